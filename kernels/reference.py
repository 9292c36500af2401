"""Plain-PyTorch reference implementations of the kernels in this package.

These are the ``backend="torch"`` path of the dispatch and the ground truth for
the tests.  They compute in float32 (or in float64 when given float64 inputs)
and return results in the input dtype, so that they mirror what the Triton
kernels do (low-precision storage, fp32 accumulation).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Softmax attention on [B, H, T, Dh] tensors, differentiable by autograd.

    ``causal=True`` masks key j > query i (autoregressive); ``causal=False`` is
    bidirectional.  Returns ``o`` (input dtype) and optionally the natural-log
    ``lse`` of each query row ([B, H, T], accumulation dtype).
    """
    if q.dim() != 4:
        raise ValueError(f"expected q, k, v of shape [B, H, T, Dh], got {tuple(q.shape)}")
    dh = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(dh)
    acc = _acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        t_q, t_k = s.shape[-2], s.shape[-1]
        keep = torch.ones(t_q, t_k, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    o = torch.matmul(p, vf).to(q.dtype)
    if return_lse:
        return o, lse
    return o


def add_norm_reference(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    eps: float = 1e-5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with iGPT's uncentred, bias-free norm.

    h = x + residual (or h = x when residual is None);
    y = h / sqrt(mean(h^2, -1) + eps) * weight;  returns (y, residual_out)
    where residual_out = h (in residual's dtype), or x itself when residual is None.
    y has x's dtype.
    """
    acc = _acc_dtype(x.dtype)
    if residual is None:
        h = x.to(acc)
        residual_out = x
    else:
        h = x.to(acc) + residual.to(acc)
        residual_out = h.to(residual.dtype)
    rstd = torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (h * rstd * weight.to(acc)).to(x.dtype)
    return y, residual_out
