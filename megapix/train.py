"""Train an iGPT: `deepspeed megapix/train.py [flags]` (also torchrun, mpiexec, srun, or plain python).

With no flags it trains the tiny preset on the embedded default (scikit-learn's digits) on CPU.
"""
from __future__ import annotations

import argparse
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
    p = argparse.ArgumentParser(prog="megapix train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML/JSON config with sections model/data/train; flags override it")
    p.add_argument("--model", help="preset: igpt-s, igpt-m, igpt-l, igpt-xl, tiny, small, bench")
    p.add_argument("--objective", choices=["ar", "bert"])
    p.add_argument("--data", help="data source: digits (default), synthetic, cifar10:PATH, imagefolder:DIR, ...")
    p.add_argument("--palette", help="kmeans_centers.npy; fitted on the training images when absent")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--global-batch", type=int)
    p.add_argument("--micro-batch", type=int, help="per data-parallel rank; the global batch stays fixed")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output folder: checkpoints, metrics.jsonl, samples.png")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out, if any")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--time-budget", type=float, help="seconds; save and exit 75 when exceeded")
    p.add_argument("--tensor-parallel", type=int)
    p.add_argument("--pipeline-parallel", type=int)
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="overrides the DeepSpeed config")
    p.add_argument("--activation-checkpointing", action="store_true", default=None)
    p.add_argument("--kernels", choices=["auto", "triton", "torch"])
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: from a table of GPUs)")
    p.add_argument("--no-samples", action="store_true", help="skip the PNG of samples at the end")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   help="DeepSpeed JSON config (ds_configs/); flags override its batch, precision and ZeRO stage")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


FLAG_TO_FIELD = {  # flag dest -> (section, field)
    "model": None, "objective": ("model", "objective"), "kernels": ("model", "kernels"),
    "data": ("data", "source"), "palette": ("data", "palette"),
    **{k: ("train", k) for k in ("max_steps", "global_batch", "micro_batch", "lr", "warmup_steps", "seed", "out",
                                 "eval_every", "save_every", "time_budget", "tensor_parallel", "pipeline_parallel",
                                 "zero_stage", "activation_checkpointing", "precision", "peak_tflops")},
}


def config_from_args(args):
    from megapix.config import Config, load_config

    raw = load_config(args.config).to_dict() if args.config else Config().to_dict()
    if args.model:
        raw["model"] = {"preset": args.model}
    for dest, target in FLAG_TO_FIELD.items():
        value = getattr(args, dest, None)
        if target is None or value is None:
            continue
        raw[target[0]][target[1]] = value
    return Config.from_dict(raw, where="arguments")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megapix.config import ConfigError

    try:
        cfg = config_from_args(args)
        from megapix.parallel.launch import init_distributed

        init_distributed()
        from megapix.engine import Trainer

        trainer = Trainer(cfg, args.deepspeed_config)
        if trainer.is_rank0:
            print(f"megapix: {cfg.model.num_parameters() / 1e6:.2f}M parameters, {trainer.layout.describe()}, "
                  f"global batch {cfg.train.global_batch} (micro {trainer.micro_batch}), out {trainer.out}",
                  flush=True)
        code = trainer.fit(resume=args.resume)
        if code == 0 and not args.no_samples:
            trainer.write_samples()
        return code
    except ConfigError as e:
        print(f"megapix: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
