"""What the loop does when a step goes wrong or a rank runs slow: the step guard.

After every step each rank contributes two floats to one all_gather: a fault code (a non-finite loss or gradient
norm on that rank, or a loss spike) and its busy time. So every rank sees the same verdict at the same step, and
every metrics record carries the spread of the ranks' times.

A bad step is handled by --on-nonfinite:
- `stop`: nothing new is saved; the run ends with one line naming the step (NonFiniteStop, exit 1).
- `rollback`: the last good checkpoint is reloaded (CheckpointManager.restore of its latest_tag) and the offending
  global batch is skipped from then on. The batch schedule is stateless (batch b = f(seed, data, b)), so "skip
  batch b" is a list of indices: the manager saves it in each checkpoint (skipped_batches.json) and a resume
  reproduces the same curve.
There is no `skip`: when the loss and the gradient norm are known, DeepSpeed has already applied the update
(bf16 and fp32 have no overflow-skip; only fp16 loss scaling skips a step), so the only exact way to drop one
global batch's update is the rollback.

Test-only hooks (read here, nowhere else; never set them in a real run):
- MEGAPIX_TEST_BAD_BATCH="B[*F][@R]": the loss of global batch B is seen as inf (or as F times its value) by
  rank R (default: every rank). It changes what the guard sees, not the gradients.
- MEGAPIX_TEST_SLOW_RANK="R:SECONDS": rank R sleeps SECONDS while fetching each batch (a slow node).
"""
from __future__ import annotations

import math
import os
import statistics
import time

import torch
import torch.distributed as dist

from megapix.errors import EXIT_FAILURE

SPIKE_WINDOW = 20  # the running median of the loss is over this many previous steps (at least 3 are needed)
MAX_ROLLBACKS = 3  # rollbacks to one checkpoint before the run stops: it diverges whatever batch it is given
EXIT_NONFINITE = EXIT_FAILURE  # not a requeue: rerunning the same steps diverges again

FAULTS = {1: "a loss spike", 2: "a non-finite gradient norm", 3: "a non-finite loss"}  # higher wins


class NonFiniteStep(Exception):
    """A step whose loss, gradient norm or weights are not fit to keep (the loop's guard handles it)."""

    def __init__(self, step: int, batch: int, reason: str):
        super().__init__(f"{reason} at step {step} (global batch {batch})")
        self.step, self.batch, self.reason = step, batch, reason


class NonFiniteStop(Exception):
    """The run stops on a bad step: the CLI prints the message as one line and exits EXIT_NONFINITE."""


def _test_bad_batch() -> tuple[int, float, int | None] | None:
    spec = os.environ.get("MEGAPIX_TEST_BAD_BATCH")
    if not spec:
        return None
    spec, _, rank = spec.partition("@")
    batch, _, factor = spec.partition("*")
    return int(batch), float(factor) if factor else math.inf, int(rank) if rank else None


def _test_slow_rank() -> tuple[int, float] | None:
    spec = os.environ.get("MEGAPIX_TEST_SLOW_RANK")
    if not spec:
        return None
    rank, _, seconds = spec.partition(":")
    return int(rank), float(seconds)


def batch_index(step: int, skipped: list[int]) -> int:
    """The global batch that step index `step` (0-based) trains on: the step-th index not in `skipped`."""
    b = step
    for s in sorted(skipped):
        if s <= b:
            b += 1
    return b


