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


def peak_memory(device: torch.device) -> tuple[str, float]:
    """(key, GiB) for the metrics record: on a GPU `peak_mem_gb`, the device memory torch has allocated at most
    (torch.cuda.max_memory_allocated: tensors, not the caching allocator's reserve); on CPU `peak_rss_gb`, the
    process's peak resident set size (ru_maxrss: everything the process touched, Python and libraries too)."""
    if device.type == "cuda":
        return "peak_mem_gb", torch.cuda.max_memory_allocated(device) / 2**30
    return "peak_rss_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


_MATMUL_PEAK: dict = {}


def measured_matmul_tflops(dtype: torch.dtype = torch.float32, seconds: float = 1.0, n: int = 1024) -> float:
    """An estimate of this CPU process's peak TFLOP/s: the best rate of n x n x n `dtype` matmuls over about
    `seconds`, with the threads this process has (torch.get_num_threads()). Cached per process and dtype."""
    if dtype not in _MATMUL_PEAK:
        g = torch.Generator().manual_seed(0)  # not the global generator: the run's random stream is untouched
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
        torch.mm(a, b)  # warm-up: thread pool and kernel selection
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0) / 1e12)
        _MATMUL_PEAK[dtype] = best
    return _MATMUL_PEAK[dtype]


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


def write_loss_plot(train: list, val: list, png_path: str, points: int = 2000) -> str | None:
    """<out>/loss.png: train loss (every step; averaged over buckets of steps beyond `points` of them) and val loss
    (each evaluation) against the step, in nats per token with bits/dim on the right axis. `train` and `val` are
    (step, loss) pairs. Written atomically (a reader never sees half a PNG). Returns the path, or None when there
    is nothing to plot yet."""
    if not train and not val:
        return None
    if len(train) > points:
        k = -(-len(train) // points)
        train = [(train[min(i + k, len(train)) - 1][0], sum(v for _, v in train[i:i + k]) / len(train[i:i + k]))
                 for i in range(0, len(train), k)]
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    from megapix.utils import atomic_path

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, ms=3, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.secondary_yaxis("right", functions=(lambda x: x / math.log(2), lambda b: b * math.log(2))).set_ylabel("bits/dim")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return png_path


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
