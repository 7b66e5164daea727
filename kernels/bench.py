"""Microbenchmarks of the Triton kernels against PyTorch and torch_brain.

    python -m kernels.bench [--op all|rotary|head] [--providers torch,torch_brain,torch_compile,triton]
                            [--dtype bf16|fp32] [--csv PATH] [--markdown PATH | --no-markdown]

Providers: ``torch`` (the PyTorch reference functions, eager), ``torch_brain``
(its rotary embedding + ``rotary_attn_pytorch_func``; attention only),
``torch_compile`` (``torch.compile`` of the reference) and ``triton``.

Sizes run from serving (batch 1, 100-1000 units, 1k-30k spike tokens, 128
latents, 50 bins, hidden 128) to batch scoring (batch 64). For every (op, size,
provider) the GPU run reports the median and 20 / 80 % quantiles of
``triton.testing.do_bench``, the achieved TFLOP/s and GB/s, and how far the
time is from the memory floor: ``time / (floor_bytes / bandwidth)`` where
``floor_bytes`` is the least the op must read and write and the bandwidth and
TFLOP/s ceilings are measured on the same card (a large device-to-device copy,
a large bf16 matmul). GB/s counts floor bytes, so it is an effective rate.

Without a GPU the command says so, runs a tiny correctness check of the kernels
on Triton's CPU interpreter and prints the FLOP / byte floors of the sizes; the
Markdown section then says the kernels are not measured on a GPU yet.

Results go to a CSV (``--csv``) and to ``docs/benchmarks.md`` between the
markers ``<!-- kernels:start -->`` and ``<!-- kernels:end -->`` (the file is
created if missing; only the text between the markers is replaced).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.jit import triton_available
from kernels.per_neuron_head import per_neuron_head, per_neuron_head_reference
from kernels.rotary_attention import (
    pack_keys,
    rotary_cross_attention,
    rotary_cross_attention_reference,
    rotary_frequencies,
)
from nh_serve.evaluation.reporting import write_doc_section

DEFAULT_MARKDOWN = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
PROVIDERS = ("torch", "torch_brain", "torch_compile", "triton")
T_MIN, T_MAX = 1e-4, 2.0  # rotary periods, seconds
BIN_WIDTH = 0.02  # seconds


@dataclasses.dataclass(frozen=True)
class AttnSize:
    """Encoder cross-attention: latents (queries) attend to spike tokens (keys)."""

    name: str
    batch: int
    latents: int
    keys_per_row: int  # mean spike tokens per batch element


@dataclasses.dataclass(frozen=True)
class HeadSize:
    """Per-neuron head over units x bins."""

    name: str
    batch: int
    units: int
    bins: int


ATTN_SIZES = (
    AttnSize("serve 1k tokens", 1, 128, 1_000),
    AttnSize("serve 10k tokens", 1, 128, 10_000),
    AttnSize("serve 30k tokens", 1, 128, 30_000),
    AttnSize("batch64 2k tokens", 64, 128, 2_000),
)
HEAD_SIZES = (
    HeadSize("serve 100 units", 1, 100, 50),
    HeadSize("serve 1000 units", 1, 1000, 50),
    HeadSize("batch64 300 units", 64, 300, 50),
)


@dataclasses.dataclass
class Row:
    op: str
    size: str
    provider: str
    dtype: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    gflop: float
    floor_mb: float
    tflops: float | None
    gbps: float | None
    floor_ratio: float | None
    max_abs_err: float | None
    note: str = ""


# ---------------------------------------------------------------------------
# Work and memory floors
# ---------------------------------------------------------------------------


def attn_lengths(size: AttnSize, seed: int = 0) -> list[int]:
    """Per-row key counts: exactly keys_per_row at batch 1, 0.5x-1.5x the mean otherwise."""
    if size.batch == 1:
        return [size.keys_per_row]
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + torch.rand(size.batch, generator=g)
    return [int(round(size.keys_per_row * float(s))) for s in scale]


def attn_floor(size: AttnSize, *, heads: int, head_dim: int, elem: int) -> tuple[float, float]:
    """(FLOPs, minimal bytes): QK^T and PV matmuls; q, k, v, times in, output out."""
    total_k = sum(attn_lengths(size))
    flops = 4.0 * heads * head_dim * size.latents * total_k
    q_bytes = size.batch * size.latents * heads * head_dim * elem
    kv_bytes = 2 * total_k * heads * head_dim * elem
    time_bytes = 4 * (size.latents + total_k)
    return flops, float(2 * q_bytes + kv_bytes + time_bytes)


def head_floor(size: HeadSize, *, hidden: int, hidden2: int, elem: int) -> tuple[float, float]:
    """(FLOPs, minimal bytes): pair adds + layer matmuls; unit/bin parts, weights in, float32 out."""
    pairs = size.batch * size.units * size.bins
    if hidden2:
        flops = pairs * (hidden + 2.0 * hidden * hidden2 + 2.0 * hidden2)
        weight_bytes = (hidden * hidden2 + hidden2) * elem + 4 * (hidden2 + 1)
    else:
        flops = pairs * (hidden + 2.0 * hidden)
        weight_bytes = 4 * (hidden + 1)
    in_bytes = size.batch * (size.units + size.bins) * hidden * elem
    return flops, float(in_bytes + weight_bytes + 4 * pairs)


# ---------------------------------------------------------------------------
# Inputs and providers
# ---------------------------------------------------------------------------


def make_attn_inputs(size: AttnSize, *, heads: int, head_dim: int, dtype: torch.dtype, device, seed: int = 0):
    """Padded + packed views of one random cross-attention problem (rotate_value=True as in the model)."""
    g = torch.Generator().manual_seed(seed)
    lengths = attn_lengths(size, seed)
    n_k = max(lengths)
    B = size.batch
    q = torch.randn(B, size.latents, heads, head_dim, generator=g)
    k = torch.randn(B, n_k, heads, head_dim, generator=g)
    v = torch.randn(B, n_k, heads, head_dim, generator=g)
    q_t = torch.linspace(0.0, 1.0, size.latents)[None, :].expand(B, -1).contiguous()  # latent times, s
    k_t = torch.sort(torch.rand(B, n_k, generator=g), dim=1).values  # spike times, s
    mask = torch.arange(n_k)[None, :] < torch.tensor(lengths)[:, None]
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    q_t, k_t, mask = (x.to(device) for x in (q_t, k_t, mask))
    cu, k_p, v_p, kt_p = pack_keys(mask, k, v, k_t)
    freqs = rotary_frequencies(head_dim=head_dim, t_min=T_MIN, t_max=T_MAX).to(device)
    return dict(q=q, k=k, v=v, q_t=q_t, k_t=k_t, mask=mask, freqs=freqs, cu=cu, k_p=k_p, v_p=v_p, kt_p=kt_p)


def attn_providers(x: dict, *, heads: int, head_dim: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Callables returning (B, Nq, H, Dh) outputs for every provider."""
    def ref():
        return rotary_cross_attention_reference(
            x["q"], x["k"], x["v"], x["q_t"], x["k_t"], x["freqs"], key_mask=x["mask"], rotate_value=True
        )

    def tri():
        return rotary_cross_attention(
            x["q"],
            x["k_p"],
            x["v_p"],
            x["q_t"],
            x["kt_p"],
            x["freqs"],
            cu_seqlens_k=x["cu"],
            rotate_value=True,
        )

    out: dict[str, Callable[[], torch.Tensor]] = {"torch": ref, "triton": tri}
    try:
        from torch_brain.nn import RotaryTimeEmbedding
        from torch_brain.nn.rotary_attention import rotary_attn_pytorch_func
    except ImportError:  # pragma: no cover - torch_brain is a dependency of the model
        RotaryTimeEmbedding = None
    if RotaryTimeEmbedding is not None:
        emb = RotaryTimeEmbedding(head_dim, head_dim // 2, T_MIN, T_MAX).to(x["q"].device)
        q2, k2, v2 = (x[n].flatten(-2) for n in ("q", "k", "v"))

        def tb():
            o = rotary_attn_pytorch_func(
                query=q2,
                key=k2,
                value=v2,
                q_pos_emb=emb(x["q_t"]),
                kv_pos_emb=emb(x["k_t"]),
                attn_mask=x["mask"],
                num_heads=heads,
                dropout_p=0.0,
                rotate_value=True,
            )
            return o.unflatten(-1, (heads, head_dim))

        out["torch_brain"] = tb
    compiled = torch.compile(rotary_cross_attention_reference, dynamic=False)
    out["torch_compile"] = lambda: compiled(
        x["q"], x["k"], x["v"], x["q_t"], x["k_t"], x["freqs"], key_mask=x["mask"], rotate_value=True
    )
    return out


def make_head_inputs(size: HeadSize, *, hidden: int, hidden2: int, dtype: torch.dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    unit_part = torch.randn(size.batch, size.units, hidden, generator=g)
    bin_part = torch.randn(size.batch, size.bins, hidden, generator=g)
    if hidden2:
        weights = [
            torch.randn(hidden2, hidden, generator=g) / hidden**0.5,
            torch.randn(1, hidden2, generator=g) / hidden2**0.5,
        ]
        biases = [0.1 * torch.randn(hidden2, generator=g), torch.randn(1, generator=g)]
    else:
        weights, biases = [torch.randn(1, hidden, generator=g) / hidden**0.5], [torch.randn(1, generator=g)]
    return dict(
        unit_part=unit_part.to(device=device, dtype=dtype),
        bin_part=bin_part.to(device=device, dtype=dtype),
        weights=[w.to(device=device, dtype=dtype) for w in weights],
        biases=[b.to(device=device, dtype=dtype) for b in biases],
    )


def head_providers(x: dict) -> dict[str, Callable[[], torch.Tensor]]:
    args = (x["unit_part"], x["bin_part"], x["weights"], x["biases"])
    kw = dict(activation="gelu", emit_rates=True, bin_width=BIN_WIDTH)
    compiled = torch.compile(per_neuron_head_reference, dynamic=False)
    return {
        "torch": lambda: per_neuron_head_reference(*args, **kw),
        "torch_compile": lambda: compiled(*args, **kw),
        "triton": lambda: per_neuron_head(*args, **kw),
    }


# ---------------------------------------------------------------------------
# GPU measurement
# ---------------------------------------------------------------------------


def _copy_bandwidth_gbps(n_bytes: int = 2**30) -> float:
    """Device-to-device copy rate of an n_bytes buffer (read + write counted), GB/s."""
    from triton.testing import do_bench

    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])[0]
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def _matmul_tflops(n: int = 8192) -> float:
    """bf16 n x n x n matmul rate, TFLOP/s."""
    from triton.testing import do_bench

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])[0]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_ceilings() -> tuple[float, float]:
    """(bandwidth GB/s from a 1 GiB device copy, TFLOP/s of an 8192^3 bf16 matmul) on this card."""
    gbps = _copy_bandwidth_gbps()
    torch.cuda.empty_cache()
    tflops = _matmul_tflops()
    torch.cuda.empty_cache()
    return gbps, tflops


