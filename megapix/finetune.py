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

import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megapix import parallel
from megapix.config import Config, ConfigError, TrainConfig
from megapix.data import load_splits
from megapix.data.augment import cifar_augment, image_rng
from megapix.data.loader import TokenData, bert_mask
from megapix.data.sources import open_source
from megapix.model.igpt import draw_parameter, lm_loss
from megapix.parallel.pipeline import HeadLayer
from megapix.tasks import Meter

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


def labelled_splits(cfg: Config, palette, augmentation: str) -> tuple[dict, object, int]:
    """The labelled train/val/test splits of cfg.data as LabelledData, the palette (fitted once on rank 0 into
    cfg.train.out when there is none, as the trainer does, else the given one) and the number of classes."""
    config, spec = cfg.model, cfg.data.source
    if palette is None:
        os.makedirs(cfg.train.out, exist_ok=True)
        token_data, palette = load_splits(cfg, cfg.train.out)
        splits = {s: td.split for s, td in token_data.items()}
    else:
        source = open_source(spec, config.resolution, cfg.data.val_fraction, cfg.train.seed, augment=True)
        splits = {s: source.split(s) for s in ("train", "val", "test")}
        TokenData(splits["train"], config.n_ctx, palette, f"{spec} [train]")  # checks the ids against the palette
    data = {s: LabelledData(sp, palette, config.n_ctx, f"{spec} [{s}]", augmentation) for s, sp in splits.items()}
    if len(data["val"]) == 0:
        raise ConfigError("the validation split is empty; early stopping needs one (--val-fraction > 0)")
    num_classes = splits["train"].num_classes or int(max(data["train"].labels.max(), data["val"].labels.max())) + 1
    return data, palette, num_classes
