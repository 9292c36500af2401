"""Backend selection shared by the public functions.

Kept free of anything torch.compile cannot trace (no triton import, no
environment reads): whether triton is installed is looked up once with
importlib at import time, and the "CUDA tensors or TRITON_INTERPRET=1" check
for backend="triton" happens in the launchers (``check_launchable``), which
run only when the kernel really executes.
"""
from __future__ import annotations

import importlib.util

import torch

BACKENDS = ("auto", "triton", "torch")

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the triton package is installed (it is imported lazily, on first launch)."""
    return _TRITON_INSTALLED


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map "auto" | "triton" | "torch" to the concrete backend "triton" or "torch".

    "auto": Triton when every tensor is on a CUDA device and triton is installed,
    otherwise the PyTorch reference (also under TRITON_INTERPRET=1: the
    interpreter is only used when asked for explicitly with backend="triton").
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and _TRITON_INSTALLED else "torch"
    if not _TRITON_INSTALLED:
        raise RuntimeError("backend='triton' was requested but the triton package is not installed")
    return "triton"


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise a clear error before launching a Triton kernel on tensors it cannot use."""
    try:
        import triton
    except Exception as e:  # installed but broken
        raise RuntimeError(f"backend='triton' was requested but triton cannot be imported: {e!r}") from e
    if all(t.is_cuda for t in tensors):
        return
    if not triton.knobs.runtime.interpret:
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {devices}); set TRITON_INTERPRET=1 to run "
            "the Triton kernels on CPU through the interpreter (slow, for testing)")
