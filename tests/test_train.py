"""Training loop (training.train, training.data): learning, resume, torchrun, bad input (nh-tiny, CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nh_serve.cli import main as cli_main
from nh_serve.core.config import COUNT_HISTORY
from nh_serve.data.history import ema_rates
from nh_serve.data.session import write_session
from nh_serve.data.synth import make_session, write_synthetic_sessions
from nh_serve.data.windows import history_counts
from nh_serve.errors import InputError
from nh_serve.evaluation.score import ScoreSettings
from nh_serve.evaluation.score import run_score as score_run
from nh_serve.inference.checkpoint import content_hash, load_checkpoint
from nh_serve.inference.model_io import load_model
from training import train as train_mod
from training.data import find_sessions, load_session, sample_image_schedules, split_sessions, window_item
from training.train import load_train_config, lr_at, make_train_config, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _write_synth(
    path: Path, *, seed: int, n_units: int = 10, duration: float = 40.0, silent: bool = False
) -> Path:
    d = make_session(seed=seed, n_units=n_units, duration=duration)
    ids = list(d["unit_ids"])
    if silent:  # one extra unit that never fires
        ids.append("silent_unit")
    return write_session(
        path,
        spike_times=d["spike_times"],
        unit_index=d["unit_index"],
        unit_ids=ids,
        start=d["start"],
        end=d["end"],
        true_rates=None,
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    (root / "train").mkdir()
    (root / "val").mkdir()
    for i in range(3):
        _write_synth(root / "train" / f"s{i}.h5", seed=100 + i, silent=(i == 0))
    _write_synth(root / "val" / "v0.h5", seed=200)
    return root


def _cfg(**kw):
    base = {
        "name": "t",
        "model": "nh-tiny",
        "steps": 20,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup_steps": 2,
        "val_every": 10,
        "ckpt_every": 5,
        "val_windows": 4,
        "reference_s": 10.0,
        "seed": 0,
        "threads": 1,
    }
    base.update(kw)
    return make_train_config(base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


# ------------------------------------------------------------------------------------------ pieces


def test_lr_schedule_warmup_and_cosine():
    cfg = _cfg(steps=110, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way through the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_window_item_targets_and_history_match_hand_counts(data_dir):
    cfg = _cfg().model_config()
    s = load_session(data_dir / "train" / "s1.h5", cfg=cfg, reference_s=10.0, val_time_fraction=0.2)
    s.unit_features = np.zeros_like(s.features)
    assert s.reference == (s.start, s.start + 10.0)
    assert s.train_range[0] == pytest.approx(s.start + 10.0)
    assert s.val_range is not None and s.val_range[1] == pytest.approx(s.end - 2.0)
    c = s.start + 15.3
    item, y = window_item(s, c, cfg)
    t, u = s.times, s.units
    for unit in range(s.n_units):
        # Target: counts in 20 ms bins of [c + 1, c + 2).
        tu = t[(u == unit) & (t >= c + 1) & (t < c + 2)]
        want = np.histogram(tu, bins=c + 1 + 0.02 * np.arange(51))[0]
        np.testing.assert_array_equal(y[unit], want)
    # History: each unit's smoothed rates at the context end, from the recording start.
    want = ema_rates(t, u, n_units=s.n_units, t_eval=[c + 1.0], start=s.start, ref_rate_hz=s.ref_rate_hz,
                     taus=cfg.history_taus)[0]
    np.testing.assert_allclose(item["history_rates"].numpy(), want, rtol=1e-6)
    # A count-history model: the spikes of the 15.3 s before the context (the recording start limits its 30 s).
    v1 = cfg.replace(**COUNT_HISTORY)
    s1 = load_session(data_dir / "train" / "s1.h5", cfg=v1, reference_s=10.0, val_time_fraction=0.2)
    s1.unit_features = np.zeros_like(s1.features)
    item1, _ = window_item(s1, c, v1)
    hist = np.array([np.sum((u == k) & (t < c)) for k in range(s.n_units)])
    np.testing.assert_allclose(item1["history_rate_hz"].numpy(), hist / (c - s.start), rtol=1e-6)
    counts, dur = history_counts(t, u, n_units=s.n_units, ctx_start=c, history_s=30.0, start=s.start)
    np.testing.assert_array_equal(counts, hist)
    assert dur == pytest.approx(c - s.start)


def test_image_schedules_hide_coming_images_in_a_fraction_of_windows(tmp_path):
    cfg = make_train_config({"model": "nh-tiny", "model_overrides": {"image_dim": 32}}).model_config()
    h = np.array(sample_image_schedules(np.random.default_rng(0), 4000, cfg, dropout=0.5))
    assert np.isclose(np.mean(h == cfg.horizon_s), 0.5, atol=0.03)
    cut = h[h < cfg.horizon_s]
    np.testing.assert_allclose(cut / cfg.bin_size_s, np.round(cut / cfg.bin_size_s), atol=1e-9)  # whole bins
    assert cut.min() == 0.0 and len(np.unique(cut)) == cfg.n_bins
    assert sample_image_schedules(np.random.default_rng(0), 50, cfg, dropout=0.0) == [cfg.horizon_s] * 50
    # window_item passes exactly the images due before the schedule end, and the marker at its end
    write_synthetic_sessions(tmp_path, n_sessions=1, seed=3, duration=90.0, multimodal=True, n_units=10)
    s = load_session(tmp_path / "synth_000.h5", cfg=cfg, reference_s=30.0, val_time_fraction=0.0)
    s.unit_features = s.features.astype(np.float32)
    it = s.images[0]
    c = float(it[(it > 40.0)][0]) - 0.5  # an image 0.5 s into the context
    n_images = []
    for sched in (0.0, 0.3, 1.0):
        item, _ = window_item(s, c, cfg, image_schedule_s=sched)
        want = it[(it >= c) & (it < c + 1.0 + sched)] - c
        got = item["image_times"].numpy()
        np.testing.assert_allclose(got[:-1], want, atol=1e-5)
        assert got[-1] == pytest.approx(1.0 + sched) and item["image_values"][-1, -1] == 1.0
        n_images.append(got.size - 1)
    assert n_images[0] < n_images[2]  # the next image (0.5-1.5 s after this one) is due in the forecast


def test_split_sessions_by_whole_recordings():
    paths = [Path(f"r{i}.h5") for i in range(10)]
    tr, va, te = split_sessions(paths, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert (len(tr), len(va), len(te)) == (7, 2, 1)
    assert set(tr) | set(va) | set(te) == set(paths) and not (set(tr) & set(va)) and not (set(tr) & set(te))
    assert split_sessions(paths, val_fraction=0.2, test_fraction=0.1, seed=3) == (tr, va, te)


# ------------------------------------------------------------------------------------------ training


def test_short_run_lowers_validation_loss(data_dir, tmp_path):
    # Without the baseline offset the untrained model predicts ~5 Hz for every unit, so learning
    # each unit's rate from its activity inputs must lower the loss on an unseen recording.
    cfg = _cfg(
        steps=40,
        lr=1e-2,
        warmup_steps=5,
        val_every=20,
        ckpt_every=20,
        batch_size=8,
        model_overrides={"baseline_offset": False},
    )
    res = train(cfg, data=[data_dir / "train"], val_data=[data_dir / "val"], out=tmp_path, progress=False)
    hist = res["history"]
    assert [h["step"] for h in hist] == [0, 20, 40]
    first, last = hist[0]["val_sessions"]["loss"], hist[-1]["val_sessions"]["loss"]
    assert last < first - 0.01
    assert hist[-1]["val_sessions"]["bits_per_spike"] > hist[0]["val_sessions"]["bits_per_spike"]
    assert res["steps_done"] == 40 and res["windows_seen"] == 320
    # The checkpoints load through the serving path, with the feature norm fitted on training data.
    model, norm, ck = load_model(tmp_path / "best.safetensors")
    assert ck.training["best_step"] == res["best_step"]
    assert not np.allclose(norm.mean, 0.0)
    assert ck.training["data"]["train"][0]["name"] == "train/s0.h5"
    assert (tmp_path / "last.safetensors").is_file() and (tmp_path / "train_state.safetensors").is_file()


def test_resume_after_kill_matches_uninterrupted_run(data_dir, tmp_path):
    cfg = _cfg(steps=20, ckpt_every=5, val_every=10)
    kw = {"data": [data_dir / "train"], "val_data": [data_dir / "val"], "progress": False}
    train(cfg, out=tmp_path / "straight", **kw)
    # "Killed" after 12 steps: the last checkpoint is at step 10, steps 11-12 are lost and redone.
    stopped = train(cfg, out=tmp_path / "resumed", stop_after_steps=12, **kw)
    assert stopped["stopped"] and stopped["steps_done"] == 12
    state = load_checkpoint(tmp_path / "resumed" / "train_state.safetensors")
    assert state.training["step"] == 10
    train(cfg, out=tmp_path / "resumed", resume=True, **kw)
    a, b = (
        _weights(tmp_path / "straight" / "last.safetensors"),
        _weights(tmp_path / "resumed" / "last.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = load_checkpoint(tmp_path / "straight" / "last.safetensors").training["history"]
    hb = load_checkpoint(tmp_path / "resumed" / "last.safetensors").training["history"]
    assert ha == hb


def test_resume_refuses_a_different_config(data_dir, tmp_path):
    kw = {"data": [data_dir / "train"], "val_data": [data_dir / "val"], "progress": False, "out": tmp_path}
    train(_cfg(steps=5, ckpt_every=5, val_every=5), **kw)
    with pytest.raises(InputError, match="different training or model config"):
        train(_cfg(steps=5, ckpt_every=5, val_every=5, lr=1e-2), resume=True, **kw)


@pytest.mark.slow
def test_torchrun_two_processes_end_with_identical_weights(data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training.train",
        "--config",
        "nh-tiny-test",
        "--set",
        "steps=6",
        "--set",
        "ckpt_every=3",
        "--set",
        "val_every=6",
        "--data",
        str(data_dir / "train"),
        "--val-data",
        str(data_dir / "val"),
        "--out",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Own process group, so that a hang cannot leave worker processes behind.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish within 240 s")
    assert proc.returncode == 0, stderr[-3000:]
    ck = load_checkpoint(out / "last.safetensors")
    hashes = ck.training["rank_weight_hashes"]
    assert ck.training["world_size"] == 2 and len(hashes) == 2
    assert hashes[0] == hashes[1] == content_hash(ck.state_dict)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["windows_seen"] == 6 * 4


def test_cli_trains_and_resumes(data_dir, tmp_path, capsys):
    args = [
        "--config",
        "nh-tiny-test",
        "--set",
        "steps=4",
        "--set",
        "ckpt_every=2",
        "--set",
        "val_every=2",
        "--data",
        str(data_dir / "train"),
        "--val-data",
        str(data_dir / "val"),
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert train_mod.main(args) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "best.safetensors")
    assert ck.provenance["command"].startswith("python -m training.train --config nh-tiny-test")
    assert train_mod.main([*args, "--resume"]) == 0  # already finished: nothing left to do


# ------------------------------------------------------------------------------------------ bad input


def test_bad_data_folders(tmp_path):
    cfg = _cfg()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no session files"):
        train(cfg, data=[tmp_path / "empty"], out=tmp_path / "o", progress=False)
    with pytest.raises(InputError, match="does not exist"):
        find_sessions([tmp_path / "nope"])
    (tmp_path / "short").mkdir()
    _write_synth(tmp_path / "short" / "a.h5", seed=1, duration=11.0)
    with pytest.raises(InputError, match=r"a\.h5: is 11 s long; training needs the 10 s reference window"):
        train(cfg, data=[tmp_path / "short"], out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # nothing started


def test_all_units_silent_in_reference_is_an_error(tmp_path):
    p = write_session(
        tmp_path / "late.h5",
        spike_times=np.array([20.0, 21.0, 30.0]),
        unit_index=np.array([0, 1, 0]),
        unit_ids=["a", "b"],
        start=0.0,
        end=40.0,
    )
    with pytest.raises(InputError, match="no unit fires in the reference window"):
        load_session(p, cfg=_cfg().model_config(), reference_s=10.0)


def test_silent_unit_is_fine(data_dir):
    s = load_session(data_dir / "train" / "s0.h5", cfg=_cfg().model_config(), reference_s=10.0)
    assert s.unit_ids[-1] == "silent_unit" and np.all(np.isfinite(s.features))
    assert s.ref_rate_hz[-1] == 0.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model_overrides": {"dim": 30, "heads": 4, "dim_head": 0}}, "model_overrides do not give a valid"),
        ({"warmup_steps": 20}, r"warmup_steps \(20\) must be in \[0, steps = 20\)"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"reference_s": 5.0}, "reference_s must be >= 10"),
        ({"model": "nh-huge"}, "is not one of"),
        ({"stepz": 3}, "unknown field"),
        ({"steps": 2.5}, "steps must be of type int, got 2.5"),
        ({"head_ablation": "nope"}, "head_ablation must be one of"),
        ({"image_schedule_dropout": 1.5}, r"image_schedule_dropout must be in \[0, 1\]"),
    ],
)
def test_inconsistent_configs_are_input_errors(override, message):
    with pytest.raises(InputError, match=message):
        _cfg(**override)


def test_named_config_and_overrides():
    cfg = load_train_config("nh-tiny-test", ["steps=7", "model_overrides.unit_embedding_mode=random"])
    assert cfg.steps == 7 and cfg.model_config().unit_embedding_mode == "random"
    with pytest.raises(InputError, match="neither a file nor a named config"):
        load_train_config("no-such-config")
    for name in ("nh-small-default", "nh-small-short", "nh-tiny-test"):
        load_train_config(name)  # every shipped config is valid


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = train_mod.main(
        ["--config", "nh-tiny-test", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("train: error: --data: folder") and "Traceback" not in err


def test_a_training_recording_is_marked_in_sample_by_eval_score_and_the_report(data_dir, tmp_path):
    """The checkpoint knows its recordings by their spikes: eval and score mark them in-sample, in
    the JSON and the HTML, and leave them out of every held-out summary; it also carries the
    univariate GLM fitted on them."""
    cfg = _cfg(steps=4, val_every=4, ckpt_every=4)
    train(cfg, data=[data_dir / "train"], val_data=[data_dir / "val"], out=tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "last.safetensors"
    meta = load_model(ckpt)[2].training
    assert meta["baselines"]["univariate_glm"]["weights"] and len(meta["data"]["train"][0]["spikes_sha256"]) == 16
    # a renamed copy of a training recording is still recognised by its spikes
    copy = tmp_path / "renamed.h5"
    shutil.copy(data_dir / "train" / "s1.h5", copy)
    held = data_dir / "val" / "v0.h5"
    out = tmp_path / "q.json"
    assert cli_main(["eval", "--checkpoint", str(ckpt), str(copy), str(held), "--json", str(out), "--no-progress",
                     "--max-windows", "6"]) == 0
    res = json.loads(out.read_text())
    marks = {r["recording"]: r["in_sample"]["model"] for r in res["recordings"]}
    assert marks == {f"{tmp_path.name}/renamed.h5": "training", "val/v0.h5": "validation"}
    assert res["summary"]["held_out_recordings"] == [] and "synthetic_mean" not in res["summary"]
    assert res["recordings"][0]["univariate_glm_weights"] == "checkpoint"
    report = score_run([copy], out=tmp_path / "scores", checkpoint=ckpt,
                       settings=ScoreSettings(reference_s=10.0, max_windows=6, backend="torch", plots=False),
                       progress=False)
    doc = json.loads((report.out / "scores.json").read_text())
    assert doc["recordings"][0]["in_sample"] == "training" and doc["summary"]["held_out"] == 0
    html = (report.out / "report.html").read_text()
    assert "IN-SAMPLE (training)" in html and "no held-out figure" in html
