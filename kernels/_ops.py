"""torch.library custom ops (namespace ``megapix_kernels``) wrapping the Triton launchers.

Registering the kernels as custom ops with fake (meta) implementations and
autograd formulas lets torch.compile trace through them as opaque nodes
instead of graph-breaking on the Triton launch.  The Triton modules are
imported lazily inside the real implementations, so registering the ops needs
only torch.

Ops:
  flash_attn_fwd(q, k, v, causal, scale, q_offset=0, k_offset=0) -> (o, lse)     lse: fp32 [B, H, Tq], differentiable
  flash_attn_bwd(do, q, k, v, o, lse, causal, scale, dlse=None, q_offset=0, k_offset=0) -> (dq, dk, dv)
      (q [B, H, Tq, Dh] at global positions q_offset.., k and v [B, H, Tk, Dh] at k_offset..: the causal mask
      compares global positions; the chunked case of ring attention)
  rms_norm_fwd(x, weight, eps) -> (y, rstd)                    rstd: fp32 x.shape[:-1]
  add_rms_norm_fwd(x, residual, weight, eps) -> (y, h, rstd)   h = x + residual (residual dtype)
  rms_norm_bwd(dy, h, weight, rstd, dh_out, out_dtype) -> (dh, dweight)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

NS = "megapix_kernels"


# ----------------------------------------------------------------------------- attention

@torch.library.custom_op(f"{NS}::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, q_offset: int = 0,
                   k_offset: int = 0) -> Tuple[Tensor, Tensor]:
    from ._triton_attention import flash_fwd

    return flash_fwd(q, k, v, causal, scale, q_offset, k_offset)


@flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(q, k, v, causal, scale, q_offset=0, k_offset=0):
    b, h, t, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op(f"{NS}::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                   causal: bool, scale: float, dlse: Optional[Tensor] = None, q_offset: int = 0,
                   k_offset: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    from ._triton_attention import flash_bwd

    return flash_bwd(do, q, k, v, o, lse, causal, scale, dlse, q_offset, k_offset)


@flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(do, q, k, v, o, lse, causal, scale, dlse=None, q_offset=0, k_offset=0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_setup(ctx, inputs, output):
    q, k, v, causal, scale, q_offset, k_offset = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal = causal
    ctx.scale = scale
    ctx.offsets = (q_offset, k_offset)


def _flash_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = torch.ops.megapix_kernels.flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, dlse,
                                                          *ctx.offsets)
    return dq, dk, dv, None, None, None, None


flash_attn_fwd.register_autograd(_flash_backward, setup_context=_flash_setup)


# ----------------------------------------------------------------------------- norm

@torch.library.custom_op(f"{NS}::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    from ._triton_norm import norm_fwd

    y, _, rstd = norm_fwd(x, None, weight, eps)
    return y, rstd


@rms_norm_fwd.register_fake
def _rms_norm_fwd_fake(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(f"{NS}::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    from ._triton_norm import norm_fwd

    return norm_fwd(x, residual, weight, eps)


@add_rms_norm_fwd.register_fake
def _add_rms_norm_fwd_fake(x, residual, weight, eps):
    return (x.new_empty(x.shape), residual.new_empty(x.shape),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op(f"{NS}::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, dh_out: Optional[Tensor],
                 out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    from ._triton_norm import norm_bwd

    return norm_bwd(dy, h, weight, rstd, dh_out, out_dtype)


@rms_norm_bwd.register_fake
def _rms_norm_bwd_fake(dy, h, weight, rstd, dh_out, out_dtype):
    return h.new_empty(h.shape, dtype=out_dtype), weight.new_empty(weight.shape)


def _rms_setup(ctx, inputs, output):
    x, weight, eps = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_backward(ctx, dy, drstd):
    x, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dw = torch.ops.megapix_kernels.rms_norm_bwd(dy, x, weight, rstd, None, x.dtype)
    return dx, dw, None


rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


def _add_rms_setup(ctx, inputs, output):
    x, residual, weight, eps = inputs
    _, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.x_dtype = x.dtype
    ctx.res_dtype = residual.dtype
    ctx.mark_non_differentiable(rstd)


def _add_rms_backward(ctx, dy, dh_out, drstd):
    h, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dx, dw = torch.ops.megapix_kernels.rms_norm_bwd(dy, h, weight, rstd, dh_out, ctx.x_dtype)
    dres = dx if ctx.res_dtype == ctx.x_dtype else dx.to(ctx.res_dtype)
    return dx, dres, dw, None


add_rms_norm_fwd.register_autograd(_add_rms_backward, setup_context=_add_rms_setup)
