"""Linear probes during pre-training (`megapix train --probe-every N`, issue 29).

Every N steps (and at the last step) the weights are consolidated onto rank 0 (Trainer.full_state_dict, so every
layout works: ZeRO-3, TP, PP, CP), loaded into a plain ImageGPT, and the offline path runs on them:
megapix.features.extract pools each probed layer over a fixed labelled subset (the first --probe-rows rows of the
probe data's train split, and as many of its val split), and megapix.probe.probe fits the same L-BFGS logistic
regression as `megapix probe` (over a shorter L2 grid, L2_GRID, for time), reporting the val accuracy of the L2
that val picks. The number is thus what `megapix extract` + `megapix probe --l2 1e-3,1e-1` give on that checkpoint
and rows.

It leaves the training curve alone: the copy of the weights is a separate module, built on the meta device (no
random initialisation), the engine is never put in eval mode, and the random states of torch, numpy and Python
are restored afterwards. The data are opened as extract opens them (no augmentation, the training seed and
validation fraction), and checked when the run is configured: no labels or a layer out of range is one line.
"""
from __future__ import annotations

import random
import time

import numpy as np
import torch

from megapix.attentive import default_layers
from megapix.config import Config, ConfigError
from megapix.data.loader import TokenData
from megapix.data.sources import open_source
from megapix.features import extract, parse_layers
from megapix.model import ImageGPT
from megapix.probe import probe

# Two strengths of megapix probe's six (1e-6..1e-1): the six fit 9 times slower (docs/evaluation.md, what
# probe-every costs). `megapix probe --l2 1e-3,1e-1` is the offline equal.
L2_GRID = (1e-3, 1e-1)


class TrainingProbe:
    """The probe of one training run: its data and layers fixed at start-up, `due(step)` and a collective call."""

    def __init__(self, cfg: Config):
        t, m = cfg.train, cfg.model
        self.every, self.max_steps, self.model_cfg = t.probe_every, t.max_steps, m
        self.spec = t.probe_data or cfg.data.source
        flag = f"--probe-data {t.probe_data}" if t.probe_data else f"--data {cfg.data.source}"
        try:
            self.layers = parse_layers(t.probe_layers, m.n_layer) if t.probe_layers else default_layers(m.n_layer)
        except ConfigError as e:
            said = str(e).replace("--layers ", "--probe-layers ")  # parse_layers speaks of extract's flag
            said = said if "--probe-layers" in said else f"--probe-layers {t.probe_layers}: {said}"
            raise ConfigError(said) from None
        source = open_source(self.spec, m.resolution, cfg.data.val_fraction, t.seed, augment=False)
        self.splits = {s: source.split(s) for s in ("train", "val")}
        for name, split in self.splits.items():
            if split.labels is None or len(split) == 0:
                raise ConfigError(f"--probe-every needs labelled train and val splits, but {flag} has "
                                  f"{'no labels' if split.labels is None else f'an empty {name} split'}; "
                                  "pass --probe-data SPEC with labelled images (e.g. digits, cifar10:PATH)")
        self.rows = {s: np.arange(min(t.probe_rows, len(split))) for s, split in self.splits.items()}
        labels = np.concatenate([s.labels for s in self.splits.values()])
        self.num_classes = self.splits["train"].num_classes or int(labels.max()) + 1  # as megapix probe counts them

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.max_steps)

    def describe(self) -> str:
        n = {s: len(r) for s, r in self.rows.items()}
        return (f"probe every {self.every} steps: layers {self.layers}, {n['train']} train / {n['val']} val rows of "
                f"{self.spec}")

    def __call__(self, trainer) -> dict:
        """{"probe_acc/layer_L": val accuracy, "probe_time_s": its seconds} on rank 0 ({} elsewhere). Collective:
        every rank calls it."""
        began = time.perf_counter()
        state = trainer.full_state_dict()
        if not trainer.is_rank0:
            return {}
        saved = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            return {**self._accuracies(state, trainer.palette, trainer.device),
                    "probe_time_s": time.perf_counter() - began}
        finally:
            torch.random.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    def _accuracies(self, state: dict, palette, device) -> dict:
        with torch.device("meta"):  # no initialisation: the weights come next, and no random number is drawn
            model = ImageGPT(self.model_cfg)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, assign=True, strict=True)
        model = model.to(device).eval()
        feats, labels = {}, {}
        for name, split in self.splits.items():
            data = TokenData(split, self.model_cfg.n_ctx, palette, f"{self.spec} [{name}]")
            feats[name] = extract(model, data.tokens(self.rows[name]), self.layers, device=device).cpu()
            labels[name] = torch.from_numpy(np.asarray(split.labels[self.rows[name]], dtype=np.int64))
        d, out, threads = self.model_cfg.d_model, {}, torch.get_num_threads()
        if torch.device(device).type == "cpu":
            torch.set_num_threads(1)  # as megapix probe: on small fits more threads only add synchronisation
        try:
            for i, layer in enumerate(self.layers):
                cols = slice(i * d, (i + 1) * d)
                r = probe((feats["train"][:, cols], labels["train"]), (feats["val"][:, cols], labels["val"]), None,
                          self.num_classes, L2_GRID, "lbfgs", device)  # megapix probe's --max-iter default, 500
                out[f"probe_acc/layer_{layer}"] = r["val_acc"]
        finally:
            torch.set_num_threads(threads)
        return out
