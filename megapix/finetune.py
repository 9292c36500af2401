"""Classification fine-tuning with the joint loss: `megapix finetune`, a task on the training engine.

The paper's recipe (section 3.4): a linear classifier on the average-pooled output of the final norm;
loss = L_gen + L_clf (unweighted sum); early stopping on validation accuracy. Augmentation fits the data:
shift-only (up to one pixel) for the 8x8 digits, where a horizontal flip would change the digit; CIFAR's
(4-pixel reflection pad, random crop, random horizontal flip) for other small images; ImageNet-layout folders
their own resize/crop. Token sources get the same crop/flip on their id grid.
BERT models: the generative term is the masked-token loss on a 15% mask, the classifier sees that same
masked forward during training and the unmasked input at evaluation.

This is megapix.engine.Trainer with another task (ClassifierTask): the same DeepSpeed config builder,
AdamW (betas, grad clip from TrainConfig), warm-up + cosine schedule, precision rule, metrics log and layouts:
data parallel with ZeRO 0-3, tensor parallel (the classifier is replicated: its input, norm_f's output, is
replicated after the row-parallel reduce; the LM logits are gathered over the TP group for the generative
term) and pipeline parallel (the last stage computes both losses).

`--lr 3e-4,1e-4,3e-5` runs one early-stopped fine-tune per rate (one Trainer each) and keeps the best by
validation accuracy; `--from-scratch` re-initialises the weights (same architecture and palette): the
random-init baseline. Writes DIR/finetune_results.json, DIR/metrics.jsonl, and the best model as an HF ImageGPT
directory DIR/best_model/ that transformers' ImageGPTForImageClassification loads (score.weight included).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megapix import parallel
from megapix.checkpoint import load_model_and_palette
from megapix.cliargs import add_fields, add_launcher_args, build, command_parser, given
from megapix.config import Config, ConfigError, DataConfig, TrainConfig, checkpoint_field, model_preset, opt
from megapix.data import load_splits
from megapix.data.augment import cifar_augment, image_rng
from megapix.data.loader import GlobalBatches, TokenData, bert_mask
from megapix.data.palette import Palette
from megapix.data.sources import open_source
from megapix.model.hf import save_classifier_pretrained
from megapix.model.igpt import draw_parameter, lm_loss
from megapix.parallel.dist import barrier, is_rank0
from megapix.parallel.launch import init_distributed
from megapix.parallel.pipeline import HeadLayer
from megapix.runlog import RunLog, write_finetune_plot
from megapix.tasks import Meter
from megapix.utils import read_metrics, shell_program, write_json

_TRAIN = TrainConfig()  # the trainer's defaults, shared rather than copied


class Classifier(nn.Module):
    """ImageGPT + a linear head on the mean over positions of norm_f's output. forward -> (loss, l_gen, l_clf,
    class logits)."""

    def __init__(self, model, num_classes: int):
        super().__init__()
        self.model = model
        # bias-free, as transformers' ImageGPTForImageClassification.score: the export loads there unchanged
        self.clf = nn.Linear(model.config.d_model, num_classes, bias=False)
        nn.init.zeros_(self.clf.weight)

    def forward(self, tokens, labels, mask=None):
        m = self.model
        z = m.hidden(tokens, mask)  # the head's input: norm_f of the last block's output
        l_gen = lm_loss(m.head(z), tokens, mask if m.config.objective == "bert" else None)
        logits = self.clf(z.float().mean(dim=1))
        l_clf = F.cross_entropy(logits, labels)
        return l_gen + l_clf, l_gen.detach(), l_clf.detach(), logits.detach()


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------
def shift_augment(images: np.ndarray, indices, epoch: int, seed: int, max_shift: int = 1) -> np.ndarray:
    """Random translation by up to max_shift pixels (edge padding), no flip: for digits, whose class a mirror
    image can change. Seeded per (seed, epoch, index) like cifar_augment."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift)) + ((0, 0),) * (images.ndim - 3)
    padded = np.pad(images, pad, mode="edge")
    out = np.empty_like(images)
    for j, idx in enumerate(np.asarray(indices).reshape(-1)):
        dy, dx = image_rng(seed, epoch, idx).integers(0, 2 * max_shift + 1, size=2)
        out[j] = padded[j, dy:dy + h, dx:dx + w]
    return out




