"""Embedded datasets generated from scikit-learn's digits (no download).

`digits-shifted`: each 8x8 digit is drawn at a random offset on a canvas of the model's resolution, with a
random background and stroke intensity, a faint per-image tint (so the 512-colour palette has colours to fit),
pixel noise, and clutter: 1-2 stroke fragments cut from other digits. Class evidence is the digit's shape
wherever it sits, so a linear probe on raw pixels is far from the ceiling while features that pool learned
stroke detectors over positions can do better: a setting in which the paper's probe-by-depth study says
something on CPU. (Plain grey 8x8 digits saturate every probe, layer 0 and raw pixels included; the
colourised `digits` put every probe at chance.)

The split is by source digit: the first 1500 of the 1797 digits (and their placements) are train+val, the last
297 test, and the train/val holdout keeps all placements of one digit on the same side.
"""
from __future__ import annotations

import numpy as np

from megapix.config import ConfigError
from megapix.data.base import SPLITS, ArraySource, Source, Split, holdout, resize

N_TRAIN_DIGITS = 1500  # as the `digits` source: the last 297 digits are the test set


def render_shifted(digits: np.ndarray, canvas: int, copies: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """digits [N, 8, 8] in [0, 1] -> (uint8 RGB [N * copies, canvas, canvas, 3], source index [N * copies])."""
    n = len(digits)
    if canvas < 8:
        raise ConfigError(f"digits-shifted needs a canvas of at least 8 pixels; got {canvas}")
    src = np.repeat(np.arange(n), copies)
    m = len(src)
    bg = rng.uniform(0.0, 0.35, m)
    fg = rng.uniform(0.6, 1.0, m)
    img = np.repeat(bg[:, None, None], canvas, 1).repeat(canvas, 2)
    img = np.ascontiguousarray(img)
    # clutter: 1-2 fragments (3x3 to 5x5 crops) of other random digits, fainter than the digit
    for i in range(m):
        for _ in range(rng.integers(1, 3)):
            j = rng.integers(n)
            h, w = rng.integers(3, 6, 2)
            y0, x0 = rng.integers(0, 9 - h), rng.integers(0, 9 - w)
            frag = digits[j, y0:y0 + h, x0:x0 + w]
            py, px = rng.integers(0, canvas - h + 1), rng.integers(0, canvas - w + 1)
            level = bg[i] + (rng.uniform(0.45, 0.75) - bg[i]) * frag
            img[i, py:py + h, px:px + w] = np.maximum(img[i, py:py + h, px:px + w], level)
        oy, ox = rng.integers(0, canvas - 8 + 1, 2)
        stroke = bg[i] + (fg[i] - bg[i]) * digits[src[i]]
        img[i, oy:oy + 8, ox:ox + 8] = np.maximum(img[i, oy:oy + 8, ox:ox + 8], stroke)
    img = img + rng.normal(0.0, 0.03, img.shape)
    tint = rng.uniform(0.85, 1.0, (m, 1, 1, 3))  # a faint colour cast per image: grey would give < 512 colours
    rgb = np.clip(np.rint(255.0 * np.clip(img, 0, 1)[..., None] * tint), 0, 255).astype(np.uint8)
    return rgb, src


class GroupedSource(Source):
    """Several renderings per source image: the train/val holdout is drawn over source images, not renderings."""

    def __init__(self, name, train_x, train_y, train_group, test_x, test_y, num_classes, val_fraction=None,
                 seed=0):
        self.name, self.num_classes = name, num_classes
        frac = self.default_val_fraction if val_fraction is None else val_fraction
        groups = np.unique(train_group)
        tr_g, va_g = holdout(len(groups), frac, seed)
        is_val = np.isin(train_group, groups[va_g])
        tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        self._splits = {
            "train": Split(train_x[tr], labels=train_y[tr], num_classes=num_classes),
            "val": Split(train_x[va], labels=train_y[va], num_classes=num_classes),
            "test": Split(test_x, labels=test_y, num_classes=num_classes),
        }

    def split(self, name: str) -> Split:
        if name not in self._splits:
            raise ConfigError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return self._splits[name]


def digits_shifted_source(resolution: int, arg: str = "", val_fraction=None, seed: int = 0) -> Source:
    """`digits-shifted[:COPIES]`: COPIES placements (default 4) of each 8x8 digit on a canvas of the model's
    resolution: offsets 0..resolution-8 in each direction, so the resolution sets the difficulty (8: no shift,
    12: up to 4 pixels, 16: up to 8). Resolutions under 8 get the 8x8 rendering resized down."""
    from sklearn.datasets import load_digits

    try:
        copies = int(arg) if arg else 4
    except ValueError:
        raise ConfigError(f"digits-shifted:{arg}: the argument is the number of placements per digit, "
                          "e.g. digits-shifted:4") from None
    if copies < 1:
        raise ConfigError(f"digits-shifted:{arg}: the number of placements per digit must be >= 1")
    d = load_digits()
    digits = (d.images / 16.0).astype(np.float64)
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(2020)  # fixed: the dataset is the same for every run and seed
    rgb, src = render_shifted(digits, max(resolution, 8), copies, rng)
    rgb = resize(rgb, resolution)
    train = src < N_TRAIN_DIGITS
    return GroupedSource("digits-shifted", rgb[train], labels[src[train]], src[train], rgb[~train],
                         labels[src[~train]], 10, val_fraction, seed)


__all__ = ["ArraySource", "GroupedSource", "digits_shifted_source", "render_shifted"]
