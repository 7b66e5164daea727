"""Fused Triton kernels for NeuroHorizon inference.

Two kernels, each with a host function that checks its inputs and a plain
PyTorch reference beside it:

- :func:`rotary_cross_attention` (``kernels.rotary_attention``): attention with
  rotary *time* embeddings (torch_brain ``RotaryCrossAttention`` convention),
  computing each token's rotation in registers from its timestamp, flash-style
  online softmax, variable-length (packed) or padded+masked keys.
- :func:`per_neuron_head` (``kernels.per_neuron_head``): the per-neuron rate
  head ``log_rate[b, u, k] = MLP(concat(bin_k, unit_u))`` with the first layer
  split into a unit part and a bin part, never materialising the
  (units x bins x hidden) activation tensor.

Importing this package does not import Triton. Kernels are compiled with
``triton.jit`` on their first launch (see :func:`lazy_jit`), so the choice
between the GPU compiler and Triton's CPU interpreter (``TRITON_INTERPRET=1``)
is made when a kernel first runs, not when this package is imported. Use
:func:`triton_available` to decide whether the Triton path can run at all.
"""

from __future__ import annotations

from kernels.jit import check_launchable, lazy_jit, materialize_jit, triton_available, triton_interpret_mode
from kernels.per_neuron_head import first_layer_parts, per_neuron_head, per_neuron_head_reference
from kernels.rotary_attention import (
    pack_keys,
    rotary_cross_attention,
    rotary_cross_attention_reference,
    rotary_frequencies,
    rotary_self_attention,
)

__all__ = [
    "check_launchable",
    "lazy_jit",
    "materialize_jit",
    "triton_available",
    "triton_interpret_mode",
    "rotary_cross_attention",
    "rotary_cross_attention_reference",
    "rotary_self_attention",
    "rotary_frequencies",
    "pack_keys",
    "per_neuron_head",
    "per_neuron_head_reference",
    "first_layer_parts",
]
