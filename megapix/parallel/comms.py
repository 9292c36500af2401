"""A recording layer for the collectives and point-to-point messages a step makes: op, group size, payload bytes,
and whether autograd's backward issued it. For tests and diagnostics (the planner's communication terms are
checked against it); never on the training path.

    with CommsRecorder() as rec:
        trainer.train_step(...)
    rec.summary()  # [{"op": "all_reduce", "ranks": [0, 1], "in_backward": True, "calls": 18, "bytes": ...}, ...]

It wraps the torch.distributed functions in place for its lifetime: megapix's TP and pipeline code and
DeepSpeed's deepspeed.comm both call them by attribute at call time. DeepSpeed's torch backend caches two
functions when it starts (its all-gather and reduce-scatter into a flat tensor); those are wrapped on the backend
too, so nothing DeepSpeed sends escapes the record. Payload: the bytes of the tensor(s) a rank contributes
(all_reduce: the tensor; reduce_scatter: its input; all_gather: its output; send/recv/broadcast: the tensor;
batch_isend_irecv: each of its ops as an isend or irecv).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

WRAPPED = {  # function -> the argument that holds the payload (position, keyword)
    "all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "send": (0, "tensor"), "recv": (0, "tensor"),
    "isend": (0, "tensor"), "irecv": (0, "tensor"), "reduce": (0, "tensor"),
    "all_gather_into_tensor": (0, "output_tensor"), "reduce_scatter_tensor": (1, "input"),
    "all_gather": (0, "tensor_list"), "reduce_scatter": (1, "input_list"),
    "all_to_all_single": (1, "input"),
}


@dataclass
class Call:
    op: str
    ranks: tuple  # the group's global ranks (for send/recv: this rank and its peer)
    nbytes: int
    in_backward: bool

    @property
    def group_size(self) -> int:
        return len(self.ranks)


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(x) for x in obj)
    return 0


_PEER = {"send": (1, "dst"), "isend": (1, "dst"), "recv": (1, "src"), "irecv": (1, "src")}


def _ranks(name, args, kwargs) -> tuple:
    if name in _PEER:
        pos, key = _PEER[name]
        peer = kwargs.get(key, args[pos] if len(args) > pos else None)
        return tuple(sorted({dist.get_rank(), peer}))
    group = kwargs.get("group")
    if group is None:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class CommsRecorder:
    def __init__(self):
        self.calls: list[Call] = []
        self._saved: list = []

    def _wrap(self, owner, attr, name):
        fn = getattr(owner, attr)
        pos, key = WRAPPED[name]
        recorder = self

        def recorded(*args, **kwargs):
            payload = kwargs.get(key, args[pos] if len(args) > pos else None)
            recorder.calls.append(Call(name, _ranks(name, args, kwargs), _nbytes(payload), _in_backward()))
            return fn(*args, **kwargs)

        self._saved.append((owner, attr, fn))
        setattr(owner, attr, recorded)

    def _wrap_batch(self):
        """batch_isend_irecv (the CP ring's): one isend or irecv per P2POp in the list, each with its peer."""
        fn = dist.batch_isend_irecv
        recorder = self

        def recorded(p2p_op_list):
            for op in p2p_op_list:
                name = "isend" if op.op is dist.distributed_c10d.isend else "irecv"
                peer = dist.get_global_rank(op.group, op.group_peer) if getattr(op, "group_peer", None) is not None \
                    and op.group is not None else op.peer
                recorder.calls.append(Call(name, tuple(sorted({dist.get_rank(), peer})), _nbytes(op.tensor),
                                           _in_backward()))
            return fn(p2p_op_list)

        self._saved.append((dist, "batch_isend_irecv", fn))
        dist.batch_isend_irecv = recorded

    def __enter__(self):
        for name in WRAPPED:
            if hasattr(dist, name):
                self._wrap(dist, name, name)
        self._wrap_batch()
        try:
            from deepspeed import comm as ds_comm

            backend = getattr(ds_comm.comm, "cdb", None)
        except ImportError:
            backend = None
        if backend is not None:  # functions DeepSpeed's backend bound at start-up
            for attr, name in (("all_gather_function", "all_gather_into_tensor"),
                               ("reduce_scatter_function", "reduce_scatter_tensor")):
                if getattr(backend, attr, None) is not None:
                    self._wrap(backend, attr, name)
        return self

    def __exit__(self, *exc):
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)
        self._saved.clear()
        return False

    def summary(self) -> list[dict]:
        """One row per (op, group, backward): calls and bytes."""
        rows: dict = {}
        for c in self.calls:
            key = (c.op, c.ranks, c.in_backward)
            row = rows.setdefault(key, {"op": c.op, "ranks": list(c.ranks), "in_backward": c.in_backward,
                                        "calls": 0, "bytes": 0})
            row["calls"] += 1
            row["bytes"] += c.nbytes
        return list(rows.values())
