"""Triton kernels for the fused residual-add + uncentred bias-free norm.

Forward (one program per row): h = x + residual (fp32), rstd = 1/sqrt(mean(h^2) + eps),
y = h * rstd * w; writes y, h (the new residual stream) and rstd (fp32, per row).

Backward (a fixed grid of G programs, each owning a contiguous range of rows):
  xhat = h * rstd, g = w * dy,
  dh = rstd * (g - xhat * mean(g * xhat)) (+ the gradient flowing into residual_out),
  and each program accumulates its partial dW = sum_rows dy * xhat in registers and
  writes it to row ``pid`` of a [G, N] fp32 buffer; the host then sums that buffer
  over dim 0 (the second reduction stage).  No atomics, deterministic for a fixed G.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_launchable
from ._jit import interpreting, lazy_jit
from .configs import norm_bwd_programs, norm_config


@lazy_jit
def _add_norm_fwd(
    X, R, W, Y, HOUT, RSTD,
    sx, sr, sy, sh, N, eps,
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    h = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * sr + cols, mask=mask, other=0.0).to(tl.float32)
        h = h + r
        tl.store(HOUT + row * sh + cols, h.to(HOUT.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = h * rstd * w
    tl.store(Y + row * sy + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@lazy_jit
def _add_norm_bwd(
    DY, H, W, RSTD, DHOUT, DX, DW_PART,
    sdy, sh, sdho, sdx, n_rows, N, rows_per_program,
    HAS_DHOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    start64 = row_start.to(tl.int64)
    # row pointers advanced by their stride each iteration (64-bit pointer arithmetic)
    dy_ptr = DY + start64 * sdy + cols
    h_ptr = H + start64 * sh + cols
    dho_ptr = DHOUT + start64 * sdho + cols
    dx_ptr = DX + start64 * sdx + cols
    for row in range(row_start, row_end):
        dy = tl.load(dy_ptr, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = h * rstd
        g = w * dy
        c = tl.sum(xhat * g, 0) / N
        dh = (g - xhat * c) * rstd
        if HAS_DHOUT:
            dh += tl.load(dho_ptr, mask=mask, other=0.0).to(tl.float32)
            dho_ptr += sdho
        tl.store(dx_ptr, dh.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        dy_ptr += sdy
        h_ptr += sh
        dx_ptr += sdx
    tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw, mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    check_launchable(x, weight)
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"add_norm: weight must have shape [{n}], got {tuple(weight.shape)}")
    for t in (x, weight):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"add_norm (triton) supports fp32/fp16/bf16, got {t.dtype}")
    return n


def norm_fwd(x, residual, weight, eps: float):
    """Returns (y, h or None, rstd).  y: x's shape/dtype, h: residual's dtype, rstd fp32 x.shape[:-1]."""
    n = _check(x, weight)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    x2 = _rows(x, n)
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    h = None
    if residual is not None:
        h = torch.empty(x.shape, dtype=residual.dtype, device=x.device)
    if rows == 0 or n == 0:
        if h is not None:
            h.copy_(x + residual)
        return y, h, rstd
    r2 = _rows(residual, n) if residual is not None else x2
    h2 = h.view(-1, n) if h is not None else x2
    y2 = y.view(-1, n)
    cfg = norm_config(n, x.element_size(), interpreting())
    _add_norm_fwd[(rows,)](
        x2, r2, weight, y2, h2, rstd,
        x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0), n, eps,
        HAS_RES=residual is not None, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
    )
    return y, h, rstd


def norm_bwd(dy, h, weight, rstd, dh_out, out_dtype: torch.dtype):
    """Returns (dh in out_dtype with h's shape, dweight in weight's dtype)."""
    n = _check(h, weight)
    dy2 = _rows(dy, n)
    h2 = _rows(h, n)
    rows = h2.shape[0]
    dx = torch.empty(h.shape, dtype=out_dtype, device=h.device)
    if rows == 0 or n == 0:
        if dh_out is not None:
            dx.copy_(dh_out)
        return dx, torch.zeros_like(weight)
    dho2 = _rows(dh_out, n) if dh_out is not None else dy2
    dx2 = dx.view(-1, n)
    interp = interpreting()
    cfg = norm_config(n, h.element_size(), interp)
    g = norm_bwd_programs(rows, h.device, interp)
    rows_per_program = triton.cdiv(rows, g)
    g = triton.cdiv(rows, rows_per_program)
    dw_part = torch.empty((g, n), dtype=torch.float32, device=h.device)
    _add_norm_bwd[(g,)](
        dy2, h2, weight, rstd.reshape(-1).contiguous(), dho2, dx2, dw_part,
        dy2.stride(0), h2.stride(0), dho2.stride(0), dx2.stride(0), rows, n, rows_per_program,
        HAS_DHOUT=dh_out is not None, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
    )
    dw = dw_part.sum(0).to(weight.dtype)
    return dx, dw
