"""What a run leaves beside its checkpoints and how it is told to stop: metrics.jsonl, the stop request
(preemption signal or time budget), peak memory, and the check that an --out does not already hold a run."""
from __future__ import annotations

import json
import os
import resource
import signal
import time

import torch
import torch.distributed as dist

from megapix.checkpoint import latest_step
from megapix.config import ConfigError


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StopRequest:
    """SIGUSR1/SIGTERM (preemption) or the time budget: stop at the next step boundary, on every rank together."""

    def __init__(self, time_budget: float):
        self.signalled = False
        self.deadline = time.time() + time_budget if time_budget > 0 else None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signalled = True

    def should_stop(self) -> bool:
        local = self.signalled or (self.deadline is not None and time.time() > self.deadline)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's signal stops all of them at the same step
        return bool(flag.item())


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a kill in the middle of a write) is skipped; a bad line
    anywhere else means the file is not ours to rewrite."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ConfigError(f"{path} line {i + 1} is not JSON; move the file away and resume again") from None
    return out


class MetricsLog:
    """<out>/metrics.jsonl, one JSON record per step (rank 0 writes). On resume, records past the checkpoint
    (and a torn last line) are dropped, so the file is exactly the curve of the run that continues.
    `append=True` keeps what is there (several runs of one sweep share a file)."""

    def __init__(self, path: str, enabled: bool, resume_step: int, append: bool = False):
        self.path, self.enabled = path, enabled
        if enabled and not append and os.path.isfile(path):
            kept = [r for r in read_metrics(path) if resume_step >= 0 and r.get("step", 0) <= resume_step]
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def existing_run_step(out: str) -> int | None:
    """The step of a run already in `out` (from checkpoints/latest, else the newest global_step* folder, else
    the last metrics.jsonl record), or None when `out` holds no run."""
    step = latest_step(os.path.join(out, "checkpoints"))
    if step is not None:
        return step
    path = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        try:
            recs = read_metrics(path)
        except ConfigError:
            recs = []
        return int(recs[-1].get("step", 0)) if recs else 0
    return None


def refuse_existing_run(out: str, shown: str) -> None:
    """Training into a folder that holds a run without --resume would cut its metrics and overwrite its
    checkpoints: refuse, naming both ways out."""
    step = existing_run_step(out)
    if step is not None:
        raise ConfigError(f"{shown} already holds a run at step {step}: pass --resume to continue, or choose "
                          "another --out")
