"""The 9-bit colour palette: k-means over RGB pixels in [-1, 1], nearest-centre encode, decode.

Encoding sits on every training path, so it is a table lookup: each distinct 24-bit colour is quantised once
(with exactly HF ImageGPTImageProcessor's float32 arithmetic, so ids are identical) and remembered in a
2^24-entry table. After the first few batches, encoding is one gather per pixel.

A palette has exactly VOCAB_SIZE = 512 colours: the model has 512 outputs and every stage (training, sampling,
export, fine-tuning) indexes them, so a palette of another size is refused where it is made or loaded rather
than failing later at sampling time. There is no "non-model" palette size.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from megapix.config import VOCAB_SIZE, ConfigError


# HF ImageGPTImageProcessor as installed without torchvision (its numpy/PIL backend, and every transformers 4.x):
# float32(x * (1/255) in float64), then (v - 0.5) / 0.5 in float32. HF's torchvision backend computes
# (x - 127.5) / 127.5 in float32 instead, one ulp apart for 128 of the 256 byte values (6 of 2^24 colours get
# another id with a random palette). Only 256 inputs exist, so this is a lookup table.
_NORM = ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)


def _normalise(rgb_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(_NORM[np.ascontiguousarray(rgb_uint8, dtype=np.uint8).reshape(-1, 3)])


def _nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    # a^2 - 2ab + b^2 in the same order and dtype as HF's squared_euclidean_distance_torch. In row chunks: a
    # [rows, k] distance matrix for millions of colours would be gigabytes (each row's result is unchanged).
    ct = centres.t()
    c2 = torch.sum(ct**2, dim=0)[None, :]
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        d = torch.sum(xs**2, dim=1)[:, None] - 2 * torch.matmul(xs, ct) + c2
        out[s:s + chunk] = torch.argmin(d, dim=1)
    return out


class Palette:
    def __init__(self, centres: np.ndarray, where: str = "a palette"):
        centres = np.asarray(centres)
        if centres.ndim != 2 or centres.shape[1] != 3 or centres.shape[0] != VOCAB_SIZE:
            raise ConfigError(f"{where} must have shape ({VOCAB_SIZE}, 3), one row per model output; got "
                              f"{centres.shape}; fit one (leave --palette unset) or pass a {VOCAB_SIZE}-colour "
                              "kmeans_centers.npy")
        if not np.issubdtype(centres.dtype, np.floating) or not np.isfinite(centres).all() \
                or np.abs(centres).max() > 1.0 + 1e-6:
            raise ConfigError(f"{where}: palette centres must be finite floats in [-1, 1] (RGB scaled as "
                              "x / 127.5 - 1); fit one or pass a released kmeans_centers.npy")
        self.centres = centres.astype(np.float32)
        self._centres_t = torch.from_numpy(self.centres)
        self._table: np.ndarray | None = None  # 2^24 int16 ids, -1 = not computed yet

    @property
    def k(self) -> int:
        return self.centres.shape[0]

    # ---- persistence: the kmeans_centers.npy format of the released iGPT palettes ----
    @classmethod
    def load(cls, path: str) -> "Palette":
        if not os.path.isfile(path):
            raise ConfigError(f"palette file {path!r} does not exist; pass a kmeans_centers.npy or fit one")
        try:
            centres = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - numpy raises several types for corrupt files
            raise ConfigError(f"palette file {path!r} is not a readable .npy array ({e}); fit a new one or pass "
                              "a kmeans_centers.npy") from None
        return cls(centres, f"palette file {path!r}")

    def save(self, path: str) -> None:
        from megapix.utils import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.centres)

    # ---- fitting ----
    @classmethod
    def fit(cls, pixels: np.ndarray, k: int = VOCAB_SIZE, seed: int = 0, iters: int = 30,
            tol: float = 1e-6) -> "Palette":
        """k-means (k-means++ init, then Lloyd) on uint8 RGB pixels [..., 3], scaled to [-1, 1].

        Runs on the distinct colours weighted by their counts: exactly Lloyd's algorithm on every pixel,
        at the cost of the (much smaller) set of distinct colours. `k` must be VOCAB_SIZE (512); callers name
        it so the number is visible where a palette is made.
        """
        if k != VOCAB_SIZE:
            raise ConfigError(f"a palette has exactly {VOCAB_SIZE} colours (the model's outputs); got k={k}")
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape[-1] != 3:
            raise ConfigError(f"Palette.fit takes uint8 RGB pixels [..., 3]; got {pixels.dtype} {pixels.shape}")
        keys = _pack(pixels.reshape(-1, 3))
        uniq, counts = np.unique(keys, return_counts=True)
        if len(uniq) < k:
            raise ConfigError(f"only {len(uniq)} distinct colours to fit {k} centres; fit on more (or more varied) "
                              "images, or pass --palette kmeans_centers.npy")
        x = _normalise(_unpack(uniq)).double()
        w = torch.from_numpy(counts).double()
        gen = torch.Generator().manual_seed(seed)
        centres = _kmeans_pp(x, w, k, gen)
        prev = None
        for _ in range(iters):
            assign = _nearest(x, centres)
            sums = torch.zeros_like(centres).index_add_(0, assign, x * w[:, None])
            mass = torch.zeros(k, dtype=x.dtype).index_add_(0, assign, w)
            empty = mass == 0
            centres = torch.where(empty[:, None], centres, sums / mass.clamp_min(1e-12)[:, None])
            if empty.any():  # re-seed empty clusters at the worst-served colours
                d = ((x - centres[assign]) ** 2).sum(1) * w
                centres[empty] = x[torch.topk(d, int(empty.sum())).indices]
            inertia = float((((x - centres[assign]) ** 2).sum(1) * w).sum())
            if prev is not None and prev - inertia <= tol * prev:
                break
            prev = inertia
        return cls(centres.clamp(-1, 1).float().numpy())

    # ---- encode / decode ----
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [N, H, W, 3] -> int64 palette ids [N, H*W] in raster order."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"encode takes uint8 images [N, H, W, 3]; got {images.dtype} {images.shape}")
        n = images.shape[0]
        keys = _pack(images.reshape(-1, 3))
        if self._table is None:
            self._table = np.full(1 << 24, -1, dtype=np.int16)
        ids = self._table[keys]
        missing = ids < 0
        if missing.any():
            new = np.unique(keys[missing])
            self._table[new] = _nearest(_normalise(_unpack(new)), self._centres_t).numpy().astype(np.int16)
            ids = self._table[keys]
        return ids.astype(np.int64).reshape(n, -1)

    def decode(self, tokens, height: int, width: int) -> np.ndarray:
        """Palette ids [N, H*W] -> uint8 images [N, H, W, 3]: rint(127.5 * (centre + 1))."""
        tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens).astype(np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != height * width:
            raise ConfigError(f"decode takes ids [N, {height * width}] for {height}x{width}; got {tokens.shape}")
        if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= self.k:
            raise ConfigError(f"token ids must lie in [0, {self.k}); got range [{tokens.min()}, {tokens.max()}]")
        rgb = np.rint(127.5 * (self.centres[tokens] + 1.0))
        return np.clip(rgb, 0, 255).astype(np.uint8).reshape(tokens.shape[0], height, width, 3)


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]


def _unpack(keys: np.ndarray) -> np.ndarray:
    return np.stack([(keys >> 16) & 255, (keys >> 8) & 255, keys & 255], axis=1).astype(np.uint8)


def _kmeans_pp(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted k-means++ seeding (greedy-free variant: one candidate per step)."""
    first = torch.multinomial(w / w.sum(), 1, generator=gen)
    centres = [x[first[0]]]
    dist = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = dist * w
        idx = torch.multinomial(p / p.sum(), 1, generator=gen)[0] if p.sum() > 0 else torch.randint(len(x), (1,))[0]
        c = x[idx]
        centres.append(c)
        dist = torch.minimum(dist, ((x - c) ** 2).sum(1))
    return torch.stack(centres)
