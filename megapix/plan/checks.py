"""The planner's checks against the engine, measured with torch's own tools: the bytes a live DeepSpeed engine holds
for model states (engine_state_bytes), the bytes autograd saves for backward (SavedTensors) and the FLOPs a step runs
(count_flops). The communication recorder is megapix.plan.comms. Used by tests, the GPU check and diagnostics, never on
the training path.

SavedTensors: torch.autograd.graph.saved_tensors_hooks over a region; each storage counted once while autograd holds
it, parameters excluded. `live`/`peak` follow the packed tensors as autograd frees them: what a pipeline stage
holding several micro-batches in flight reaches. `total` adds each storage every time it becomes held (m times one
micro-batch's over a step of m, even when the allocator reuses an address).
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


def engine_state_bytes(engine) -> dict:
    """Bytes of the tensors a DeepSpeed engine holds for parameters, gradients, fp32 master and optimizer state,
    each storage counted once. Call it when the optimizer is about to step (Adam state and gradients alive):
    module parameters (ZeRO-3: their ds_tensor partitions) and .grad; every tensor the DeepSpeed optimizer wrapper
    keeps in its attributes (ZeRO-1/2: single_partition_of_fp32_groups and its .grad; ZeRO-3:
    fp32_partitioned_groups_flat, grad_partitions_flat_buffer; BF16_Optimizer: fp32 partitions, flat fp32 grads),
    and the inner torch optimizer's state (exp_avg, exp_avg_sq). Storages, not shapes: a parameter that is a view
    of a larger tensor counts the whole storage it keeps alive (how the TP shard views were found). At micro-batch
    1, autograd leaves sos.grad a view of the [1, T, d] embedding gradient (T x its size): measure at >= 2."""
    seen: set = set()
    out = {"params": 0, "grads": 0, "master": 0, "optimizer": 0}

    def storage_bytes(t) -> int:
        if t.device.type == "meta" or t.numel() == 0:
            return 0
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            return 0
        seen.add(st.data_ptr())
        return st.nbytes()

    module_params = list(engine.module.parameters())
    for p in module_params:
        out["params"] += storage_bytes(p.ds_tensor if hasattr(p, "ds_tensor") else p)
    for p in module_params:  # after all parameters: a grad must never claim a flat parameter buffer
        if p.grad is not None:
            out["grads"] += storage_bytes(p.grad)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)

    def walk(obj, kind, depth=0):
        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            if obj.numel() > 1:  # scalars (step counters, norms) are not model state
                out[kind] += storage_bytes(obj)
            if obj.grad is not None:
                out["grads"] += storage_bytes(obj.grad)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, kind, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, kind, depth + 1)

    walk(list(inner.state.values()), "optimizer")
    if opt is not inner:  # a DeepSpeed wrapper: its gradient buffers, then its fp32 partitions (the master)
        attrs = {k: v for k, v in vars(opt).items() if k != "optimizer"}
        for name, value in attrs.items():
            if "grad" in name:
                walk(value, "grads")
        for name, value in attrs.items():
            if "grad" not in name:
                walk(value, "master")
    return out

