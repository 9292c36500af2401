"""Resume a checkpoint in a different layout (TP, PP, DP or ZeRO stage changed): which path, and the fallback.

`how_to_resume` decides: the saved layout -> DeepSpeed's own loader (exact); another ZeRO-1/2/3 layout ->
DeepSpeed's universal checkpoint (megapix.checkpoint.universal: fp32 masters, Adam moments, step and schedule
carried); a ZeRO-0 checkpoint or run -> this module's fallback, which restarts the Adam moments and so runs only
with --reset-optimizer (without it the resume is refused with one line before anything is written).

The fallback: consolidate the saved checkpoint into the canonical single-rank state dict
(megapix.checkpoint.consolidate, which merges TP shards and collects pipeline layer files), cut it into this
rank's shards (megapix.parallel.tensor.shard_tensor) and copy it into the freshly built engine; ZeRO-1/2 fp32
masters are refreshed from the module. The step counter and the learning-rate schedule continue where they
stopped, and the data resume is exact (global batches depend only on seed and step). The Adam moments restart
from zero (bias correction restarting too), so the first resumed step's loss equals the uninterrupted run's and
later steps differ slightly. ZeRO-3 destinations are refused here (a ZeRO-0 checkpoint resumes into ZeRO-3 by
way of a ZeRO-1/2 run's save).
"""
from __future__ import annotations

import warnings

from megapix.checkpoint.consolidate import load_into, state_dict
from megapix.checkpoint.tags import check_same_model, layout_record, saved_layout, saved_step
from megapix.checkpoint.universal import unsupported_reason
from megapix.config import Config, ConfigError
from megapix.parallel import dist
from megapix.parallel.layout import Layout


def how_to_resume(ckpt_dir: str, tag: str, layout: Layout, reset_optimizer: bool) -> tuple[str, str]:
    """("same" | "universal" | "reshard", why the universal checkpoint does not apply). Raises ConfigError (exit 2)
    where the resume cannot keep the Adam moments and --reset-optimizer was not given, and where even the fallback
    cannot load (ZeRO-3 destination of a ZeRO-0 checkpoint)."""
    saved = saved_layout(ckpt_dir, tag)
    here = {k: v for k, v in layout_record(layout, 0).items() if k != "step"}
    if saved is None or saved == here:
        return "same", ""
    why = unsupported_reason(saved, layout.zero_stage)
    if why is None:
        return "universal", ""
    change = f"{tag} was written as {describe_record(saved)}; this run is {describe_record(here)}"
    if layout.zero_stage == 3:
        raise ConfigError(f"{change}: {why}, and the fallback cannot load into ZeRO-3; resume with --zero-stage 1 "
                          "--reset-optimizer (or the saved layout), save, then switch to ZeRO-3")
    if not reset_optimizer:
        raise ConfigError(f"{change}: {why}, so the Adam moments cannot be carried; pass --reset-optimizer to "
                          "resume with the weights and schedule and restart the moments, or resume in the saved "
                          "layout")
    return "reshard", why


def describe_record(rec: dict) -> str:
    """A layout.json record in words: 'TP2 x PP1 x DP2, ZeRO-3'."""
    return f"TP{rec.get('tp')} x PP{rec.get('pp')} x DP{rec.get('dp')}, ZeRO-{rec.get('zero_stage')}"


def resume_resharded(engine, ckpt_dir: str, tag: str, cfg: Config, layout: Layout, is_pipeline: bool,
                     why: str = "") -> int:
    """`why`: the reason DeepSpeed's universal checkpoint could not be used, for the log line."""
    if layout.zero_stage == 3:  # how_to_resume refuses it first, with the way round
        raise ConfigError("resuming a ZeRO-0 checkpoint into ZeRO-3 is not supported")
    saved_cfg = check_same_model(ckpt_dir, tag, cfg)
    full = state_dict(ckpt_dir, tag, saved_cfg)
    load_into(engine.module, full, is_pipeline, cfg.model.n_layer, layout.tp, layout.tp_rank)
    opt = engine.optimizer
    if hasattr(opt, "refresh_fp32_params"):  # ZeRO-1/2 keep fp32 master copies of the module weights
        opt.refresh_fp32_params()
    step = saved_step(ckpt_dir, tag)
    sched = engine.lr_scheduler
    if sched is not None:
        sched.last_epoch = step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lrs = sched.get_lr()
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = list(lrs)
    if dist.is_rank0():
        saved = saved_layout(ckpt_dir, tag)
        print(f"megapix: resumed {tag} written as {saved} in {layout.describe(batch=False, world=True)}: weights "
              f"resharded, schedule at step {step}, Adam moments restarted (--reset-optimizer; layout change"
              f"{'; not universal: ' + why if why else ''})", flush=True)
    return step