def _time(fn: Callable[[], torch.Tensor]) -> tuple[float, float, float]:
    from triton.testing import do_bench

    fn()  # compile / warm caches outside the timed region
    torch.cuda.synchronize()
    med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


def _row(op, size_name, provider, dtype_name, flops, floor_bytes, bandwidth, timing, err, note="") -> Row:
    if timing is None:
        return Row(
            op,
            size_name,
            provider,
            dtype_name,
            None,
            None,
            None,
            flops / 1e9,
            floor_bytes / 1e6,
            None,
            None,
            None,
            err,
            note,
        )
    med, p20, p80 = timing
    sec = med * 1e-3
    floor_s = floor_bytes / (bandwidth * 1e9)
    return Row(
        op,
        size_name,
        provider,
        dtype_name,
        med,
        p20,
        p80,
        flops / 1e9,
        floor_bytes / 1e6,
        flops / sec / 1e12,
        floor_bytes / sec / 1e9,
        sec / floor_s,
        err,
        note,
    )


def run_gpu(args, bandwidth: float) -> list[Row]:
    from tqdm import tqdm

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    jobs = []
    if args.op in ("all", "rotary"):
        jobs += [("rotary", s) for s in ATTN_SIZES]
    if args.op in ("all", "head"):
        jobs += [("head", s) for s in HEAD_SIZES]
    rows: list[Row] = []
    for op, size in tqdm(jobs, desc="kernel benchmarks", unit="size"):
        if op == "rotary":
            x = make_attn_inputs(size, heads=args.heads, head_dim=args.head_dim, dtype=dtype, device="cuda")
            fns = attn_providers(x, heads=args.heads, head_dim=args.head_dim)
            flops, floor_bytes = attn_floor(size, heads=args.heads, head_dim=args.head_dim, elem=elem)
            ref = attn_providers(
                {**x, **{n: x[n].float() for n in ("q", "k", "v", "k_p", "v_p")}},
                heads=args.heads,
                head_dim=args.head_dim,
            )["torch"]
        else:
            x = make_head_inputs(size, hidden=args.hidden, hidden2=args.hidden2, dtype=dtype, device="cuda")
            fns = head_providers(x)
            flops, floor_bytes = head_floor(size, hidden=args.hidden, hidden2=args.hidden2, elem=elem)
            ref = head_providers(
                {n: (v.float() if torch.is_tensor(v) else [t.float() for t in v]) for n, v in x.items()}
            )["torch"]
        with torch.no_grad():
            want = ref().float()
            for provider in args.providers:
                if provider not in fns:
                    rows.append(
                        _row(
                            op,
                            size.name,
                            provider,
                            args.dtype,
                            flops,
                            floor_bytes,
                            bandwidth,
                            None,
                            None,
                            "n/a",
                        )
                    )
                    continue
                try:
                    got = fns[provider]().float()
                    err = float((got - want).abs().max())
                    timing = _time(fns[provider])
                    rows.append(
                        _row(op, size.name, provider, args.dtype, flops, floor_bytes, bandwidth, timing, err)
                    )
                except Exception as e:  # a provider failing (e.g. out of memory) must not stop the table
                    rows.append(
                        _row(
                            op,
                            size.name,
                            provider,
                            args.dtype,
                            flops,
                            floor_bytes,
                            bandwidth,
                            None,
                            None,
                            f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}",
                        )
                    )
                    torch.cuda.empty_cache()
        del x, fns
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------
# No-GPU path
# ---------------------------------------------------------------------------


