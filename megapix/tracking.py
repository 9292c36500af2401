"""The run's Weights & Biases run, for `--report-to wandb`. DeepSpeed's own monitor (the DeepSpeed config's wandb
section, built by megapix.dsconfig) logs every step's metrics on rank 0; this module adds what that monitor has no
place for: the run's id kept in <out>/wandb_run.json so that a --resume continues the same W&B run, the run's
name and local folder (<out>/monitor/wandb), the run's config, and at the end the summary and the samples PNG.
WANDB_MODE=offline (or `wandb offline`) keeps everything on disk, for machines without a network."""
from __future__ import annotations

import os
import secrets
import sys

from megapix.config import Config
from megapix.utils import read_json, write_json

RUN_FILE = "wandb_run.json"


def wanted(cfg: Config, ds_config: dict) -> bool:
    return bool(ds_config.get("wandb", {}).get("enabled")) and "wandb" in cfg.train.report_to.split(",")


def prepare(cfg: Config, ds_config: dict, resume: bool) -> str | None:
    """Rank 0, before DeepSpeed builds its monitor: the W&B run's id (the saved one on a resume, else a new one),
    name and folder, through the environment wandb.init reads (DeepSpeed's monitor passes only project, team and
    group). Returns the id, or None when W&B is not in use."""
    if not wanted(cfg, ds_config):
        return None
    out = os.path.abspath(cfg.train.out)
    record = read_json(os.path.join(out, RUN_FILE)) if resume else None
    run_id = record.get("id") if isinstance(record, dict) and isinstance(record.get("id"), str) else None
    run_id = run_id or secrets.token_hex(4)  # W&B's own ids are 8 characters of [a-z0-9] too
    folder = os.path.join(out, "monitor")
    os.makedirs(folder, exist_ok=True)
    os.environ.update(WANDB_RUN_ID=run_id, WANDB_RESUME="allow", WANDB_DIR=folder,
                      WANDB_NAME=cfg.train.wandb_name or os.path.basename(out.rstrip(os.sep)))
    write_json(os.path.join(out, RUN_FILE), {"id": run_id, "project": ds_config["wandb"].get("project"),
                                             "entity": ds_config["wandb"].get("team")})
    return run_id


def begin(cfg: Config, engine) -> None:
    """Rank 0, once the engine exists: the run's config into the W&B run DeepSpeed's monitor started, and only the
    per-step series to it. W&B steps must only increase, and DeepSpeed's own Train/Samples/* events are at step =
    samples seen, which would make W&B drop every megapix/* event of a smaller step (the lr is megapix/lr)."""
    monitor = getattr(getattr(engine, "monitor", None), "wandb_monitor", None)
    if monitor is not None:
        write = monitor.write_events
        monitor.write_events = lambda events: write([e for e in events if str(e[0]).startswith("megapix/")])
    run = _run()
    if run is not None:
        run.config.update(cfg.to_dict(), allow_val_change=True)  # a resume may steer some settings


def finish(summary: dict, samples: str | None) -> None:
    """The end-of-run numbers (and the samples PNG) into the W&B run, then close it so that its files are complete."""
    run = _run()
    if run is None:
        return
    import wandb

    run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    if samples and os.path.isfile(samples):
        run.log({"samples": wandb.Image(samples)})
    run.finish()


def _run():
    # only a run DeepSpeed's wandb monitor started: it imported wandb. Importing it here for nothing would add
    # a second to every run's start.
    wandb = sys.modules.get("wandb")
    return None if wandb is None else wandb.run