DIGIT_SOURCES = ("digits", "digits-shifted")  # the embedded digit sources: a mirror image can change the class


def default_augmentation(data_spec: str) -> str:
    """What fits the data: shift-only for the embedded digits, the paper's CIFAR augmentation otherwise
    (ImageNet-layout folders apply their own resize/crop whatever is chosen here, unless 'none')."""
    return "shift" if data_spec.split(":", 1)[0] in DIGIT_SOURCES else "cifar"


class LabelledData:
    """A split as (tokens, labels) batches, with an augmentation ('none', 'shift', 'cifar') on request."""

    def __init__(self, split, palette, n_ctx: int, name: str, augmentation: str = "cifar"):
        if split.labels is None:
            raise ConfigError(f"{name} has no labels; fine-tuning needs a labelled source")
        self.td = TokenData(split, n_ctx, palette, name)  # validates sizes and the palette
        self.split, self.palette, self.n_ctx = split, palette, n_ctx
        self.labels = np.asarray(split.labels, dtype=np.int64)
        self.augmentation = augmentation

    def __len__(self):
        return len(self.labels)

    def batch(self, idx: np.ndarray, epoch: int = 0, seed: int = 0, augment: bool = False):
        idx = np.asarray(idx, dtype=np.int64)
        y = torch.from_numpy(self.labels[idx])
        s = self.split
        if not augment or self.augmentation == "none":
            return self.td.tokens(idx), y
        fn = shift_augment if self.augmentation == "shift" else cifar_augment
        if s.tokens is not None:  # crop/flip the id grid itself: the same augmentation, after encoding
            side = int(round(math.sqrt(self.n_ctx)))
            grid = np.asarray(s.tokens[idx]).reshape(len(idx), side, side, 1)
            return torch.from_numpy(fn(grid, idx, epoch, seed).reshape(len(idx), -1).astype(np.int64)), y
        if hasattr(s.images, "batch"):  # ImageNet-layout folders: the paper's random resize/crop
            return self.td.tokens(idx, epoch, seed), y
        images = fn(np.asarray(s.images[idx]), idx, epoch, seed)
        return torch.from_numpy(self.palette.encode(images)), y


