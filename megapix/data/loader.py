"""Splits turned into token batches, and the global-batch schedule.

The sequence of global batches depends only on (seed, data): step s takes positions [s*G, (s+1)*G) of an
endless stream made of one seeded permutation per epoch. Each data-parallel rank takes its contiguous slice
of that global batch and cuts it into micro-batches. So every layout sees the same global batches, curves
compare across layouts, and resuming at step k needs no loader state at all.
"""
from __future__ import annotations

import numpy as np
import torch

from megapix.config import VOCAB_SIZE, ConfigError
from megapix.data.palette import Palette
from megapix.data.sources import Split


class TokenData:
    """A split as palette ids. Token splits are used as they are; image splits are encoded on the fly
    (the palette's lookup table makes that a gather), with per-epoch augmentation where the source has it."""

    def __init__(self, split: Split, n_ctx: int, palette: Palette | None, name: str = "data"):
        self.split = split
        self.palette = palette
        self.n_ctx = n_ctx
        self.name = name
        if split.tokens is not None:
            tokens = split.tokens
            if tokens.ndim != 2 or tokens.shape[1] != n_ctx:
                raise ConfigError(f"{name}: token rows have {tokens.shape[1:]} ids but the model takes {n_ctx} "
                                  f"({int(n_ctx ** 0.5)}x{int(n_ctx ** 0.5)}); pick a preset of that resolution")
            hi = int(np.max(tokens[: min(len(tokens), 4096)])) if len(tokens) else 0
            if hi >= VOCAB_SIZE:
                raise ConfigError(f"{name}: token id {hi} >= {VOCAB_SIZE}; palette ids must lie in [0, 512)")
        else:
            if palette is None:
                raise ConfigError(f"{name}: image data needs a palette (--palette FILE, or none to fit one)")
            h, w = split.images.shape[1:3]
            if h * w != n_ctx:
                raise ConfigError(f"{name}: images are {h}x{w} but the model takes {int(n_ctx ** 0.5)}x"
                                  f"{int(n_ctx ** 0.5)}; choose a preset of that resolution or resize the data")

    def __len__(self) -> int:
        return len(self.split)

    @property
    def labels(self):
        return self.split.labels

    def tokens(self, indices: np.ndarray, epoch: int = 0, seed: int = 0) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64)
        if self.split.tokens is not None:
            ids = np.asarray(self.split.tokens[np.sort(indices)])[np.argsort(np.argsort(indices))]
            if ids.size and ids.max() >= VOCAB_SIZE:
                raise ConfigError(f"{self.name}: token id {int(ids.max())} >= {VOCAB_SIZE}; ids must lie in [0, 512)")
            return torch.from_numpy(ids.astype(np.int64))
        images = self.split.images
        batch = images.batch(indices, epoch, seed) if hasattr(images, "batch") else images[indices]
        return torch.from_numpy(self.palette.encode(np.asarray(batch)))


