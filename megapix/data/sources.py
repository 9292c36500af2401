"""Image sources. Each yields splits of uint8 images [N, H, W, 3] (or ready palette ids) with labels.

A source is named by a spec string: "digits" (the embedded default, no download), "digits-shifted", "shapes",
"outlines", "outlines-large" (megapix/data/embedded.py), "synthetic",
"cifar10:PATH" / "cifar100:PATH" (the python tarballs as distributed), "imagefolder:DIR" (ImageNet layout),
"npy:IMAGES.npy[,LABELS.npy]", "igpt:DIR/cifar10" (the released token arrays {name}_{trX,trY,...}.npy),
"shards:DIR" (the output of `megapix prepare`), "wds:PATTERN" / "parquet:PATTERN" (WebDataset tar shards and
Parquet files of image bytes, read in place: megapix/data/sharded.py).
"""
from __future__ import annotations

import numpy as np

from megapix.config import ConfigError
from megapix.data import embedded, files, sharded
from megapix.data.base import SPLITS, ArraySource, Source, Split, holdout, resize

__all__ = ["SPLITS", "ArraySource", "Source", "Split", "holdout", "open_source", "spec_grammar"]

SYNTHETIC_MAX = 100_000  # generated in memory, for tests and demos


def digits_source(resolution: int, val_fraction=None, seed: int = 0) -> ArraySource:
    """The embedded default: scikit-learn's 1797 handwritten digits (8x8, 10 classes), colourised.

    Each image gets its own seeded foreground and background colour, so that the palette has real colour
    structure to learn and the class is carried by shape, not colour. 1500 images train (+val), 297 test.
    """
    images, labels = embedded.load_digits()
    gray = (images / 16.0).astype(np.float32)  # [N, 8, 8] in [0, 1]
    rng = np.random.default_rng(1234)  # fixed: the dataset is the same for every run and seed
    fg = rng.uniform(0, 255, size=(len(gray), 1, 1, 3))
    bg = rng.uniform(0, 255, size=(len(gray), 1, 1, 3))
    bg = np.where(np.abs(fg - bg).sum(-1, keepdims=True) < 150, 255 - fg, bg)  # keep digits visible
    rgb = np.rint(bg + (fg - bg) * gray[..., None]).astype(np.uint8)
    rgb = resize(rgb, resolution)
    return ArraySource("digits", rgb[:1500], labels[:1500], rgb[1500:], labels[1500:], 10, val_fraction, seed)


def synthetic_source(resolution: int, n: int = 512, val_fraction=None, seed: int = 0) -> ArraySource:
    """Random blobs of colour on gradients, 4 classes by the blob's quadrant: for tests, no files needed."""
    rng = np.random.default_rng(4321)
    yy, xx = np.mgrid[0:resolution, 0:resolution] / max(resolution - 1, 1)
    total = n + n // 4
    labels = rng.integers(0, 4, size=total)
    imgs = np.empty((total, resolution, resolution, 3), dtype=np.uint8)
    for i in range(total):
        base = rng.uniform(0, 255, 3)
        grad = rng.uniform(-80, 80, 3)
        img = base + grad * (xx[..., None] + yy[..., None]) / 2
        cy, cx = (0.25 + 0.5 * (labels[i] // 2)), (0.25 + 0.5 * (labels[i] % 2))
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < 0.04
        img[blob] = rng.uniform(0, 255, 3)
        imgs[i] = np.clip(np.rint(img), 0, 255)
    return ArraySource("synthetic", imgs[:n], labels[:n], imgs[n:], labels[n:], 4, val_fraction, seed)


_ARG_FORMS = {"cifar10": "PATH", "cifar100": "PATH", "imagefolder": "DIR", "npy": "IMAGES.npy[,LABELS.npy]",
              "igpt": "DIR/NAME", "shards": "DIR"}
SHARDED_SOURCES = {"wds": sharded.wds_source, "parquet": sharded.parquet_source}
_SHARDED_FORMS = {"wds": "'PATTERN.tar[;test=PATTERN][;image=EXT][;label=EXT][;skip-corrupt]'",
                  "parquet": "'PATTERN.parquet[;test=PATTERN][;image=COLUMN][;label=COLUMN][;skip-corrupt]'"}


def spec_grammar() -> str:
    """The data spec grammar, for error messages: every kind with the argument it takes."""
    return " | ".join(["digits", "digits-shifted[:COPIES]", "shapes[:N]", "outlines[:N]", "outlines-large[:N]",
                       "synthetic[:N]"]
                      + [f"{k}:{_ARG_FORMS.get(k, 'PATH')}" for k in files.FILE_SOURCES])


def open_source(spec: str, resolution: int, val_fraction=None, seed: int = 0, augment: bool = True,
                skip_corrupt: bool = False) -> Source:
    """Build a Source from its spec string (see the module docstring). `skip_corrupt`: sharded sources skip
    damaged samples (as the spec's ;skip-corrupt) instead of stopping; other sources have no such mode."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"data spec {spec!r} is empty; use one of: {spec_grammar()}")
    kind, colon, arg = spec.partition(":")
    if kind == "digits":
        if colon:
            raise ConfigError(f"data spec {spec!r}: 'digits' takes no argument; use one of: {spec_grammar()}")
        return digits_source(resolution, val_fraction, seed)
    if kind == "digits-shifted":  # megapix/data/embedded.py
        return embedded.digits_shifted_source(resolution, arg, val_fraction, seed)
    if kind == "shapes":  # megapix/data/embedded.py
        return embedded.shapes_source(resolution, arg, val_fraction, seed)
    if kind == "outlines":  # megapix/data/embedded.py: shapes in grey with hard edges
        return embedded.outlines_source(resolution, arg, val_fraction, seed)
    if kind == "outlines-large":  # the same, larger: the probe study's task
        return embedded.outlines_large_source(resolution, arg, val_fraction, seed)
    if kind == "synthetic":
        n = 512
        if colon:
            if not arg.isdigit() or not 1 <= int(arg) <= SYNTHETIC_MAX:
                raise ConfigError(f"data spec {spec!r}: N in synthetic[:N] is an image count in [1, {SYNTHETIC_MAX}]"
                                  f", e.g. synthetic:512; use one of: {spec_grammar()}")
            n = int(arg)
        return synthetic_source(resolution, n, val_fraction, seed)
    if kind in files.FILE_SOURCES:  # sources that read user files
        if not arg:
            raise ConfigError(f"data source {kind!r} needs a path: '{kind}:{_ARG_FORMS.get(kind, 'PATH')}'")
        return files.FILE_SOURCES[kind](arg, resolution=resolution, val_fraction=val_fraction, seed=seed,
                                        augment=augment)
    if kind in SHARDED_SOURCES:  # WebDataset tar shards and Parquet files, read in place
        if not arg:
            raise ConfigError(f"data source {kind!r} needs a file pattern: {kind}:{_SHARDED_FORMS[kind]}")
        return SHARDED_SOURCES[kind](arg, resolution=resolution, val_fraction=val_fraction, seed=seed,
                                     augment=augment, skip_corrupt=skip_corrupt)
    raise ConfigError(f"unknown data source {spec!r}; use one of: {spec_grammar()}")