def interpreter_smoke_check() -> list[str]:
    """Tiny kernel-vs-reference check on Triton's CPU interpreter; returns report lines."""
    if not triton_available():
        return ["triton is not installed: kernels not checked"]
    lines = []
    x = make_attn_inputs(AttnSize("smoke", 2, 9, 40), heads=2, head_dim=16, dtype=torch.float32, device="cpu")
    got = rotary_cross_attention(
        x["q"], x["k_p"], x["v_p"], x["q_t"], x["kt_p"], x["freqs"], cu_seqlens_k=x["cu"], rotate_value=True
    )
    want = rotary_cross_attention_reference(
        *(x[n].double() for n in ("q", "k", "v")),
        x["q_t"],
        x["k_t"],
        x["freqs"],
        key_mask=x["mask"],
        rotate_value=True,
    )
    err = float((got.double() - want).abs().max())
    lines.append(
        f"rotary_cross_attention  (B=2, 9 latents, ~40 keys, H=2, Dh=16): max |err| vs float64 = {err:.2e}  "
        f"{'ok' if err < 1e-4 else 'MISMATCH'}"
    )
    h = make_head_inputs(
        HeadSize("smoke", 2, 7, 50), hidden=32, hidden2=16, dtype=torch.float32, device="cpu"
    )
    got = per_neuron_head(h["unit_part"], h["bin_part"], h["weights"], h["biases"])
    want = per_neuron_head_reference(
        h["unit_part"].double(),
        h["bin_part"].double(),
        [w.double() for w in h["weights"]],
        [b.double() for b in h["biases"]],
    )
    err = float((got.double() - want).abs().max())
    lines.append(
        f"per_neuron_head         (B=2, 7 units, 50 bins, H=32, H2=16):  max |err| vs float64 = {err:.2e}  "
        f"{'ok' if err < 1e-4 else 'MISMATCH'}"
    )
    return lines


