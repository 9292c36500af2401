"""Resume a checkpoint in a different layout (TP, PP, DP or ZeRO stage changed).

The path: consolidate the saved checkpoint into the canonical single-rank state dict
(megapix.checkpoint.consolidate, which merges TP shards and collects pipeline layer files), cut it into this
rank's shards (megapix.parallel.tensor.shard_tensor) and copy it into the freshly built engine; ZeRO-1/2 fp32
masters are refreshed from the module. The step counter and the learning-rate schedule continue where they
stopped, and the data resume is exact (global batches depend only on seed and step).

What is not carried over: the Adam moments (they restart from zero, with bias correction restarting too).
So the first resumed step's loss equals the uninterrupted run's; later steps differ slightly. This is the
fallback: where DeepSpeed's universal checkpoint works (ZeRO-1/2 -> ZeRO-1/2, ZeRO-3 -> ZeRO-3 at TP 1) the resume
goes through it instead (megapix.checkpoint.universal), which keeps the moments. This path serves ZeRO-0
checkpoints, resumes into ZeRO-0 and ZeRO-3 -> ZeRO-1/2 (ZeRO-3 destinations are refused here). A
layout-preserving resume goes through DeepSpeed's loader and is exact, optimizer included.
"""
from __future__ import annotations

import warnings

from megapix.checkpoint.consolidate import load_into, state_dict
from megapix.checkpoint.tags import check_same_model, saved_layout, saved_step
from megapix.config import Config, ConfigError
from megapix.parallel import dist
from megapix.parallel.layout import Layout


def resume_resharded(engine, ckpt_dir: str, tag: str, cfg: Config, layout: Layout, is_pipeline: bool,
                     why: str = "") -> int:
    """`why`: the reason DeepSpeed's universal checkpoint could not be used, for the log line."""
    if layout.zero_stage == 3:
        raise ConfigError("resuming a checkpoint in a different layout into ZeRO-3 is not supported; resume with "
                          "--zero-stage 2 (or the saved layout), save, then switch to ZeRO-3")
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
              f"resharded, schedule at step {step}, Adam moments restarted (layout change"
              f"{'; not universal: ' + why if why else ''})", flush=True)
    return step