class StepGuard:
    """One run's verdict on each step (policy `on_nonfinite`, optional spike rule) and the ranks' time spread."""

    def __init__(self, on_nonfinite: str, spike_factor: float, rank: int, world: int, device):
        self.policy, self.spike_factor = on_nonfinite, spike_factor
        self.rank, self.world, self.device = rank, world, device
        self.bad_batch, self.slow = _test_bad_batch(), _test_slow_rank()
        self.pending: list[dict] = []  # rollbacks not yet written into a metrics record
        self.written: list[tuple[int, dict]] = []  # (the record's step, the rollback it carries)
        self.rollbacks_to: dict[str, int] = {}  # checkpoint tag -> rollbacks to it

    def slow_down(self) -> None:
        """The test-only slow-rank hook (a sleep while this rank fetches its batch)."""
        if self.slow is not None and self.slow[0] == self.rank:
            time.sleep(self.slow[1])

    def check(self, step: int, batch: int, loss: float | None, grad_norm: float | None, busy_s: float,
              history: list[float]) -> dict:
        """Collective: every rank calls it after a step. Raises NonFiniteStep on every rank when any rank saw a
        non-finite loss or gradient norm (or a spike: `history` is the previous train losses, rank 0's counts);
        else returns this step's straggler fields for the metrics record."""
        if self.bad_batch is not None and self.bad_batch[0] == batch and self.bad_batch[2] in (None, self.rank):
            loss = loss * self.bad_batch[1] if math.isfinite(self.bad_batch[1]) and loss is not None else math.inf
        code = 0
        if loss is None or not math.isfinite(loss):
            code = 3
        elif grad_norm is not None and not math.isfinite(grad_norm):
            code = 2
        elif self.spike_factor and self.rank == 0 and len(history) >= 3:  # rank 0's curve survives a resume
            median = statistics.median(history[-SPIKE_WINDOW:])
            if loss > self.spike_factor * median:
                code = 1
        mine = torch.tensor([float(code), busy_s], dtype=torch.float64, device=self.device)
        if self.world > 1:
            rows = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(rows, mine)
        else:
            rows = [mine]
        codes = [int(r[0]) for r in rows]
        times = [float(r[1]) for r in rows]
        worst = max(codes)
        if worst:
            ranks = ",".join(str(r) for r, c in enumerate(codes) if c == worst)
            what = (f"a loss spike (above {self.spike_factor:g} x the median of the last {SPIKE_WINDOW} steps)"
                    if worst == 1 else f"{FAULTS[worst]} on rank {ranks}")
            raise NonFiniteStep(step, batch, what)
        slowest = max(range(len(times)), key=times.__getitem__)
        return {"rank_time_min_s": min(times), "rank_time_median_s": statistics.median(times),
                "rank_time_max_s": times[slowest], "slowest_rank": slowest}

    def recover(self, trainer, bad: NonFiniteStep) -> int:
        """Handle a bad step by the policy: raise NonFiniteStop, or roll back to the last good checkpoint, skip
        the offending global batch from now on, and return the step to continue from. `bad` may also be the
        manager's NonFiniteWeights (a save refused): the offending batch is then the one just trained."""
        if not isinstance(bad, NonFiniteStep):
            bad = NonFiniteStep(bad.step, trainer.batch, f"non-finite weights ({bad.tensors} tensors)")
        ckpt = trainer.checkpoints
        tag = ckpt.latest_tag if ckpt.enabled else None
        saved = f"nothing was saved after step {ckpt.saved_step}" if ckpt.saved_step else "nothing was saved"
        if self.policy == "stop":
            raise NonFiniteStop(f"{bad}; {saved}: lower --lr, or pass --on-nonfinite rollback with --save-every N")
        if tag is None:
            raise NonFiniteStop(f"{bad}; no checkpoint to roll back to yet ({saved}): pass --save-every N so that "
                                "--on-nonfinite rollback has one, or lower --lr")
        self.rollbacks_to[tag] = self.rollbacks_to.get(tag, 0) + 1
        if self.rollbacks_to[tag] > MAX_ROLLBACKS:
            raise NonFiniteStop(f"{bad}; {MAX_ROLLBACKS} rollbacks to {tag} did not get past it, the run diverges "
                                "whatever batch it is given: lower --lr")
        skipped = sorted(set(ckpt.skipped_batches) | {bad.batch})
        step = ckpt.restore(trainer.engine, trainer.is_pipeline, trainer.log if trainer.owns_log else None, tag=tag)
        ckpt.skipped_batches = skipped
        # records after `step` are gone from metrics.jsonl: the rollbacks they carried go into the next one
        self.pending = [e for s, e in self.written if s > step] + self.pending
        self.written = [(s, e) for s, e in self.written if s <= step]
        event = {"step": bad.step, "batch": bad.batch, "reason": bad.reason, "rolled_back_to": step}
        self.pending.append(event)
        if trainer.is_rank0:
            print(f"megapix: {bad}: rolled back to {tag} (step {step}); global batch {bad.batch} is skipped from now "
                  "on", flush=True)
        return step

    def take_events(self, record_step: int) -> dict:
        """{"rolled_back": [the rollbacks since the last record]} for the metrics record of `record_step`, or {}."""
        events, self.pending = self.pending, []
        self.written += [(record_step, e) for e in events]
        return {"rolled_back": events} if events else {}
