"""The model's one dispatch point for attention and the iGPT norm.

"torch" is the plain PyTorch path (SDPA, which picks its own fused CPU/GPU implementation, and the reference norm,
an autograd.Function that saves what the Triton kernel saves: the 16-bit input and an fp32 rstd per row); "triton"
forces the fused kernels in kernels/; "auto" uses the Triton kernels on CUDA tensors and torch elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import megapix.kernels as kernels


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    # the one backend rule lives in kernels/_dispatch.resolve_backend (also used by the kernels' own entry points)
    return kernels.resolve_backend(backend, x) == "triton"


def attention(q, k, v, causal: bool, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v over q [B, H, Tq, Dh] and k, v [B, H, Tk, Dh], Tq <= Tk: the queries are the
    last Tq of the Tk positions (the earlier keys come from a KV cache); causal: a query sees keys up to its own."""
    t_q, t_k = q.shape[2], k.shape[2]
    if t_q != t_k:
        # The fused kernel takes self-attention only; queries past a KV cache use the torch path. One query (a
        # sampling step) sees every key, so it needs no mask.
        if t_q == 1 or not causal:
            return F.scaled_dot_product_attention(q, k, v)
        visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    if _use_triton(q, backend):
        return kernels.flash_attention(q, k, v, causal=causal, backend="triton")
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """iGPT's uncentred, bias-free norm: x / sqrt(mean(x^2) + eps) * weight, computed in float32."""
    if _use_triton(x, backend):
        return kernels.add_norm(x, None, weight, eps, backend="triton")[0]
    return kernels.add_norm_reference(x, None, weight, eps)[0]


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto"):
    """(norm(x + residual), x + residual): the residual add fused with the norm on the Triton path."""
    if _use_triton(x, backend):
        return kernels.add_norm(x, residual, weight, eps, backend="triton")
    return kernels.add_norm_reference(x, residual, weight, eps)
