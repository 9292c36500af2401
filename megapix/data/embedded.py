"""Embedded datasets, generated (no download): `digits-shifted` from scikit-learn's digits, `shapes`,
`outlines` (the shapes in grey with hard edges: see render_outlines) and `outlines-large` (the same drawn larger,
the probe study's second-attempt task: see render_outlines_large).

`shapes` (the probe study's task; see render_shapes): one of 4 outlines (square, ring, plus, cross) per image,
small (half-size 12-22% of the canvas, scaled per class so every class has the same ink) at a random place, one of
3 background and 3 stroke levels and one of 8 hues, one fainter clutter bar, soft edges (drawn at 4x and averaged
down, so the palette has intermediate colours to fit). Only the outline's shape decides the class: a linear probe
on raw pixels gets 47.5% test at 16x16 (4 classes), where the class is plain to the eye. Tried first: outlines at
18-32% of the canvas gave raw pixels 78% (12x12) and 75% (16x16), and equal ink at that size 91% (the plus's
size gave it away); 12-22% with equal ink: 58% at 12x12, 47.5% at 16x16.
Tried after it (seed 0, an in-process AR loop of the study's shape, 8 layers x d64, 400 steps, not the study
command): hard edges (no supersampling) take the colour-histogram cue away, the random-init control falls from 40% to
25-31% per layer, but raw pixels rise to 51.5% and the AR model's layers give only 28-36% (val loss 0.32 nats: it
learns the background); 3 or 5 copies of the outline per image (each its own size and place) lift raw pixels to 71%
and 77% (a linear template summed over places). Neither was kept.

`digits-shifted`: each 8x8 digit is drawn at a random offset on a canvas of the model's resolution (10x10 in
configs/tiny_digits.yaml and the probe study), with one of 3 background levels, one of 3 stroke levels, one of 8
hues for the whole image, and at most one fainter fragment cut from another digit as clutter; no pixel noise. An
image holds a handful of colours (about 16 palette ids), and the ~3000 distinct colours over the set give the
512-colour palette something to fit while each id still means "background", "stroke" or an edge between them.
Class evidence is the digit's shape wherever it sits, so a linear probe on raw pixels is far from the ceiling
while features that pool stroke detectors over positions could do better. Measured at 10x10
(docs/probe_study_digits_shifted, the study before it moved to shapes): raw-pixel logistic regression 51% test,
a random-init model's pooled features 13-14%, an 8-layer d64 AR model trained 300 steps (1.59 nats/token)
15-19% per layer and 25% for layers 0-4 concatenated: above the control, still far below raw pixels.

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

import os

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


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits: (images float64 [1797, 8, 8] in 0..16, labels int64), as load_digits() gives.

    Read from the file load_digits reads (sklearn/datasets/data/digits.csv.gz) without importing scikit-learn,
    whose import takes 3 s of every run's start on 2 cores; load_digits() itself where that file is not found."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without running its __init__
    path = (os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
            if spec is not None and spec.submodule_search_locations else "")
    if not os.path.isfile(path):
        from sklearn.datasets import load_digits as sklearn_load_digits

        d = sklearn_load_digits()
        return d.images, d.target.astype(np.int64)
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def digits_shifted_source(resolution: int, arg: str = "", val_fraction=None, seed: int = 0) -> Source:
    """`digits-shifted[:COPIES]`: COPIES placements (default 4) of each 8x8 digit on a canvas of the model's
    resolution: offsets 0..resolution-8 in each direction, so the resolution sets the difficulty (8: no shift,
    12: up to 4 pixels, 16: up to 8). Resolutions under 8 get the 8x8 rendering resized down."""
    try:
        copies = int(arg) if arg else 4
    except ValueError:
        raise ConfigError(f"digits-shifted:{arg}: the argument is the number of placements per digit, "
                          "e.g. digits-shifted:4") from None
    if copies < 1:
        raise ConfigError(f"digits-shifted:{arg}: the number of placements per digit must be >= 1")
    images, labels = load_digits()
    digits = (images / 16.0).astype(np.float64)
    rng = np.random.default_rng(2020)  # fixed: the dataset is the same for every run and seed
    rgb, src = render_shifted(digits, max(resolution, 8), copies, rng)
    rgb = resize(rgb, resolution)
    train = src < N_TRAIN_DIGITS
    return GroupedSource("digits-shifted", rgb[train], labels[src[train]], src[train], rgb[~train],
                         labels[src[~train]], 10, val_fraction, seed)


# ----------------------------------------------------------------------------------------------------------
# shapes: the class is an outline's shape, not its colour, size or place
# ----------------------------------------------------------------------------------------------------------
SHAPES = ("square", "ring", "plus", "cross")  # hollow square, hollow circle, +, x
SHAPES_DEFAULT_N = 3000  # images in train+val; a fifth as many again are the test set
SHAPES_MAX = 50_000  # generated in memory (drawn in chunks of 1000)
HALF_RANGE = (0.12, 0.22)  # of the canvas: small outlines, so that the place varies widely (raw pixels weak)
SHAPE_INK = ((1.0, 1.0), (1.13, 1.13), (1.43, 1.4), (1.2, 1.18))  # (size, stroke) factors: equal ink per class
N_BARS = 1  # clutter bars per image
SUPERSAMPLE = 4  # drawn at 4x and area-averaged down: soft edges, so the palette has intermediate colours to fit


def _shape_masks(kind: np.ndarray, cy, cx, half, width, canvas: int, s: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage in [0, 1], float32 [N, canvas, canvas]: each image's outline (kind index into SHAPES) centred at
    (cy, cx) with half-size `half` and stroke width `width` (canvas pixels), drawn at s x, averaged."""
    g = ((np.arange(canvas * s) + 0.5) / s).astype(np.float32)  # sample centres in canvas pixels
    out = np.empty((len(kind), canvas, canvas), dtype=np.float32)
    for k in range(len(SHAPES)):  # each image draws only its own shape
        i = np.flatnonzero(kind == k)
        y = g[None, :, None] - cy[i, None, None].astype(np.float32)
        x = g[None, None, :] - cx[i, None, None].astype(np.float32)
        h, w = half[i, None, None].astype(np.float32), width[i, None, None].astype(np.float32) / 2
        ay, ax = np.abs(y), np.abs(x)
        if SHAPES[k] == "square":
            m = np.abs(np.maximum(ay, ax) - h) <= w
        elif SHAPES[k] == "ring":
            m = np.abs(np.sqrt(y * y + x * x) - h) <= w
        elif SHAPES[k] == "plus":
            m = (ay <= h) & (ax <= h) & ((ay <= w) | (ax <= w))
        else:  # cross: the two diagonals of the square, the same stroke width measured across the stroke
            m = (ay <= h) & (ax <= h) & (np.abs(np.abs(y) - np.abs(x)) <= w * np.float32(np.sqrt(2)))
        out[i] = m.reshape(len(i), canvas, s, canvas, s).mean((2, 4), dtype=np.float32)
    return out


