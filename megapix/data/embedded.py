"""Embedded datasets generated from scikit-learn's digits (no download).

`digits-shifted`: each 8x8 digit is drawn at a random offset on a canvas of the model's resolution (10x10 in
configs/tiny_digits.yaml and the probe study), with one of 3 background levels, one of 3 stroke levels, one of 8
hues for the whole image, and at most one fainter fragment cut from another digit as clutter; no pixel noise. An
image holds a handful of colours (about 16 palette ids), and the ~3000 distinct colours over the set give the
512-colour palette something to fit while each id still means "background", "stroke" or an edge between them.
Class evidence is the digit's shape wherever it sits, so a linear probe on raw pixels is far from the ceiling
while features that pool stroke detectors over positions could do better. Measured at 10x10 (docs/probe_study):
raw-pixel logistic regression 51% test, a random-init model's pooled features 13-14%, an 8-layer d64 AR model
trained 300 steps (1.59 nats/token) 15-19% per layer and 25% for layers 0-4 concatenated: above the control,
still far below raw pixels.

Earlier renderings that did not work, kept as lessons: the colourised `digits` (a random foreground and
background colour per image) put every probe at chance (raw pixels 19%); plain grey 8x8 digits saturate every
probe (raw pixels 98%); and a first digits-shifted with continuous background/stroke levels, a per-image tint and
pixel noise N(0, 0.03) (131k distinct colours, 38 palette ids per 10x10 image) left an 8-layer d64 model trained
200 steps (12x12) probing at chance at every layer; the likely reason: the palette split near-grey intensities into
hundreds of ids that the noise, not the strokes, decides.

The split is by source digit: the first 1500 of the 1797 digits (and their placements) are train+val, the last
297 test, and the train/val holdout keeps all placements of one digit on the same side.
"""
from __future__ import annotations

import numpy as np

from megapix.config import ConfigError
from megapix.data.base import SPLITS, ArraySource, Source, Split, holdout, resize

N_TRAIN_DIGITS = 1500  # as the `digits` source: the last 297 digits are the test set


BG_LEVELS = (0.0, 0.12, 0.24)  # background intensity, one per image
FG_LEVELS = (0.7, 0.85, 1.0)  # stroke intensity, one per image
N_HUES = 8  # colours an image is tinted with: a small fixed set


def hues(n: int = N_HUES) -> np.ndarray:
    """The fixed set of image colours: [n, 3] RGB weights in [0.35, 1], brightest channel 1."""
    h = np.random.default_rng(7).uniform(0.35, 1.0, (n, 3))
    return h / h.max(1, keepdims=True)


def render_shifted(digits: np.ndarray, canvas: int, copies: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """digits [N, 8, 8] in [0, 1] -> (uint8 RGB [N * copies, canvas, canvas, 3], source index [N * copies]).

    Each rendering: a background level and a stroke level (each one of 3), one of 8 hues, the digit at a random
    offset, at most one fainter fragment of another digit; no pixel noise, so an image holds few colours and the
    next pixel's colour is predictable from the strokes around it."""
    n = len(digits)
    if canvas < 8:
        raise ConfigError(f"digits-shifted needs a canvas of at least 8 pixels; got {canvas}")
    src = np.repeat(np.arange(n), copies)
    m = len(src)
    bg = rng.choice(BG_LEVELS, m)
    fg = rng.choice(FG_LEVELS, m)
    tint = hues()[rng.integers(N_HUES, size=m)]
    img = np.ascontiguousarray(np.repeat(bg[:, None, None], canvas, 1).repeat(canvas, 2))
    for i in range(m):
        # clutter: 0 or 1 fragment (a 3x3 to 5x5 crop) of another random digit, fainter than the digit
        for _ in range(rng.integers(0, 2)):
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
    rgb = np.clip(np.rint(255.0 * np.clip(img, 0, 1)[..., None] * tint[:, None, None, :]), 0, 255).astype(np.uint8)
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
