"""Resume a checkpoint in a different layout (TP, PP, DP or ZeRO stage changed).

The path: consolidate the saved checkpoint into the canonical single-rank state dict
(megapix.parallel.consolidate, which merges TP shards and collects pipeline layer files), cut it into this
rank's shards (megapix.parallel.tensor.shard_tensor) and copy it into the freshly built engine; ZeRO-1/2 fp32
masters are refreshed from the module. The step counter and the learning-rate schedule continue where they
stopped, and the data resume is exact (global batches depend only on seed and step).

What is not carried over: the Adam moments (they restart from zero, with bias correction restarting too).
So the first resumed step's loss equals the uninterrupted run's; later steps differ slightly. This is the
fallback: where DeepSpeed's universal checkpoint works (ZeRO-1/2 -> ZeRO-1/2, ZeRO-3 -> ZeRO-3 at TP 1) the resume
goes through it instead (megapix.parallel.universal), which keeps the moments. This path serves ZeRO-0
checkpoints, resumes into ZeRO-0 and ZeRO-3 -> ZeRO-1/2 (ZeRO-3 destinations are refused here). A
layout-preserving resume goes through DeepSpeed's loader and is exact, optimizer included.
"""
from __future__ import annotations

import json
import os
import re
import warnings

from megapix.config import ConfigError


def saved_layout(ckpt_dir: str, tag: str) -> dict | None:
    path = os.path.join(ckpt_dir, tag, "layout.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rec = json.load(f)
    rec.pop("step", None)
    return rec


def saved_step(ckpt_dir: str, tag: str) -> int:
    path = os.path.join(ckpt_dir, tag, "layout.json")
    if os.path.isfile(path):
        with open(path) as f:
            return int(json.load(f)["step"])
    m = re.fullmatch(r"global_step(\d+)", tag)
    if not m:
        raise ConfigError(f"cannot tell the step of checkpoint {tag}")
    return int(m.group(1))


def check_same_model(trainer, tag: str):
    """The checkpoint's Config, after checking it was written for this run's model."""
    from megapix.checkpoint import read_config

    saved_cfg = read_config(trainer.ckpt_dir, tag)
    if saved_cfg.model != trainer.cfg.model:
        raise ConfigError(f"checkpoint {tag} was written for model {saved_cfg.model}, not {trainer.cfg.model}")
    return saved_cfg


def resume_resharded(trainer, tag: str, why: str = "") -> int:
    """`why`: the reason DeepSpeed's universal checkpoint could not be used, for the log line."""
    from megapix.parallel.consolidate import load_into, state_dict

    lay = trainer.layout
    if lay.zero_stage == 3:
        raise ConfigError("resuming a checkpoint in a different layout into ZeRO-3 is not supported; resume with "
                          "--zero-stage 2 (or the saved layout), save, then switch to ZeRO-3")
    saved_cfg = check_same_model(trainer, tag)
    full = state_dict(trainer.ckpt_dir, tag, saved_cfg)
    load_into(trainer.engine.module, full, trainer.is_pipeline, trainer.cfg.model.n_layer, lay.tp, lay.tp_rank)
    opt = trainer.engine.optimizer
    if hasattr(opt, "refresh_fp32_params"):  # ZeRO-1/2 keep fp32 master copies of the module weights
        opt.refresh_fp32_params()
    step = saved_step(trainer.ckpt_dir, tag)
    sched = trainer.engine.lr_scheduler
    if sched is not None:
        sched.last_epoch = step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lrs = sched.get_lr()
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = list(lrs)
    if trainer.is_rank0:
        saved = saved_layout(trainer.ckpt_dir, tag)
        print(f"megapix: resumed {tag} written as {saved} in {lay.describe()}: weights resharded, schedule at step "
              f"{step}, Adam moments restarted (layout change{'; not universal: ' + why if why else ''})", flush=True)
    return step
