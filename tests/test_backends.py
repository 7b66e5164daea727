"""Inference backends: equal rates on real-data windows, the auto choice, the registry, bad names."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from real_data import REAL

from nh_serve.data.windows import collate
from nh_serve.errors import InputError
from nh_serve.inference import backends as B
from nh_serve.inference.backends import base, registry
from nh_serve.inference.backends.parity import ParityError
from nh_serve.inference.predictor import Predictor


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, make_tiny_checkpoint):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors", norm_seed=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("export-cache")


@pytest.fixture(scope="module")
def recording():
    """A real recording (spike times, unit ids as str); skipped without the data."""
    f = REAL / "ibl_brainbox_fixture" / "spikes_flat.npz"
    if not f.is_file():
        pytest.skip(f"real recording {f} is absent")
    with np.load(f) as d:
        t = np.asarray(d["spike_times"], np.float64)
        ids = np.asarray(d["unit_ids"]).astype(str)
    o = np.argsort(t, kind="stable")
    return t[o], ids[o]


def _windows(t, ids, starts):
    out = []
    for c in starts:
        a, b = np.searchsorted(t, [c, c + 1.0])
        out.append({"spike_times": t[a:b], "unit_ids": ids[a:b], "context_start": float(c)})
    return out


SLOW = os.environ.get("NH_SERVE_SLOW_TESTS", "0") == "1"


def _available():
    """Backends to compare: torch-compile only with NH_SERVE_SLOW_TESTS=1 (building it compiles
    C++ kernels: 30 s to 3 min on 2 cores; every build of it is parity-checked at construction anyway)."""
    avail = B.available_backends("cpu")
    names = ("torch", "torchscript", "onnxruntime") + (("torch-compile",) if SLOW else ())
    return [name for name in names if avail.get(name) is None]


@pytest.fixture(scope="module")
def predictions(ckpt, cache, recording):
    """Rates of 4 real windows (289 units), one by one and as a batch, from every available backend."""
    t, ids = recording
    m = t < 60.0
    starts = [61.0, 75.25, 90.5, 110.0]
    out = {}
    for name in _available():
        p = Predictor.load(ckpt, backend=name, cache_dir=cache)
        assert p.backend_name == name
        tok = p.register(t[m], ids[m], reference_window=(0.0, 60.0), units=np.unique(ids))
        wins = _windows(t, ids, starts)
        single = np.stack([p.predict(tok, **w).rates_hz for w in wins])
        batch = np.stack([x.rates_hz for x in p.predict_batch(tok, wins)])
        out[name] = (single, batch, p, tok)
    return out


@pytest.mark.slow
@pytest.mark.real_data
def test_all_backends_agree_on_real_windows(predictions, recording):
    assert {"torch", "torchscript", "onnxruntime"} <= set(predictions)
    if SLOW and B.available_backends("cpu")["torch-compile"] is None:
        assert "torch-compile" in predictions
    ref_single, ref_batch = predictions["torch"][:2]
    assert (
        ref_single.shape == (4, np.unique(recording[1]).size, 50)
        and np.all(np.isfinite(ref_single))
        and np.all(ref_single > 0)
    )
    np.testing.assert_allclose(ref_batch, ref_single, rtol=1e-5)  # batching (padding) changes nothing
    for name, (single, batch, _, _) in predictions.items():
        rel = np.max(np.abs(single - ref_single) / ref_single)
        assert rel <= 1e-4, f"{name}: relative error {rel:.3g}"
        np.testing.assert_allclose(batch, ref_single, rtol=1e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.real_data
def test_every_backend_refuses_non_finite_inputs(predictions, recording):
    """An infinite input rate makes eager torch answer NaN but onnxruntime's Clip the 1000 Hz ceiling,
    so every backend refuses non-finite inputs the same way before running."""
    t, ids = recording
    w = _windows(t, ids, [70.0])[0]
    for _, _, p, tok in predictions.values():
        s = p.session(tok)
        batch = collate([p.tokenize_window(s, w["spike_times"], w["unit_ids"], context_start=70.0)])
        batch.pop("unit_features")
        batch["history_rate_hz"][0, 3] = float("inf")
        with pytest.raises(
            InputError, match="history_counts/history_duration_s: the model input history_rate_hz"
        ):
            p._backend(batch, s.embeddings.unsqueeze(0))
        batch["history_rate_hz"][0, 3] = 1.0
        batch["spike_times"][0, -1] = float("nan")
        with pytest.raises(InputError, match="context spikes: .*spike_times is not finite"):
            p._backend(batch, s.embeddings.unsqueeze(0))


@pytest.mark.slow
@pytest.mark.real_data
def test_onnxruntime_backend_is_cached_by_checkpoint_hash(predictions, ckpt, cache):
    p = predictions["onnxruntime"][2]
    d = p._backend.describe()
    path = Path(d["artifact"])
    assert path.parent == cache and path.suffix == ".onnx" and p.model_hash in path.name
    assert d["providers"] == ["CPUExecutionProvider"] and d["intra_op_threads"] == B.default_threads()
    again = Predictor.load(ckpt, backend="onnxruntime", cache_dir=cache, threads=1)
    assert again._backend.cached and Path(again._backend.describe()["artifact"]) == path
    assert sorted(x.name for x in cache.iterdir()) == [path.name]  # no temporary files left


@pytest.mark.slow
def test_auto_picks_the_first_available_backend_of_the_table(ckpt, cache, monkeypatch):
    order = B.AUTO_ORDER["cpu"]
    want = next(n for n in order if B.available_backends("cpu")[n] is None)
    assert B.choose_backend("cpu") == want
    assert Predictor.load(ckpt, cache_dir=cache).backend_name == want
    # When the first choice is unavailable, auto falls through to the next one.
    first = B.BACKENDS[order[0]]
    monkeypatch.setitem(
        registry.BACKENDS, order[0], B.BackendSpec(first.name, first.description, first.build, lambda d: "disabled")
    )
    assert B.choose_backend("cpu") == next(n for n in order[1:] if B.available_backends("cpu")[n] is None)
    assert B.choose_backend("cuda") != "triton" or "triton" in B.BACKENDS


def test_unknown_or_unavailable_backend(ckpt, monkeypatch):
    with pytest.raises(
        InputError, match="unknown backend 'tensorrt'; choose one of .*onnxruntime.*torch.* or 'auto'"
    ):
        Predictor.load(ckpt, backend="tensorrt")
    spec = B.BACKENDS["onnxruntime"]
    monkeypatch.setitem(
        registry.BACKENDS,
        "onnxruntime",
        B.BackendSpec(spec.name, spec.description, spec.build, lambda d: "onnxruntime is not installed"),
    )
    with pytest.raises(InputError, match="not available here: onnxruntime is not installed"):
        Predictor.load(ckpt, backend="onnxruntime")


def test_register_backend_plugs_in_a_new_backend(ckpt, monkeypatch):
    calls = []

    class Doubling(B.TorchBackend):
        name = "doubling"

        def run(self, batch, unit_embeddings):
            calls.append(unit_embeddings.shape)
            return super().run(batch, unit_embeddings)

    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
    registry.register_backend(B.BackendSpec("doubling", "test", lambda req: Doubling(req.model), lambda d: None))
    with pytest.raises(ValueError, match="already registered"):
        registry.register_backend(B.BackendSpec("doubling", "test", lambda req: Doubling(req.model), lambda d: None))
    p = Predictor.load(ckpt, backend="doubling")
    tok = p.register(np.linspace(0, 19.9, 200), np.array(["a", "b"] * 100), reference_window=(0.0, 20.0))
    p.predict(tok, [20.1, 20.5], ["a", "b"], context_start=20.0)
    assert p.backend_name == "doubling" and calls == [torch.Size([1, 2, 32])]


def test_a_backend_that_disagrees_with_eager_is_refused(ckpt, monkeypatch):
    class Off(B.TorchBackend):
        name = "off"

        def run(self, batch, unit_embeddings):
            return super().run(batch, unit_embeddings) + 1e-3

    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
    registry.register_backend(
        B.BackendSpec("off", "test", lambda req: B.verify(Off(req.model), req), lambda d: None)
    )
    with pytest.raises(ParityError, match="backend off does not match eager PyTorch"):
        Predictor.load(ckpt, backend="off")


def test_default_threads_rule(monkeypatch):
    monkeypatch.setattr(base.os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert B.default_threads() == 1
    monkeypatch.setattr(base.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert B.default_threads() == 4


def test_auto_falls_back_when_a_build_fails(ckpt, monkeypatch):
    from nh_serve.errors import CheckpointError

    def broken(req):
        raise CheckpointError("ONNX export failed (simulated)")

    first = B.AUTO_ORDER["cpu"][0]
    spec = B.BACKENDS[first]
    monkeypatch.setitem(registry.BACKENDS, first, B.BackendSpec(spec.name, spec.description, broken, lambda d: None))
    with pytest.warns(UserWarning, match="simulated"):
        p = Predictor.load(ckpt)
    assert p.backend_name == next(
        n for n in B.AUTO_ORDER["cpu"][1:] if B.available_backends("cpu")[n] is None
    )
    with pytest.raises(CheckpointError, match="simulated"):  # asked for by name: no fallback
        Predictor.load(ckpt, backend=first)
