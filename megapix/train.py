"""Train an iGPT: `deepspeed megapix/train.py [flags]` (also torchrun, mpiexec, srun, or plain python).

With no flags it trains the tiny preset on the embedded default (scikit-learn's digits) on CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script (deepspeed/torchrun megapix/train.py): needs the installed package
    try:
        import megapix  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "megapix":
            raise
        print("megapix: error: the megapix package is not installed in this Python: run `pip install -e .` in the "
              "repository (or `make train`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from ModelConfig, DataConfig and TrainConfig (megapix.cliargs), plus the run's own."""
    from megapix.cliargs import add_config_args, add_launcher_args, command_parser

    p = command_parser("megapix train", __doc__.splitlines()[0] + "\n\nPrecedence: defaults < --config file < "
                       "flags. A DeepSpeed JSON's settings are taken in where megapix's are not set; a value set in "
                       "both that disagrees is an error (megapix/dsconfig.py).")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (default: off)")
    p.add_argument("--no-samples", action="store_true", help="skip the PNG of samples at the end (default: off)")
    add_config_args(p)
    add_launcher_args(p)  # deepspeed's launcher appends --local_rank
    return p


def config_from_args(args):
    from megapix.cliargs import config_from_args

    return config_from_args(args)


def check_run_record(path: str, cfg, resume: bool) -> None:
    """<out>/config.json belongs to the run in --out: refuse to replace a different run's record unless resuming
    it (where the new settings, e.g. a later --max-steps, are what the continued run trains with)."""
    import json

    from megapix.config import ConfigError

    if resume or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} exists and is not a megapix run record; choose another --out") from None
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
    args = build_parser().parse_args(argv)
    from megapix.config import ConfigError, check_kernels_available

    try:
        cfg = config_from_args(args)
        check_kernels_available(cfg.model.kernels)
        from megapix import dsconfig

        # the JSON agrees with the flags (or says where not) before any process group starts or file is written
        effective, _ = dsconfig.resolve(cfg, args.deepspeed_config, dsconfig.launch_world())
        out = os.path.abspath(effective.train.out)
        if not args.resume:  # a run already there is named by its step, before its record is compared
            from megapix.checkpoint.manager import refuse_existing_run

            refuse_existing_run(out, effective.train.out)
        record = os.path.join(out, "config.json")
        check_run_record(record, effective, args.resume)
        from megapix.parallel.launch import init_distributed

        init_distributed(effective.train.collective_timeout)
        from megapix import runfolder

        runfolder.claim(out, "train", "megapix train")  # one writer per --out, for this process's life
        from megapix.engine import Trainer

        trainer = Trainer(cfg, args.deepspeed_config, resume=args.resume)
        if trainer.is_rank0:
            from megapix.utils import write_json

            print(dsconfig.describe(trainer.cfg, trainer.ds_config, args.deepspeed_config), flush=True)
            write_json(record, dsconfig.run_record(trainer.cfg, trainer.ds_config, args.deepspeed_config))
            print(f"megapix: {cfg.model.num_parameters() / 1e6:.2f}M parameters, {trainer.layout.describe()}, "
                  f"global batch {trainer.cfg.train.global_batch} (micro {trainer.micro_batch}), out {trainer.out}",
                  flush=True)
            print(f"megapix: MFU against {trainer.peak_tflops:.3g} TFLOP/s per rank ({trainer.peak_source}; "
                  "--peak-tflops sets it)"
                  if trainer.peak_tflops else f"megapix: no MFU: {trainer.peak_source}", flush=True)
        code = trainer.fit()
        from megapix.runlog import summary_text
        from megapix.sample import write_run_samples

        samples = write_run_samples(trainer) if code == 0 and not args.no_samples else None
        if trainer.is_rank0 and code == 0:
            print(summary_text(trainer.log, trainer.checkpoints, trainer.shown_out, trainer.step, trainer.peak_tflops,
                               trainer.peak_source, samples), flush=True)
        return code
    except ConfigError as e:
        print(f"megapix: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from megapix.divergence import EXIT_NONFINITE, NonFiniteStop

        if isinstance(e, NonFiniteStop):  # every rank saw it at the same step; rank 0 says it
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"megapix: error: {e}", file=sys.stderr, flush=True)
            return EXIT_NONFINITE
        from megapix.parallel.watchdog import exit_if_peer_lost
        from megapix.runfolder import disk_error

        exit_if_peer_lost(e)  # a peer died, hung or went out of reach: one line, exit 75 (requeue)
        problem = disk_error(e, getattr(args, "out", None))  # a full, read-only or forbidden disk: one line, not a traceback
        if problem is None:
            raise
        print(f"megapix: error: {problem}", file=sys.stderr)
        return 2
    finally:
        from megapix.runfolder import release_all

        release_all()


if __name__ == "__main__":
    sys.exit(main())
