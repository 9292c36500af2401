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
    q_offset: int = 0,
    k_offset: int = 0,
):
    """Softmax attention of q [B, H, Tq, Dh] over k, v [B, H, Tk, Dh], differentiable by autograd.

    ``causal=True`` masks key j > query i (autoregressive) in global positions: q's rows sit at
    q_offset.., k's at k_offset.. (the chunked case of ring attention; self-attention is Tq = Tk and both
    offsets 0); ``causal=False`` is bidirectional.  Returns ``o`` (input dtype) and optionally the
    natural-log ``lse`` of each query row ([B, H, Tq], accumulation dtype).  A row that sees no key
    has o = 0 and lse = -inf, so partial results merge exactly (``merge_attention``).
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
        rows = torch.arange(t_q, device=s.device).unsqueeze(1) + q_offset
        cols = torch.arange(t_k, device=s.device).unsqueeze(0) + k_offset
        s = s.masked_fill(cols > rows, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # rows without a visible key: lse = -inf, and p = 0 rather than exp(-inf - -inf) = nan
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    o = torch.matmul(p, vf).to(q.dtype)
    if return_lse:
        return o, lse
    return o


class _AddNorm(torch.autograd.Function):
    """The residual add + norm with the Triton kernel's memory contract: it saves the new residual stream h in
    its own (16-bit) dtype and one fp32 rstd per row, not fp32 copies, and recomputes xhat = h * rstd in backward.
    autograd through the formula would keep an fp32 copy of h and the fp32 normalised product (8 bytes per element
    where this keeps 2 in bf16). Backward: g = w * dy, dh = rstd * (g - xhat * mean(g * xhat)) (+ the gradient
    flowing into residual_out), dw = sum over rows of dy * xhat."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        acc = _acc_dtype(x.dtype)
        if residual is None:
            h, residual_out = x.to(acc), x
        else:
            h = x.to(acc) + residual.to(acc)
            residual_out = h.to(residual.dtype)
        rstd = torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
        y = (h * rstd * weight.to(acc)).to(x.dtype)
        ctx.save_for_backward(residual_out, weight, rstd)
        ctx.x_dtype, ctx.has_residual = x.dtype, residual is not None
        ctx.res_dtype = None if residual is None else residual.dtype
        if residual is None:
            return y
        return y, residual_out

    @staticmethod
    def backward(ctx, dy, dres_out=None):
        h, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype
        xhat = h.to(acc) * rstd
        dy = dy.to(acc)
        g = dy * weight.to(acc)
        dh = rstd * (g - xhat * (g * xhat).mean(dim=-1, keepdim=True))
        if dres_out is not None:
            dh = dh + dres_out.to(acc)
        dw = (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        if not ctx.has_residual:
            return dh.to(ctx.x_dtype), None, dw, None
        return dh.to(ctx.x_dtype), dh.to(ctx.res_dtype), dw, None


def merge_attention(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor):
    """Attention over the union of two disjoint key sets from each set's (o, lse): exact, differentiable.

    lse = logaddexp(lse_a, lse_b); o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b (a side with
    lse = -inf weighs 0).  o in o_a's dtype, lse in fp32 (or fp64 for fp64 inputs).
    """
    acc = _acc_dtype(o_a.dtype)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    o = (w_a * o_a.to(acc) + w_b * o_b.to(acc)).to(o_a.dtype)
    return o, lse


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
    y has x's dtype. Differentiable (an autograd.Function that saves what the Triton kernel saves: see _AddNorm).
    """
    if residual is None:
        return _AddNorm.apply(x, None, weight, eps), x
    return _AddNorm.apply(x, residual, weight, eps)


def add_norm_formula(x, residual, weight, eps: float = 1e-5):
    """The same function written out for autograd to differentiate: the tests' independent check of _AddNorm's
    hand-written backward."""
    acc = _acc_dtype(x.dtype)
    h = x.to(acc) if residual is None else x.to(acc) + residual.to(acc)
    residual_out = x if residual is None else h.to(residual.dtype)
    rstd = torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (h * rstd * weight.to(acc)).to(x.dtype), residual_out
