"""The planner's communication check. A recording layer for the collectives and point-to-point messages a step
makes: op, group size, payload bytes,
and whether autograd's backward issued it. For tests and diagnostics (the planner's communication terms are
checked against it, and `megapix train --profile-comms N` writes what it saw to <out>/comms_profile.json, see
CommsProfile); never on the default training path.

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

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megapix.parallel.layout import Layout
from megapix.plan.timing import comm_bytes
from megapix.utils import write_json

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

    def summary(self, by_size: bool = False) -> list[dict]:
        """One row per (op, group, backward), or also per message size (`msg_bytes`): calls and bytes."""
        rows: dict = {}
        for c in self.calls:
            key = (c.op, c.ranks, c.in_backward) + ((c.nbytes,) if by_size else ())
            row = rows.setdefault(key, {"op": c.op, "ranks": list(c.ranks), "in_backward": c.in_backward,
                                        **({"msg_bytes": c.nbytes} if by_size else {}), "calls": 0, "bytes": 0})
            row["calls"] += 1
            row["bytes"] += c.nbytes
        return list(rows.values())


# ---- what a recorded call is for: the planner's group kinds (megapix.plan.timing.comm_bytes) ----
P2P = ("send", "recv", "isend", "irecv")
KINDS = ("tp", "pp", "dp_reduce", "dp_gather", "cp")
SCALAR = 64  # bytes a call: the loss and meter all-reduces (a few fp32 scalars a step) are not the planner's business


def layout_groups(topology, rank: int, cp_group=None) -> dict:
    """This rank's TP, DP and PP groups (global ranks) in DeepSpeed's PipeModelDataParallelTopology, and its CP
    group when there is one (on the data axis: DeepSpeed's DP group is DP x CP)."""
    groups = {axis: next(tuple(g) for g in topology.get_axis_comm_lists(name) if rank in g)
              for axis, name in (("tp", "model"), ("dp", "data"), ("pp", "pipe"))}
    if cp_group is not None:
        groups["cp"] = tuple(dist.get_process_group_ranks(cp_group))
    return groups


def call_kind(row: dict, groups: dict) -> str:
    """A summary row's kind: p2p messages within the rank's pipeline are pp; a collective is classified by its
    group's ranks (a DP one by gather or reduce); p2p within the CP group is the ring's (cp); scalars, groups that
    are no layout axis (one rank) and other p2p are "other"."""
    if row["op"] in P2P:
        if set(row["ranks"]) <= set(groups["pp"]):
            return "pp"
        return "cp" if "cp" in groups and set(row["ranks"]) <= set(groups["cp"]) else "other"
    by_ranks = {tuple(g): axis for axis, g in groups.items() if len(g) > 1 and axis != "cp"}
    axis = by_ranks.get(tuple(row["ranks"]))
    if axis is None or row["bytes"] <= SCALAR * row["calls"]:
        return "other"
    if axis == "dp":
        return "dp_gather" if "gather" in row["op"] else "dp_reduce"
    return axis


def bytes_by_kind(rows: list[dict], groups: dict) -> dict:
    """Bytes of summary rows per kind (KINDS, plus "other")."""
    out = dict.fromkeys((*KINDS, "other"), 0)
    for row in rows:
        out[call_kind(row, groups)] += row["bytes"]
    return out


# ---- --profile-comms: the diagnostic a run writes ----
PROFILE_FILE = "comms_profile.json"


def planned_bytes(cfg, layout, micro_batch: int, ds_config: dict) -> tuple[list[dict] | None, list[str]]:
    """megapix.plan.timing.comm_bytes for a run's layout, per stage and step (payloads in the training dtype), and the
    notes that say where it is known to differ from what DeepSpeed does for this run; None where the planner does
    not model the layout."""
    lay = Layout(tp=layout.tp, pp=layout.pp, dp=layout.dp, zero_stage=layout.zero_stage, micro_batch=micro_batch,
                 checkpointing=cfg.train.activation_checkpointing, sp=layout.sp, cp=layout.cp)
    nbytes = 2 if ds_config.get("bf16", {}).get("enabled") else 4
    notes = []
    threshold = ds_config.get("zero_optimization", {}).get("stage3_param_persistence_threshold")
    if layout.zero_stage == 3 and layout.dp > 1 and threshold != 0:
        kept = f"{threshold} elements" if threshold else "DeepSpeed's default threshold"
        notes.append("planned dp_gather assumes stage3_param_persistence_threshold 0 (every parameter "
                     f"partitioned); this run keeps parameters below {kept} whole, so it gathers less")
    return comm_bytes(cfg.model, lay, cfg.train.global_batch, nbytes=nbytes), notes


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f} MiB"


