"""When and how the Triton kernels run: availability checks and the lazy ``@triton.jit``.

Nothing here imports Triton at import time (see the comment above :func:`lazy_jit`).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from nh_serve.errors import InputError


def triton_interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when the Triton kernels can run here.

    That is: the ``triton`` package is importable AND either a CUDA device is
    present or ``TRITON_INTERPRET=1`` is set (CPU interpreter; slow, for tests).
    Importing nothing heavy: Triton itself is not imported by this check.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    return bool(torch.cuda.is_available() or triton_interpret_mode())


# ---------------------------------------------------------------------------
# Lazy @triton.jit
# ---------------------------------------------------------------------------
# ``triton.jit`` decides at decoration time whether a function becomes a GPU
# kernel or an interpreted one (``TRITON_INTERPRET``). Decorating at import
# time would freeze that choice the first time anything imports this package,
# and would make ``import kernels`` fail where Triton is missing. Instead the
# kernel modules mark their device functions with ``@lazy_jit`` and call
# ``materialize_jit(globals())`` from their host functions: on the first call
# this imports Triton, binds ``tl`` in the module and replaces every marked
# function by ``triton.jit(fn)``, so kernels can call the helper device
# functions by name exactly as with eager decoration.
#
# Triton's own library helpers written in Triton (``tl.sum``, ``tl.max``,
# ``tl.cdiv``, ``tl.zeros``, ...) are decorated when ``triton`` is first
# imported, which torch._dynamo and torch_brain do early. If that happened
# before ``TRITON_INTERPRET=1`` was set they are GPU-only and fail on the CPU
# interpreter. The kernels therefore call builtins only: ``tl.full`` instead
# of ``tl.zeros``, ``tl.reduce(x, axis, tl.standard._sum_combine)`` instead of
# ``tl.sum`` (the same reduction; the interpreter recognises the combine
# function and uses numpy), integer arithmetic instead of ``tl.cdiv``.

_JIT_MARK = "_nh_lazy_jit"
_JIT_LOCK = threading.Lock()


def lazy_jit(fn: Callable) -> Callable:
    """Mark ``fn`` as a Triton device function, jitted on first launch.

    Use exactly like ``@triton.jit``; the module must call
    :func:`materialize_jit` (with its ``globals()``) before launching.
    """
    setattr(fn, _JIT_MARK, True)
    return fn


def materialize_jit(namespace: dict[str, Any]) -> None:
    """Import Triton and jit every ``@lazy_jit`` function of a module namespace (once)."""
    if namespace.get("_JIT_READY"):
        return
    with _JIT_LOCK:
        if namespace.get("_JIT_READY"):
            return
        import triton
        import triton.language as tl

        namespace["triton"] = triton
        namespace["tl"] = tl
        for name, obj in list(namespace.items()):
            if callable(obj) and getattr(obj, _JIT_MARK, False):
                namespace[name] = triton.jit(obj)
        namespace["_JIT_READY"] = True


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the kernels cannot run on these tensors' device."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(
            "Triton is not installed: install the 'triton' package or use the PyTorch "
            "reference path instead of the Triton kernels"
        )
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise InputError(
            f"all tensors must be on one device, got {sorted(str(d) for d in devices)}; "
            "move them with .to(device) first"
        )
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu" and triton_interpret_mode():
        return
    raise RuntimeError(
        f"the Triton kernels run on CUDA tensors (got device {device}); on a machine "
        "without a GPU set TRITON_INTERPRET=1 before the first kernel call to run them "
        "on the (slow) CPU interpreter, or use the PyTorch reference path"
    )
