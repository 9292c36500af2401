"""What every image source is: splits of uint8 images [N, H, W, 3] (or palette ids) with labels, the seeded
train/val holdout, and in-memory sources. The embedded and file-reading sources build on this module, and
megapix.data.sources (the registry of spec strings) on them."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from megapix.config import ConfigError

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """One split: either images (uint8 [N, H, W, 3]) or tokens (palette ids [N, T]), plus optional labels [N]."""

    images: np.ndarray | None = None
    tokens: np.ndarray | None = None
    labels: np.ndarray | None = None
    num_classes: int | None = None

    def __len__(self) -> int:
        return len(self.images if self.images is not None else self.tokens)


class Source(ABC):
    """Base class: `split(name)` returns a Split for "train", "val" or "test"."""

    name = "source"
    num_classes: int | None = None
    default_val_fraction = 0.1  # the paper: 10% of CIFAR/STL train held out

    @abstractmethod
    def split(self, name: str) -> Split:
        """The named split ("train", "val" or "test")."""

    def for_workers(self) -> Source | None:
        """What `megapix prepare` hands its worker processes (pickled) in place of the spec: the opened source
        when opening it builds an index by reading files and that index is small to send (the sharded sources),
        else None and each worker opens the spec again (in-memory and memory-mapped sources would be copied)."""
        return None


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of range(n) into (train, val) indices: the paper's held-out validation."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class ArraySource(Source):
    """In-memory images with labels, a fixed test set, and a seeded train/val holdout."""

    def __init__(self, name, train_x, train_y, test_x, test_y, num_classes, val_fraction=None, seed=0):
        self.name = name
        self.num_classes = num_classes
        frac = self.default_val_fraction if val_fraction is None else val_fraction
        tr, va = holdout(len(train_x), frac, seed)
        y = (lambda a, i: None if a is None else a[i])
        self._splits = {
            "train": Split(train_x[tr], labels=y(train_y, tr), num_classes=num_classes),
            "val": Split(train_x[va], labels=y(train_y, va), num_classes=num_classes),
            "test": Split(test_x, labels=test_y, num_classes=num_classes),
        }

    def split(self, name: str) -> Split:
        if name not in self._splits:
            raise ConfigError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return self._splits[name]


def resize(images: np.ndarray, res: int) -> np.ndarray:
    if images.shape[1] == res and images.shape[2] == res:
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((res, res), Image.BILINEAR)) for im in images])


def holdout_fraction(val_fraction, default: float) -> float:
    """The held-out share of train: the user's value, else the source's default; in [0, 1)."""
    f = default if val_fraction is None else float(val_fraction)
    if not 0.0 <= f < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must lie in [0, 1); the paper holds out 0.1 "
                          "(0.04 ImageNet)")
    return f


def check_size(h: int, w: int, resolution: int, what: str, fix: str) -> None:
    """Images of a fixed-size dataset must be the model's resolution; `fix` says how to get there."""
    if h != resolution or w != resolution:
        raise ConfigError(f"{what} images are {h}x{w} but the model expects {resolution}x{resolution}; {fix}")
