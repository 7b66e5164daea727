"""The ``triton`` inference backend: NeuroHorizon with its attention and head on the fused kernels.

A plugin of the backend registry (:mod:`nh_serve.inference.backends.registry`): the
entry point ``triton`` of the group ``nh_serve.backends`` (pyproject.toml) names
:data:`TRITON`, registered the first time the registry is used. Importing this
module does not import Triton.

How the kernels enter the model: :func:`fuse_model` makes a structural copy of
the loaded model that shares every parameter and buffer with it (no weights are
copied) and sets the copy's hooks:

- every :class:`~nh_serve.core.rotary.RotaryCrossAttention` and
  :class:`~nh_serve.core.rotary.RotarySelfAttention` gets ``fused_attention =``
  :func:`fused_attention`, i.e. :func:`kernels.rotary_cross_attention`. The
  encoder passes its ``(B, U * 3, H * Dh)`` key / value table of (unit, token
  type) rows with ``kv_index`` (``row = unit * 3 + type``), so per-token keys and
  values never exist in memory; the processor and decoder self-attention use
  the same kernel with shared times (``causal`` for the decoder bins);
- :class:`~nh_serve.core.blocks.PerNeuronHead` gets ``fused_combine =``
  :class:`FusedHead` (:func:`kernels.per_neuron_head`, exact-erf GELU), for heads
  of 2 or 3 linear layers (``head_layers``); deeper heads keep the PyTorch
  :meth:`~nh_serve.core.blocks.PerNeuronHead.combine`.

Everything else (norms, projections, feed-forwards, masking, clamping) is the
model's own code, so the backend follows the model. The loaded model is left
untouched: the Predictor's ``torch`` reference, test-time adaptation and the
parity check at build time (against eager PyTorch, like every backend) still run
the reference path.

Availability: a CUDA device and an importable ``triton``. On the CPU the backend
is unavailable (``auto`` never picks it; asking for it by name is an
:class:`~nh_serve.errors.InputError`) unless ``TRITON_INTERPRET=1`` is set, in
which case the kernels run on Triton's CPU interpreter (slow; for tests).
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import torch
from torch import Tensor

from kernels.jit import triton_interpret_mode
from kernels.per_neuron_head import per_neuron_head
from kernels.rotary_attention import rotary_cross_attention
from nh_serve.core.blocks import PerNeuronHead
from nh_serve.core.model import NeuroHorizon
from nh_serve.core.rotary import RotaryCrossAttention, RotarySelfAttention
from nh_serve.errors import InputError
from nh_serve.inference.backends.base import Backend, BackendSpec, BuildRequest
from nh_serve.inference.backends.eager import TorchBackend, verify

__all__ = ["TRITON", "FusedHead", "TritonBackend", "fuse_model", "fused_attention", "triton_unavailable"]

MAX_FUSED_HEAD_LAYERS = 3
"""The head kernel fuses the output layer plus at most one hidden layer (``head_layers`` 2 or 3)."""


def triton_unavailable(device: str) -> str | None:
    """None if the Triton kernels can run on ``device`` (``"cpu"`` / ``"cuda"``), else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; it needs a CUDA GPU)"
    if device == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is visible to PyTorch"
    if device == "cpu" and triton_interpret_mode():
        return None
    return (
        f"the Triton kernels run on CUDA GPUs, and this model is on {device}; load it on a GPU, "
        "use another backend ('auto' picks one), or set TRITON_INTERPRET=1 before starting Python "
        "to run them on Triton's slow CPU interpreter (for testing)"
    )


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    freqs: Tensor,
    *,
    key_mask: Tensor | None,
    kv_index: Tensor | None,
    heads: int,
    rotate_value: bool,
    causal: bool,
) -> Tensor:
    """:class:`~nh_serve.core.rotary.FusedAttention` on :func:`kernels.rotary_cross_attention`.

    ``q`` ``(B, Nq, H * Dh)``; ``k``, ``v`` ``(B, Nk, H * Dh)`` or, with ``kv_index`` ``(B, Nk)``,
    ``(B, M, H * Dh)`` tables (views into the projections; only reshaped, never copied); times
    in seconds. Returns ``(B, Nq, H * Dh)``.
    """
    out = rotary_cross_attention(
        q.unflatten(-1, (heads, -1)),  # (B, Nq, H, Dh)
        k.unflatten(-1, (heads, -1)),  # (B, Nk | M, H, Dh)
        v.unflatten(-1, (heads, -1)),
        q_t,
        k_t,
        freqs,
        key_mask=key_mask,
        kv_index=kv_index,
        rotate_value=rotate_value,
        causal=causal,
    )  # (B, Nq, H, Dh)
    return out.flatten(2)  # (B, Nq, H * Dh)


