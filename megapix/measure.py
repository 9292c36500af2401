"""What the planner (megapix/plan.py) is checked against: the bytes autograd saves for backward and the FLOPs a
step runs, measured with torch's own tools on the real model. Used by tests and diagnostics, never on the
training path (communication is recorded in megapix/parallel/comms.py).

SavedTensors: torch.autograd.graph.saved_tensors_hooks over a region; each storage counted once while autograd
holds it, parameters excluded. `live`/`peak` follow the packed tensors as autograd frees them (a holder object per
saved tensor, dropped with the graph): what a pipeline stage holding several micro-batches in flight reaches.
`total` adds each storage every time it becomes held, so over a step of m micro-batches it is m times one
micro-batch's, even when the allocator hands a freed address to the next micro-batch.

count_flops: torch.utils.flop_counter.FlopCounterMode over a callable, with the attention ops it has no formula
for here (SDPA's CPU flash op, megapix's Triton custom ops) given torch's own SDPA formulas.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter


class _Held:
    """One saved tensor as autograd keeps it; its storage leaves the live count when the last holder goes."""

    __slots__ = ("tensor", "owner", "key", "__weakref__")

    def __init__(self, tensor, owner, key):
        self.tensor, self.owner, self.key = tensor, owner, key

    def __del__(self):
        if self.key is not None:
            self.owner._release(self.key)


class SavedTensors:
    """with SavedTensors(params) as saved: ...forward (and backward)...; saved.total, saved.peak, saved.live."""

    def __init__(self, params=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in params if p.device.type != "meta"}
        self.sizes: dict[int, int] = {}  # storage address -> bytes, while held
        self.refs: dict[int, int] = {}  # storage address -> holders alive
        self.live = self.peak = self.total = 0

    def hold(self, t: torch.Tensor) -> "_Held":
        """Count a tensor something keeps for backward outside autograd's saved tensors (DeepSpeed's checkpoint
        keeps its block inputs on ctx.deepspeed_saved_tensors); counted until the returned holder is dropped."""
        return self._pack(t)

    def _pack(self, t: torch.Tensor):
        if t.device.type == "meta" or isinstance(t, torch.nn.Parameter):
            return _Held(t, self, None)
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.exclude or st.nbytes() == 0:
            return _Held(t, self, None)
        if self.refs.get(key, 0) == 0:
            self.sizes[key] = st.nbytes()
            self.live += st.nbytes()
            self.total += st.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Held(t, self, key)

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


_REGISTERED = False


def _register_attention_formulas() -> None:
    """FlopCounterMode counts SDPA's CUDA ops but not its CPU flash op nor megapix's Triton ops: give them
    torch's own SDPA formulas (the same matmul count: 4 b h s^2 d forward, twice that backward)."""
    global _REGISTERED
    if _REGISTERED:
        return
    aten = torch.ops.aten
    ops_fwd, ops_bwd = [], []
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        if hasattr(aten, name) and getattr(aten, name) not in flop_counter.flop_registry:
            ops_fwd.append(getattr(aten, name))
        if hasattr(aten, name + "_backward") and getattr(aten, name + "_backward") not in flop_counter.flop_registry:
            ops_bwd.append(getattr(aten, name + "_backward"))
    import megapix.kernels  # noqa: F401  (registers torch.ops.megapix_kernels.*)

    ops_fwd.append(torch.ops.megapix_kernels.flash_attn_fwd)
    ops_bwd.append(torch.ops.megapix_kernels.flash_attn_bwd)

    @flop_counter.register_flop_formula(ops_fwd)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(ops_bwd)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    _REGISTERED = True


def count_flops(fn) -> int:
    """FLOPs torch runs for fn() (e.g. one forward + backward), matmuls and attention, by FlopCounterMode."""
    _register_attention_formulas()
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
