"""The ``triton`` backend (kernels.backend): same rates as the PyTorch reference, availability rules.

Without a GPU the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1,
set below before Triton is first used), so the model is nh-tiny and windows are short.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # top-level package `kernels` from a source checkout
    sys.path.insert(0, str(_ROOT))

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kernels.backend as KB  # noqa: E402
from kernels import triton_available  # noqa: E402
from nh_serve.core.config import get_config  # noqa: E402
from nh_serve.core.model import NeuroHorizon  # noqa: E402
from nh_serve.data.synth import make_session  # noqa: E402
from nh_serve.errors import InputError  # noqa: E402
from nh_serve.inference import backends as B  # noqa: E402
from nh_serve.inference.backends.parity import random_batches  # noqa: E402
from nh_serve.inference.predictor import Predictor  # noqa: E402

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
RTOL = 1e-5  # float32 rates, relative


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, make_tiny_checkpoint):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors")


@pytest.fixture
def counted(monkeypatch):
    """Count the kernel launches of the backend (and record the encoder's kv_index use)."""
    calls = {"attention": 0, "indexed": 0, "head": 0, "table_rows": []}
    attn, head = KB.rotary_cross_attention, KB.per_neuron_head

    def attention(q, k, v, *args, **kw):
        calls["attention"] += 1
        if kw.get("kv_index") is not None:
            calls["indexed"] += 1
            # a (B, U * 3, H, Dh) table of (unit, token type) rows, not per-token keys
            calls["table_rows"].append(k.shape[1])
            assert k.shape[1] % 3 == 0 and int(kw["kv_index"].max()) < k.shape[1]
        return attn(q, k, v, *args, **kw)

    def fused_head(*args, **kw):
        calls["head"] += 1
        return head(*args, **kw)

    monkeypatch.setattr(KB, "rotary_cross_attention", attention)
    monkeypatch.setattr(KB, "per_neuron_head", fused_head)
    return calls


def _close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7)


@needs_triton
def test_predictor_triton_rates_equal_torch(ckpt, counted):
    """Predictor.load(backend='triton') on synthetic windows of different spike counts (token padding)."""
    rec = make_session(seed=3, n_units=9, duration=14.0)
    t, ids = rec["spike_times"], np.asarray(rec["unit_ids"])[rec["unit_index"]]
    windows = []
    for c in (11.0, 12.5):
        a, b = np.searchsorted(t, [c, c + 1.0])
        windows.append({"spike_times": t[a:b], "unit_ids": ids[a:b], "context_start": c})
    windows.append({"spike_times": t[:0], "unit_ids": ids[:0], "context_start": 12.0})  # no spikes at all
    assert len(windows[0]["spike_times"]) != len(windows[1]["spike_times"])

    rates = {}
    for name in ("torch", "triton"):
        p = Predictor.load(ckpt, backend=name)
        assert p.backend_name == name
        ref = t < 10.0
        token = p.register(t[ref], ids[ref], reference_window=(0.0, 10.0), units=rec["unit_ids"])
        one = p.predict(token, **windows[0])
        batch = p.predict_batch(token, windows)
        _close(one.rates_hz, batch[0].rates_hz)  # a window alone == the same window in a padded batch
        rates[name] = np.stack([pr.rates_hz for pr in batch])  # (3, U, T) Hz
    assert np.all(np.isfinite(rates["triton"])) and rates["triton"].shape == (3, 9, 50)
    _close(rates["triton"], rates["torch"])
    # every attention layer and the head ran on the kernels, the encoder with kv_index
    assert counted["indexed"] > 0 and counted["head"] > 0 and counted["attention"] > counted["indexed"]
    assert counted["table_rows"][-1] == 9 * 3  # the last batch: 9 units x 3 token types


@needs_triton
@pytest.mark.parametrize(
    "overrides",
    [{}, {"head_layers": 3, "behavior_dim": 2}],
    ids=["nh-tiny", "3-layer-head+behaviour"],
)
def test_backend_equals_torch_with_padded_units(overrides, counted):
    """Windows of 5 / 33 / 12 units in one batch (unit and token padding); multimodal keys masked."""
    torch.manual_seed(1)
    model = NeuroHorizon(get_config("nh-tiny", **overrides)).eval()
    ref, fused = B.TorchBackend(model), KB.TritonBackend(model)
    assert fused.fused_head and fused.describe()["head"] == "triton per_neuron_head"
    name, batch = random_batches(model.cfg, seed=2)[-1]
    batch = dict(batch)
    feats = batch.pop("unit_features")
    emb = ref.embed_units(feats)
    with torch.no_grad():
        want = ref(batch, emb)
    got = fused(batch, emb)
    mask = batch["unit_mask"].numpy()
    assert mask.sum(1).tolist() == [5, 33, 12], name
    _close(np.exp(got.numpy())[mask], np.exp(want.numpy())[mask])
    torch.testing.assert_close(fused.embed_units(feats), emb)
    assert counted["head"] == 1 and counted["indexed"] == 1


def test_fuse_model_shares_weights_and_leaves_the_model_alone():
    model = NeuroHorizon(get_config("nh-tiny", head_layers=4))
    fused = KB.fuse_model(model)
    assert fused is not model
    assert all(a is b for a, b in zip(model.parameters(), fused.parameters()))  # no copies
    assert all(a is b for a, b in zip(model.buffers(), fused.buffers()))
    assert fused.enc_attn.fused_attention is KB.fused_attention
    assert fused.blocks[0].attn.fused_attention is KB.fused_attention
    assert fused.dec_self_attn.fused_attention is KB.fused_attention
    assert fused.head.fused_combine is None  # 4 layers: the head kernel fuses at most 3
    assert model.enc_attn.fused_attention is None and model.head.fused_combine is None
    with pytest.raises(InputError, match="at most 3 layers"):
        KB.FusedHead(model.head)


def test_registered_and_auto_never_picks_it_on_cpu(monkeypatch):
    assert "triton" in B.backend_names()
    assert "triton" not in B.AUTO_ORDER["cpu"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert B.choose_backend("cpu") != "triton"  # even with the interpreter available


def test_availability(monkeypatch):
    triton_installed = importlib.util.find_spec("triton") is not None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = KB.triton_unavailable("cpu")
    assert reason is not None and "CUDA" in reason and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert (KB.triton_unavailable("cpu") is None) == triton_installed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in (KB.triton_unavailable("cuda") or "not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (KB.triton_unavailable("cuda") is None) == triton_installed
    if triton_installed:
        assert B.choose_backend("cuda") == "triton"  # first on CUDA

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
    )
    assert "triton is not installed" in KB.triton_unavailable("cuda")


def test_explicit_request_without_gpu_or_interpreter_is_a_clear_error(ckpt, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="backend 'triton' is not available here: .*TRITON_INTERPRET=1"):
        Predictor.load(ckpt, backend="triton")
    with pytest.raises(InputError, match="needs the PyTorch checkpoint"):
        KB.build_triton_backend(B.BuildRequest())
