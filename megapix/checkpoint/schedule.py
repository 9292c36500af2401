"""The learning-rate schedule, one definition: linear warm-up, then cosine decay to 0 at max_steps (the paper), or
WSD (--schedule wsd): the same warm-up, the peak lr held (stable), then a decay to 0 over the last `decay` steps.
WSD's decay is 1-sqrt (Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations", found it better than a linear cool-down). A checkpoint of the stable phase continues to a longer
run exactly as if that run had been trained straight through: the lr up to the new decay is the peak either way.

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


def default_decay(max_steps: int) -> int:
    """WSD's decay when --decay-steps is not given: the last 10% of the run (the usual 10-20%). Measured on the
    2-layer d64 model, 200 steps, batch 16: final val_loss 1.6511 / 1.6053 (seeds 0 / 1) at 10%, 1.6572 / 1.6147
    at 20%, 1.6763 at 30%, 1.6560 at 5%; the cosine 1.7709 (docs/training.md)."""
    return max(1, max_steps // 10)


@dataclass(frozen=True)
class Schedule:
    lr: float  # the peak lr
    warmup: int  # linear warm-up steps
    max_steps: int  # the lr reaches 0 here
    kind: str = "cosine"  # or "wsd"
    decay: int = 0  # WSD: the decay's steps, the last of the run

    @property
    def decay_start(self) -> int | None:
        """WSD: the step whose checkpoint ends the stable phase (every step up to it trained at the peak once
        warmed up; the next one is the decay's first); None for the cosine, which decays from the warm-up's end."""
        return self.max_steps - self.decay if self.kind == "wsd" else None

    def factor(self, step: int) -> float:
        """The multiple of the peak lr that optimizer step `step` (0-based: the step after `step` steps) uses."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "wsd":
            # steps decay_start+1..max_steps (1-based) decay, each above 0; the lr is 0 at max_steps (the cosine's end)
            return 1.0 - math.sqrt(min(1.0, max(0, step - self.decay_start + 1) / (self.decay + 1)))
        progress = min(1.0, (step - self.warmup) / max(1, self.max_steps - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self) -> str:
        what = f"peak {self.lr:g}, warm-up {self.warmup}, "
        if self.kind == "wsd":
            return what + f"stable through step {self.decay_start}, 1-sqrt decay to 0 at step {self.max_steps}"
        return what + f"cosine to 0 at step {self.max_steps}"

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
        return (f"the lr schedule follows the current settings ({self.describe()}): step {step + 1} trains at lr "
                f"{want[0]:.4g} (the checkpoint's schedule had {restored[0]:.4g})")


def continuation(schedule: Schedule, step: int, new: Schedule, stable_tag: str | None) -> tuple[str, str]:
    """(what continuing the run that ended at `step` under `new` (a later end) does to the lr, in one line; the
    flags the continue command resumes with). A cosine stretched to a new end restarts from where the new curve
    stands at `step`, not from the lr the run ended at. A WSD run continues from its stable-phase checkpoint
    `stable_tag` (when it was kept): the lr stays at the peak until the new decay, as in one run trained straight
    through; without that tag it warm-restarts from the decayed end like the cosine."""
    if schedule.kind == "wsd" and stable_tag is not None:
        k = schedule.decay_start
        held = "stays at the peak" if new.lr_at(k) == schedule.lr else f"trains at {new.lr_at(k):.3g}"
        return (f"--max-steps {new.max_steps} continues from the stable-phase checkpoint {stable_tag} (step {k}, "
                f"before the decay): the lr {held} ({schedule.lr:g}) through step {new.decay_start}, then decays to 0 "
                f"at step {new.max_steps}, as in a run trained straight through; this run's decayed steps {k + 1}-"
                f"{step} leave metrics.jsonl", f"--resume-tag {stable_tag}")
    shape = "the cosine" if new.kind == "cosine" else "the schedule"
    return (f"--max-steps {new.max_steps} stretches {shape} to end at step {new.max_steps}: step {step + 1} trains at "
            f"lr {new.lr_at(step):.3g} (step {step} had {schedule.lr_at(step - 1):.3g}), then the lr decays to 0 "
            "again", "--resume")
