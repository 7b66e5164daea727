"""Tests for nh_serve.inference.checkpoint: round trips, hashing, and every damaged-file case."""

from __future__ import annotations

import datetime
import hashlib
import json
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from nh_serve import util
from nh_serve.errors import CheckpointError, InputError
from nh_serve.inference import checkpoint as ckpt_mod
from nh_serve.inference.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    content_hash,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    short_hash,
)
from nh_serve.inference.model_io import check_state_dict

N_FEATURES = 33


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    w[0, 0] = float("nan")
    w[0, 1] = -0.0
    return {
        "enc.weight": w,  # float32, with NaN and -0.0 that must survive bit for bit
        "enc.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "head.scale": torch.tensor([1.0, -2.5, 3e-39], dtype=torch.bfloat16),
        "norm.num_batches_tracked": torch.tensor(7, dtype=torch.int64),  # 0-d int64 buffer
        "tok.index": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def _norm() -> dict:
    return {"mean": [0.1 * i for i in range(N_FEATURES)], "std": [1.0 + 0.01 * i for i in range(N_FEATURES)]}


def _meta() -> dict:
    return dict(
        config={"d_model": 64, "n_bins": 50, "bin_size": 0.02, "dims": [1, 2, 3], "name": "tiny-ü"},
        feature_norm=_norm(),
        training={"sessions": ["a", "b"], "n_units": 120, "hours": 1.5},
        metrics={"val": {"bits_per_spike": 0.123456789012345, "r2": None}},
        provenance={"command": "nh-serve train --config tiny"},
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Tensor reinterpreted as integers of the same width, for bitwise comparison."""
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    return t.contiguous().reshape(-1).view(width)


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _header(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


def _rewrite_doc(path, dst, edit) -> None:
    """Copy checkpoint ``path`` to ``dst`` with its nh_serve document changed by ``edit(doc)``."""
    tensors = safetensors.torch.load_file(path)
    _, header = _header(path)
    doc = json.loads(header["__metadata__"]["nh_serve"])
    edit(doc)
    safetensors.torch.save_file(tensors, dst, metadata={"nh_serve": json.dumps(doc)})


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "model.safetensors"
    ck = save_checkpoint(path, state_dict=_state_dict(), **_meta())
    return path, ck


# ----------------------------------------------------------------------------- round trip


def test_round_trip_is_bitwise_and_metadata_equal(saved):
    path, ck = saved
    loaded = load_checkpoint(path)
    assert isinstance(loaded, Checkpoint)
    _assert_bitwise_equal(loaded.state_dict, _state_dict())
    _assert_bitwise_equal(ck.state_dict, _state_dict())
    assert list(loaded.state_dict) == sorted(_state_dict())
    meta = _meta()
    assert loaded.config == meta["config"]
    assert loaded.feature_norm == meta["feature_norm"]
    assert loaded.training == meta["training"]
    assert loaded.metrics == meta["metrics"]
    assert loaded.metrics["val"]["bits_per_spike"] == 0.123456789012345  # floats survive exactly
    assert loaded.provenance["command"] == "nh-serve train --config tiny"
    assert loaded.format_version == FORMAT_VERSION == 1
    assert loaded.content_hash == ck.content_hash == content_hash(_state_dict())
    assert loaded.short_hash == ck.content_hash[:12]
    assert loaded.path == path
    assert loaded.metadata() == ck.metadata() == read_metadata(path)
    assert "hash=" + ck.short_hash in repr(ck)


def test_provenance_defaults_and_caller_keys(tmp_path):
    ck = save_checkpoint(
        tmp_path / "m.safetensors",
        state_dict={"w": torch.ones(2)},
        config={},
        feature_norm=_norm(),
        provenance={"torch_version": "pinned", "git": "abc"},
    )
    prov = load_checkpoint(tmp_path / "m.safetensors").provenance
    assert prov == ck.provenance
    assert prov["torch_version"] == "pinned" and prov["git"] == "abc"  # caller's keys win
    assert prov["safetensors_version"] == safetensors.__version__
    assert set(prov) >= {"nh_serve_version", "python_version", "created", "command"}
    created = datetime.datetime.fromisoformat(prov["created"])
    assert created.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 600
    assert load_checkpoint(tmp_path / "m.safetensors").training == {}


def test_metadata_conversion_of_numpy_tuples_and_to_dict_objects(tmp_path):
    class Norm:
        def to_dict(self):
            return {"mean": np.zeros(3), "std": np.ones(3, dtype=np.float32)}

    ck = save_checkpoint(
        tmp_path / "m.safetensors",
        state_dict={"w": torch.ones(1)},
        config={
            "dims": (4, np.int64(5)),
            "flag": np.bool_(True),
            "lr": np.float32(0.5),
            "t": torch.tensor([1, 2]),
        },
        feature_norm=Norm(),
    )
    expect = {"dims": [4, 5], "flag": True, "lr": 0.5, "t": [1, 2]}
    assert ck.config == expect
    assert ck.feature_norm == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    assert load_checkpoint(ck.path).config == expect
    assert type(load_checkpoint(ck.path).config["dims"][1]) is int


def test_saved_file_is_plain_safetensors(saved):
    path, ck = saved
    plain = safetensors.torch.load_file(path)
    _assert_bitwise_equal(plain, _state_dict())
    with safe_open(path, framework="pt") as f:
        doc = json.loads(f.metadata()["nh_serve"])
    assert doc["content_hash"] == ck.content_hash
    assert doc["config"] == _meta()["config"]


def test_saved_tensors_are_a_snapshot_and_any_layout_is_accepted(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {"t": base.t(), "tied_a": base, "tied_b": base, "row": base[1]}  # non-contiguous and shared memory
    ck = save_checkpoint(tmp_path / "m.safetensors", state_dict=sd, config={}, feature_norm=_norm())
    base += 100  # later training steps must not change what was saved
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    ref = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for sdict in (ck.state_dict, loaded.state_dict):
        assert torch.equal(sdict["t"], ref.t())
        assert torch.equal(sdict["tied_a"], ref) and torch.equal(sdict["tied_b"], ref)
        assert torch.equal(sdict["row"], ref[1])
    assert loaded.content_hash == content_hash(
        {"t": ref.t().contiguous(), "tied_a": ref, "tied_b": ref, "row": ref[1]}
    )


def test_map_location(saved):
    path, _ = saved
    loaded = load_checkpoint(path, map_location=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in loaded.state_dict.values())
    with pytest.raises(InputError, match="map_location"):
        load_checkpoint(path, map_location="not-a-device")


def test_save_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "m.safetensors"
    save_checkpoint(path, state_dict={"w": torch.ones(1)}, config={}, feature_norm=_norm())
    assert load_checkpoint(path).state_dict["w"].item() == 1.0


# ----------------------------------------------------------------------------- hashing


def _reference_hash(sd: dict[str, np.ndarray]) -> str:
    """Independent implementation of the documented scheme, over numpy arrays."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
    h = hashlib.sha256(b"nh-serve/weights/v1\n")
    for name in sorted(sd):
        a = np.ascontiguousarray(sd[name])
        desc = json.dumps([name, codes[a.dtype], list(a.shape)], separators=(",", ":")).encode()
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        h.update(len(desc).to_bytes(8, "little") + desc + len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


def test_hash_matches_documented_scheme():
    a = np.array([[1.0, 2.5], [-3.0, 0.125]], dtype=np.float32)
    b = np.array([7, -1, 2**40], dtype=np.int64)
    got = content_hash({"b": torch.from_numpy(b), "a": torch.from_numpy(a)})
    assert got == _reference_hash({"a": a, "b": b})
    assert len(got) == 64 and short_hash(got) == got[:12]


def test_hash_is_order_independent_and_sensitive_to_every_part():
    sd = _state_dict()
    h = content_hash(sd)
    assert content_hash(dict(reversed(list(sd.items())))) == h
    assert content_hash({k: v.clone() for k, v in sd.items()}) == h

    def changed(**edits):
        out = {k: v.clone() for k, v in sd.items()}
        out.update(edits)
        return content_hash(out)

    w = sd["enc.weight"].clone()
    w[5, 4] = torch.nextafter(w[5, 4], torch.tensor(float("inf")))  # one ulp
    assert changed(**{"enc.weight": w}) != h
    assert changed(**{"enc.weight": sd["enc.weight"].reshape(5, 6)}) != h  # same bytes, new shape
    assert changed(**{"tok.index": sd["tok.index"].view(torch.float64)}) != h  # same bytes, new dtype
    renamed = dict(sd)
    renamed["enc.weight2"] = renamed.pop("enc.weight")
    assert content_hash(renamed) != h
    # moving bytes between adjacent tensors must change the hash (lengths are framed)
    assert content_hash({"a": torch.ones(2), "b": torch.ones(3)}) != content_hash(
        {"a": torch.ones(3), "b": torch.ones(2)}
    )


# ----------------------------------------------------------------------------- read_metadata


def test_read_metadata_summary(saved):
    path, ck = saved
    meta = read_metadata(path)
    assert meta["content_hash"] == ck.content_hash and meta["short_hash"] == ck.short_hash
    assert meta["format_version"] == 1
    assert meta["config"] == _meta()["config"] and meta["feature_norm"] == _norm()
    assert meta["tensors"]["enc.bias"] == {"dtype": "bfloat16", "shape": [5]}
    assert meta["tensors"]["norm.num_batches_tracked"] == {"dtype": "int64", "shape": []}
    assert list(meta["tensors"]) == sorted(_state_dict())
    assert meta["n_elements"] == 30 + 5 + 3 + 1 + 12 + 3 + 0
    meta["config"]["d_model"] = -1  # a fresh copy every time
    assert read_metadata(path)["config"]["d_model"] == 64


def test_read_metadata_reads_only_the_header(saved, monkeypatch):
    path, _ = saved
    n, _ = _header(path)
    counted = []

    class CountingFile:
        def __init__(self, f):
            self._f = f

        def read(self, size=-1):
            data = self._f.read(size)
            counted.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self._f, name)

    real_open = open
    monkeypatch.setattr(ckpt_mod, "open", lambda *a, **k: CountingFile(real_open(*a, **k)), raising=False)
    read_metadata(path)
    assert 0 < sum(counted) <= 8 + n
    counted.clear()
    load_checkpoint(path)
    assert sum(counted) == path.stat().st_size


def test_read_metadata_ignores_tensor_bytes_but_not_truncation(saved, tmp_path):
    path, ck = saved
    n, _ = _header(path)
    raw = bytearray(path.read_bytes())
    raw[8 + n :] = bytes(len(raw) - 8 - n)  # zero every tensor byte, same size
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(bytes(raw))
    assert read_metadata(garbled)["content_hash"] == ck.content_hash  # header intact: metadata readable
    with pytest.raises(CheckpointError, match="weights are corrupt"):
        load_checkpoint(garbled)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        read_metadata(cut)  # a short file is reported even without reading tensor data


# ----------------------------------------------------------------------------- damaged files


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        read_metadata(tmp_path / "nope.safetensors")
    save_checkpoint(
        tmp_path / "m.safetensors", state_dict={"w": torch.ones(1)}, config={}, feature_norm=_norm()
    )
    with pytest.raises(CheckpointError, match=r"is a directory \(it contains m.safetensors\)"):
        load_checkpoint(tmp_path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    for fn in (load_checkpoint, read_metadata):
        with pytest.raises(CheckpointError, match="empty"):
            fn(p)


def test_truncated_at_many_points(saved, tmp_path):
    path, _ = saved
    raw = path.read_bytes()
    n, _ = _header(path)
    cuts = [1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, (8 + n + len(raw)) // 2, len(raw) - 1]
    for cut in cuts:
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(raw[:cut])
        for fn in (load_checkpoint, read_metadata):
            with pytest.raises(CheckpointError, match="truncated") as exc:
                fn(p)
            assert str(p) in str(exc.value) and "again" in str(exc.value)


def test_flipped_tensor_bytes_fail_the_hash(saved, tmp_path):
    path, ck = saved
    raw = path.read_bytes()
    n, _ = _header(path)
    data_len = len(raw) - 8 - n
    for pos in sorted({8 + n, 8 + n + data_len // 3, 8 + n + data_len // 2, len(raw) - 1}):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        p = tmp_path / "flip.safetensors"
        p.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match=f"weights are corrupt.*records {ck.short_hash}"):
            load_checkpoint(p)


@pytest.mark.parametrize("mask", [0x01, 0xFF])
def test_every_flipped_header_byte_is_a_clean_error(saved, tmp_path, mask):
    """No damaged byte in the length field or header changes what loads, or leaks another error type.

    A flip either raises CheckpointError or leaves the parsed checkpoint identical (e.g. the float
    0.30000000000000004 written as ...05 parses to the same double).
    """
    path, ck = saved
    raw = path.read_bytes()
    n, _ = _header(path)
    p = tmp_path / "flip.safetensors"
    detected = 0
    for pos in range(8 + n):
        bad = bytearray(raw)
        bad[pos] ^= mask
        p.write_bytes(bytes(bad))
        try:
            loaded = load_checkpoint(p)
        except CheckpointError:
            detected += 1
            continue
        assert loaded.metadata() == ck.metadata(), (
            f"byte {pos} (mask {mask:#x}) changed the metadata unnoticed"
        )
        _assert_bitwise_equal(loaded.state_dict, ck.state_dict)
    assert detected >= 8 + n - 5


def test_flipped_metadata_value_is_caught_by_metadata_hash(saved, tmp_path):
    path, _ = saved
    raw = path.read_bytes()
    pos = raw.index(b"tiny-")
    bad = bytearray(raw)
    bad[pos] = ord("T")
    p = tmp_path / "edited.safetensors"
    p.write_bytes(bytes(bad))
    for fn in (load_checkpoint, read_metadata):
        with pytest.raises(CheckpointError, match="metadata is corrupt"):
            fn(p)


def test_pickled_torch_files_are_refused_without_unpickling(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(3)}, tmp_path / "zip.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "raw.bin").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    payloads = ["zip.pt", "legacy.pt", "raw.bin"]

    def no_unpickling(*a, **k):
        raise AssertionError("tried to unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    for name in payloads:
        for fn in (load_checkpoint, read_metadata):
            with pytest.raises(CheckpointError, match="looks like a pickled PyTorch file.*only .safetensors"):
                fn(tmp_path / name)


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(1)
    for i, size in enumerate([3, 8, 9, 100, 10_000]):
        p = tmp_path / f"random{i}.safetensors"
        p.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError, match="not a safetensors file|too short"):
            load_checkpoint(p)
    p = tmp_path / "text.safetensors"
    p.write_text("hello, this is not a checkpoint at all\n")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(p)


def test_trailing_bytes(saved, tmp_path):
    path, _ = saved
    p = tmp_path / "long.safetensors"
    p.write_bytes(path.read_bytes() + b"\x00" * 5)
    with pytest.raises(CheckpointError, match="5 unexpected bytes after the tensor data"):
        load_checkpoint(p)


def test_plain_safetensors_without_our_metadata(tmp_path):
    p = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, p)
    with pytest.raises(
        CheckpointError, match="no metadata.*plain safetensors file, not an nh-serve checkpoint"
    ):
        load_checkpoint(p)
    safetensors.torch.save_file({"w": torch.ones(2)}, p, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no 'nh_serve' metadata \\(metadata keys: 'format'\\)"):
        read_metadata(p)


@pytest.mark.parametrize(
    ("value", "match"),
    [("{not json", "'nh_serve' metadata is not valid JSON"), ("[1, 2]", "not a JSON object")],
)
def test_non_json_metadata(tmp_path, value, match):
    p = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, p, metadata={"nh_serve": value})
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(p)


def test_newer_format_version_says_upgrade(saved, tmp_path):
    path, _ = saved
    p = tmp_path / "v2.safetensors"
    _rewrite_doc(path, p, lambda d: d.update(format_version=FORMAT_VERSION + 1, content_hash="new-scheme"))
    for fn in (load_checkpoint, read_metadata):
        with pytest.raises(
            CheckpointError, match=r"newer nh-serve \(checkpoint format version 2.*upgrade nh-serve"
        ):
            fn(p)


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True])
def test_unknown_format_version(saved, tmp_path, version):
    path, _ = saved
    p = tmp_path / "v.safetensors"
    _rewrite_doc(path, p, lambda d: d.update(format_version=version))
    with pytest.raises(CheckpointError, match="unknown checkpoint format version"):
        load_checkpoint(p)


def test_missing_format_version_and_fields(saved, tmp_path):
    path, _ = saved
    p = tmp_path / "x.safetensors"
    _rewrite_doc(path, p, lambda d: d.pop("format_version"))
    with pytest.raises(CheckpointError, match="no format_version"):
        load_checkpoint(p)
    _rewrite_doc(path, p, lambda d: d.pop("config"))
    with pytest.raises(CheckpointError, match="'config' is missing"):
        load_checkpoint(p)
    _rewrite_doc(path, p, lambda d: d.pop("metadata_hash"))
    with pytest.raises(CheckpointError, match="metadata_hash is missing"):
        load_checkpoint(p)


def test_feature_norm_checked_on_load(saved, tmp_path):
    path, _ = saved

    def break_norm(doc):
        doc["feature_norm"]["std"][3] = 0.0
        doc["metadata_hash"] = ckpt_mod.metadata_hash(doc)

    p = tmp_path / "norm.safetensors"
    _rewrite_doc(path, p, break_norm)
    with pytest.raises(CheckpointError, match=r"\['std'\]\[3\] is 0.0"):
        load_checkpoint(p)


def test_header_offsets_inconsistent_with_shape(tmp_path):
    """A hand-made header whose shape does not match its byte range."""
    header = {
        "__metadata__": {"nh_serve": "{}"},
        "w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
    }
    hb = json.dumps(header).encode()
    p = tmp_path / "h.safetensors"
    p.write_bytes(len(hb).to_bytes(8, "little") + hb + bytes(8))
    with pytest.raises(CheckpointError, match="no format_version"):
        load_checkpoint(p)  # metadata is checked first
    header["__metadata__"]["nh_serve"] = json.dumps({"format_version": 1})
    hb = json.dumps(header).encode()
    p.write_bytes(len(hb).to_bytes(8, "little") + hb + bytes(8))
    with pytest.raises(
        CheckpointError, match=r"tensor 'w' \(F32 \(3,\)\) needs 12 bytes but its data offsets span 8"
    ):
        load_checkpoint(p)


# ----------------------------------------------------------------------------- save validation


def test_save_rejects_bad_input(tmp_path):
    p = tmp_path / "m.safetensors"
    ok = dict(state_dict={"w": torch.ones(1)}, config={}, feature_norm=_norm())
    cases = [
        (dict(ok, state_dict={}), "state_dict is empty"),
        (dict(ok, state_dict={"w": [1.0]}), r"state_dict\['w'\] is a list, not a torch.Tensor"),
        (dict(ok, state_dict={"__metadata__": torch.ones(1)}), "reserved"),
        (dict(ok, state_dict={"w": torch.ones(2).to_sparse()}), "sparse"),
        (dict(ok, metrics={"val": {"r2": float("nan")}}), r"metrics\['val'\]\['r2'\] is nan.*store None"),
        (dict(ok, config={1: "a"}), "keys must be str"),
        (dict(ok, config={"p": tmp_path}), r"config\['p'\] is a .*Path"),
        (dict(ok, config=[1, 2]), "config must be a dict"),
        (dict(ok, feature_norm={"mean": [0.0, 1.0], "std": [1.0]}), "2 means but 1 stds"),
        (
            dict(ok, feature_norm={"mean": [0.0], "std": [0.0]}),
            r"\['std'\]\[0\] is 0.0; every std must be > 0",
        ),
        (dict(ok, feature_norm={"mean": [0.0]}), r"\['std'\] must be a non-empty list"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            save_checkpoint(p, **kwargs)
        assert not p.exists()
    with pytest.raises(InputError, match="is a directory"):
        save_checkpoint(tmp_path, **ok)


# ----------------------------------------------------------------------------- atomic writes


def _dir_listing(path):
    return sorted(q.name for q in path.parent.iterdir())


def test_failed_write_leaves_destination_untouched(saved, monkeypatch):
    path, old = saved
    before = path.read_bytes()
    listing = _dir_listing(path)

    def half_then_fail(f, blob):
        f.write(blob[: len(blob) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(util, "_write_all", half_then_fail)
    with pytest.raises(CheckpointError, match="No space left on device.*nothing was written"):
        save_checkpoint(path, state_dict={"w": torch.zeros(1000)}, config={}, feature_norm=_norm())
    assert path.read_bytes() == before
    assert _dir_listing(path) == listing  # no temporary file left behind
    assert load_checkpoint(path).content_hash == old.content_hash


def test_interrupted_write_and_failed_rename(tmp_path, monkeypatch):
    path = tmp_path / "new.safetensors"
    kwargs = dict(state_dict={"w": torch.zeros(10)}, config={}, feature_norm=_norm())

    def interrupted(f, blob):
        f.write(blob[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(util, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, **kwargs)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def failing_replace(src, dst):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(util.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="Permission denied"):
        save_checkpoint(path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_whole_file(saved):
    path, old = saved
    new = save_checkpoint(
        path, state_dict={"w": torch.full((2,), 3.0)}, config={"v": 2}, feature_norm=_norm()
    )
    loaded = load_checkpoint(path)
    assert loaded.content_hash == new.content_hash != old.content_hash
    assert list(loaded.state_dict) == ["w"] and loaded.config == {"v": 2}
    assert _dir_listing(path) == ["model.safetensors"]


# ----------------------------------------------------------------------------- check_state_dict


def test_check_state_dict_accepts_matching_weights():
    sd = _state_dict()
    check_state_dict({k: (v.shape, v.dtype) for k, v in sd.items()}, sd)
    check_state_dict(sd, sd)  # tensors work as specs too
    # float32 vs bfloat16 is fine (load_state_dict casts); dtype None skips the check
    check_state_dict({"enc.bias": ((5,), torch.float32)}, {"enc.bias": sd["enc.bias"]})
    check_state_dict({"x": ((2,), None)}, {"x": torch.ones(2, dtype=torch.int64)})


def test_check_state_dict_reports_problems_by_name():
    expected = {
        "enc.weight": ((6, 5), torch.float32),
        "enc.bias": ((5,), torch.float32),
        "head.w": ((4, 4), torch.float32),
        "norm.num_batches_tracked": ((), torch.int64),
    }
    got = {
        "enc.weight": torch.zeros(6, 4),
        "enc.bias": torch.zeros(5),
        "old.proj": torch.zeros(2),
        "norm.num_batches_tracked": torch.tensor(1.0),
    }
    with pytest.raises(CheckpointError) as exc:
        check_state_dict(expected, got, source="checkpoint model.safetensors")
    msg = str(exc.value)
    assert "1 missing, 1 unexpected, 2 with the wrong shape or dtype" in msg
    assert "missing 'head.w'" in msg and "unexpected 'old.proj'" in msg
    assert "'enc.weight' has shape (6, 4) in the checkpoint model.safetensors but (6, 5) in the model" in msg
    assert "'norm.num_batches_tracked' is float32 in the checkpoint model.safetensors but int64" in msg
    assert "enc.bias" not in msg
    assert "different model configuration" in msg


def test_check_state_dict_lists_only_the_first_few():
    expected = {f"layer{i}.w": ((2,), torch.float32) for i in range(10)}
    with pytest.raises(CheckpointError, match=r"10 missing\).*layer5.w'; \.\.\. and 4 more") as exc:
        check_state_dict(expected, {})
    assert "layer6.w" not in str(exc.value)
    with pytest.raises(InputError, match="must be \\(shape, dtype\\)"):
        check_state_dict({"w": 3}, {"w": torch.ones(1)})


# ----------------------------------------------------------------------------- sizes before building


def _model_checkpoint_with_config(tmp_path, name, **changes):
    """A real nh-tiny checkpoint whose stored config is edited (metadata hash recomputed, as an attacker would)."""
    from nh_serve.core.config import get_config
    from nh_serve.core.model import NeuroHorizon
    from nh_serve.data.features import FeatureNorm
    from nh_serve.inference.checkpoint_header import metadata_hash
    from nh_serve.inference.model_io import save_model

    torch.manual_seed(0)
    src = tmp_path / "tiny.safetensors"
    m = NeuroHorizon(get_config("nh-tiny"))
    save_model(src, m, feature_norm=FeatureNorm.identity(m.cfg.n_features))

    def edit(doc):
        doc["config"].update(changes)
        doc.pop("metadata_hash", None)
        doc["metadata_hash"] = metadata_hash(doc)

    dst = tmp_path / name
    _rewrite_doc(src, dst, edit)
    return dst


def test_huge_config_is_refused_before_any_model_is_built(tmp_path, monkeypatch):
    from nh_serve.inference import model_io

    built = []
    real = model_io.NeuroHorizon

    def spy(cfg):
        built.append(str(torch.get_default_device()))
        return real(cfg)

    monkeypatch.setattr(model_io, "NeuroHorizon", spy)
    huge = _model_checkpoint_with_config(tmp_path, "huge.safetensors", dim=65536, depth=64, dim_head=64)
    with pytest.raises(CheckpointError, match=r"dim = 65536 \(at most 4096\)"):
        model_io.load_model(huge)
    assert built == []  # refused from the config alone
    # Within the bounds but not what the weights are: found on the storage-less meta device.
    wrong = _model_checkpoint_with_config(tmp_path, "wrong.safetensors", dim=256, depth=8, dim_head=64)
    with pytest.raises(CheckpointError, match="weights do not fit the model"):
        model_io.load_model(wrong)
    assert built == ["meta"]
    built.clear()
    model, _, _ = model_io.load_model(tmp_path / "tiny.safetensors")  # the untouched file loads
    assert built == ["meta", "cpu"] and model.cfg.dim == 32


def test_expected_weights_match_a_built_model_and_count_parameters():
    from nh_serve.core.config import get_config
    from nh_serve.core.model import NeuroHorizon
    from nh_serve.inference.model_io import MAX_PARAMETERS, expected_weights

    cfg = get_config("nh-small", behavior_dim=3, image_dim=16)
    real = {k: (tuple(v.shape), v.dtype) for k, v in NeuroHorizon(cfg).state_dict().items()}
    assert expected_weights(cfg) == real
    big = get_config("nh-small").replace(dim=4096, depth=64, dim_head=64, heads=64)
    with pytest.raises(CheckpointError, match=f"more than the {MAX_PARAMETERS:,}"):
        expected_weights(big)
