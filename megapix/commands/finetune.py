"""`megapix finetune`: its flags, the learning-rate sweep (one early-stopped Trainer per rate) and its outputs
(finetune_results.json, metrics.jsonl, finetune_curves.png, best_model/ as an HF ImageGPT classifier). What is
trained, the joint loss and its layouts, is megapix.finetune's ClassifierTask."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import time

from megapix import runfolder
from megapix.checkpoint import load_model_and_palette
from megapix.cliargs import add_fields, add_launcher_args, build, command_parser, given
from megapix.commands.options import TRAIN_FIELDS, FinetuneConfig
from megapix.commands.runner import out_flag, run
from megapix.config import Config, ConfigError, DataConfig, TrainConfig, model_preset
from megapix.data.loader import GlobalBatches
from megapix.data.palette import Palette
from megapix.finetune import ClassifierTask, default_augmentation, labelled_splits
from megapix.model.hf import save_classifier_pretrained
from megapix.parallel.dist import barrier, is_rank0
from megapix.parallel.launch import init_distributed
from megapix.runlog import RunLog, write_finetune_plot
from megapix.utils import read_metrics, shell_program, write_json


def build_parser() -> tuple[argparse.ArgumentParser, dict, dict]:
    """The parser, and dest -> field of FinetuneConfig's flags and of the TrainConfig flags (dest "train.<field>")."""
    p = command_parser("megapix finetune", "Classification fine-tuning with the joint loss (the paper's section 3.4).")
    dests = add_fields(p, FinetuneConfig)
    train_dests = add_fields(p, TrainConfig, prefix="train.", only=TRAIN_FIELDS, title="training (as megapix train)")
    p.add_argument("--no-augment", dest="augment", action="store_const", const="none", default=argparse.SUPPRESS,
                   help="same as --augment none")
    add_launcher_args(p)
    return p, dests, train_dests


def parse_args(argv=None) -> tuple[FinetuneConfig, list[float]]:
    p, dests, train_dests = build_parser()
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    train = build(TrainConfig, given(ns, train_dests))
    args = build(FinetuneConfig, {**given(ns, dests), "train": train})
    try:
        lrs = [float(x) for x in args.lr.split(",") if x]
    except ValueError:
        raise ConfigError(f"cannot parse --lr {args.lr!r}; use e.g. 3e-4,1e-4,3e-5") from None
    if not lrs or any(not (math.isfinite(x) and x > 0) for x in lrs):
        raise ConfigError("--lr needs one or more positive, finite rates")
    if args.patience < 1:
        raise ConfigError("--patience must be >= 1")
    return args, lrs


def _load(args):
    if args.checkpoint:
        if not os.path.exists(args.checkpoint):
            raise ConfigError(f"checkpoint {args.checkpoint!r} does not exist")
        model, palette, data = load_model_and_palette(args.checkpoint, args.palette, args.data)
        return model.config, {k: v.detach().float() for k, v in model.state_dict().items()}, palette, data
    if not args.from_scratch:
        raise ConfigError("pass --checkpoint (a pre-trained model), or --from-scratch with --model PRESET")
    config = model_preset(args.model or "tiny")
    palette = Palette.load(args.palette) if args.palette else None
    return config, None, palette, args.data or "digits"


def train_config(args: FinetuneConfig, lr: float, max_steps: int, eval_every: int, out: str) -> TrainConfig:
    """One run of the sweep: the training settings with this run's rate, length, evaluation period and folder."""
    return dataclasses.replace(args.train, lr=lr, max_steps=max_steps, eval_every=eval_every, out=out)


def main(argv=None) -> int:
    return run("megapix finetune", lambda: _finetune(argv), out_flag(argv))


def _finetune(argv) -> int:
    args, lrs = parse_args(argv)
    init_distributed()
    runfolder.claim(args.out, "finetune", "megapix finetune")  # before anything is read or written
    config, base_state, palette, data_spec = _load(args)
    out = os.path.abspath(args.out)
    base_cfg = Config(model=config, data=DataConfig(source=data_spec, val_fraction=args.val_fraction),
                      train=dataclasses.replace(args.train, out=out))
    augmentation = default_augmentation(data_spec) if args.augment == "auto" else args.augment
    data, palette, num_classes = labelled_splits(base_cfg, palette, augmentation)
    os.makedirs(out, exist_ok=True)
    log = RunLog(out, is_rank0(), plot=False)  # this sweep's curves, one file
    log.continue_from(None)
    spe = GlobalBatches(len(data["train"]), args.train.global_batch, args.train.seed).steps_per_epoch()
    max_steps = args.max_steps if args.max_steps is not None else args.max_epochs * spe
    eval_every = args.eval_every if args.eval_every is not None else spe
    runs, best, best_state = [], None, None
    for lr in lrs:  # only the best run's weights are kept (one full state dict on rank 0 at a time)
        rec, state = _one_run(args, config, base_cfg, base_state, data, num_classes, augmentation, log, lr,
                              max_steps, eval_every, spe)
        runs.append(rec)
        if best is None or rec["best_val_acc"] > best["best_val_acc"]:
            best, best_state = rec, state
        del state
        gc.collect()  # the finished run's engine, before the next one is built
    if is_rank0():
        write_outputs(args, out, config, palette, num_classes, lrs, runs, best, best_state, data_spec, augmentation)
    barrier()
    return 0


