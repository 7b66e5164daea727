"""Per-neuron rate head: a fused Triton kernel and its PyTorch reference.

The model predicts ``log_rate[b, u, k] = MLP(concat(bin_k, unit_u))`` for
every unit u and horizon bin k. The MLP's first layer is linear, so it splits
(:func:`first_layer_parts`) into

- ``unit_part`` (B, U, H) = ``unit_u @ W1[:, D_bin:].T``
- ``bin_part``  (B, T, H) = ``bin_k @ W1[:, :D_bin].T + b1``

and the first hidden activation is ``act(unit_part[u] + bin_part[k])``. The
remaining layers are given as nn.Linear-style ``weights`` / ``biases`` lists:

- one output layer: ``weights = [W_out (1, H)]``, ``biases = [b_out (1,)]``
  (``log_rate = act(h1) @ W_out.T + b_out``), or
- one more hidden layer: ``weights = [W2 (H2, H), W_out (1, H2)]``,
  ``biases = [b2 (H2,), b_out (1,)]``
  (``log_rate = act(act(h1) @ W2.T + b2) @ W_out.T + b_out``).

``activation`` is ``"gelu"`` (exact, erf; ``nn.GELU()``), ``"gelu_tanh"``
(``nn.GELU(approximate="tanh")``), ``"relu"`` or ``"silu"``; the same one
after every hidden layer. Use whichever the model's head uses.

Output (B, U, T) float32 log-rates (log of counts per bin, or whatever the
model's head emits), or with ``emit_rates=True`` rates in Hz:
``exp(clamp(log_rate, *log_rate_clamp)) / bin_width`` (bin_width in seconds).

Kernel: one program per (block of units, block of bins, batch element). Its
BLOCK_U x BLOCK_T (unit, bin) pairs form the rows of a small GEMM whose left
operand ``act(unit_part[u] + bin_part[k])`` is generated in registers chunk by
chunk along H, so the (U, T, H) hidden tensor never exists in memory; the
second hidden layer accumulates in float32 and the output layer is a row
reduction. Float32 inputs use IEEE fp32 dots (``allow_tf32=True`` for TF32);
bf16 / fp16 inputs use tensor-core dots with float32 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.jit import check_launchable, lazy_jit, materialize_jit
from nh_serve.errors import InputError

tl = None  # triton.language, bound by materialize_jit() at first launch
triton = None  # the triton module, bound by materialize_jit()

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def first_layer_parts(
    bins: torch.Tensor, units: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the head's first nn.Linear over ``concat(bin_k, unit_u)`` into its two parts.

    Args:
        bins: (B, T, D_bin) decoder bin vectors.
        units: (B, U, D_unit) unit vectors.
        weight: (H, D_bin + D_unit) first-layer weight (bin features first).
        bias: (H,) or None.

    Returns:
        unit_part (B, U, H) and bin_part (B, T, H) (the bias goes into bin_part).
    """
    d_bin = bins.shape[-1]
    if weight.shape[1] != d_bin + units.shape[-1]:
        raise InputError(
            f"first-layer weight has {weight.shape[1]} inputs but bins + units have "
            f"{d_bin} + {units.shape[-1]}; the head input must be concat(bin, unit)"
        )
    bin_part = F.linear(bins, weight[:, :d_bin], bias)  # (B, T, H)
    unit_part = F.linear(units, weight[:, d_bin:])  # (B, U, H)
    return unit_part, bin_part


# ---------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------


@lazy_jit
def _activation(x, ACTIVATION: tl.constexpr):
    """0: exact GELU (erf), 1: tanh GELU, 2: ReLU, 3: SiLU; float32 in and out."""
    if ACTIVATION == 0:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 1:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
        y = 0.5 * x * (1.0 + tanh)
    elif ACTIVATION == 2:
        y = tl.maximum(x, 0.0)
    else:
        y = x / (1.0 + tl.exp(-x))
    return y