class CommsProfile:
    """`--profile-comms N`: every rank records the collectives and p2p messages of N training steps, the ones after
    the first step this process runs (that one builds DeepSpeed's flat buffers and differs from the rest), with
    CommsRecorder and, where it sees them (deepspeed.comm's calls: ZeRO, the pipeline), DeepSpeed's own
    comms_logger, which adds each op's latency; then rank 0 writes <out>/comms_profile.json: per rank, the
    per-op, per-group table, its bytes per step by kind beside megapix.plan.timing.comm_bytes's for the rank's stage,
    and DeepSpeed's log. Only the steps' forward, backward and optimizer step are recorded (no data loading,
    evaluation or checkpoint). The Trainer makes one only when the flag is set."""

    def __init__(self, steps: int, first_step: int):
        self.wanted = steps
        self.first = first_step + 2
        self.steps: list[int] = []
        self.recorder = CommsRecorder()
        self.ds_comm = None
        try:
            from deepspeed import comm as ds_comm

            if not ds_comm.comms_logger.enabled:  # one the DeepSpeed JSON enabled logs the whole run: left alone
                self.ds_comm = ds_comm
                ds_comm.reset_log()
        except (ImportError, AttributeError):
            pass

    @contextlib.contextmanager
    def step(self, step: int):
        """Record `step` when it is one of the profiled ones."""
        if not self.first <= step < self.first + self.wanted:
            yield
            return
        if self.ds_comm is not None:
            self.ds_comm.configure(enabled=True, prof_all=True, verbose=False)
        try:
            with self.recorder:
                yield
        finally:
            if self.ds_comm is not None:
                self.ds_comm.configure(enabled=False)
        self.steps.append(step)

    @property
    def complete(self) -> bool:
        return len(self.steps) >= self.wanted

    def _deepspeed_log(self) -> list[dict] | None:
        if self.ds_comm is None:
            return None
        rows = []
        for op, sizes in sorted(self.ds_comm.comms_logger.get_raw_data().items()):
            for size, (count, latencies, _algbw, busbw) in sorted(sizes.items()):
                rows.append({"op": op, "msg_bytes": int(size), "calls": int(count),
                             "total_ms": float(sum(latencies)), "busbw_avg_gbps": float(sum(busbw) / len(busbw))})
        return rows

    def write(self, out: str, layout, planned: list[dict] | None, notes: list[str]) -> str | None:
        """Collective (every rank calls it): gather each rank's record on rank 0, which writes the file and prints
        a few lines. `planned`: megapix.plan.timing.comm_bytes per stage (per step), or None where it does not model the
        layout; `notes`: what to know when comparing. Returns the path on rank 0."""
        n = max(1, len(self.steps))
        calls = self.recorder.summary(by_size=True)
        groups = layout_groups(layout.topology, layout.rank, layout.cp_group)
        for row in calls:
            row["group"] = call_kind(row, groups)
        stage = layout.pp_rank
        mine = {"rank": layout.rank, "stage": stage, "groups": groups, "calls": calls,
                "bytes_per_step": {k: v / n for k, v in bytes_by_kind(calls, groups).items()},
                "planned_per_step": ({k: planned[stage][k] for k in KINDS} if planned is not None else None),
                "deepspeed_comms_logger": self._deepspeed_log()}
        parts = [None] * layout.world if layout.rank == 0 else None
        if layout.world > 1:
            dist.gather_object(mine, parts, dst=0)
        else:
            parts = [mine]
        if layout.rank != 0:
            return None
        path = os.path.join(out, PROFILE_FILE)
        write_json(path, {"steps": self.steps, "layout": layout.describe(batch=False, world=True), "notes": notes,
                          "ranks": parts,
                          "about": "bytes: the payload a rank puts into each call (all_reduce: the tensor; "
                                   "reduce_scatter: its input; all_gather: its output; send/recv: the tensor), "
                                   "summed over the steps; *_per_step divide by their number. group: the planner's "
                                   "kind (tp, pp, dp_reduce, dp_gather, cp; other: scalars and groups of one rank, "
                                   "which it leaves out). "
                                   "deepspeed_comms_logger: deepspeed.comm's own record of its calls (sizes in "
                                   "its convention), with latencies; megapix's TP and p2p calls bypass it."})
        self._print(parts, path, notes)
        return path

    def _print(self, parts: list[dict], path: str, notes: list[str]) -> None:
        steps = (f"step {self.steps[0]}" if len(self.steps) == 1 else
                 f"steps {self.steps[0]}-{self.steps[-1]}" if self.steps else "no step")
        print(f"megapix: communication profile of {steps} on {len(parts)} rank(s), per step, the largest rank "
              f"(all ranks, every op and group: {path}):", flush=True)
        for kind in (*KINDS, "other"):
            got = max(p["bytes_per_step"][kind] for p in parts)
            plans = [p["planned_per_step"][kind] for p in parts if p["planned_per_step"] and kind in KINDS]
            if got or any(plans):
                plan = f", planned {_mib(max(plans))}" if plans else ""
                label = "other (scalars, groups of one rank)" if kind == "other" else kind
                print(f"megapix:   {label:<10} {_mib(got)}{plan}", flush=True)
        for note in notes:
            print(f"megapix:   note: {note}", flush=True)
