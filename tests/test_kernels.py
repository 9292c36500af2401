"""Tests for kernels/ (FlashAttention-2 style attention, fused add + norm).

The Triton kernels run on CPU through the Triton interpreter (TRITON_INTERPRET=1),
in float32, and are compared with float64 PyTorch references.

How the interpreter is enabled (investigated on triton 3.9):
  * ``@triton.jit`` picks interpreter vs. compiler when a function is *decorated*, from
    ``triton.knobs.runtime.interpret`` (which re-reads TRITON_INTERPRET on each access).
  * megapix.kernels wraps its own kernels in ``megapix.kernels._jit.lazy_jit``, which makes
    that choice at every launch, so importing the package earlier does not matter.
  * BUT triton's own ``tl.sum``, ``tl.max``, ``tl.zeros`` (triton/language/standard.py)
    are ``@jit`` functions decorated when ``triton.language`` is first imported.  If
    that import happened without TRITON_INTERPRET=1, the interpreter later fails with
    "Cannot call @triton.jit'd outside of the scope of a kernel".
  So these tests run only in a pytest process started with TRITON_INTERPRET=1 (marker
  ``triton_interp``, see tests/conftest.py; ``make test`` runs that process after the main one):
  the flag is set before anything imports triton, and it never reaches the other tests.

Error bound used throughout (fp32 kernel vs float64 reference):
    max|out - ref| <= RTOL * max|ref| + ATOL
with RTOL = 2e-5 for forward outputs, 1e-4 for gradients, ATOL = 1e-6
(ATOL covers exactly-zero references, e.g. dq and dk at T = 1).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch


if os.environ.get("TRITON_INTERPRET") != "1":  # conftest reports the skip (and how to run them)
    pytest.skip("Triton interpreter tests: TRITON_INTERPRET=1 python -m pytest -m triton_interp",
                allow_module_level=True)
triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from megapix import kernels  # noqa: E402
from megapix.kernels import add_norm, flash_attention, rms_norm  # noqa: E402
from megapix.kernels.reference import add_norm_reference, attention_reference  # noqa: E402

if not isinstance(triton.language.standard.sum, InterpretedFunction):
    raise RuntimeError("TRITON_INTERPRET=1 is set but tl.sum is not interpreted: something imported "
                       "triton.language before the flag was set")

FWD_RTOL = 2e-5
BWD_RTOL = 1e-4
ATOL = 1e-6


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, name: str = "") -> None:
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rtol * scale + ATOL, f"{name}: max abs err {err:.3e} vs max abs ref {scale:.3e} (rtol {rtol})"


# ----------------------------------------------------------------------------- attention

def _attn_case(B, H, T, D, causal, *, layout="bhtd", seed=0):
    """Random q, k, v (fp32 leaves for the kernel, fp64 copies for the reference)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "bhtd":
        base = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3)]
        views32 = lambda ts: ts  # noqa: E731
    else:  # q, k, v are transposes of a packed [B, T, 3, H, D] tensor: non-contiguous
        packed = torch.randn(B, T, 3, H, D, generator=g, dtype=torch.float64)
        base = [packed[:, :, i].transpose(1, 2) for i in range(3)]
        views32 = None
    do = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    return base, do, views32


def _run_attention(q64s, do64, causal, backend="triton", noncontig=False):
    if noncontig:
        # build fp32 leaves in [B, T, 3, H, D] layout and take strided views
        packed = torch.stack([t.transpose(1, 2) for t in q64s], dim=2).float().requires_grad_()
        q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
        assert not q.is_contiguous() and q.stride(-1) == 1
        leaves = (packed,)
    else:
        q, k, v = (t.float().requires_grad_() for t in q64s)
        leaves = (q, k, v)
    o = flash_attention(q, k, v, causal=causal, backend=backend)
    # gradient enters through a transposed view -> non-contiguous dO in the backward
    (o.transpose(1, 2) * do64.float().transpose(1, 2)).sum().backward()
    if noncontig:
        g = packed.grad
        grads = tuple(g[:, :, i].transpose(1, 2) for i in range(3))
    else:
        grads = tuple(t.grad for t in leaves)
    return o, grads


