"""What the Trainer trains. A task builds the module DeepSpeed wraps for a layout, turns one micro-batch into a
loss, and evaluates; the Trainer owns everything else (DeepSpeed config, optimiser, schedule, precision, metrics,
checkpoints, the loop). Pre-training is `LMTask`; fine-tuning is `megapix.finetune.ClassifierTask`.

The interface (duck-typed; LMTask is the reference):
  metrics                    names the task records per micro-batch ("loss" first)
  meter                      a Meter: the task adds to it inside the loss, the Trainer reduces it over ranks
  build(cfg, layout)         -> (module, is_pipeline)
  setup(trainer)             batch geometry is known: prepare the train/eval batches
  train_size                 examples in the training split (the global-batch schedule)
  train_batches(step)        -> this data-parallel rank's micro-batches of global batch `step` (tuples of tensors)
  forward(engine, batch)     -> loss of one micro-batch (non-pipeline engines), recorded in the meter
  pipe_batch(batch)          -> (inputs, labels) for DeepSpeed's pipeline engine
  evaluate(trainer)          -> metrics dict (val_loss, ...); `score(metrics)`: higher is better (early stopping,
                                best checkpoint)
  bits_per_dim (optional)    {metric in nats per token: its bits-per-dim key}, added to each record by the Trainer
"""
from __future__ import annotations

import numpy as np
import torch

from megapix import parallel
from megapix.data.loader import MicroBatches, bert_mask
from megapix.parallel import dist as pdist


class Meter:
    """Weighted sums per metric over one step or one evaluation, reduced over all ranks. Weights make the result
    independent of the layout: tokens for losses, rows for accuracy. Ranks that hold no loss (non-last pipeline
    stages) add nothing; tensor-parallel replicas add the same value and weight, which cancels in the ratio."""

    def __init__(self, names):
        self.names = tuple(names)
        self.enabled = True
        self.reset()

    def reset(self) -> None:
        self.sums = {n: 0.0 for n in self.names}
        self.weights = {n: 0.0 for n in self.names}

    def add(self, name: str, mean, weight) -> None:
        if self.enabled:
            self.sums[name] = self.sums[name] + mean.detach().double() * float(weight)
            self.weights[name] += float(weight)

    def reduce(self, device) -> dict[str, float | None]:
        """Collective (every rank calls it): the weighted mean of each metric over all ranks."""
        vals = [torch.as_tensor(self.sums[n], dtype=torch.float64, device=device).reshape(()) for n in self.names]
        vec = torch.stack(vals + [torch.tensor(self.weights[n], dtype=torch.float64, device=device)
                                  for n in self.names])
        if pdist.world_size() > 1:
            torch.distributed.all_reduce(vec)
        k = len(self.names)
        return {n: (float(vec[i] / vec[k + i]) if vec[k + i] > 0 else None) for i, n in enumerate(self.names)}


def token_count(tokens, mask, bert: bool) -> float:
    return float(mask.sum()) if (bert and mask is not None) else float(tokens.numel())


class _RecordedPipeLoss:
    """A PipelineModule's loss_fn, recording each micro-batch's mean loss and token count in the meter."""

    def __init__(self, base, meter: Meter, bert: bool):
        self.base, self.meter, self.bert = base, meter, bert

    def __call__(self, outputs, labels):
        loss = self.base(outputs, labels)
        tokens, mask = labels if isinstance(labels, (tuple, list)) else (labels, None)
        self.meter.add("loss", loss, token_count(tokens, mask, self.bert))
        return loss


class LMTask:
    """Pre-training: the generative loss (next-token for AR, masked tokens for BERT); evaluation is the
    token-weighted val loss over a fixed set of validation images, the same in every layout."""

    metrics = ("loss",)
    # metrics in nats per token, and the key of each in bits per dim (the Trainer adds loss / ln 2)
    bits_per_dim = {"loss": "bpd", "val_loss": "val_bpd"}

    def __init__(self, splits: dict, palette=None):
        self.splits, self.palette = splits, palette
        self.meter = Meter(self.metrics)

    @property
    def train_size(self) -> int:
        return len(self.splits["train"])

    def build(self, cfg, layout):
        self.bert = cfg.model.objective == "bert"
        module, is_pipeline = parallel.build_module(cfg, layout)
        if is_pipeline:  # DeepSpeed calls module.loss_fn on the last stage
            module.loss_fn = _RecordedPipeLoss(module.loss_fn, self.meter, self.bert)
        return module, is_pipeline

    def setup(self, trainer) -> None:
        cfg, lay, t = trainer.cfg, trainer.layout, trainer.cfg.train
        rate = cfg.model.mask_rate if self.bert else None
        self.batches = MicroBatches(self.splits["train"], trainer.schedule, lay.dp_rank, lay.dp,
                                    trainer.micro_batch, rate, t.seed, num_workers=cfg.data.num_workers)
        # The evaluation set: the first eval_batches x global_batch validation images, whatever the layout.
        val = self.splits["val"]
        self.n_eval = min(len(val), t.eval_batches * t.global_batch)
        self.eval_mask = (bert_mask(-1, self.n_eval, cfg.model.n_ctx, rate, t.seed)
                          if rate is not None and self.n_eval else None)

    def train_batches(self, step: int):
        return self.batches(step)

    def forward(self, engine, batch):
        tokens, mask = batch
        loss = engine(tokens, mask)
        self.meter.add("loss", loss, token_count(tokens, mask, self.bert))
        return loss

    def pipe_batch(self, batch):
        tokens, mask = batch
        return ((tokens, tokens) if mask is None else ((tokens, mask), (tokens, mask)))

    def eval_batch(self, idx: np.ndarray):
        mask = None if self.eval_mask is None else self.eval_mask[torch.from_numpy(idx)]
        return self.splits["val"].tokens(idx), mask

    def evaluate(self, trainer) -> dict:
        if not self.n_eval:
            return {}
        return {"val_loss": trainer.evaluate_rows(self.n_eval, self.eval_batch)["loss"]}

    @staticmethod
    def score(metrics: dict) -> float | None:
        v = metrics.get("val_loss")
        return None if v is None else -v
