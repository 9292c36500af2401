"""Train an iGPT: `deepspeed megapix/train.py [flags]` (also torchrun, mpiexec, srun, or plain python).

With no flags it trains what `make train` trains (configs/tiny_digits.yaml: the tiny preset at 10x10 on the
embedded digits-shifted, into runs/digits) on CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

from megapix import dsconfig, runfolder, tracking
from megapix.checkpoint.manager import (RUN_RECORD, STEER_FLAGS, check_resume_config, existing_run_step,
                                        refuse_existing_run, saved_run_config)
from megapix.cliargs import add_config_args, add_launcher_args, command_parser, config_from_args
from megapix.commands.runner import run
from megapix.config import DEFAULT_RUN, ConfigError, check_kernels_available
from megapix.parallel.launch import init_distributed
from megapix.utils import drop_deepspeed_cpu_notice, read_json, write_json


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from ModelConfig, DataConfig and TrainConfig (megapix.cliargs), plus the run's own."""
    p = command_parser("megapix train", __doc__.splitlines()[0] + "\n\nPrecedence, field by field (a flag overrides "
                       "a field, never a whole section): defaults (without --config: the `make train` run; with "
                       "--resume: the saved run's config) < --model preset < --config file < flags. A DeepSpeed "
                       "JSON's settings are taken in where megapix's are not set; a value set in both that "
                       "disagrees is an error (megapix/dsconfig.py).")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with its saved config (<out>/config."
                   "json): no other flag is needed. Flags that only steer it from here on may change: "
                   f"{', '.join(STEER_FLAGS)}; any other setting that differs from the saved run's is an error "
                   "unless --allow-changed. A folder with no run is an error unless --resume-if-exists "
                   "(default: off)")
    p.add_argument("--resume-tag", metavar="TAG",
                   help="--resume from this checkpoint of <out>/checkpoints (global_step<N>) instead of the latest: "
                   "a WSD run's stable-phase checkpoint, to continue to a longer --max-steps; `latest` then names it "
                   "(default: the latest)")
    p.add_argument("--resume-if-exists", action="store_true",
                   help="--resume when --out holds a run, else start one there (requeued batch jobs) (default: off)")
    p.add_argument("--allow-changed", action="store_true",
                   help="with --resume: continue even where the settings contradict the saved run's (the log and the "
                   "summary say what changed) (default: off)")
    p.add_argument("--reset-optimizer", action="store_true",
                   help="with --resume in another layout that cannot carry the Adam moments (a ZeRO-0 checkpoint or "
                   "run): resume with the weights and schedule and restart the moments (the log and the summary say "
                   "so); without it such a resume is refused. Between ZeRO-1/2/3 layouts the moments are always "
                   "carried (default: off)")
    p.add_argument("--no-samples", action="store_true", help="skip the PNG of samples at the end (default: off)")
    add_config_args(p, run_defaults=DEFAULT_RUN)
    add_launcher_args(p)  # deepspeed's launcher appends --local_rank
    return p


def parse_args(argv=None):
    """The parsed flags and the run config they ask for (the one precedence rule), checked, without starting a run
    (nothing is read from --out)."""
    args = build_parser().parse_args(argv)
    return args, requested_config(args)


def requested_config(args, saved: dict | None = None):
    """The one precedence rule (config_from_args) over the right base: a resumed run's saved config, else (no
    --config) the `make train` run, else the defaults."""
    return config_from_args(args, base=saved if saved is not None else None if args.config else DEFAULT_RUN)


def resumes(args, out: str, shown: str) -> bool:
    """Whether this start continues the run in `out`: --resume needs a run there; --resume-if-exists continues one
    or starts one in a new or empty folder. A folder of files megapix did not write (a metrics.jsonl of the
    user's, without megapix's config.json or checkpoints/) is neither: one line, nothing touched."""
    if not (args.resume or args.resume_if_exists):
        return False
    has_run = existing_run_step(out) is not None
    ours = os.path.isdir(os.path.join(out, "checkpoints")) or os.path.lexists(os.path.join(out, RUN_RECORD))
    if (has_run and not ours) or (args.resume_if_exists and not has_run and runfolder.folder_kind(out) == "user"):
        flag = "--resume-if-exists" if args.resume_if_exists else "--resume"
        raise ConfigError(f"{flag}: {shown} holds files megapix did not write (no {RUN_RECORD} nor checkpoints/ of "
                          "a run): it continues a megapix run or starts one in a new or empty folder; choose "
                          "another --out")
    if args.resume and not args.resume_if_exists and not has_run:
        raise ConfigError(f"--resume: {shown} holds no run to continue; drop --resume to start one there, or pass "
                          "--resume-if-exists (resume when there is a run, start one otherwise)")
    return has_run