@lazy_jit
def _per_neuron_head_kernel(
    UNIT,
    BIN,
    W_HID,
    B_HID,
    W_OUT,
    B_OUT,
    OUT,
    n_units,
    n_bins,
    hidden,
    hidden2,
    stride_ub,
    stride_uu,
    stride_uh,
    stride_bb,
    stride_bt,
    stride_bh,
    stride_wh_out,
    stride_wh_in,
    stride_wo,
    stride_ob,
    stride_ou,
    stride_ot,
    inv_bin_width,
    clamp_lo,
    clamp_hi,
    TWO_LAYER: tl.constexpr,
    ACTIVATION: tl.constexpr,
    EMIT_RATES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H2: tl.constexpr,
):
    """log_rate (or rate) for BLOCK_U units x BLOCK_T bins of one batch element."""
    pid_u = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.arange(0, BLOCK_U * BLOCK_T)  # one row per (unit, bin) pair
    offs_u = pid_u * BLOCK_U + rows // BLOCK_T
    offs_t = pid_t * BLOCK_T + rows % BLOCK_T
    row_ok = (offs_u < n_units) & (offs_t < n_bins)
    unit_rows = UNIT + b * stride_ub + offs_u[:, None] * stride_uu  # (ROWS, 1) pointers
    bin_rows = BIN + b * stride_bb + offs_t[:, None] * stride_bt

    if TWO_LAYER:
        offs_j = tl.arange(0, BLOCK_H2)
        j_ok = offs_j < hidden2
        acc = tl.full((BLOCK_U * BLOCK_T, BLOCK_H2), 0.0, tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < hidden
            ld_mask = row_ok[:, None] & k_ok[None, :]
            a = tl.load(unit_rows + offs_k[None, :] * stride_uh, mask=ld_mask, other=0.0).to(tl.float32)
            c = tl.load(bin_rows + offs_k[None, :] * stride_bh, mask=ld_mask, other=0.0).to(tl.float32)
            h1 = _activation(a + c, ACTIVATION)  # (ROWS, BLOCK_K), act(0) = 0 on padding
            w = tl.load(
                W_HID + offs_j[None, :] * stride_wh_out + offs_k[:, None] * stride_wh_in,
                mask=k_ok[:, None] & j_ok[None, :],
                other=0.0,
            )  # (BLOCK_K, BLOCK_H2) = W2.T chunk
            h1 = h1.to(W_HID.dtype.element_ty)
            if DOT_F32:  # the CPU interpreter computes bf16 / fp16 dots wrongly
                h1 = h1.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h1, w, acc, input_precision=INPUT_PRECISION)
        b2 = tl.load(B_HID + offs_j, mask=j_ok, other=0.0).to(tl.float32)
        h2 = _activation(acc + b2[None, :], ACTIVATION)  # (ROWS, BLOCK_H2)
        w_out = tl.load(W_OUT + offs_j * stride_wo, mask=j_ok, other=0.0).to(tl.float32)
        log_rate = tl.reduce(h2 * w_out[None, :], 1, tl.standard._sum_combine)
    else:
        log_rate = tl.full((BLOCK_U * BLOCK_T,), 0.0, tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < hidden
            ld_mask = row_ok[:, None] & k_ok[None, :]
            a = tl.load(unit_rows + offs_k[None, :] * stride_uh, mask=ld_mask, other=0.0).to(tl.float32)
            c = tl.load(bin_rows + offs_k[None, :] * stride_bh, mask=ld_mask, other=0.0).to(tl.float32)
            h1 = _activation(a + c, ACTIVATION)
            w_out = tl.load(W_OUT + offs_k * stride_wo, mask=k_ok, other=0.0).to(tl.float32)
            log_rate += tl.reduce(h1 * w_out[None, :], 1, tl.standard._sum_combine)
    log_rate += tl.load(B_OUT).to(tl.float32)

    if EMIT_RATES:
        y = tl.exp(tl.minimum(tl.maximum(log_rate, clamp_lo), clamp_hi)) * inv_bin_width
    else:
        y = log_rate
    o_ptrs = OUT + b * stride_ob + offs_u * stride_ou + offs_t * stride_ot
    tl.store(o_ptrs, y.to(OUT.dtype.element_ty), mask=row_ok)


# ---------------------------------------------------------------------------
# Host function
# ---------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise InputError(message)


def _check_head_inputs(
    unit_part: torch.Tensor,
    bin_part: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    activation: str,
    emit_rates: bool,
    bin_width: float | None,
    log_rate_clamp: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Validate shapes; return (B, U, T, H)."""
    _need(
        unit_part.ndim == 3 and bin_part.ndim == 3,
        f"unit_part must be (B, U, H) and bin_part (B, T, H), got {tuple(unit_part.shape)} and {tuple(bin_part.shape)}",
    )
    _need(
        unit_part.shape[2] == bin_part.shape[2],
        f"unit_part and bin_part hidden sizes differ: {unit_part.shape[2]} vs {bin_part.shape[2]}",
    )
    bu, bb = unit_part.shape[0], bin_part.shape[0]
    _need(bu == bb or 1 in (bu, bb), f"batch sizes {bu} and {bb} differ (1 broadcasts)")
    _need(activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _need(
        len(weights) in (1, 2) and len(biases) == len(weights),
        "weights / biases must be lists of 1 or 2 layers",
    )
    hidden = unit_part.shape[2]
    in_dim = hidden
    for i, (w, bias) in enumerate(zip(weights, biases)):
        last = i == len(weights) - 1
        out_dim = 1 if last else w.shape[0]
        _need(
            tuple(w.shape) in ((out_dim, in_dim),) + (((in_dim,),) if last else ()),
            f"layer {i + 2} weight must be ({out_dim}, {in_dim}) (nn.Linear layout), got {tuple(w.shape)}",
        )
        _need(
            bias.numel() == out_dim,
            f"layer {i + 2} bias must have {out_dim} element(s), got {tuple(bias.shape)}",
        )
        in_dim = out_dim
    if len(weights) == 2:
        _need(
            weights[0].shape[0] <= 256,
            f"second hidden layer wider than 256 ({weights[0].shape[0]}) is not supported",
        )
    if emit_rates:
        _need(
            bin_width is not None and float(bin_width) > 0,
            f"emit_rates=True needs bin_width > 0 seconds, got {bin_width}",
        )
    lo, hi = log_rate_clamp
    _need(lo < hi, f"log_rate_clamp must be (lo, hi) with lo < hi, got {log_rate_clamp}")
    return max(bu, bb), unit_part.shape[1], bin_part.shape[1], hidden


def per_neuron_head(
    unit_part: torch.Tensor,
    bin_part: torch.Tensor,
    weights: list[torch.Tensor] | tuple[torch.Tensor, ...],
    biases: list[torch.Tensor] | tuple[torch.Tensor, ...],
    *,
    activation: str = "gelu",
    emit_rates: bool = False,
    bin_width: float | None = None,
    log_rate_clamp: tuple[float, float] = (-20.0, 10.0),
    allow_tf32: bool = False,
    out: torch.Tensor | None = None,
    block_u: int | None = None,
    block_t: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Fused per-neuron head (Triton). Layouts and layer convention: see the module docstring.

    Args:
        unit_part: (B, U, H) first-layer unit contribution (batch 1 broadcasts).
        bin_part: (B, T, H) first-layer bin contribution, bias included.
        weights: ``[W_out (1, H)]`` or ``[W2 (H2, H), W_out (1, H2)]`` (nn.Linear layout).
        biases: ``[b_out (1,)]`` or ``[b2 (H2,), b_out (1,)]``.
        activation: "gelu" (exact), "gelu_tanh", "relu" or "silu".
        emit_rates: return rates in Hz, exp(clamp(log_rate)) / bin_width, instead of log-rates.
        bin_width: bin width in seconds (needed with emit_rates).
        log_rate_clamp: (lo, hi) applied to the log-rate before exp when emitting rates.
        allow_tf32: float32 inputs may use TF32 dots for the second hidden layer.
        out: optional (B, U, T) float buffer (float32 by default) to write into.
        block_u, block_t, block_k: tile sizes (powers of two; block_u * block_t >= 16).

    Returns:
        (B, U, T) float32 log-rates (or rates in Hz).
    """
    weights, biases = list(weights), list(biases)
    B, n_units, n_bins, hidden = _check_head_inputs(
        unit_part, bin_part, weights, biases, activation, emit_rates, bin_width, log_rate_clamp
    )
    _need(
        unit_part.dtype in _FLOAT_DTYPES and bin_part.dtype == unit_part.dtype,
        f"unit_part and bin_part must share a float dtype, got {unit_part.dtype} and {bin_part.dtype}",
    )
    if out is None:
        out = torch.empty((B, n_units, n_bins), dtype=torch.float32, device=unit_part.device)
    else:
        _need(
            tuple(out.shape) == (B, n_units, n_bins) and out.dtype in _FLOAT_DTYPES,
            f"out must be a float ({B}, {n_units}, {n_bins}) tensor, got {tuple(out.shape)} {out.dtype}",
        )
    check_launchable(unit_part, bin_part, *weights, *biases, out)
    if B == 0 or n_units == 0 or n_bins == 0:
        return out

    two_layer = len(weights) == 2
    if two_layer:
        w_hid = weights[0].to(unit_part.dtype)  # (H2, H), dot operand in the inputs' dtype
        b_hid = biases[0].reshape(-1)
        hidden2 = w_hid.shape[0]
    else:
        w_hid = b_hid = weights[0]  # unused
        hidden2 = 1
    w_out = weights[-1].reshape(-1)  # (H_last,)
    b_out = biases[-1].reshape(-1)  # (1,)
    unit_sb = unit_part.stride(0) if unit_part.shape[0] > 1 else 0
    bin_sb = bin_part.stride(0) if bin_part.shape[0] > 1 else 0

    on_gpu = unit_part.device.type == "cuda"
    block_h2 = max(16, _next_pow2(hidden2))
    if block_t is None:
        block_t = min(16 if on_gpu else 64, _next_pow2(n_bins))
    if block_u is None:
        rows = 128 if on_gpu else 1024  # the CPU interpreter prefers few, large programs
        block_u = max(1, min(rows // block_t, _next_pow2(n_units)))
    if block_k is None:
        block_k = 32 if on_gpu else max(16, min(64, _next_pow2(hidden)))
    for name, blk in (("block_u", block_u), ("block_t", block_t), ("block_k", block_k)):
        _need(blk >= 1 and blk == _next_pow2(blk), f"{name} must be a power of two, got {blk}")
    if block_u * block_t < 16:
        block_u = 16 // block_t
    _need(block_k >= 16, f"block_k must be >= 16, got {block_k}")

    materialize_jit(globals())
    grid = (-(-n_units // block_u), -(-n_bins // block_t), B)
    launch = {"num_warps": 8 if two_layer else 4, "num_stages": 2} if on_gpu else {}
    _per_neuron_head_kernel[grid](
        unit_part, bin_part, w_hid, b_hid, w_out, b_out, out,
        n_units, n_bins, hidden, hidden2,
        unit_sb, unit_part.stride(1), unit_part.stride(2),
        bin_sb, bin_part.stride(1), bin_part.stride(2),
        w_hid.stride(0) if two_layer else 0, w_hid.stride(1) if two_layer else 0, w_out.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        1.0 / float(bin_width) if emit_rates else 1.0,
        float(log_rate_clamp[0]), float(log_rate_clamp[1]),
        TWO_LAYER=two_layer,
        ACTIVATION=ACTIVATIONS.index(activation),
        EMIT_RATES=bool(emit_rates),
        INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
        DOT_F32=not on_gpu and unit_part.dtype != torch.float32,
        BLOCK_U=block_u,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        BLOCK_H2=block_h2,
        **launch,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------


def _activation_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    if activation == "silu":
        return F.silu(x)
    raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def per_neuron_head_reference(
    unit_part: torch.Tensor,
    bin_part: torch.Tensor,
    weights: list[torch.Tensor] | tuple[torch.Tensor, ...],
    biases: list[torch.Tensor] | tuple[torch.Tensor, ...],
    *,
    activation: str = "gelu",
    emit_rates: bool = False,
    bin_width: float | None = None,
    log_rate_clamp: tuple[float, float] = (-20.0, 10.0),
) -> torch.Tensor:
    """Plain PyTorch per-neuron head in unit_part's dtype (float64 for an oracle).

    Same arguments as :func:`per_neuron_head`; materialises the (B, U, T, H)
    hidden tensor. Returns (B, U, T) log-rates (or rates in Hz).
    """
    weights, biases = list(weights), list(biases)
    _check_head_inputs(
        unit_part, bin_part, weights, biases, activation, emit_rates, bin_width, log_rate_clamp
    )
    dtype = unit_part.dtype
    h = _activation_reference(
        unit_part[:, :, None, :] + bin_part[:, None, :, :].to(dtype), activation
    )  # (B, U, T, H)
    for i, (w, bias) in enumerate(zip(weights, biases)):
        h = F.linear(h, w.to(dtype).reshape(-1, h.shape[-1]), bias.to(dtype).reshape(-1))
        if i < len(weights) - 1:
            h = _activation_reference(h, activation)
    log_rate = h.squeeze(-1)  # (B, U, T)
    if emit_rates:
        return torch.exp(log_rate.clamp(*log_rate_clamp)) / bin_width
    return log_rate
