"""The learning-rate schedule, one definition: linear warm-up, then cosine decay to 0 at max_steps (the paper).

The engine builds DeepSpeed's LambdaLR from `Schedule.factor`; every restore (a resume, a rollback) then applies
the schedule of the current settings at the restored step (`Schedule.apply`): the scheduler and optimizer state
a checkpoint restores carry the lr of the run that saved it, so a resume with --allow-changed --lr, a new
--warmup-steps or a longer --max-steps would otherwise train on at the old schedule (a finished run's end lr, 0).
A resume that changes nothing finds the same lr and leaves the restored state untouched (bit-exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def default_warmup(steps_per_epoch: int, max_steps: int) -> int:
    """The warm-up when --warmup-steps is not given: one epoch (the paper), at most 10% of the run."""
    return min(steps_per_epoch, max(1, max_steps // 10))


@dataclass(frozen=True)
class Schedule:
    lr: float  # the peak lr
    warmup: int  # linear warm-up steps
    max_steps: int  # the cosine reaches 0 here

    def factor(self, step: int) -> float:
        """The multiple of the peak lr that optimizer step `step` (0-based: the step after `step` steps) uses."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.max_steps - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> float:
        """The lr of the optimizer step taken after `step` completed steps (what metrics.jsonl logs at step+1)."""
        return self.lr * self.factor(step)

    def apply(self, engine, step: int) -> str | None:
        """Set `engine`'s scheduler and every optimizer param group to this schedule at `step` (just restored).
        Returns one line saying what changed, or None when the restored lr already is this schedule's."""
        sched = engine.lr_scheduler
        if sched is None:
            return None
        groups = sched.optimizer.param_groups
        restored = [g["lr"] for g in groups]
        want = [self.lr * self.factor(step)] * len(groups)
        bases = [g.get("initial_lr", self.lr) for g in groups]
        if restored == want and bases == [self.lr] * len(groups) and sched.last_epoch == step:
            return None
        for group, lr in zip(groups, want):
            group["lr"], group["initial_lr"] = lr, self.lr
        sched.base_lrs = [self.lr] * len(groups)
        if hasattr(sched, "lr_lambdas"):  # a LambdaLR (the engine's): its later steps follow this schedule too
            sched.lr_lambdas = [self.factor] * len(groups)
        sched.last_epoch = step
        sched._last_lr = list(want)
        return (f"the lr schedule follows the current settings (peak {self.lr:g}, warm-up {self.warmup}, ends at "
                f"step {self.max_steps}): step {step + 1} trains at lr {want[0]:.4g} (the checkpoint's schedule "
                f"had {restored[0]:.4g})")


def continuation(schedule: Schedule, step: int, max_steps: int, warmup: int) -> str:
    """What `--resume --max-steps max_steps` after `step` finished steps does to the lr, in one line: a cosine
    stretched to a new end restarts from where the new curve stands at `step`, not from the lr the run ended at."""
    new = Schedule(schedule.lr, warmup, max_steps)
    return (f"--max-steps {max_steps} stretches the cosine to end at step {max_steps}: step {step + 1} trains at lr "
            f"{new.lr_at(step):.3g} (step {step} had {schedule.lr_at(step - 1):.3g}), then the lr decays to 0 again")