def _reference_attention(q64s, do64, causal):
    q, k, v = (t.detach().clone().requires_grad_() for t in q64s)
    o = attention_reference(q, k, v, causal=causal)
    o.backward(do64)
    return o, (q.grad, k.grad, v.grad)


ATTN_CASES = [
    # (B, H, T, Dh, causal)
    (1, 2, 1, 32, True),
    (1, 2, 1, 64, False),
    (2, 3, 17, 64, True),
    (1, 2, 17, 32, False),
    (1, 2, 77, 96, True),
    (1, 1, 77, 128, False),
    (1, 2, 130, 64, True),
    (1, 1, 130, 96, False),
    (1, 2, 33, 128, True),
    (1, 2, 64, 64, False),  # exact multiple of the block size
]


@pytest.mark.parametrize("B,H,T,D,causal", ATTN_CASES)
def test_flash_attention_matches_reference(B, H, T, D, causal):
    qkv, do, _ = _attn_case(B, H, T, D, causal)
    o, grads = _run_attention(qkv, do, causal)
    o_ref, grads_ref = _reference_attention(qkv, do, causal)
    assert o.dtype == torch.float32
    assert_close(o, o_ref, FWD_RTOL, "o")
    for name, g, gr in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(g, gr, BWD_RTOL, name)


@pytest.mark.parametrize("T,D,causal", [(17, 64, True), (77, 96, False)])
def test_flash_attention_noncontiguous(T, D, causal):
    qkv, do, _ = _attn_case(2, 2, T, D, causal, layout="bthd", seed=1)
    o, grads = _run_attention(qkv, do, causal, noncontig=True)
    o_ref, grads_ref = _reference_attention(qkv, do, causal)
    assert_close(o, o_ref, FWD_RTOL, "o")
    for name, g, gr in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(g, gr, BWD_RTOL, name)


def test_flash_attention_lse():
    qkv, _, _ = _attn_case(1, 2, 45, 64, True, seed=2)
    o, lse = torch.ops.megapix_kernels.flash_attn_fwd(*(t.float() for t in qkv), True, 1 / 8.0)
    o_ref, lse_ref = attention_reference(*qkv, causal=True, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 45)
    assert_close(lse, lse_ref, FWD_RTOL, "lse")
    assert_close(o, o_ref, FWD_RTOL, "o")


def test_causal_mask_is_applied():
    """Changing future keys/values must not change earlier outputs (and must for bidirectional)."""
    qkv, _, _ = _attn_case(1, 1, 20, 32, True, seed=3)
    q, k, v = (t.float() for t in qkv)
    k2, v2 = k.clone(), v.clone()
    k2[..., 10:, :] += 3.0
    v2[..., 10:, :] -= 3.0
    o1 = flash_attention(q, k, v, causal=True, backend="triton")
    o2 = flash_attention(q, k2, v2, causal=True, backend="triton")
    assert torch.equal(o1[..., :10, :], o2[..., :10, :])
    assert not torch.allclose(o1[..., 10:, :], o2[..., 10:, :])
    b1 = flash_attention(q, k, v, causal=False, backend="triton")
    b2 = flash_attention(q, k2, v2, causal=False, backend="triton")
    assert not torch.allclose(b1[..., :10, :], b2[..., :10, :])


def test_flash_attention_fp16_inputs():
    """Low-precision inputs, fp32 accumulation: compare with fp64 math on the same fp16 values."""
    qkv, do, _ = _attn_case(1, 2, 33, 64, True, seed=4)
    q, k, v = (t.half().requires_grad_() for t in qkv)
    o = flash_attention(q, k, v, causal=True, backend="triton")
    o.backward(do.half())
    assert o.dtype == torch.float16 and q.grad.dtype == torch.float16
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref = attention_reference(q64, k64, v64, causal=True)
    o_ref.backward(do.half().double())
    assert_close(o, o_ref, 2e-3, "o fp16")
    for name, g, gr in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad)):
        assert_close(g, gr, 1e-2, name + " fp16")


