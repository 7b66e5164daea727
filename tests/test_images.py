"""``nh-serve embed-images``: CLIP embeddings with a small open_clip model (ViT-S-32), no download."""

from __future__ import annotations

import numpy as np
import pytest

from nh_serve.data.session import open_session, write_session
from nh_serve.errors import InputError
from nh_serve.ingest.cli import run
from nh_serve.ingest.images import embed_images, load_presentations, to_pil

MODEL = "ViT-S-32"  # the smallest ViT in open_clip's list: 22.6 M image-tower parameters


def make_session(path):
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0.0, 10.0, 300))
    write_session(
        path,
        spike_times=times,
        unit_index=rng.integers(0, 3, 300),
        unit_ids=np.array(["a", "b", "c"]),
        start=0.0,
        end=10.0,
        units_extra={"depth": np.array([1.0, 2.0, 3.0])},
        behavior=(np.arange(0.0, 10.0, 0.5), np.arange(20.0).reshape(-1, 1)),
        trials={"start": np.array([1.0, 2.0, 3.0, 4.0]), "end": np.array([1.5, 2.5, 3.5, 4.5]),
                "frame": np.array([2.0, np.nan, 0.0, 2.0])},
        true_rates=(np.full((500, 3), 5.0, dtype=np.float32), 0.02),
        provenance={"source": {"format": "test"}},
    )
    return times