# ----------------------------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------------------------
class _GatherFromTP(torch.autograd.Function):
    """All-gather of vocab-sharded logits along the last dim; backward keeps this rank's slice (the loss on the
    gathered logits is computed identically on every TP rank)."""

    @staticmethod
    def forward(ctx, x, group, tp, rank):
        ctx.tp, ctx.rank = tp, rank
        parts = [torch.empty_like(x) for _ in range(tp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(ctx.tp, dim=-1)[ctx.rank].contiguous(), None, None, None


class ClassifierHeadLayer(HeadLayer):
    """Pipeline last layer for fine-tuning: the LM head layer (norm_f, head; canonical names kept) plus the
    classifier on the mean over positions of norm_f's output -> (LM logits, class logits)."""

    def __init__(self, config, seed: int, tp_info, num_classes: int, initial):
        # bias-free, as Classifier.clf; its starting value (zero) comes from `initial`, like every parameter's
        super().__init__(config, seed, tp_info, initial,
                         extra={"clf": lambda: nn.Linear(config.d_model, num_classes, bias=False)})

    def forward(self, h):
        z = self.norm_f(h)
        return self.head(z), self.clf(z.float().mean(dim=1))


class ClassifierHead:
    """megapix.parallel.build_module's head hook for fine-tuning: Classifier around the model (its LM logits
    gathered over the TP group for the generative term), ClassifierHeadLayer as the last pipeline layer, and
    L_gen + L_clf as the last stage's loss."""

    parts = ("clf",)

    def __init__(self, task: "ClassifierTask"):
        self.task = task

    def module(self, model, layout):
        module = Classifier(model, self.task.num_classes)
        if layout.tp > 1:  # the classifier is replicated: its input, norm_f's output, is after the row-parallel reduce
            group, tp, rank = layout.tp_group, layout.tp, layout.tp_rank
            model.head.register_forward_hook(lambda mod, args, out: _GatherFromTP.apply(out, group, tp, rank))
        return module

    def pipeline_layer(self, config, seed: int, tp_info, initial):
        from deepspeed.pipe import LayerSpec  # lazy, as in parallel/pipeline.py: deepspeed takes seconds to import

        return LayerSpec(ClassifierHeadLayer, config, seed, tp_info, self.task.num_classes, initial)

    def pipeline_loss(self, lm):
        return _PipeClassifierLoss(self.task, lm)


class ClassifierTask:
    """Fine-tuning as a task of megapix.engine.Trainer: module = ImageGPT + Classifier for the layout, loss =
    L_gen + L_clf, evaluation = validation accuracy and classification loss, score = accuracy."""

    metrics = ("loss", "l_gen", "l_clf", "acc")

    def __init__(self, data: dict, num_classes: int, base_state: dict | None, augment: bool):
        self.data, self.num_classes, self.base_state, self.augment = data, num_classes, base_state, augment
        self.meter = Meter(self.metrics)

    @property
    def train_size(self) -> int:
        return len(self.data["train"])

    def _record(self, loss, l_gen, l_clf, logits, y) -> None:
        n = len(y)
        for name, v in (("loss", loss), ("l_gen", l_gen), ("l_clf", l_clf)):
            self.meter.add(name, v, n)
        self.meter.add("acc", (logits.argmax(-1) == y).double().mean(), n)

    def build(self, cfg, layout):
        """Through parallel.build_module, as pre-training: every rank materialises only its share, starting from
        the pre-trained weights (or the initialisation, --from-scratch) cut to its shard, the classifier at zero."""
        m, seed = cfg.model, cfg.train.seed
        if cfg.train.sequence_parallel or cfg.train.context_parallel > 1:
            flag = "--sequence-parallel" if cfg.train.sequence_parallel else "--context-parallel"
            raise ConfigError(f"fine-tuning does not run with {flag} (its classifier pools over all positions); "
                              "drop it, tensor parallelism alone works")
        self.bert = m.objective == "bert"

        def initial(name: str, shape) -> torch.Tensor:
            if name.startswith("clf."):
                return torch.zeros(shape)
            if self.base_state is None:
                return draw_parameter(name, shape, m, seed)
            return self.base_state[name].float().clone()  # a new tensor: the sweep's next run starts from it too

        return parallel.build_module(cfg, layout, head=ClassifierHead(self), initial=initial)

    def setup(self, trainer) -> None:
        lay, t = trainer.layout, trainer.cfg.train
        self.schedule, self.micro, self.seed = trainer.schedule, trainer.micro_batch, t.seed
        self.per_rank = t.global_batch // lay.dp
        if self.per_rank * lay.dp != t.global_batch or self.per_rank % self.micro:
            raise ConfigError(f"global batch {t.global_batch} does not split into {lay.dp} data-parallel ranks x "
                              f"micro-batches of {self.micro}; pick a global batch divisible by both")
        self.dp_rank, self.global_batch = lay.dp_rank, t.global_batch
        self.n_ctx, self.mask_rate = trainer.cfg.model.n_ctx, trainer.cfg.model.mask_rate

    def train_batches(self, step: int):
        idx, epochs = self.schedule.indices(step)
        lo = self.dp_rank * self.per_rank
        mask = bert_mask(step, self.global_batch, self.n_ctx, self.mask_rate, self.seed) if self.bert else None
        out = []
        for a in range(lo, lo + self.per_rank, self.micro):
            sl = slice(a, a + self.micro)
            tokens = torch.empty((self.micro, self.n_ctx), dtype=torch.int64)
            y = torch.empty(self.micro, dtype=torch.int64)
            for e in np.unique(epochs[sl]):  # augmentation is seeded per epoch; keep row order
                rows = np.flatnonzero(epochs[sl] == e)
                tok, lab = self.data["train"].batch(idx[sl][rows], int(e), self.seed, self.augment)
                tokens[torch.from_numpy(rows)], y[torch.from_numpy(rows)] = tok, lab
            out.append((tokens, y, None if mask is None else mask[sl]))
        return out

    def forward(self, engine, batch):
        tokens, y, mask = batch
        loss, l_gen, l_clf, logits = engine(tokens, y, mask)
        self._record(loss, l_gen, l_clf, logits, y)
        return loss

    @staticmethod
    def pipe_batch(batch):
        tokens, y, mask = batch
        return (tokens, (tokens, y)) if mask is None else ((tokens, mask), (tokens, y, mask))

    def split_metrics(self, trainer, name: str) -> dict:
        split = self.data[name]
        m = trainer.evaluate_rows(len(split), lambda idx: (*split.batch(idx), None))
        return {f"{name}_acc": m["acc"], f"{name}_loss": m["l_clf"]}

    def evaluate(self, trainer) -> dict:
        return self.split_metrics(trainer, "val")

    @staticmethod
    def score(metrics: dict) -> float | None:
        return metrics.get("val_acc")


class _PipeClassifierLoss:
    """The last pipeline stage's loss_fn: L_gen + L_clf from (LM logits, class logits)."""

    def __init__(self, task: ClassifierTask, lm):
        self.task, self.lm = task, lm

    def __call__(self, outputs, labels):
        lm_logits, logits = outputs
        tokens, y, mask = (*labels, None)[:3]
        l_gen = self.lm(lm_logits, tokens, mask if self.task.bert else None)
        l_clf = F.cross_entropy(logits.float(), y)
        loss = l_gen + l_clf
        self.task._record(loss, l_gen, l_clf, logits, y)
        return loss


# ----------------------------------------------------------------------------------------------------------
# the CLI: options as a dataclass (help in field metadata), a parser built from it
# ----------------------------------------------------------------------------------------------------------
# TrainConfig's fields that `megapix finetune` takes as flags, with TrainConfig's defaults and help: the optimiser,
# clipping, seed, batch geometry, layout and precision are the trainer's settings, not copies of them.
TRAIN_FIELDS = ("global_batch", "micro_batch", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "seed",
                "zero_stage", "tensor_parallel", "pipeline_parallel", "activation_checkpointing", "precision")


@dataclass
class FinetuneConfig:
    """`megapix finetune` options (flags generated by megapix.cliargs, as for every command): the fine-tuning
    sweep's own here, the training settings in `train` (a TrainConfig; its TRAIN_FIELDS are flags too), so
    fine-tuning and pre-training share one definition of each. The learning rate, the length and the evaluation
    period are the sweep's (per run: TrainConfig.lr, max_steps, eval_every)."""

    out: str | None = opt(None, "output folder: finetune_results.json, metrics.jsonl, best_model/", kind="out",
                          metavar="DIR", default_help="required")
    checkpoint: str | None = checkpoint_field(required=False)
    model: str | None = opt(None, "preset for --from-scratch without a --checkpoint (e.g. tiny)", metavar="PRESET",
                              default_help="none")
    from_scratch: bool = opt(False, "random initialisation (same architecture and palette): the baseline")
    data: str | None = opt(None, "labelled source: digits, cifar10:PATH, ...", metavar="SPEC",
                             default_help="the checkpoint's")
    palette: str | None = opt(None, "kmeans_centers.npy", metavar="PATH",
                                default_help="the checkpoint's; fitted when there is none")
    lr: str = opt("3e-4,1e-4,3e-5", "one learning rate or a comma-separated sweep (one early-stopped run each)",
                  metavar="LRS")
    max_epochs: int = opt(10, "epochs per run")
    max_steps: int | None = opt(None, "steps per run; overrides --max-epochs", default_help="from --max-epochs")
    patience: int = opt(3, "evaluations without a validation-accuracy gain before a run stops")
    eval_every: int | None = opt(None, "steps between validation evaluations", default_help="one epoch")
    augment: Literal["auto", "none", "shift", "cifar"] = opt(
        "auto", "train-time augmentation: auto (shift for the embedded digits, CIFAR's pad/crop/flip otherwise), none, "
        "shift, cifar")
    val_fraction: float | None = opt(None, "held-out share of train for early stopping", default_help="the paper's")
    deepspeed_config: str | None = opt(None, "DeepSpeed JSON config (its values and megapix's must agree)",
                                       aliases=("--deepspeed_config",), metavar="JSON", default_help="none")
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig, metadata={
        "cli": False, "help": f"the training settings (flags: {', '.join(TRAIN_FIELDS)})"})

    def __post_init__(self):
        if not self.out:
            raise ConfigError("--out is required: the folder for finetune_results.json, metrics.jsonl, best_model/")
        for name in ("max_steps", "max_epochs", "eval_every"):  # 0 is a value, not "unset"
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value} must be >= 1"
                                  + (" (leave it unset to train --max-epochs)" if name == "max_steps" else ""))


