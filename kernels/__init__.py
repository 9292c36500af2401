"""megapix fused kernels: FlashAttention-2 style attention and fused add + RMS-style norm.

Public API::

    flash_attention(q, k, v, causal=True, backend="auto", scale=None) -> o
    flash_attention_chunk(q, k, v, causal, q_offset, k_offset, backend="auto", scale=None) -> (o, lse)
    merge_attention(o_a, lse_a, o_b, lse_b) -> (o, lse)
    add_norm(x, residual, weight, eps=1e-5, backend="auto") -> (y, residual_out)
    rms_norm(x, weight, eps=1e-5, backend="auto") -> y

``backend``: "triton" forces the Triton kernels (CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1), "torch" the plain-PyTorch reference, "auto" Triton on
CUDA tensors and the reference elsewhere.  This package imports nothing from
megapix/ and imports triton only when a Triton kernel is launched.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _ops  # noqa: F401  (registers torch.ops.megapix_kernels.*)
from ._dispatch import BACKENDS, resolve_backend, triton_available
from .reference import add_norm_reference, attention_reference, merge_attention

__all__ = [
    "flash_attention", "flash_attention_chunk", "merge_attention", "add_norm", "rms_norm", "attention_reference",
    "add_norm_reference",
    "resolve_backend", "triton_available", "BACKENDS",
]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    backend: str = "auto", scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention over [B, H, T, Dh] tensors (self-attention: q, k, v of equal shape).

    causal=True is autoregressive (key j visible to query i iff j <= i); causal=False
    is bidirectional.  scale defaults to 1/sqrt(Dh).  Output has q's shape
    (contiguous) and dtype; accumulation is fp32.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if resolve_backend(backend, q, k, v) == "torch":
        return attention_reference(q, k, v, causal=causal, scale=scale)
    o, _ = torch.ops.megapix_kernels.flash_attn_fwd(q, k, v, bool(causal), float(scale))
    return o


def flash_attention_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, q_offset: int,
                          k_offset: int, backend: str = "auto", scale: Optional[float] = None):
    """Attention of a query chunk over a key/value chunk of the same sequence: q [B, H, Tq, Dh] at global
    positions q_offset.., k, v [B, H, Tk, Dh] at k_offset..; causal compares global positions.  Returns
    (o, lse), both differentiable; rows that see no key get o = 0, lse = -inf.  Partial results over
    disjoint key chunks combine exactly with merge_attention (ring attention).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if resolve_backend(backend, q, k, v) == "torch":
        return attention_reference(q, k, v, causal=causal, scale=scale, return_lse=True, q_offset=q_offset,
                                   k_offset=k_offset)
    return torch.ops.megapix_kernels.flash_attn_fwd(q, k, v, bool(causal), float(scale), int(q_offset),
                                                    int(k_offset))


def add_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
             eps: float = 1e-5, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual; y = h / sqrt(mean(h^2, -1) + eps) * weight; returns (y, h).

    With residual None: y = norm(x) and residual_out is x itself.  y has x's dtype,
    residual_out residual's dtype.  Differentiable wrt x, residual and weight,
    including gradients flowing into residual_out.
    """
    tensors = (x, weight) if residual is None else (x, residual, weight)
    if resolve_backend(backend, *tensors) == "torch":
        return add_norm_reference(x, residual, weight, eps)
    if residual is None:
        y, _ = torch.ops.megapix_kernels.rms_norm_fwd(x, weight, float(eps))
        return y, x
    y, h, _ = torch.ops.megapix_kernels.add_rms_norm_fwd(x, residual, weight, float(eps))
    return y, h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
             backend: str = "auto") -> torch.Tensor:
    """The norm alone: y = x / sqrt(mean(x^2, -1) + eps) * weight."""
    return add_norm(x, None, weight, eps, backend)[0]