class GlobalBatches:
    """Which examples make up global batch `step`, identical on every rank and in every layout."""

    def __init__(self, n: int, global_batch: int, seed: int):
        if n == 0:
            raise ConfigError("the training split is empty; check the data path")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(example indices [G], their epochs [G]) for global batch `step`."""
        pos = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
        epochs = pos // self.n
        idx = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            idx[sel] = self._perm(int(e))[pos[sel] % self.n]
        return idx, epochs

    def steps_per_epoch(self) -> int:
        return -(-self.n // self.global_batch)


def bert_mask(step: int, rows: int, n_ctx: int, rate: float, seed: int, salt: int = 0) -> torch.Tensor:
    """Exactly round(rate * T) masked positions per image, seeded by (seed, step): the same in every layout,
    and every micro-batch has the same number of masked tokens, so per-micro-batch means average exactly."""
    n_mask = max(1, int(round(rate * n_ctx)))
    rng = np.random.default_rng([seed, step % 2**63, 7919 + salt])  # negative steps: evaluation sets
    order = np.argsort(rng.random((rows, n_ctx)), axis=1)[:, :n_mask]
    mask = np.zeros((rows, n_ctx), dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return torch.from_numpy(mask)


class MicroBatchSampler(torch.utils.data.Sampler):
    """The stateless schedule as a DataLoader sampler: from `start_step` on, one item per micro-batch of this
    rank, (step, rows [micro], epochs [micro]). Endless; the consumer stops when training does."""

    def __init__(self, schedule: GlobalBatches, dp_rank: int, per_rank: int, micro_batch: int, start_step: int):
        self.schedule, self.dp_rank, self.per_rank, self.micro_batch = schedule, dp_rank, per_rank, micro_batch
        self.start_step = start_step

    def __iter__(self):
        step = self.start_step
        lo = self.dp_rank * self.per_rank
        while True:
            idx, epochs = self.schedule.indices(step)
            for a in range(lo, lo + self.per_rank, self.micro_batch):
                yield step, idx[a:a + self.micro_batch], epochs[a:a + self.micro_batch]
            step += 1


class TokenDataset(torch.utils.data.Dataset):
    """Decode, augment and encode one micro-batch (a MicroBatchSampler item) into palette ids [micro, T]; this is
    the work DataLoader workers do. Keyed only by (rows, epochs, seed), so any worker gives the same tokens."""

    def __init__(self, data: TokenData, seed: int):
        self.data, self.seed = data, seed

    def __getitem__(self, item) -> torch.Tensor:
        _, rows, epochs = item
        tokens = torch.empty((len(rows), self.data.n_ctx), dtype=torch.int64)
        for e in np.unique(epochs):  # augmentation is seeded per epoch; keep row order
            sel = np.flatnonzero(epochs == e)
            tokens[torch.from_numpy(sel)] = self.data.tokens(rows[sel], int(e), self.seed)
        return tokens


def _worker_init(_):
    torch.set_num_threads(1)  # the workers are the parallelism; intra-op threads would oversubscribe the CPUs


class MicroBatches:
    """This data-parallel rank's micro-batches of global batch `step`: (tokens, mask) pairs.

    With num_workers > 0, a torch DataLoader (TokenDataset + MicroBatchSampler) prepares the coming micro-batches
    in worker processes while the model trains; steps asked in order are served from it, and a jump (resume,
    re-run of a step) restarts it at that step. Batches are identical for any number of workers.
    """

    def __init__(self, data: TokenData, schedule: GlobalBatches, dp_rank: int, dp_size: int, micro_batch: int,
                 bert_rate: float | None, seed: int, num_workers: int = 0, prefetch_factor: int = 2):
        per_rank = schedule.global_batch // dp_size
        if per_rank * dp_size != schedule.global_batch or per_rank % micro_batch:
            raise ConfigError(f"global batch {schedule.global_batch} does not split into {dp_size} data-parallel "
                              f"ranks x micro-batches of {micro_batch}; pick a global batch divisible by both")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0 (0: prepare batches in this process)")
        self.data, self.schedule = data, schedule
        self.dp_rank, self.per_rank, self.micro_batch = dp_rank, per_rank, micro_batch
        self.bert_rate, self.seed = bert_rate, seed
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.dataset = TokenDataset(data, seed)
        self._it, self._next_step = None, None

    def _loader(self, start_step: int):
        sampler = MicroBatchSampler(self.schedule, self.dp_rank, self.per_rank, self.micro_batch, start_step)
        loader = torch.utils.data.DataLoader(self.dataset, sampler=sampler, batch_size=None,
                                             num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                                             worker_init_fn=_worker_init, persistent_workers=False)
        return iter(loader)

    def close(self) -> None:
        """Stop the worker processes (they also stop when this object is collected)."""
        self._it, self._next_step = None, None

    def __call__(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        n_micro = self.per_rank // self.micro_batch
        if self.num_workers == 0:
            items = iter(MicroBatchSampler(self.schedule, self.dp_rank, self.per_rank, self.micro_batch, step))
            tokens = [self.dataset[next(items)] for _ in range(n_micro)]
        else:
            if self._it is None or self._next_step != step:
                self._it = self._loader(step)
            tokens = [next(self._it) for _ in range(n_micro)]
            self._next_step = step + 1
        mask = None
        if self.bert_rate is not None:
            mask = bert_mask(step, self.schedule.global_batch, self.data.n_ctx, self.bert_rate, self.seed)
        lo = self.dp_rank * self.per_rank
        return [(t, None if mask is None else mask[lo + i * self.micro_batch:lo + (i + 1) * self.micro_batch])
                for i, t in enumerate(tokens)]