# ----------------------------------------------------------------------------- bf16 attention, emulated
# The interpreter's bf16 tl.dot is wrong on CPU, so bf16 is checked in two steps: (1) a PyTorch emulation of the
# kernels' arithmetic (fp32 math, the forward's online softmax over BLOCK_N keys, and a rounding to the storage
# dtype exactly where the kernels cast: P before P@V and dV, dS before dK and dQ, the outputs) equals the kernels
# run in fp16 through the interpreter (whose fp16 dot is right); (2) the same emulation in bf16 stays within error
# bounds derived from bf16's unit roundoff against float64 attention on the same bf16 inputs.
LOG2E = 1.4426950408889634


def _emulate_flash(q, k, v, do, causal, dtype, round_p=True, block_n=16):
    """(o, dq, dk, dv) of the Triton kernels' algorithm on q, k, v, do holding `dtype` values (see above);
    round_p=False keeps P and dS in fp32 (what the test shows the kernels do not do)."""
    q, k, v, do = (t.float() for t in (q, k, v, do))
    T, scale = q.shape[-2], q.shape[-1] ** -0.5
    s_all = (q @ k.transpose(-1, -2)) * (scale * LOG2E)
    if causal:
        s_all = s_all.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    rnd = (lambda x: x.to(dtype).float()) if round_p else (lambda x: x)
    m = torch.full(q.shape[:-1], float("-inf"))
    l_sum, acc = torch.zeros(q.shape[:-1]), torch.zeros_like(q)
    for start in range(0, T, block_n):  # _attn_fwd's loop: running max, rescaled sum and accumulator
        s = s_all[..., start:start + block_n]
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp2(s - m_new[..., None])
        alpha = torch.exp2(m - m_new)
        l_sum = l_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + rnd(p) @ v[..., start:start + block_n, :]
        m = m_new
    o = (acc / l_sum[..., None]).to(dtype)
    p = torch.exp2(s_all - (m + torch.log2(l_sum))[..., None])  # the backward recomputes P from the lse
    delta = (o.float() * do).sum(-1)  # _attn_bwd_preprocess: from the stored (rounded) output
    ds = p * (do @ v.transpose(-1, -2) - delta[..., None])
    dv = (rnd(p).transpose(-1, -2) @ do).to(dtype)
    dk = ((rnd(ds).transpose(-1, -2) @ q) * scale).to(dtype)
    dq = ((rnd(ds) @ k) * scale).to(dtype)
    return o, dq, dk, dv