def _placed_outlines(n: int, canvas: int, rng: np.random.Generator,
                     half_range: tuple[float, float] = HALF_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """(classes, soft masks [n, canvas, canvas] in [0, 1]): balanced outlines of random size, stroke and place
    (anywhere they fit), drawn in chunks of 1000 (bounded memory). The order of draws from `rng` is part of the
    data: shapes and outlines of one seed share their geometry."""
    kind = np.arange(n) % len(SHAPES)
    rng.shuffle(kind)
    size, thick = np.array(SHAPE_INK).T[:, kind]
    half = rng.uniform(*half_range, n) * canvas * size
    width = rng.uniform(0.9, 1.3, n) * thick
    half = np.minimum(half, canvas / 2 - width / 2 - 0.5)  # always fits
    margin = half + width / 2 + 0.5
    cy, cx = (rng.uniform(margin, canvas - margin) for _ in range(2))
    return kind, np.concatenate([_shape_masks(kind[i:i + 1000], cy[i:i + 1000], cx[i:i + 1000], half[i:i + 1000],
                                              width[i:i + 1000], canvas) for i in range(0, n, 1000)])


def render_shapes(n: int, canvas: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8 RGB [n, canvas, canvas, 3]) and their classes (int64 [n], index into SHAPES).

    Each image: one of 4 outlines (balanced classes) of a random half-size (18-32% of the canvas) at a random
    place (anywhere it fits), stroke about one pixel wide; one background and one stroke level (each one of 3,
    as digits-shifted) and one of its 8 hues for the whole image; one fainter short bar (horizontal or vertical,
    random place) as clutter, so that no single pixel or colour count gives the class away."""
    if canvas < 8:
        raise ConfigError(f"shapes needs a canvas of at least 8 pixels; got {canvas}")
    kind, shape = _placed_outlines(n, canvas, rng)
    # clutter: a 1-pixel bar, 2-4 pixels long, at a random place and orientation, at 45-75% of the stroke level
    bar = np.zeros(shape.shape)
    for _ in range(N_BARS):
        length = rng.integers(2, 5, n)
        vertical = rng.random(n) < 0.5
        for i in range(n):
            hh, ww = (length[i], 1) if vertical[i] else (1, length[i])
            py, px = rng.integers(0, canvas - hh + 1), rng.integers(0, canvas - ww + 1)
            bar[i, py:py + hh, px:px + ww] = np.maximum(bar[i, py:py + hh, px:px + ww], rng.uniform(0.45, 0.75))
    bg = rng.choice(BG_LEVELS, n)[:, None, None]
    fg = rng.choice(FG_LEVELS, n)[:, None, None]
    tint = hues()[rng.integers(N_HUES, size=n)]
    img = bg + (fg - bg) * np.maximum(shape, bar)  # float64: the same rounding everywhere
    rgb = np.clip(np.rint(255.0 * img[..., None] * tint[:, None, None, :]), 0, 255).astype(np.uint8)
    return rgb, kind.astype(np.int64)


def shapes_source(resolution: int, arg: str = "", val_fraction=None, seed: int = 0) -> Source:
    """`shapes[:N]`: N images (default 3000) for train+val and N/5 for test, drawn on a canvas of the model's
    resolution from a fixed seed (the same data for every run and seed; the seed picks the val holdout)."""
    return _drawn_source("shapes", render_shapes, 2021, resolution, arg, val_fraction, seed)


# ----------------------------------------------------------------------------------------------------------
# outlines: shapes without the colour shortcut (grey, hard edges), the probe study's second task
# ----------------------------------------------------------------------------------------------------------
OUTLINE_LEVELS = np.linspace(0.0, 1.0, 8)  # the greys a background or a stroke takes, one each per image
OUTLINE_CONTRAST = 3  # levels between background and stroke at least, either way round


def render_outlines(n: int, canvas: int, rng: np.random.Generator,
                    half_range: tuple[float, float] = HALF_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """n grey images (uint8 RGB [n, canvas, canvas, 3], R = G = B) and their classes (index into SHAPES).

    The outlines of render_shapes (same sizes, places and equal ink) with hard edges: a pixel is stroke when at
    least half of it is covered, so an image holds 2-3 grey levels and no edge colours (the colour-histogram cue
    of `shapes`); one background and one stroke grey per image, each one of 8 levels at least 3 apart and either
    brighter (no hue), so no pixel's value says "stroke" by itself; one clutter bar.
    Raw pixels get 30.5% test at 16x16 (outlines:3000, chance 25%). With the stroke always brighter (background
    0-0.3, stroke 0.55-1) they got 51%, and 58% with continuous levels: the sign of the contrast is what a
    template on pixels cannot follow, while the outline stays plain to the eye."""
    if canvas < 8:
        raise ConfigError(f"outlines needs a canvas of at least 8 pixels; got {canvas}")
    kind, shape = _placed_outlines(n, canvas, rng, half_range)
    shape = shape >= 0.5  # hard edges: a pixel half covered or more is stroke
    bg = rng.integers(len(OUTLINE_LEVELS), size=n)
    gap = rng.integers(OUTLINE_CONTRAST, len(OUTLINE_LEVELS), size=n) * rng.choice((-1, 1), n)
    gap = np.where((bg + gap < 0) | (bg + gap >= len(OUTLINE_LEVELS)), -gap, gap)  # the other way fits
    ok = (bg + gap >= 0) & (bg + gap < len(OUTLINE_LEVELS))  # a wide gap from a middle level fits neither way
    gap = np.where(ok, gap, np.where(bg >= len(OUTLINE_LEVELS) // 2, -OUTLINE_CONTRAST, OUTLINE_CONTRAST))
    bg, fg = OUTLINE_LEVELS[bg], OUTLINE_LEVELS[bg + gap]
    img = np.where(shape, fg[:, None, None], bg[:, None, None])
    length, vertical = rng.integers(2, 5, n), rng.random(n) < 0.5
    for i in range(n):  # the clutter bar: halfway between background and stroke, never over the outline
        hh, ww = (length[i], 1) if vertical[i] else (1, length[i])
        py, px = rng.integers(0, canvas - hh + 1), rng.integers(0, canvas - ww + 1)
        patch = img[i, py:py + hh, px:px + ww]
        img[i, py:py + hh, px:px + ww] = np.where(shape[i, py:py + hh, px:px + ww], patch, (bg[i] + fg[i]) / 2)
    grey = np.rint(255.0 * img).astype(np.uint8)
    return np.repeat(grey[..., None], 3, -1), kind.astype(np.int64)


def outlines_source(resolution: int, arg: str = "", val_fraction=None, seed: int = 0) -> Source:
    """`outlines[:N]`: as `shapes[:N]` (N train+val images, default 3000, N/5 test, fixed data), rendered by
    render_outlines: grey, hard edges."""
    return _drawn_source("outlines", render_outlines, 2022, resolution, arg, val_fraction, seed)


LARGE_HALF_RANGE = (0.18, 0.32)  # outlines-large: half-size 2.9-5.1 pixels at 16x16 (outlines: 1.9-3.5)


def render_outlines_large(n: int, canvas: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """render_outlines with larger outlines (LARGE_HALF_RANGE): a ring and a square differ by more than a pixel or
    two, so more of each image is the shape the model must predict; raw pixels stay near chance (31%, the
    contrast's sign) while a translation- and sign-invariant feature separates the classes (docs/evaluation.md)."""
    return render_outlines(n, canvas, rng, LARGE_HALF_RANGE)


def outlines_large_source(resolution: int, arg: str = "", val_fraction=None, seed: int = 0) -> Source:
    """`outlines-large[:N]`: as `outlines[:N]`, drawn by render_outlines_large (outlines' data seed:
    the same classes, sizes drawn from the same numbers, the same contrasts)."""
    return _drawn_source("outlines-large", render_outlines_large, 2022, resolution, arg, val_fraction, seed)


__all__ = ["SHAPES", "ArraySource", "GroupedSource", "digits_shifted_source", "outlines_large_source",
           "outlines_source", "render_outlines", "render_outlines_large", "render_shapes", "render_shifted",
           "shapes_source"]


def _drawn_source(kind: str, render, data_seed: int, resolution: int, arg: str, val_fraction, seed: int) -> Source:
    """`kind[:N]`: N images (default 3000) for train+val and N/5 for test, drawn by `render` on a canvas of the
    model's resolution from a fixed seed (the same data for every run; the run's seed picks the val holdout)."""
    if arg and (not arg.isdigit() or not 20 <= int(arg) <= SHAPES_MAX):
        raise ConfigError(f"{kind}:{arg}: N is the number of train+val images, an integer in "
                          f"[20, {SHAPES_MAX}], e.g. {kind}:3000")
    n = int(arg) if arg else SHAPES_DEFAULT_N
    rgb, y = render(n + n // 5, max(resolution, 8), np.random.default_rng(data_seed))
    rgb = resize(rgb, resolution)
    return ArraySource(kind, rgb[:n], y[:n], rgb[n:], y[n:], len(SHAPES), val_fraction, seed)
