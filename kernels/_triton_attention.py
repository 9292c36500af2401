"""FlashAttention-2-style Triton kernels (forward, and an atomics-free backward).

Forward: one program per (query block, batch*head).  It streams key/value
blocks through SRAM with an online softmax (running max m_i and running sum
l_i, in the log2 domain with the 1/sqrt(Dh) scale folded into the exponent),
accumulates in fp32, and saves the natural-log logsumexp of every query row.

Backward (as in FA2, but without atomics):
  * ``_attn_bwd_preprocess``: delta_i = rowsum(dO_i * O_i)  (fp32, [B, H, T]);
  * ``_attn_bwd_dkdv``: one program per key block; loops over the query blocks
    that can see it, recomputing P from Q, K and the saved logsumexp, and
    accumulates dV = P^T dO and dK = scale * dS^T Q in registers;
  * ``_attn_bwd_dq``: one program per query block; loops over key blocks and
    accumulates dQ = scale * dS K.
  With dS = P * (dP - delta), dP = dO V^T.  Every output element is written by
  exactly one program, so no atomics and the result is deterministic.

Arbitrary T is handled with masks (rows/columns past T are loaded as zero and
excluded from the softmax); head dims that are not a power of two (e.g. 96)
use a head-dim block padded to the next power of two with masked loads.

The chunked case (ring attention, megapix/parallel/context.py): q holds TQ
positions starting at global position Q_OFF, k and v hold TK starting at K_OFF,
and the causal mask compares global positions (key K_OFF + n visible to query
Q_OFF + m iff K_OFF + n <= Q_OFF + m); causal loops stop at the last visible key
block.  A query row that sees no key gets o = 0 and lse = -inf, so partial
results merge exactly: lse = logaddexp(lse_a, lse_b), o = sum exp(lse_x - lse) o_x.
The lse is differentiable: its gradient dlse enters the backward as
delta - dlse (d lse / d s = p, so dS = P * (dP - (delta - dlse))).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_launchable
from ._jit import interpreting, lazy_jit
from .configs import attention_config

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@lazy_jit
def _attn_fwd(
    Q, K, V, O, LSE,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    H, TQ, TK, Q_OFF, K_OFF, HEAD_DIM, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    T = TQ

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < T
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = TK
    if CAUSAL:  # keys up to the block's last query, in global positions
        hi = tl.maximum(tl.minimum((pid_m + 1) * BLOCK_M + Q_OFF - K_OFF, TK), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < TK
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        keep = n_mask[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] + K_OFF <= offs_m[:, None] + Q_OFF)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet (possible in the chunked case) keeps m = -inf: shift by 0 instead
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(o_base + offs_m[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=m_mask)


@lazy_jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    sob, soh, sot, sdob, sdoh, sdot,
    H, T, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < T
    mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=m_mask)


@lazy_jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
    sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
    H, TQ, TK, Q_OFF, K_OFF, HEAD_DIM, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    lse_base = LSE + bh.to(tl.int64) * TQ
    delta_base = DELTA + bh.to(tl.int64) * TQ

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < TK
    d_mask = offs_d < HEAD_DIM
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo = 0
    if CAUSAL:
        # first query block containing a query that can see key pid_n * BLOCK_N (global positions)
        lo = (tl.minimum(tl.maximum(pid_n * BLOCK_N + K_OFF - Q_OFF, 0), TQ) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, TQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < TQ
        q_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdot + offs_d[None, :], mask=q_mask, other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        keep = m_mask[None, :]
        if CAUSAL:
            keep = keep & (offs_m[None, :] + Q_OFF >= offs_n[:, None] + K_OFF)
        p_t = tl.where(keep, tl.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)

    dk = dk * sm_scale
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@lazy_jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
    H, TQ, TK, Q_OFF, K_OFF, HEAD_DIM, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    T = TQ

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < T
    d_mask = offs_d < HEAD_DIM
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = TK
    if CAUSAL:
        hi = tl.maximum(tl.minimum((pid_m + 1) * BLOCK_M + Q_OFF - K_OFF, TK), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < TK
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        keep = n_mask[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] + K_OFF <= offs_m[:, None] + Q_OFF)
        p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------- launchers

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_launchable(q, k, v)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"flash_attention expects q [B, H, Tq, Dh] and k, v of equal shape [B, H, Tk, Dh]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention (triton) supports fp32/fp16/bf16, got {q.dtype}")
    if not 1 <= q.shape[-1] <= 256:
        raise ValueError(f"flash_attention (triton) supports head dims up to 256, got {q.shape[-1]}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _head_dim_block(dh: int) -> int:
    return max(16, triton.next_power_of_2(dh))


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (matches torch's default matmul precision)
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_fwd(q, k, v, causal: bool, scale: float, q_offset: int = 0, k_offset: int = 0):
    _check(q, k, v)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, T, D = q.shape
    TK = k.shape[2]
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return o, lse
    bd = _head_dim_block(D)
    cfg = attention_config("fwd", bd, q.dtype, causal, q.device, interpreting())
    grid = (triton.cdiv(T, cfg.block_m), B * H)
    _attn_fwd[grid](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, T, TK, q_offset, k_offset, D, scale * LOG2E,
        CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, PREC=_prec(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def flash_bwd(do, q, k, v, o, lse, causal: bool, scale: float, dlse=None, q_offset: int = 0, k_offset: int = 0):
    """dq, dk, dv of o (and, given dlse, of lse too) for the forward flash_fwd(q, k, v, ...) that gave o, lse."""
    _check(q, k, v)
    q, k, v, o, do = (_last_dim_contiguous(t) for t in (q, k, v, o, do))
    lse = lse.contiguous()
    B, H, T, D = q.shape
    TK = k.shape[2]
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, TK, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, TK, D), dtype=v.dtype, device=q.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    bd = _head_dim_block(D)
    interp = interpreting()
    cfg = attention_config("bwd", bd, q.dtype, causal, q.device, interp)
    pre_bm = 16 if interp else 64
    _attn_bwd_preprocess[(triton.cdiv(T, pre_bm), B * H)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, T, D, BLOCK_M=pre_bm, BLOCK_D=bd,
    )
    if dlse is not None:
        delta = delta - dlse.float()  # dS = P * (dP - delta + dlse)
    common = dict(CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd,
                  PREC=_prec(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    strides_in = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    _attn_bwd_dkdv[(triton.cdiv(TK, cfg.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, *strides_in,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, T, TK, q_offset, k_offset, D, scale * LOG2E, scale, **common,
    )
    _attn_bwd_dq[(triton.cdiv(T, cfg.block_m), B * H)](
        q, k, v, do, lse, delta, dq, *strides_in,
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, T, TK, q_offset, k_offset, D, scale * LOG2E, scale, **common,
    )
    return dq, dk, dv