def _ulp(x, dtype):
    """One unit in the last place of `dtype` at |x|."""
    return 2.0 ** math.floor(math.log2(abs(x))) * torch.finfo(dtype).eps


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_flash_attention_rounding_points_equal_the_emulation_in_fp16(causal):
    g = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(1, 2, 40, 64, generator=g).half() for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = flash_attention(*leaves, causal=causal, backend="triton")
    o.backward(do)
    kernel = (o.detach(), *(t.grad for t in leaves))
    emulated = _emulate_flash(q, k, v, do, causal, torch.float16)
    unrounded = _emulate_flash(q, k, v, do, causal, torch.float16, round_p=False)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), kernel, emulated, unrounded):
        # bit-equal but where fp32 summation order moved a value across a rounding boundary: an output's last
        # bit, or (in dq, dk: sums that cancel) one dS's, at most one ulp at the tensor's scale
        assert (a == b).double().mean() >= 0.98, name
        assert (a.double() - b.double()).abs().max() <= _ulp(b.abs().max().item(), torch.float16), name
        assert (a == c).double().mean() < 0.9, name  # where P and dS round matters, and is found


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_bf16_attention_algorithm_within_its_rounding_bounds(causal):
    """The kernels' bf16 arithmetic (the emulation) against float64 attention on the same bf16 inputs, each
    element within the bound its roundings allow (u = 2^-8, bf16's unit roundoff; fp32 sums add a 1e-5 slack):
      o:  u max|v| (P rounded, normalised by the unrounded sum) + u |o| (output cast)
      dv: u sum_i P_ij |dO_i| + u |dv|
      dk, dq: scale sum (P |d delta| + u |dS|) |q| (resp. |k|) + u |dk| (resp. |dq|), with d delta =
          rowsum((o - o_ref) dO), the forward's error carried into the backward by delta = rowsum(o dO)."""
    u = 2.0**-8
    g = torch.Generator().manual_seed(8)
    q, k, v, do = (torch.randn(2, 2, 128, 96, generator=g).bfloat16() for _ in range(4))
    emulated = _emulate_flash(q, k, v, do, causal, torch.bfloat16)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    do64 = do.double()
    o64 = attention_reference(q64, k64, v64, causal=causal)
    o64.backward(do64)
    scale = q.shape[-1] ** -0.5
    s = (q64 @ k64.transpose(-1, -2)).detach() * scale
    if causal:
        s = s.masked_fill(torch.ones(128, 128, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    o64 = o64.detach()
    ds = p * (do64 @ v64.detach().transpose(-1, -2) - (o64 * do64).sum(-1, keepdim=True))
    bound_o = u * v64.detach().abs().amax((-2, -1), keepdim=True) + u * o64.abs()
    d_delta = ((emulated[0].double() - o64) * do64).sum(-1, keepdim=True).abs()  # o's error, carried by delta
    err_ds = p * d_delta + u * ds.abs()
    bounds = {"o": bound_o, "dv": u * p.transpose(-1, -2) @ do64.abs() + u * v64.grad.abs(),
              "dk": scale * err_ds.transpose(-1, -2) @ q64.detach().abs() + u * k64.grad.abs(),
              "dq": scale * err_ds @ k64.detach().abs() + u * q64.grad.abs()}
    refs = {"o": o64, "dq": q64.grad, "dk": k64.grad, "dv": v64.grad}
    for name, got in zip(("o", "dq", "dk", "dv"), emulated):
        err = (got.double() - refs[name]).abs()
        slack = 1e-5 * refs[name].abs().max()
        ratio = (err / (bounds[name] + slack)).max().item()
        assert 0.1 < ratio <= 1, (name, ratio)  # within the bound, and the bound is not vacuous (0.17-0.77 seen)
        assert err.max() / refs[name].abs().max() < 2e-2 / 2, name  # gpu_check's BF16_TOL, with margin


# ----------------------------------------------------------------------------- chunked attention (ring)

def _assert_lse_close(lse, ref, rtol, name):
    """lse: -inf exactly where the reference is (rows that see no key), close elsewhere."""
    none = torch.isinf(ref)
    assert torch.equal(torch.isinf(lse) & (lse < 0), none), name
    if (~none).any():
        assert_close(lse[~none], ref[~none], rtol, name)


# (Tq, Tk, q_offset, k_offset, causal): a query chunk after its key chunk (all visible), on the diagonal, a key
# chunk partly in the future (rows with no visible key), offsets not multiples of the block, and bidirectional
CHUNK_CASES = [
    (16, 16, 32, 0, True),
    (24, 24, 24, 24, True),
    (20, 36, 5, 13, True),
    (33, 17, 40, 0, True),
    (17, 40, 0, 9, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("TQ,TK,q_off,k_off,causal", CHUNK_CASES)
def test_chunked_attention_offset_mask_and_lse(TQ, TK, q_off, k_off, causal, dtype):
    """The kernel's offset causal mask and its differentiable lse against the fp64 reference (the same values):
    forward o and lse, and dq, dk, dv of a loss that uses both o and lse."""
    g = torch.Generator().manual_seed(TQ * 100 + TK)
    q64 = torch.randn(2, 2, TQ, 32, generator=g, dtype=torch.float64)
    k64, v64 = (torch.randn(2, 2, TK, 32, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(2, 2, TQ, 32, generator=g, dtype=torch.float64)
    dl = torch.randn(2, 2, TQ, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    o, lse = kernels.flash_attention_chunk(q, k, v, causal, q_off, k_off, backend="triton")
    assert o.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 2, TQ)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o_ref, lse_ref = kernels.flash_attention_chunk(*ref_in, causal, q_off, k_off, backend="torch")
    fwd, bwd = (FWD_RTOL, BWD_RTOL) if dtype == torch.float32 else (2e-3, 1e-2)
    assert_close(o, o_ref, fwd, "o")
    _assert_lse_close(lse, lse_ref, fwd, "lse")
    seen = ~torch.isinf(lse_ref)  # -inf rows carry no gradient through lse
    ((o.double() * do).sum() + (lse.double().where(seen, 0.0) * dl).sum()).backward()
    ((o_ref * do).sum() + (lse_ref.where(seen, 0.0) * dl).sum()).backward()
    for name, a, b in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), (t.grad for t in ref_in)):
        assert_close(a, b, bwd, name)


def test_ring_partials_merge_to_full_causal_attention():
    """Ring attention's arithmetic: a causal sequence of 4 chunks, each query chunk attended over every key
    chunk separately (the invisible ones give lse = -inf) and merged with merge_attention, equals full causal
    attention in o and in every gradient (through the merge's dependence on each partial lse)."""
    g = torch.Generator().manual_seed(7)
    T, C = 48, 12
    q64, k64, v64, do = (torch.randn(1, 2, T, 16, generator=g, dtype=torch.float64) for _ in range(4))
    q, k, v = (t.float().requires_grad_() for t in (q64, k64, v64))
    outs = []
    for i in range(0, T, C):
        o_i, lse_i = None, None
        for j in range(0, T, C):
            o, lse = kernels.flash_attention_chunk(q[:, :, i:i + C], k[:, :, j:j + C], v[:, :, j:j + C], True, i, j,
                                                   backend="triton")
            o_i, lse_i = (o, lse) if o_i is None else kernels.merge_attention(o_i, lse_i, o, lse)
        outs.append(o_i)
    out = torch.cat(outs, dim=2)
    out.backward(do.float())
    ref_in = [t.detach().clone().requires_grad_() for t in (q64, k64, v64)]
    ref = attention_reference(*ref_in, causal=True)
    ref.backward(do)
    assert_close(out, ref, FWD_RTOL, "o")
    for name, a, b in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), (t.grad for t in ref_in)):
        assert_close(a, b, BWD_RTOL, name)


# ----------------------------------------------------------------------------- add_norm

NORM_CASES = [
    # (leading shape, width, with residual)
    ((2, 3), 96, True),
    ((2, 3), 96, False),
    ((5,), 1000, True),
    ((5,), 1000, False),
    ((3, 2), 1536, True),
    ((4,), 1536, False),
    ((1, 7), 3072, True),
]


@pytest.mark.parametrize("lead,n,with_res", NORM_CASES)
def test_add_norm_matches_reference(lead, n, with_res):
    g = torch.Generator().manual_seed(n + int(with_res))
    shape = (*lead, n)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    r64 = torch.randn(shape, generator=g, dtype=torch.float64) if with_res else None
    w64 = 1.0 + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    dres_out = torch.randn(shape, generator=g, dtype=torch.float64)  # gradient into residual_out

    def run(x, r, w, backend):
        y, res_out = add_norm(x, r, w, eps=1e-5, backend=backend)
        (y * dy.to(y.dtype)).sum().backward(retain_graph=True)
        (res_out * dres_out.to(res_out.dtype)).sum().backward()
        return y, res_out

    x = x64.float().requires_grad_()
    r = r64.float().requires_grad_() if with_res else None
    w = w64.float().requires_grad_()
    y, res_out = run(x, r, w, "triton")

    xr = x64.clone().requires_grad_()
    rr = r64.clone().requires_grad_() if with_res else None
    wr = w64.clone().requires_grad_()
    y_ref, res_ref = run(xr, rr, wr, "torch")

    assert y.dtype == torch.float32 and y.shape == shape
    assert_close(y, y_ref, FWD_RTOL, "y")
    assert_close(res_out, res_ref, FWD_RTOL, "residual_out")
    if not with_res:
        assert res_out is x
    assert_close(x.grad, xr.grad, BWD_RTOL, "dx")
    assert_close(w.grad, wr.grad, BWD_RTOL, "dweight")
    if with_res:
        assert_close(r.grad, rr.grad, BWD_RTOL, "dresidual")


def test_add_norm_noncontiguous_and_rms_norm():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(96, 3, 2, generator=g, dtype=torch.float64)
    x64 = base.permute(2, 1, 0)  # [2, 3, 96], non-contiguous
    r64 = torch.randn(3, 2, 96, generator=g, dtype=torch.float64).transpose(0, 1)
    w64 = torch.rand(96, generator=g, dtype=torch.float64) + 0.5
    y, h = add_norm(x64.float(), r64.float(), w64.float(), backend="triton")
    y_ref, h_ref = add_norm_reference(x64, r64, w64)
    assert_close(y, y_ref, FWD_RTOL, "y")
    assert_close(h, h_ref, FWD_RTOL, "h")
    y2 = rms_norm(x64.float(), w64.float(), eps=1e-6, backend="triton")
    assert_close(y2, add_norm_reference(x64, None, w64, eps=1e-6)[0], FWD_RTOL, "rms_norm")


def test_add_norm_dweight_two_stage_many_rows():
    """More rows than backward programs: each program reduces several rows into its dW partial."""
    g = torch.Generator().manual_seed(8)
    x64 = torch.randn(37, 96, generator=g, dtype=torch.float64)
    w64 = torch.randn(96, generator=g, dtype=torch.float64)
    x, w = x64.float().requires_grad_(), w64.float().requires_grad_()
    rms_norm(x, w, backend="triton").sum().backward()
    xr, wr = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    add_norm_reference(xr, None, wr)[0].sum().backward()
    assert_close(x.grad, xr.grad, BWD_RTOL, "dx")
    assert_close(w.grad, wr.grad, BWD_RTOL, "dweight")


# ----------------------------------------------------------------------------- dispatch

def test_dispatch_auto_on_cpu_is_reference():
    q = torch.randn(1, 2, 5, 32)
    assert kernels.resolve_backend("auto", q) == "torch"
    assert torch.equal(flash_attention(q, q, q), attention_reference(q, q, q, causal=True))
    x, w = torch.randn(3, 96), torch.rand(96)
    y, res = add_norm(x, x, w)
    y_ref, res_ref = add_norm_reference(x, x, w)
    assert torch.equal(y, y_ref) and torch.equal(res, res_ref)


def test_dispatch_forced_triton_uses_kernel():
    q = torch.randn(1, 1, 5, 32)
    assert kernels.resolve_backend("triton", q) == "triton"
    o = flash_attention(q, q, q, backend="triton")
    assert_close(o, attention_reference(q.double(), q.double(), q.double()), FWD_RTOL, "o")


def test_dispatch_bad_backend():
    q = torch.randn(1, 1, 5, 32)
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda'"):
        flash_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        add_norm(q, None, torch.ones(32), backend="Triton")


def test_dispatch_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 5, 32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        flash_attention(q, q, q, backend="triton")


def test_interpreter_flag_read_at_launch(monkeypatch):
    """lazy_jit follows TRITON_INTERPRET per launch, not when the kernel was decorated."""
    from megapix.kernels._jit import lazy_jit
    from megapix.kernels._triton_norm import _add_norm_fwd
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_add_norm_fwd, lazy_jit)
    assert isinstance(_add_norm_fwd.kernel(), InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert isinstance(_add_norm_fwd.kernel(), triton.runtime.jit.JITFunction)


def test_package_imports_triton_lazily():
    # (that kernels/ imports nothing from the rest of megapix is checked on its source: tests/test_packaging.py)
    code = textwrap.dedent("""
        import sys
        import megapix.kernels
        assert 'triton' not in sys.modules, 'triton imported eagerly'
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ----------------------------------------------------------------------------- custom ops / torch.compile

def test_custom_ops_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 17, 96, dtype=torch.bfloat16)
        o, lse = torch.ops.megapix_kernels.flash_attn_fwd(q, q, q, True, 0.1)
        assert o.shape == q.shape and o.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 17) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.megapix_kernels.flash_attn_bwd(o, q, q, q, o, lse, True, 0.1)
        assert dq.shape == q.shape and dv.dtype == torch.bfloat16
        x = torch.empty(4, 5, 1000, dtype=torch.float16)
        r = torch.empty(4, 5, 1000, dtype=torch.float32)
        w = torch.empty(1000, dtype=torch.float32)
        y, h, rstd = torch.ops.megapix_kernels.add_rms_norm_fwd(x, r, w, 1e-5)
        assert y.dtype == torch.float16 and h.dtype == torch.float32 and rstd.shape == (4, 5)
        dx, dw = torch.ops.megapix_kernels.rms_norm_bwd(y, h, w, rstd, h, torch.float16)
        assert dx.dtype == torch.float16 and dx.shape == x.shape and dw.shape == (1000,)


@pytest.mark.parametrize("op_case", ["attn", "add_norm", "rms_norm"])
def test_custom_ops_opcheck(op_case):
    g = torch.Generator().manual_seed(11)
    if op_case == "attn":
        q, k, v = (torch.randn(1, 2, 9, 32, generator=g, requires_grad=True) for _ in range(3))
        torch.library.opcheck(torch.ops.megapix_kernels.flash_attn_fwd.default, (q, k, v, True, 32 ** -0.5))
    elif op_case == "add_norm":
        x, r = (torch.randn(3, 96, generator=g, requires_grad=True) for _ in range(2))
        w = torch.rand(96, generator=g).requires_grad_()
        torch.library.opcheck(torch.ops.megapix_kernels.add_rms_norm_fwd.default, (x, r, w, 1e-5))
    else:
        x = torch.randn(3, 96, generator=g, requires_grad=True)
        w = torch.rand(96, generator=g).requires_grad_()
        torch.library.opcheck(torch.ops.megapix_kernels.rms_norm_fwd.default, (x, w, 1e-5))


def test_torch_compile_through_custom_ops():
    torch._dynamo.reset()

    def block(x, res, w, wq):
        y, res = add_norm(x, res, w, backend="triton")
        b, t, c = y.shape
        qkv = (y @ wq).view(b, t, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        o = flash_attention(qkv[0], qkv[1], qkv[2], causal=True, backend="triton")
        return o.transpose(1, 2).reshape(b, t, c), res

    g = torch.Generator().manual_seed(12)
    x, res = torch.randn(2, 11, 64, generator=g), torch.randn(2, 11, 64, generator=g)
    w, wq = torch.rand(64, generator=g) + 0.5, torch.randn(64, 192, generator=g) / 8

    def loss_and_grads(fn):
        ins = [t.clone().requires_grad_() for t in (x, res, w, wq)]
        out, r = fn(*ins)
        ((out ** 2).sum() + (r * 0.5).sum()).backward()
        return out.detach(), [t.grad for t in ins]

    out_e, grads_e = loss_and_grads(block)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out_c, grads_c = loss_and_grads(compiled)
    assert_close(out_c, out_e, 1e-6, "compiled out")
    for gc, ge in zip(grads_c, grads_e):
        assert_close(gc, ge, 1e-6, "compiled grad")
    # and the kernel-backed block still matches the pure reference
    out_r, grads_r = loss_and_grads(lambda *a: _block_reference(*a))
    assert_close(out_e, out_r, FWD_RTOL, "block out")
    for ge, gr in zip(grads_e, grads_r):
        assert_close(ge, gr, BWD_RTOL, "block grad")


def _block_reference(x, res, w, wq):
    y, res = add_norm_reference(x, res, w)
    b, t, c = y.shape
    qkv = (y @ wq).view(b, t, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
    o = attention_reference(qkv[0], qkv[1], qkv[2], causal=True)
    return o.transpose(1, 2).reshape(b, t, c), res


def test_compiled_path_builds_for_hopper_and_ampere():
    """Compile (no GPU needed) the real, non-interpreted kernels with the pinned configs for
    sm90 and sm80 and check their shared memory fits: catches errors the interpreter cannot."""
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton's NVIDIA backend is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "megapix.kernels._compile_check", "--quick"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all ok" in proc.stdout