def _one_run(args, config, base_cfg, base_state, data, num_classes, augmentation, log, lr, max_steps, eval_every,
             spe) -> tuple[dict, dict | None]:
    """One early-stopped fine-tune at `lr`: its record, and its best full state dict (rank 0's)."""
    from megapix.engine import Trainer  # lazy: deepspeed (seconds to import) is not needed for --help

    cfg = Config(model=config, data=base_cfg.data,
                 train=train_config(args, lr, max_steps, eval_every, base_cfg.train.out))
    task = ClassifierTask(data, num_classes, None if args.from_scratch else base_state, augmentation != "none")
    trainer = Trainer(cfg, args.deepspeed_config, task=task, run_log=log, checkpoints=False)
    rec = {"lr": lr, "from_scratch": args.from_scratch, "best_val_acc": -1.0, "best_step": 0, "stopped_early": False}
    kept = {}

    def on_best(tr, r):
        rec.update(best_val_acc=r["val_acc"], best_step=tr.step)
        if len(data["test"]) > 0:
            rec["test_acc_at_best"] = r["test_acc"] = task.split_metrics(tr, "test")["test_acc"]
        kept["state"] = tr.full_state_dict()

    t0 = time.perf_counter()
    trainer.fit(patience=args.patience, on_best=on_best, extra={"lr_run": lr}, desc=f"finetune lr={lr:g}")
    rec.update(steps=trainer.step, steps_per_epoch=spe, stopped_early=trainer.stopped_early,
               seconds=round(time.perf_counter() - t0, 1), zero_stage=trainer.layout.zero_stage,
               world=trainer.layout.world, layout=trainer.layout.describe(batch=False, world=True))
    return rec, kept.get("state")


def write_outputs(args, out, config, palette, num_classes, lrs, runs, best, best_state, data_spec, augmentation):
    # One HF directory that transformers' ImageGPTForImageClassification loads with every weight (score.weight
    # included), with the palette's preprocessor_config.json and a model card.
    target = os.path.join(out, "best_model")
    model_sd = {k: v for k, v in best_state.items() if not k.startswith("clf.")}
    card = {"data": data_spec, "steps": best["best_step"], "layout": best["layout"],
            "val accuracy": f"{100 * best['best_val_acc']:.2f}%", "fine-tuned from": args.checkpoint or "scratch"}
    save_classifier_pretrained(model_sd, config, best_state["clf.weight"], target, palette=palette, card=card,
                               provenance={"data": data_spec})
    result = {"checkpoint": args.checkpoint and os.path.abspath(args.checkpoint), "data": data_spec,
              "from_scratch": args.from_scratch, "lrs": lrs, "runs": runs, "best_lr": best["lr"],
              "best_val_acc": best["best_val_acc"], "test_acc": best.get("test_acc_at_best"),
              "selection": "best validation accuracy over the sweep; test accuracy at that run's best step",
              "loss": "L_gen + L_clf (unweighted)", "augment": augmentation, "world": best["world"],
              "layout": best["layout"], "best_model": target, "num_classes": num_classes}
    write_json(os.path.join(out, "finetune_results.json"), result)
    print(f"megapix finetune: best lr {best['lr']:g}: val acc {100 * best['best_val_acc']:.2f}%"
          + (f", test acc {100 * best['test_acc_at_best']:.2f}%" if "test_acc_at_best" in best else "")
          + f" -> {out}", flush=True)
    for r in runs:
        print(f"  lr {r['lr']:<8g} best val {100 * r['best_val_acc']:6.2f}% at step {r['best_step']}/{r['steps']}"
              + (" (early stop)" if r["stopped_early"] else ""), flush=True)
    curves = write_finetune_plot(read_metrics(os.path.join(out, "metrics.jsonl")),
                                 os.path.join(out, "finetune_curves.png"))
    megapix = shell_program("megapix")
    print("  results      " + os.path.join(out, "finetune_results.json")
          + (f"\n  curves       {curves}" if curves else "")
          + f"\n  best model   {target} (transformers: ImageGPTForImageClassification.from_pretrained)"
          + "\nnext:"
          + f"\n  features     {megapix} extract --checkpoint {target} --out {out}-features && "
          + f"{megapix} probe --features {out}-features", flush=True)


if __name__ == "__main__":
    sys.exit(main())
