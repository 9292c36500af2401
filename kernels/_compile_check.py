"""Ahead-of-time compile check for the Triton kernels, no GPU needed: the specialisations that will launch.

Each launcher (flash_fwd, flash_bwd, norm_fwd, norm_bwd) runs on meta tensors laid out as the model lays them out
(q, k, v: views of the fused c_attn output; the attention output's gradient: a transposed view; the norm's input,
residual and weight all in the training dtype, as under DeepSpeed's bf16) at the iGPT presets' shapes, as on a GPU
of the target's capability and SM count, with every kernel launch captured instead of run. Each captured launch
goes through Triton's own JIT binder (the function ``triton.jit`` generates to specialise a launch: an int is i32 or
i64 by value, an int equal to 1 becomes a constexpr, pointers and ints divisible by 16 get ``tt.divisibility=16``)
with a CUDA backend for the target, and the signature, constexprs, attrs and options it derives are compiled to a
cubin for Hopper (sm90) and Ampere (sm80) with triton's bundled ptxas, as ``JITFunction.run`` would compile them.
A pointer is a CPU stand-in of the same dtype and the same alignment mod 16 as the real one (CUDA's caching
allocator hands out 512-byte aligned blocks; a view's offset decides).

Per kernel and config it prints the shared memory (metadata.shared, checked against the target's per-block limit),
the registers per thread and spills (triton's n_regs / n_spills: from the driver where this machine's GPU has the
target's capability, else read from the cubin with triton's bundled cuobjdump), and the blocks per SM they allow.
It catches type errors in the compiled (non-interpreter) code path and configs that cannot launch; it says nothing
about speed.

    python -m megapix.kernels._compile_check           # full matrix: 48 attention and 48 norm cases
    python -m megapix.kernels._compile_check --quick   # the subset the tests run (~40 s on 2 busy cores)

Must run WITHOUT TRITON_INTERPRET=1 (it needs triton's compiled standard library).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from unittest import mock

import torch

SMEM_LIMIT = {90: 232448, 80: 166912}  # per block (the opt-in maximum)
SMEM_PER_SM = {90: 233472, 80: 167936}
REGS_PER_SM = 65536
SMS = {90: 132, 80: 108}  # H100 SXM / A100: the norm backward's grid is two programs per SM
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# preset -> (tensor-parallel ranks, micro-batch) the model launches at: igpt-xl as its recipe runs it (TP 2, mb 2)
SHAPES = {"igpt-s": (1, 4), "igpt-m": (1, 4), "igpt-l": (1, 4), "igpt-xl": (2, 2)}


@dataclass
class Launch:
    kernel: object  # the kernel's lazy_jit
    grid: tuple
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def captured_launches(cap: int):
    """Inside: the launchers run as on a GPU of capability `cap` (its config table row, its SM count) and append
    each kernel launch to the yielded list instead of running it (meta tensors pass the launchable check)."""
    from . import _jit, configs
    from . import _triton_attention as A
    from . import _triton_norm as N

    launches: list[Launch] = []

    class Capture:
        def __init__(self, lazy):
            self.lazy = lazy

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.lazy, grid, args, kwargs))

    arch = "sm90" if cap >= 90 else "sm80"
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(_jit.lazy_jit, "kernel", lambda self: Capture(self)))
        stack.enter_context(mock.patch.object(configs, "_arch", lambda device: arch))
        stack.enter_context(mock.patch.object(N, "norm_bwd_programs",
                                              functools.partial(configs.norm_bwd_programs, sms=SMS[cap])))
        for module in (A, N):
            stack.enter_context(mock.patch.object(module, "check_launchable", lambda *tensors: None))
        yield launches


@dataclass(frozen=True)
class _Dims:
    """The presets' dimensions (megapix/config.py's presets; kernels/ imports nothing from megapix, and
    tests/test_compile_check compares these with the presets)."""

    n_head: int
    d_model: int
    n_ctx: int
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


PRESET_DIMS = {"igpt-s": _Dims(8, 512, 1024), "igpt-m": _Dims(8, 1024, 1024), "igpt-l": _Dims(16, 1536, 1024),
               "igpt-xl": _Dims(24, 3072, 4096)}


def _shape(preset: str):
    m = PRESET_DIMS[preset]
    tp, b = SHAPES[preset]
    return m, tp, b


def attention_launches(cap: int, dtype: torch.dtype, preset: str, causal: bool) -> list[Launch]:
    """The attention kernels one block launches, forward and backward, at the preset's shape."""
    from . import _triton_attention as A

    m, tp, b = _shape(preset)
    heads, dh, t = m.n_head // tp, m.head_dim, m.n_ctx
    meta = dict(device="meta", dtype=dtype)
    q, k, v = torch.empty(b, t, 3 * heads * dh, **meta).view(b, t, 3, heads, dh).permute(2, 0, 3, 1, 4)  # igpt.py
    # the output's gradient: c_proj's input gradient (b, t, heads*dh) through y.transpose(1, 2).reshape(...)
    do = torch.empty(b, t, heads * dh, **meta).view(b, t, heads, dh).transpose(1, 2)
    with captured_launches(cap) as launches:
        o, lse = A.flash_fwd(q, k, v, causal, dh**-0.5)
        A.flash_bwd(do, q, k, v, o, lse, causal, dh**-0.5)
    return launches


