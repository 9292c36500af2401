"""Attentive probes (what `megapix probe --attentive --checkpoint RUN` trains; the command is megapix.commands.probe).

AIM's evaluation (El-Nouby et al. 2024, `AttentionPoolingClassifier`): a layer's token states, standardised per
channel (BatchNorm without affine parameters), one learned query cross-attending over them, and a linear classifier
on the pooled vector. The trunk stays frozen and runs forward for every batch; no token dump is written. One trunk
pass feeds every (layer, learning rate) head at once. The docs: docs/evaluation.md, "Attentive probe".

- The standardisation uses statistics from one pass over (up to STATS_ROWS) training rows rather than per-batch
  statistics, so the probe does not depend on how the rows are spread over ranks.
- Data-parallel: each global batch is dealt out over the ranks, gradients are summed over ranks (one all-reduce
  for all heads), so every rank holds the same heads and 2 ranks train what 1 rank trains.
- Selection: val accuracy picks each layer's learning rate and epoch; test accuracy is that head's.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from megapix import runfolder
from megapix.checkpoint import load_model_and_palette
from megapix.checkpoint.schedule import Schedule
from megapix.config import ConfigError
from megapix.data.loader import TokenData
from megapix.data.sources import open_source
from megapix.features import rank_device, rows_per_forward
from megapix.parallel.dist import World

STATS_ROWS = 2048  # training rows whose token states give the per-channel mean and variance
WEIGHT_DECAY = 0.05
DEFAULT_CANDIDATES = 4  # layers tried without --layers, spread over depth


class AttentionPoolingHead(nn.Module):
    """[B, T, d] token states -> [B, classes] logits: standardise, pool with learned queries, classify."""

    def __init__(self, d: int, num_classes: int, queries: int = 1, heads: int = 1, seed: int = 0):
        super().__init__()
        if d % heads:
            raise ValueError(f"{heads} heads do not divide the width {d}")
        self.heads = heads
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("inv_std", torch.ones(d))
        gen = torch.Generator().manual_seed(seed)
        self.query = nn.Parameter(0.02 * torch.randn(1, queries, d, generator=gen))
        self.k, self.v = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.linear = nn.Linear(d, num_classes)
        for layer in (self.k, self.v, self.linear):  # seeded, so every rank starts from the same head
            nn.init.normal_(layer.weight, std=d ** -0.5, generator=gen)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The attention pooling with the standardisation and the key and value projections moved off the tokens:
        a query's scores are z @ (W_k^T q) and its output W_v (sum_t a_t z_t), with z = (x - mean) * inv_std
        applied to the d-vectors these produce (the weights a_t sum to 1). Exact reorderings of softmax(q k^T) v
        that cost O(T d) per query and head instead of O(T d^2) (`reference_forward` is the direct form)."""
        x = x.to(self.query.dtype)
        b, t, d = x.shape
        h = self.heads
        q = self.query[0].view(-1, h, d // h)  # [queries, heads, d_head]
        directions = torch.einsum("qhe,hed->qhd", q, self.k.weight.view(h, d // h, d)).reshape(-1, d)
        directions = directions * self.inv_std * (d // h) ** -0.5  # [queries * heads, d]: z @ v = x @ (v * inv_std) - c
        offset = directions @ self.mean
        scores = (x @ directions.t()).transpose(1, 2) - offset[:, None]  # [b, queries * heads, t]
        mixed = (scores.softmax(dim=-1) @ x - self.mean) * self.inv_std  # sum_t a_t z_t: [b, q * h, d]
        pooled = torch.einsum("bqhd,hed->bqhe", mixed.view(b, -1, h, d), self.v.weight.view(h, d // h, d))
        return self.linear(pooled.reshape(b, -1, d).mean(dim=1))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """AIM's AttentionPoolingClassifier as written: project every token, then attend."""
        x = (x.to(self.query.dtype) - self.mean) * self.inv_std
        b, t, d = x.shape
        split = lambda y: y.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q = split(self.query.expand(b, -1, -1))
        pooled = F.scaled_dot_product_attention(q, split(self.k(x)), split(self.v(x)))
        return self.linear(pooled.transpose(1, 2).reshape(b, -1, d).mean(dim=1))


def default_layers(n_layer: int, count: int = DEFAULT_CANDIDATES) -> list[int]:
    """`count` layers spread over depth, the last one n_layer (after the final norm)."""
    return sorted({max(1, round(i * n_layer / count)) for i in range(1, count + 1)})


class _Rows:
    """One split's rows, dealt out over ranks batch by batch, and the frozen model's token states for them: run
    for each batch, or kept in memory after their first pass when they fit in `cache_bytes` (the model is frozen
    and the probe's inputs are not augmented, so a kept state is the one a new pass would give)."""

    def __init__(self, data: TokenData, dist: World, device):
        self.data, self.dist, self.device = data, dist, device
        self.labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
        self.model, self.layers, self.cache, self.kept = None, [], None, None

    def __len__(self):
        return len(self.data)

    def attach(self, model, layers: list[int], cache_bytes: float) -> bool:
        """Read states of `layers` from `model`; keep them when all of this split's fit in `cache_bytes`."""
        self.model, self.layers = model, list(layers)
        c = model.config
        shape = (len(self), c.n_ctx, c.d_model)
        if len(layers) * math.prod(shape) * 4 <= cache_bytes:
            self.cache = {l: torch.empty(shape, device=self.device) for l in layers}
            self.kept = torch.zeros(len(self), dtype=torch.bool)
        return self.cache is not None

    def batches(self, order: np.ndarray, batch_size: int):
        """(row indices, labels, global batch size) of this rank's share of each global batch of `order`."""
        for lo in range(0, len(order), batch_size):
            batch = order[lo:lo + batch_size]
            mine = torch.from_numpy(np.ascontiguousarray(batch[self.dist.rank::self.dist.world]))
            yield mine, self.labels[mine].to(self.device), len(batch)

    def states(self, rows: torch.Tensor) -> dict[int, torch.Tensor]:
        """{layer: float32 [len(rows), T, d]} of these rows."""
        if self.cache is None:
            return self._run(rows)
        new = rows[~self.kept[rows]]
        if len(new):
            for l, x in self._run(new).items():
                self.cache[l][new.to(self.device)] = x
            self.kept[new] = True
        index = rows.to(self.device)
        return {l: self.cache[l][index] for l in self.layers}

    def _run(self, rows: torch.Tensor) -> dict[int, torch.Tensor]:
        if not len(rows):
            c = self.model.config
            return {l: torch.empty(0, c.n_ctx, c.d_model, device=self.device) for l in self.layers}
        step = rows_per_forward(self.device, self.model.config.n_ctx, len(rows))  # cache-sized on a CPU, as extract
        parts = []
        for lo in range(0, len(rows), step):
            tokens = self.data.tokens(rows[lo:lo + step].numpy()).to(self.device)
            with torch.no_grad():  # not inference_mode: the heads save these states for their backward
                parts.append({l: x.float() for l, x in self.model.hidden_states(tokens, self.layers)})
        return parts[0] if len(parts) == 1 else {l: torch.cat([p[l] for p in parts]) for l in self.layers}


def _all_sum(dist: World, values: list[torch.Tensor]) -> list[torch.Tensor]:
    if dist.on and dist.world > 1:
        flat = torch.cat([v.reshape(-1).double() for v in values])
        dist.dist.all_reduce(flat)
        out, i = [], 0
        for v in values:
            out.append(flat[i:i + v.numel()].view_as(v).to(v.dtype))
            i += v.numel()
        return out
    return values


def channel_stats(model, rows: _Rows, layers: list[int], batch_size: int) -> dict[int, tuple]:
    """Per layer, the mean and 1/std of every channel over all positions of the first STATS_ROWS training rows."""
    d = model.config.d_model
    sums = {l: [torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)] for l in layers}
    count = torch.zeros(1, dtype=torch.float64)
    for index, _, _ in rows.batches(np.arange(min(len(rows), STATS_ROWS)), batch_size):
        for l, x in rows.states(index).items():
            x = x.double().reshape(-1, d).cpu()
            sums[l][0] += x.sum(0)
            sums[l][1] += (x * x).sum(0)
        count += len(index) * model.config.n_ctx
    flat = _all_sum(rows.dist, [count] + [s for l in layers for s in sums[l]])
    n, stats = flat[0], {}
    for i, l in enumerate(layers):
        mean = flat[1 + 2 * i] / n
        var = (flat[2 + 2 * i] / n - mean * mean).clamp_min(0)
        stats[l] = (mean.float(), (var + 1e-6).rsqrt().float())
    return stats


class Probes:
    """Every (layer, lr) head, trained together over one trunk pass per batch."""

    def __init__(self, model, layers, lrs, num_classes, stats, args, device):
        d = model.config.d_model
        self.keys = [(l, lr) for l in layers for lr in lrs]
        self.heads = {}
        for i, (l, lr) in enumerate(self.keys):
            head = AttentionPoolingHead(d, num_classes, args.queries, args.attentive_heads, seed=args.seed + i)
            head = head.to(device)
            head.mean.copy_(stats[l][0]), head.inv_std.copy_(stats[l][1])
            self.heads[l, lr] = head
        self.opts = {k: torch.optim.AdamW(h.parameters(), lr=k[1], weight_decay=WEIGHT_DECAY)
                     for k, h in self.heads.items()}
        self.layers = list(layers)

    def step(self, rows: _Rows, index, labels, global_n: int, lr_scale: float) -> None:
        states = rows.states(index)
        for k, head in self.heads.items():
            self.opts[k].zero_grad(set_to_none=False)
            if len(index):  # the loss is a mean over the global batch: summing over ranks gives 1 rank's gradient
                (F.cross_entropy(head(states[k[0]]), labels, reduction="sum") / global_n).backward()
        grads = [p.grad for h in self.heads.values() for p in h.parameters()]
        for g, total in zip(grads, _all_sum(rows.dist, grads)):
            g.copy_(total)
        for k, opt in self.opts.items():
            for group in opt.param_groups:
                group["lr"] = k[1] * lr_scale
            opt.step()

    @torch.no_grad()
    def correct(self, rows: _Rows, batch_size: int) -> dict:
        """Correctly classified rows of a split, per head, summed over ranks."""
        hits = {k: torch.zeros(1, dtype=torch.float64) for k in self.heads}
        for index, labels, _ in rows.batches(np.arange(len(rows)), batch_size):
            states = rows.states(index)
            for k, head in self.heads.items():
                hits[k] += (head(states[k[0]]).argmax(-1) == labels).sum().cpu()
        total = _all_sum(rows.dist, list(hits.values()))
        return {k: float(v) / len(rows) for k, v in zip(hits, total)}


def train_probes(model, splits: dict[str, _Rows], layers, lrs, num_classes: int, args, device) -> list[dict]:
    """Train every (layer, lr) head; val picks each head's epoch, then each layer's lr. Rows, one per layer."""
    train, dist, bs = splits["train"], splits["train"].dist, args.attentive_batch_size
    budget = args.state_cache_gb * 2 ** 30
    for rows in splits.values():  # train first: it is read most often
        if rows.attach(model, layers, budget):
            budget -= len(layers) * len(rows) * model.config.n_ctx * model.config.d_model * 4
    kept = [name for name, rows in splits.items() if rows.cache is not None]
    _say(dist, f"token states kept in memory after their first pass: {', '.join(kept) or 'none'} "
               f"(--state-cache-gb {args.state_cache_gb:g}); the model runs for the rest")
    stats = channel_stats(model, train, layers, bs)
    probes = Probes(model, layers, lrs, num_classes, stats, args, device)
    steps_per_epoch = math.ceil(len(train) / bs)
    schedule = Schedule(1.0, steps_per_epoch, args.attentive_epochs * steps_per_epoch)  # warm-up: one epoch
    best = {k: (-1.0, 0, None) for k in probes.keys}  # val acc, epoch, state
    step, t0 = 0, time.perf_counter()
    for epoch in range(1, args.attentive_epochs + 1):
        order = np.random.default_rng([args.seed, epoch]).permutation(len(train))
        batches = tqdm(train.batches(order, bs), total=steps_per_epoch, leave=False, desc=f"epoch {epoch}",
                       disable=dist.rank != 0 or not sys.stderr.isatty())
        for index, labels, n in batches:
            probes.step(train, index, labels, n, schedule.factor(step))
            step += 1
        val = probes.correct(splits["val"], bs)
        for k, acc in val.items():
            if acc > best[k][0]:
                best[k] = (acc, epoch, copy.deepcopy(probes.heads[k].state_dict()))
        top = max(val, key=val.get)
        _say(dist, f"epoch {epoch}/{args.attentive_epochs}: val {100 * val[top]:.2f}% best (layer {top[0]}, lr "
                   f"{top[1]:g}), {time.perf_counter() - t0:.1f} s")
    for k, (_, _, state) in best.items():
        probes.heads[k].load_state_dict(state)
    test = probes.correct(splits["test"], bs) if "test" in splits else {}
    rows = []
    for l in layers:
        k = max(((l, lr) for lr in lrs), key=lambda k: best[k][0])
        row = {"probe": "attentive", "name": f"attentive {l}", "layers": [l], "lr": k[1], "epoch": best[k][1],
               "val_acc": best[k][0], "queries": args.queries, "heads": args.attentive_heads,
               "lr_val_acc": {f"{lr:g}": best[l, lr][0] for lr in lrs}}
        if k in test:
            row["test_acc"] = test[k]
        rows.append(row)
    return rows


def _say(dist: World, line: str) -> None:
    if dist.rank == 0:
        print(f"megapix probe --attentive: {line}", flush=True)


def open_splits(args, dist: World):
    """(model, {split: _Rows}, num classes, device, data spec), with the bad inputs refused first."""
    if not os.path.exists(args.checkpoint):
        raise ConfigError(f"checkpoint {args.checkpoint!r} does not exist; pass a training --out folder, a "
                          "checkpoint tag folder or an HF/megapix export directory")
    if runfolder.folder_kind(args.checkpoint) == "extract":
        raise ConfigError(f"{args.checkpoint} is a feature extraction, not a model: an attentive probe needs "
                          f"--checkpoint RUN; for these features drop --attentive (megapix probe --features "
                          f"{args.checkpoint})")
    model, palette, data = load_model_and_palette(args.checkpoint, args.palette, args.data)
    source = open_source(data, model.config.resolution, args.val_fraction, args.seed, augment=False)
    device = rank_device(args.device)
    splits = {}
    for name in ("train", "val", "test"):
        try:
            split = source.split(name)
        except ConfigError:
            if name != "test":
                raise
            continue
        if split.labels is None:
            raise ConfigError(f"the {name} split of {data} has no labels; an attentive probe needs labelled "
                              f"data: pass --data with labels (e.g. cifar10:PATH or imagefolder:DIR)")
        if len(split) == 0 and name != "test":
            raise ConfigError(f"the {name} split of {data} is empty; pass --val-fraction above 0 or more data")
        if len(split):
            splits[name] = _Rows(TokenData(split, model.config.n_ctx, palette, f"{data} [{name}]"), dist, device)
    labels = np.concatenate([np.asarray(r.data.labels) for r in splits.values()])
    num_classes = int(getattr(source, "num_classes", None) or labels.max() + 1)
    return model.to(device).eval(), splits, num_classes, device, data


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lrs = []
    if not lrs or any(not (math.isfinite(x) and x > 0) for x in lrs):
        raise ConfigError(f"--attentive-lr {text!r} needs one or more positive numbers, e.g. 1e-3,3e-3")
    return lrs