class FusedHead:
    """:meth:`PerNeuronHead.combine` on :func:`kernels.per_neuron_head`, reading ``head``'s weights.

    The weights are looked up at every call (no copies), so in-place updates of the
    head are seen.
    """

    def __init__(self, head: PerNeuronHead):
        n_layers = len(head.hidden_layers) + 2
        if n_layers > MAX_FUSED_HEAD_LAYERS:
            raise InputError(
                f"the fused head supports at most {MAX_FUSED_HEAD_LAYERS} layers, this head has {n_layers}"
            )
        self.head = head

    def __call__(self, unit_part: Tensor, bin_part: Tensor, unit_offset: Tensor | None = None) -> Tensor:
        """``unit_part (B, U, H)``, ``bin_part (B, T, H)`` -> log-rate ``(B, U, T)`` (log Hz, unclamped)."""
        layers = [*self.head.hidden_layers, self.head.out]
        out = per_neuron_head(
            unit_part,
            bin_part,
            [layer.weight for layer in layers],
            [layer.bias for layer in layers],
            activation="gelu",
        ).to(unit_part.dtype)  # (B, U, T)
        if unit_offset is not None:
            out = out + unit_offset.unsqueeze(-1)
        return out


def fuse_model(model: NeuroHorizon) -> NeuroHorizon:
    """A copy of ``model`` that shares all its parameters and buffers and runs the fused kernels.

    Attention modules get ``fused_attention`` (:func:`fused_attention`); the head gets
    ``fused_combine`` (:class:`FusedHead`) if it has at most :data:`MAX_FUSED_HEAD_LAYERS`
    layers. ``model`` itself is not modified.
    """
    shared: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    fused = copy.deepcopy(model, shared)  # new modules, the same tensors
    for module in fused.modules():
        if isinstance(module, (RotaryCrossAttention, RotarySelfAttention)):
            module.fused_attention = fused_attention
        elif isinstance(module, PerNeuronHead) and len(module.hidden_layers) + 2 <= MAX_FUSED_HEAD_LAYERS:
            module.fused_combine = FusedHead(module)
    return fused.eval()


class TritonBackend(TorchBackend):
    """The model on the fused Triton kernels (:func:`fuse_model`); inference only (no gradients)."""

    name = "triton"

    def __init__(self, model: NeuroHorizon, *, threads: int | None = None):
        super().__init__(fuse_model(model), threads=threads)
        self.fused_head = self.model.head.fused_combine is not None

    def __call__(self, batch: dict[str, Tensor], unit_embeddings: Tensor) -> Tensor:
        with torch.no_grad():
            return super().__call__(batch, unit_embeddings)

    def embed_units(self, unit_features: Tensor) -> Tensor:
        with torch.no_grad():
            return super().embed_units(unit_features)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "attention": "triton rotary_cross_attention (encoder keys gathered in-kernel by kv_index)",
            "head": "triton per_neuron_head"
            if self.fused_head
            else f"pytorch (head_layers > {MAX_FUSED_HEAD_LAYERS})",
            "interpreter": self.device.type == "cpu",
        }


def build_triton_backend(req: BuildRequest) -> Backend:
    """BackendSpec factory: :class:`TritonBackend`, parity-checked against eager PyTorch."""
    if req.model is None:
        raise InputError(
            "backend 'triton' needs the PyTorch checkpoint (.safetensors), not an exported artifact"
        )
    return verify(TritonBackend(req.model, threads=req.threads), req)


TRITON = BackendSpec(
    "triton",
    "fused Triton kernels (rotary attention, per-neuron head); CUDA",
    build_triton_backend,
    triton_unavailable,
)