def floor_rows(args) -> list[Row]:
    elem = {"bf16": 2, "fp32": 4}[args.dtype]
    rows = []
    if args.op in ("all", "rotary"):
        for s in ATTN_SIZES:
            f, b = attn_floor(s, heads=args.heads, head_dim=args.head_dim, elem=elem)
            rows.append(
                Row(
                    "rotary",
                    s.name,
                    "-",
                    args.dtype,
                    None,
                    None,
                    None,
                    f / 1e9,
                    b / 1e6,
                    None,
                    None,
                    None,
                    None,
                    "not measured on GPU yet",
                )
            )
    if args.op in ("all", "head"):
        for s in HEAD_SIZES:
            f, b = head_floor(s, hidden=args.hidden, hidden2=args.hidden2, elem=elem)
            rows.append(
                Row(
                    "head",
                    s.name,
                    "-",
                    args.dtype,
                    None,
                    None,
                    None,
                    f / 1e9,
                    b / 1e6,
                    None,
                    None,
                    None,
                    None,
                    "not measured on GPU yet",
                )
            )
    return rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    """format(x, spec), or a dash of the same width for a missing value."""
    if x is None:
        width = spec.split(".")[0]
        return format("-", ">" + width) if width else "-"
    return format(x, spec)


def environment_lines(gpu: bool) -> list[str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu_name, driver = "none (no CUDA device)", "-"
    if gpu:
        gpu_name = torch.cuda.get_device_name()
        try:
            driver = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = "unknown"
    return [
        f"GPU: {gpu_name}; driver {driver}; CUDA {torch.version.cuda}",
        f"torch {torch.__version__}; triton {triton_version}; Python {platform.python_version()}",
    ]


def markdown_section(
    rows: list[Row], *, env: list[str], ceilings: tuple[float, float] | None, args, smoke: list[str]
) -> str:
    out = ["## Triton kernels", ""]
    out += [f"- {line}" for line in env]
    shapes = (
        f"rotary attention: H={args.heads}, Dh={args.head_dim}, rotate_value=True; per-neuron head: "
        f"hidden {args.hidden}"
        + (f" -> {args.hidden2}" if args.hidden2 else "")
        + " -> 1, exact GELU, rates out"
    )
    out.append(f"- {shapes}; inputs {args.dtype}")
    if ceilings is None:
        out += [
            "",
            "**Not measured on GPU yet**: this run had no CUDA device. Floors of the benchmark sizes "
            "(GFLOP, and the least MB each op must move):",
            "",
        ]
        out += ["| op | size | GFLOP | floor MB | FLOP/byte |", "|---|---|---:|---:|---:|"]
        for r in rows:
            out.append(
                f"| {r.op} | {r.size} | {r.gflop:.3f} | {r.floor_mb:.2f} | {r.gflop * 1e3 / r.floor_mb:.1f} |"
            )
        if smoke:
            out += ["", "CPU-interpreter correctness check:", ""] + [f"- {s}" for s in smoke]
    else:
        bw, tf = ceilings
        out += [
            f"- ceilings on this card: {bw:.0f} GB/s (device copy), {tf:.0f} TFLOP/s (bf16 8192^3 matmul)",
            "",
        ]
        out += [
            "Times: median (20%-80%) of `triton.testing.do_bench`. GB/s = floor bytes / time; "
            "x floor = time / (floor bytes / copy bandwidth). err = max |output - float32 torch reference|.",
            "",
        ]
        out += [
            "| op | size | provider | ms median (p20-p80) | TFLOP/s | GB/s | x floor | err | note |",
            "|---|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            t = "-" if r.median_ms is None else f"{r.median_ms:.4f} ({r.p20_ms:.4f}-{r.p80_ms:.4f})"
            out.append(
                f"| {r.op} | {r.size} | {r.provider} | {t} | {_fmt(r.tflops, '.2f')} | {_fmt(r.gbps, '.0f')} | "
                f"{_fmt(r.floor_ratio, '.1f')} | {_fmt(r.max_abs_err, '.1e')} | {r.note} |"
            )
    return "\n".join(out) + "\n"


def write_markdown(path: Path, section: str) -> None:
    """Replace the kernels section of ``path`` (shared writer of all benchmark sections)."""
    write_doc_section(path, "kernels", section, title="Benchmarks")


def write_csv(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        fields = [fl.name for fl in dataclasses.fields(Row)]
        w.writerow(fields)
        for r in rows:
            w.writerow(["" if getattr(r, n) is None else getattr(r, n) for n in fields])


def print_table(rows: list[Row], gpu: bool) -> None:
    if gpu:
        print(
            f"{'op':7} {'size':20} {'provider':14} {'median ms':>10} {'p20':>9} {'p80':>9} {'TFLOP/s':>8} "
            f"{'GB/s':>7} {'x floor':>8} {'err':>8}  note"
        )
        for r in rows:
            print(
                f"{r.op:7} {r.size:20} {r.provider:14} {_fmt(r.median_ms, '10.4f')} {_fmt(r.p20_ms, '9.4f')} "
                f"{_fmt(r.p80_ms, '9.4f')} {_fmt(r.tflops, '8.2f')} {_fmt(r.gbps, '7.0f')} "
                f"{_fmt(r.floor_ratio, '8.1f')} {_fmt(r.max_abs_err, '8.1e')}  {r.note}"
            )
    else:
        print(f"{'op':7} {'size':20} {'GFLOP':>9} {'floor MB':>9} {'FLOP/byte':>10}")
        for r in rows:
            print(f"{r.op:7} {r.size:20} {r.gflop:9.3f} {r.floor_mb:9.2f} {r.gflop * 1e3 / r.floor_mb:10.1f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kernels.bench",
        description="Benchmark the Triton kernels (rotary cross-attention, per-neuron head) against "
        "PyTorch, torch_brain and torch.compile.",
    )
    p.add_argument("--op", choices=("all", "rotary", "head"), default="all", help="which op(s) to run")
    p.add_argument(
        "--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {','.join(PROVIDERS)}"
    )
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="input dtype (default bf16)")
    p.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    p.add_argument("--head-dim", type=int, default=64, help="attention head size (default 64)")
    p.add_argument("--hidden", type=int, default=128, help="per-neuron head hidden size H (default 128)")
    p.add_argument(
        "--hidden2", type=int, default=128, help="second hidden layer H2, 0 for H -> 1 (default 128)"
    )
    p.add_argument("--csv", type=Path, default=None, help="write the result rows to this CSV file")
    p.add_argument(
        "--markdown",
        type=Path,
        default=DEFAULT_MARKDOWN,
        help="Markdown file to update (default docs/benchmarks.md)",
    )
    p.add_argument("--no-markdown", action="store_true", help="do not touch any Markdown file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    bad = [s for s in args.providers if s not in PROVIDERS]
    if bad:
        print(f"error: unknown provider(s) {bad}; choose from {', '.join(PROVIDERS)}", file=sys.stderr)
        return 2
    gpu = torch.cuda.is_available()
    env = environment_lines(gpu)
    for line in env:
        print(line)
    smoke: list[str] = []
    ceilings = None
    if gpu:
        ceilings = measure_ceilings()
        print(f"ceilings: {ceilings[0]:.0f} GB/s device copy, {ceilings[1]:.0f} TFLOP/s bf16 matmul")
        rows = run_gpu(args, ceilings[0])
    else:
        print("No CUDA GPU found: timings are skipped (they are only meaningful on a GPU).")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first compiled
        print("Correctness check of the kernels on Triton's CPU interpreter:")
        smoke = interpreter_smoke_check()
        for line in smoke:
            print("  " + line)
        print(
            "Work and memory floors of the benchmark sizes "
            f"(H={args.heads}, Dh={args.head_dim}, hidden {args.hidden}/{args.hidden2}, {args.dtype}):"
        )
        rows = floor_rows(args)
    print_table(rows, gpu)
    if args.csv is not None:
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    if not args.no_markdown:
        write_markdown(
            args.markdown, markdown_section(rows, env=env, ceilings=ceilings, args=args, smoke=smoke)
        )
        print(f"updated {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