def make_frames(folder):
    """Three 40x48 frames: grey .npy, colour .npy (floats in [0, 1]) and a .png."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(1)
    np.save(folder / "cat.npy", rng.integers(0, 256, (40, 48), dtype=np.uint8))
    np.save(folder / "dog.npy", rng.random((40, 48, 3)))
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "owl.png")


@pytest.mark.slow
def test_embeddings_use_the_weights_file_and_keep_the_session(tmp_path):
    import open_clip
    import torch

    session = tmp_path / "s.h5"
    spike_times = make_session(session)
    make_frames(tmp_path / "frames")
    (tmp_path / "pres.csv").write_text(
        "start_time,image_name,stop_time\n"
        "6.0,owl.png,6.5\n"  # a name with a suffix matches the frame's stem
        "1.0,cat,1.5\n"
        "2.0,dog,2.5\n"
        "3.0,,3.5\n"  # no frame: skipped
        "4.0,cat,4.5\n"
    )
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "clip.pt")

    out = tmp_path / "with_images.h5"
    run(["embed-images", "--frames", str(tmp_path / "frames"), "--presentations", str(tmp_path / "pres.csv"),
         "--session", str(session), "--out", str(out), "--model", MODEL, "--weights", str(tmp_path / "clip.pt")])

    frames = {"cat": np.load(tmp_path / "frames" / "cat.npy"), "dog": np.load(tmp_path / "frames" / "dog.npy")}
    from PIL import Image

    frames["owl"] = np.asarray(Image.open(tmp_path / "frames" / "owl.png"))
    with torch.no_grad():
        ref = {k: model.encode_image(preprocess(to_pil(v, k))[None]).float()[0].numpy() for k, v in frames.items()}
    ref = {k: v / np.linalg.norm(v) for k, v in ref.items()}

    with open_session(out) as s:
        t, emb = s.image_events(s.start, s.end)
        assert t.tolist() == [1.0, 2.0, 4.0, 6.0]  # sorted by time, blank row dropped
        assert emb.shape == (4, 384) and s.image_dim == 384
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        for row, key in zip(emb, ["cat", "dog", "cat", "owl"]):
            np.testing.assert_allclose(row, ref[key], atol=2e-5)
        assert np.abs(emb[0] @ emb[1]) < 0.999  # different frames, different embeddings
        # everything else is kept
        st, su = s.spikes(0, 10)
        np.testing.assert_array_equal(st, spike_times)
        assert s.unit_ids.tolist() == ["a", "b", "c"]
        assert s.units_table["depth"].tolist() == [1.0, 2.0, 3.0]
        assert s.behavior(0, 10)[1][:, 0].tolist() == list(np.arange(20.0))
        assert s.trials["start"].tolist() == [1.0, 2.0, 3.0, 4.0]
        bins, rates = s.true_rates(0, 10)
        assert rates.shape == (500, 3) and bins[1] == pytest.approx(0.02)
        prov = s.provenance
    assert prov["source"] == {"format": "test"}
    info = prov["image_embeddings"]
    assert info["model"] == MODEL and info["weights"] == "clip.pt" and len(info["weights_sha256"]) == 64
    assert info["n_presentations"] == 4 and info["n_frames_embedded"] == 3 and info["rows_without_frame_skipped"] == 1
    with open_session(session) as s:
        assert s.image_dim == 0  # --out left the input alone


def test_random_weights_stack_and_session_trials_in_place(tmp_path):
    session = tmp_path / "s.h5"
    make_session(session)
    stack = np.random.default_rng(2).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    np.save(tmp_path / "stack.npy", stack)
    # no --presentations: the session's trials (start, frame) are used; frame NaN is skipped
    embed_images(frames=tmp_path / "stack.npy", session=session, model_name=MODEL, random_weights=True)
    with open_session(session) as s:
        t, emb = s.image_events(0, 10)
        assert t.tolist() == [1.0, 3.0, 4.0]
        np.testing.assert_array_equal(emb[0], emb[2])  # frame 2 shown twice, embedded once
        assert not np.allclose(emb[0], emb[1])
        assert s.provenance["image_embeddings"]["weights"].startswith("random")
        assert s.n_units == 3 and s.trials is not None


def test_inputs_that_do_not_fit(tmp_path):
    session = tmp_path / "s.h5"
    make_session(session)
    make_frames(tmp_path / "frames")
    out = tmp_path / "o.h5"
    base = ["embed-images", "--frames", str(tmp_path / "frames"), "--session", str(session), "--out", str(out),
            "--model", MODEL]
    (tmp_path / "p.csv").write_text("start_time,frame\n1.0,cat\n2.0,zebra\n")
    with pytest.raises(InputError, match=r"1 presentation\(s\) show frames that are not in .*zebra"):
        run(base + ["--presentations", str(tmp_path / "p.csv"), "--random-weights"])
    (tmp_path / "late.csv").write_text("start_time,frame\n1.0,cat\n12.0,dog\n")
    with pytest.raises(InputError, match="starts at 12 s, outside the session's extent"):
        run(base + ["--presentations", str(tmp_path / "late.csv"), "--random-weights"])
    (tmp_path / "nocol.csv").write_text("start_time,color\n1.0,red\n")
    with pytest.raises(InputError, match="no frame column"):
        run(base + ["--presentations", str(tmp_path / "nocol.csv"), "--random-weights"])
    (tmp_path / "ok.csv").write_text("start_time,frame\n1.0,cat\n")
    with pytest.raises(InputError, match="--weights: pass a local CLIP checkpoint"):
        run(base + ["--presentations", str(tmp_path / "ok.csv")])
    with pytest.raises(InputError, match="--weights .*missing.pt: not found"):
        run(base + ["--presentations", str(tmp_path / "ok.csv"), "--weights", str(tmp_path / "missing.pt")])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot load it into ViT-S-32"):
        run(base + ["--presentations", str(tmp_path / "ok.csv"), "--weights", str(tmp_path / "junk.pt")])
    with pytest.raises(InputError, match="--frames .*nothing: not found"):
        embed_images(frames=tmp_path / "nothing", session=session, presentations=tmp_path / "ok.csv",
                     model_name=MODEL, random_weights=True)
    with pytest.raises(InputError, match="file not found"):
        embed_images(frames=tmp_path / "frames", session=tmp_path / "none.h5", presentations=tmp_path / "ok.csv",
                     model_name=MODEL, random_weights=True)
    assert not out.exists()
    with open_session(session) as s:
        assert s.image_dim == 0


def test_presentations_from_npz_and_frame_keys(tmp_path):
    np.savez(tmp_path / "p.npz", start_time=np.array([3.0, 1.0, 2.0]), frame=np.array([5.0, -1.0, 7.0]))
    pres = load_presentations(tmp_path / "p.npz")
    assert pres.times.tolist() == [2.0, 3.0] and pres.frames == ["7", "5"] and pres.skipped == 1


def test_to_pil_pixel_rules():
    assert np.asarray(to_pil(np.full((4, 4), 0.5), "f"))[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(to_pil(np.full((3, 4, 4), 1000, dtype=np.uint16), "u"))[0, 0].tolist() == [3, 3, 3]
    with pytest.raises(InputError, match="frame bad: must be"):
        to_pil(np.zeros((2, 2, 2, 2)), "bad")