def run_config(args) -> tuple:
    """(the run's config, its DeepSpeed JSON as a dict, whether it resumes, what the resume changes): the one
    precedence rule (config_from_args) over the right base, the DeepSpeed JSON resolved once, and a resume's
    settings checked against the saved run's, all before any process group starts or file is written."""
    cfg = requested_config(args)
    out, shown = os.path.abspath(cfg.train.out), cfg.train.out
    resume = resumes(args, out, shown)
    saved, source = saved_run_config(out, shown) if resume else (None, None)
    if saved is not None:
        cfg = requested_config(args, saved)
    effective, ds = dsconfig.resolve(cfg, args.deepspeed_config, dsconfig.launch_world())
    notes = [source] if source else []
    if saved is not None:
        notes += check_resume_config(saved, effective, shown, args.allow_changed)
    elif not resume:
        refuse_existing_run(out, shown)
        check_run_record(os.path.join(out, "config.json"), effective)
    return effective, ds, resume, notes


def check_run_record(path: str, cfg) -> None:
    """<out>/config.json belongs to the run in --out: refuse to replace a different run's record (a resume compares
    its settings with it instead, manager.check_resume_config)."""
    if not os.path.isfile(path):
        return
    rec = read_json(path)
    if not isinstance(rec, dict) or "config" not in rec:
        raise ConfigError(f"{path} exists and is not a megapix run record; choose another --out")
    old = rec["config"]
    bad = "config" if not isinstance(old, dict) else next(
        (f"config.{sec}" for sec in ("model", "data", "train") if not isinstance(old.get(sec, {}), dict)), None)
    if bad is not None:
        raise ConfigError(f"{path}: field {bad!r} is not a JSON object; the run record is damaged: move it away "
                          "(or choose another --out)")
    new = cfg.to_dict()
    if old != new:
        diffs = [f"{sec}.{k}: {old.get(sec, {}).get(k)!r} -> {v!r}" for sec in ("model", "data", "train")
                 for k, v in new[sec].items() if old.get(sec, {}).get(k) != v]
        raise ConfigError(f"{os.path.dirname(path)} holds another run (config.json differs: {'; '.join(diffs[:3])}); "
                          "pass --resume to continue it, or choose another --out")


def main(argv=None) -> int:
    drop_deepspeed_cpu_notice()
    args = build_parser().parse_args(argv)
    args.resume = args.resume or args.resume_tag is not None
    return run("megapix", lambda: _train(args), lambda: vars(args).get("train.out"))


def _train(args) -> int:
    cfg, ds, resume, notes = run_config(args)
    check_kernels_available(cfg.model.kernels)
    probe = None  # --probe-every: its data and layers checked before any process group starts or file is written
    if cfg.train.probe_every:
        from megapix.trainprobe import TrainingProbe  # lazy, as the engine below

        probe = TrainingProbe(cfg)
    init_distributed(cfg.train.collective_timeout)
    runfolder.claim(os.path.abspath(cfg.train.out), "train", "megapix train")  # one writer per --out
    # lazy: the engine imports deepspeed (seconds), which `--help` and a refused command never need
    from megapix.engine import Trainer
    from megapix.runlog import summary_text
    from megapix.sample import write_run_samples

    trainer = Trainer(cfg, ds, resume=resume, resume_tag=args.resume_tag, reset_optimizer=args.reset_optimizer)
    trainer.probe = probe
    if trainer.is_rank0:
        _announce(trainer, args, cfg, notes)
        tracking.begin(trainer.cfg, trainer.engine)
    code = trainer.fit()
    samples = write_run_samples(trainer) if code == 0 and not args.no_samples else None
    if trainer.checkpoints.moments_restarted:
        notes = [*notes, trainer.checkpoints.moments_restarted]
    if trainer.is_rank0 and code == 0:
        print(summary_text(trainer.log, trainer.checkpoints, trainer.shown_out, trainer.step, trainer.peak_tflops,
                           trainer.peak_source, samples, notes + dsconfig.monitor_notes(trainer.cfg, trainer.ds_config),
                           trainer.continuation), flush=True)
    if trainer.is_rank0:
        tracking.finish(trainer.log.summary, samples)
    return code


def _announce(trainer, args, cfg, notes) -> None:
    """Rank 0's opening lines (the resolved settings, what a resume changed, the size and layout, the MFU's
    reference) and the run record <out>/config.json."""
    print(dsconfig.describe(trainer.cfg, trainer.ds_config, args.deepspeed_config), flush=True)
    for line in notes:
        print(f"megapix: {line}", flush=True)
    write_json(os.path.join(trainer.out, "config.json"),
               dsconfig.run_record(trainer.cfg, trainer.ds_config, args.deepspeed_config))
    print(f"megapix: {cfg.model.num_parameters() / 1e6:.2f}M parameters, "
          f"{trainer.layout.describe(batch=False, world=True)}, "
          f"global batch {trainer.cfg.train.global_batch} (micro {trainer.micro_batch}), out {trainer.out}",
          flush=True)
    print(f"megapix: MFU against {trainer.peak_tflops:.3g} TFLOP/s per rank ({trainer.peak_source}; "
          "--peak-tflops sets it)"
          if trainer.peak_tflops else f"megapix: no MFU: {trainer.peak_source}", flush=True)
    if trainer.probe is not None:
        print(f"megapix: {trainer.probe.describe()}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