def build_parser() -> tuple[argparse.ArgumentParser, dict, dict]:
    """The parser, and dest -> field of FinetuneConfig's flags and of the TrainConfig flags (dest "train.<field>")."""
    p = command_parser("megapix finetune", __doc__.splitlines()[0])
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
    args, lrs = parse_args(argv)
    from megapix.engine import Trainer  # lazy: deepspeed (seconds to import) is not needed for --help

    init_distributed()
    rank0 = is_rank0()
    from megapix import runfolder

    runfolder.claim(args.out, "finetune", "megapix finetune")  # before anything is read or written
    config, base_state, palette, data_spec = _load(args)
    out = os.path.abspath(args.out)
    base_cfg = Config(model=config, data=DataConfig(source=data_spec, val_fraction=args.val_fraction),
                      train=dataclasses.replace(args.train, out=out))
    if palette is None:  # the trainer's palette path: fitted once on rank 0 into --out, or reused from there
        os.makedirs(out, exist_ok=True)
        token_data, palette = load_splits(base_cfg, out)
        splits = {s: td.split for s, td in token_data.items()}
    else:
        source = open_source(data_spec, config.resolution, args.val_fraction, args.train.seed, augment=True)
        splits = {s: source.split(s) for s in ("train", "val", "test")}
        TokenData(splits["train"], config.n_ctx, palette, f"{data_spec} [train]")
    augmentation = default_augmentation(data_spec) if args.augment == "auto" else args.augment
    data = {s: LabelledData(sp, palette, config.n_ctx, f"{data_spec} [{s}]", augmentation)
            for s, sp in splits.items()}
    if len(data["val"]) == 0:
        raise ConfigError("the validation split is empty; early stopping needs one (--val-fraction > 0)")
    has_test = len(data["test"]) > 0
    num_classes = (splits["train"].num_classes
                   or int(max(data["train"].labels.max(), data["val"].labels.max())) + 1)
    os.makedirs(out, exist_ok=True)
    log = RunLog(out, rank0, plot=False)  # this sweep's curves, one file
    log.continue_from(None)
    spe = GlobalBatches(len(data["train"]), args.train.global_batch, args.train.seed).steps_per_epoch()
    max_steps = args.max_steps if args.max_steps is not None else args.max_epochs * spe
    eval_every = args.eval_every if args.eval_every is not None else spe

    runs, best, best_state = [], None, None
    for lr in lrs:
        cfg = Config(model=config, data=base_cfg.data, train=train_config(args, lr, max_steps, eval_every, out))
        task = ClassifierTask(data, num_classes, None if args.from_scratch else base_state, augmentation != "none")
        trainer = Trainer(cfg, args.deepspeed_config, task=task, run_log=log, checkpoints=False)
        rec = {"lr": lr, "from_scratch": args.from_scratch, "best_val_acc": -1.0, "best_step": 0,
               "stopped_early": False}
        kept = {}

        def on_best(tr, r, rec=rec, kept=kept, task=task):
            rec.update(best_val_acc=r["val_acc"], best_step=tr.step)
            if has_test:
                rec["test_acc_at_best"] = r["test_acc"] = task.split_metrics(tr, "test")["test_acc"]
            kept["state"] = tr.full_state_dict()

        t0 = time.perf_counter()
        trainer.fit(patience=args.patience, on_best=on_best, extra={"lr_run": lr}, desc=f"finetune lr={lr:g}")
        rec.update(steps=trainer.step, steps_per_epoch=spe, stopped_early=trainer.stopped_early,
                   seconds=round(time.perf_counter() - t0, 1), zero_stage=trainer.layout.zero_stage,
                   world=trainer.layout.world, layout=trainer.layout.describe(batch=False, world=True))
        runs.append(rec)
        if best is None or rec["best_val_acc"] > best["best_val_acc"]:
            best, best_state = rec, kept.get("state")
        del trainer, task, kept
        gc.collect()
    if rank0:
        write_outputs(args, out, config, palette, num_classes, lrs, runs, best, best_state, data_spec, augmentation)
    barrier()
    return 0


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