def norm_launches(cap: int, dtype: torch.dtype, preset: str, with_res: bool) -> list[Launch]:
    """add_norm forward and backward (with the residual: the blocks' norms; without: ln_1 of block 0 and ln_f)."""
    from . import _triton_norm as N

    m, _tp, b = _shape(preset)
    meta = dict(device="meta", dtype=dtype)
    x, res, dy = (torch.empty(b, m.n_ctx, m.d_model, **meta) for _ in range(3))
    w = torch.empty(m.d_model, **meta)
    with captured_launches(cap) as launches:
        _y, h, rstd = N.norm_fwd(x, res if with_res else None, w, m.norm_eps)
        N.norm_bwd(dy, h if with_res else x, w, rstd, dy if with_res else None, dtype)
    return launches


def _stand_in(arg):
    """A CPU tensor with the dtype and the alignment mod 16 of the (meta) tensor the launcher passed; others as is."""
    if not isinstance(arg, torch.Tensor):
        return arg
    size = arg.element_size()
    return torch.empty(64, dtype=arg.dtype)[arg.storage_offset() * size % 16 // size:]  # CPU blocks: 64-aligned


def specialise(launch: Launch, target):
    """(JITFunction, signature, constexprs, attrs, options) as triton's JITFunction.run derives them for this
    launch on `target` (its binder, then _pack_args)."""
    import triton
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = triton.jit(launch.kernel.fn)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(launch.kwargs, debug=launch.kwargs.get("debug", jit.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)  # as JITFunction.run adds them
    bound, specialization, options = binder(*[_stand_in(a) for a in launch.args], **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return jit, signature, constexprs, attrs, options


def _registers(kernel, cap: int) -> tuple[int, int, str]:
    """(n_regs, n_spills, source) of a compiled kernel: triton's loader on a GPU of the target's capability, else
    the cubin's resource usage (REG; spills as triton counts them: local bytes per thread / 4)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] * 10 == cap:
        kernel._init_handles()
        return kernel.n_regs, kernel.n_spills, "driver"
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return int(usage["REG"]), (int(usage.get("STACK", 0)) + int(usage.get("LOCAL", 0))) // 4, "cubin"


def compile_launch(launch: Launch, cap: int) -> dict:
    """Compile one captured launch for sm`cap`; its config and resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", cap, 32)
    jit, signature, constexprs, attrs, options = specialise(launch, target)
    kernel = triton.compile(triton.compiler.ASTSource(fn=jit, signature=signature, constexprs=constexprs,
                                                      attrs=attrs), target=target, options=options.__dict__)
    smem = kernel.metadata.shared
    name = launch.kernel.__name__
    if smem > SMEM_LIMIT[cap]:
        raise RuntimeError(f"{name}: needs {smem} B shared memory > sm{cap} limit {SMEM_LIMIT[cap]}")
    regs, spills, source = _registers(kernel, cap)
    threads = options.num_warps * 32
    blocks = min(SMEM_PER_SM[cap] // max(smem, 1), REGS_PER_SM // max(regs * threads, 1))
    blocks_kw = {k: launch.kwargs[k] for k in ("BLOCK_M", "BLOCK_N") if k in launch.kwargs}
    return {"kernel": name, "blocks": blocks_kw, "num_warps": options.num_warps, "num_stages": options.num_stages,
            "smem": smem, "n_regs": regs, "n_spills": spills, "source": source, "blocks_per_sm": blocks,
            "divisible_by_16": sorted(jit.arg_names[p[0]] for p, a in attrs.items() if ["tt.divisibility", 16] in a),
            "constexpr_ints": sorted(jit.arg_names[p[0]] for p in constexprs if not jit.params[p[0]].is_constexpr)}


def _line(r: dict) -> str:
    tiles = "x".join(str(v) for v in r["blocks"].values())
    return (f"  {r['kernel']:<20} {tiles or '-':>7} w{r['num_warps']} s{r['num_stages']}: smem {r['smem']} B, "
            f"{r['n_regs']} regs, {r['n_spills']} spills ({r['source']}), {r['blocks_per_sm']} block(s)/SM, "
            f"{len(r['divisible_by_16'])} args divisible by 16")


def main(argv=None) -> int:
    import triton

    if triton.knobs.runtime.interpret:
        print("unset TRITON_INTERPRET to run the compile check", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    bf16, fp32 = torch.bfloat16, torch.float32
    if args.quick:
        attn = [(90, bf16, "igpt-l", True), (80, bf16, "igpt-s", False)]
        norm = [(90, bf16, "igpt-l", True), (80, fp32, "igpt-xl", False)]
    else:
        attn = [(cap, dt, p, c) for cap in (90, 80) for dt in _DT for p in SHAPES for c in (True, False)]
        norm = [(cap, dt, p, r) for cap in (90, 80) for dt in _DT for p in SHAPES for r in (True, False)]
    cases = [("attention", attention_launches, c, f"causal={c[3]}") for c in attn]
    cases += [("add_norm", norm_launches, c, f"residual={c[3]}") for c in norm]
    failed = 0
    for kind, launches_of, case, variant in cases:
        cap, dt, preset = case[:3]
        t = time.time()
        title = f"{kind} sm{cap} {_DT[dt]} {preset} {variant}"
        try:
            rows = [compile_launch(launch, cap) for launch in launches_of(*case)]
            print(f"{title}: ok ({time.time() - t:.1f}s)", flush=True)
            for r in rows:
                print(_line(r), flush=True)
        except Exception as e:  # report all failures
            failed += 1
            print(f"{title}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
    print("compile check:", "FAILED" if failed else "all ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
