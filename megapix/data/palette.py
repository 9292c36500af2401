"""The 9-bit colour palette: k-means over RGB pixels in [-1, 1], nearest-centre encode, decode.

Encoding sits on every training path, so it is a table lookup: each distinct 24-bit colour is quantised once
(with exactly HF ImageGPTImageProcessor's float32 arithmetic, so ids are identical) and remembered in a
2^24-entry table. Colours are quantised by a pruned exact search (`_Search`: each colour is scored against the
few centres that can be nearest in its cell of the colour cube), on demand for the colours seen; once a palette
loaded from a file has met LUT_FULL_AFTER distinct colours, or when `build_table()` is called, the whole table
is built (a few CPU seconds) and cached beside the file as <name>.lut.npz, keyed by a hash of the centres, so
every later process (ranks, DataLoader workers, resumed runs) starts with a lookup. A cache whose key or
contents do not check out is ignored and rebuilt.

A palette has exactly VOCAB_SIZE = 512 colours: the model has 512 outputs and every stage (training, sampling,
export, fine-tuning) indexes them, so a palette of another size is refused where it is made or loaded rather
than failing later at sampling time. There is no "non-model" palette size.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import torch

from megapix.config import VOCAB_SIZE, ConfigError
from megapix.utils import atomic_path


# HF ImageGPTImageProcessor as installed without torchvision (its numpy/PIL backend, and every transformers 4.x):
# float32(x * (1/255) in float64), then (v - 0.5) / 0.5 in float32. HF's torchvision backend computes
# (x - 127.5) / 127.5 in float32 instead, one ulp apart for 128 of the 256 byte values (6 of 2^24 colours get
# another id with a random palette). Only 256 inputs exist, so this is a lookup table.
_NORM = ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)


def _normalise(rgb_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(_NORM[np.ascontiguousarray(rgb_uint8, dtype=np.uint8).reshape(-1, 3)])


def _nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    # a^2 - 2ab + b^2 in the same order and dtype as HF's squared_euclidean_distance_torch. In row chunks (each
    # row's result is unchanged): 256 rows x 512 centres is a 1 MiB float64 block that stays in cache, where the
    # 65536-row blocks used before went through memory (palette fit on digits 12.4 s -> 1.8 s on one
    # thread: benchmarks/bench_startup.py); the whole distance matrix for millions of colours would be gigabytes.
    ct = centres.t()
    c2 = torch.sum(ct**2, dim=0)[None, :]
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        d = torch.sum(xs**2, dim=1)[:, None] - 2 * torch.matmul(xs, ct) + c2
        out[s:s + chunk] = torch.argmin(d, dim=1)
    return out


# ---- the exact nearest-centre search, pruned ----
# The colour cube is cut into 16x16x16-byte cells. For each cell, a centre is a candidate when its distance
# bound to the cell's box could make it the nearest for some colour in it (lower bound <= the smallest upper
# bound over all centres, plus a margin far above float32 rounding, which is < 1e-5 on squared distances <= 12).
# Every colour is then scored against its cell's few candidates (about 8 of 512 on average) with HF's float32
# arithmetic, term by term: a2 - 2ab + c2 where ab is the dot product as the GEMM kernel forms it (a chain of
# fused multiply-adds: x0*c0, + x1*c1, + x2*c2). Ties keep the lowest centre index, as argmin over all 512 does,
# because candidates are kept in index order and every centre that could tie is a candidate. `_Search` checks on
# a seeded probe of colours that this reproduces torch.matmul and HF's full search on this machine; where it
# does not (another BLAS), it falls back to the full search, which is exact by construction.
_CELL_BITS = 4
_MARGIN = 1e-4
_PROBE = 4096


def _dot_chain(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x [..., 3] . c [..., 3] (broadcast) in float32 as the GEMM kernel forms it: x0*c0, then fused
    multiply-adds of x1*c1 and x2*c2 (torch.addcmul is fused on CPU; _Search checks it against matmul)."""
    acc = x[..., 0] * c[..., 0]
    acc = torch.addcmul(acc, x[..., 1], c[..., 1])
    return torch.addcmul(acc, x[..., 2], c[..., 2])


_NB = 1 << (8 - _CELL_BITS)  # cells per channel
_SIDE = 1 << _CELL_BITS  # byte values per cell and channel


def _cell_of(keys: np.ndarray) -> np.ndarray:
    r, g, b = (keys >> (16 + _CELL_BITS)) & (_NB - 1), (keys >> (8 + _CELL_BITS)) & (_NB - 1), \
        (keys >> _CELL_BITS) & (_NB - 1)
    return (r * _NB + g) * _NB + b


def _buckets(count: np.ndarray) -> np.ndarray:
    """Candidate counts rounded up to a multiple of 4 (1 stays 1): few blocks, little padding."""
    return np.where(count == 1, 1, (count + 3) // 4 * 4)


class _Search:
    """Exact nearest centre (HF's ids) for any set of 24-bit colours, pruned by cell."""

    def __init__(self, centres: np.ndarray):
        self.centres_np = np.ascontiguousarray(centres, dtype=np.float32)
        self.centres = torch.from_numpy(self.centres_np)
        self.c2 = torch.sum(self.centres.t() ** 2, dim=0).numpy()  # as HF: over the transposed [3, k] matrix
        self.planes = np.concatenate([self.centres_np.T, self.c2[None]])  # [4, k]: x, y, z, |c|^2
        v = _NORM.astype(np.float64)
        lo, hi = v[np.arange(_NB) * _SIDE], v[np.arange(_NB) * _SIDE + _SIDE - 1]
        c = self.centres_np.astype(np.float64)
        dmin = [np.maximum(np.maximum(lo[:, None] - c[None, :, a], c[None, :, a] - hi[:, None]), 0.0) ** 2
                for a in range(3)]
        dmax = [np.maximum(c[None, :, a] - lo[:, None], hi[:, None] - c[None, :, a]) ** 2 for a in range(3)]
        lower = dmin[0][:, None, None] + dmin[1][None, :, None] + dmin[2][None, None, :]  # [nb, nb, nb, k]
        upper = (dmax[0][:, None, None] + dmax[1][None, :, None] + dmax[2][None, None, :]).min(-1, keepdims=True)
        cand = (lower <= upper + _MARGIN).reshape(_NB**3, -1)
        self.count = cand.sum(1)
        # candidate ids per cell in ascending order, padded with the cell's last candidate: a padded copy sits
        # after the original, so argmin (first minimum) never picks it over the original or a lower index
        width = int(_buckets(self.count).max())
        order = np.argsort(~cand, axis=1, kind="stable")[:, :width]
        last = np.take_along_axis(order, (self.count - 1)[:, None], 1)
        self.cand = np.where(np.arange(width)[None, :] < self.count[:, None], order, last).astype(np.int64)
        self.exact = self._matches_full_search()

    def _matches_full_search(self) -> bool:
        rng = np.random.default_rng(12345)
        keys = np.concatenate([rng.integers(0, 1 << 24, _PROBE), np.arange(256) * 0x010101])
        x = _normalise(_unpack(keys))
        chain = _dot_chain(x[:, None, :], self.centres[None, :, :])
        return bool(torch.equal(chain, torch.matmul(x, self.centres.t()))
                    and np.array_equal(self._pruned(keys), _nearest(x, self.centres).numpy()))

    def _score(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """x [..., 3] float32 colours, ids [..., K] candidates (broadcast against x[..., 0]) -> chosen ids [...].

        One candidate column at a time, elementwise (small arrays that stay in cache): d_k = (a2 - 2 ab_k) + c2_k,
        keeping the first minimum as argmin does. torch.sub(a2, ab, alpha=2) equals a2 - 2 * ab exactly: the
        factor 2 scales without rounding, so fused or not the one rounding is of a2 - 2ab.
        """
        xt = torch.from_numpy(np.ascontiguousarray(x))
        a2 = torch.sum(xt.reshape(-1, 3) ** 2, dim=1).reshape(xt.shape[:-1])  # HF's call, on [pixels, 3]
        x0, x1, x2 = (xt[..., i].contiguous() for i in range(3))
        best = pick = None
        for k in range(ids.shape[-1]):
            idk = ids[..., k]
            c0, c1, c2, cc = torch.from_numpy(self.planes[:, idk])  # one gather; each row contiguous
            ab = torch.addcmul(torch.addcmul(x0 * c0, x1, c1), x2, c2)
            d = torch.sub(a2, ab, alpha=2).add_(cc)
            if best is None:
                best, pick = d, torch.from_numpy(idk).expand(d.shape).clone()
            else:
                better = d < best  # strict: an equal distance keeps the earlier (lower) centre id
                best = torch.where(better, d, best)
                pick = torch.where(better, torch.from_numpy(idk), pick)
        return pick.numpy()

    def _pruned(self, keys: np.ndarray, chunk: int = 1 << 21) -> np.ndarray:
        cell = _cell_of(keys)
        width = _buckets(self.count)[cell]
        out = np.empty(len(keys), dtype=np.int64)
        for w in np.flatnonzero(np.bincount(width)):
            sel = np.flatnonzero(width == w)
            for s in range(0, len(sel), max(1, chunk // int(w))):
                rows = sel[s:s + max(1, chunk // int(w))]
                ids = self.cand[cell[rows], : int(w)]
                out[rows] = ids[:, 0] if w == 1 else self._score(_NORM[_unpack(keys[rows])], ids)
        return out

    def table(self, chunk: int = 1 << 22) -> np.ndarray:
        """All 2^24 ids (int16, indexed by 0xRRGGBB), cell by cell: a cell's colours share its candidates."""
        if not self.exact:  # the full search (minutes, but HF's ids by construction)
            return self(np.arange(1 << 24, dtype=np.int64)).astype(np.int16)
        off = np.stack(np.meshgrid(*[np.arange(_SIDE)] * 3, indexing="ij"), -1).reshape(-1, 3)  # [S^3, 3]
        base = np.stack(np.meshgrid(*[np.arange(_NB) * _SIDE] * 3, indexing="ij"), -1).reshape(-1, 3)
        out = np.empty((_NB**3, _SIDE**3), dtype=np.int16)
        width = _buckets(self.count)
        for w in np.flatnonzero(np.bincount(width)):
            cells = np.flatnonzero(width == w)
            step = max(1, chunk // (_SIDE**3 * int(w)))
            for s in range(0, len(cells), step):
                cs = cells[s:s + step]
                ids = self.cand[cs, : int(w)]  # [n, K]
                if w == 1:
                    out[cs] = ids[:, :1]
                    continue
                x = _NORM[base[cs][:, None, :] + off[None, :, :]]  # [n, S^3, 3]
                out[cs] = self._score(x, ids[:, None, :])
        # cells are (r, g, b) blocks and rows are offsets within one: scatter back to 0xRRGGBB order
        full = out.reshape(_NB, _NB, _NB, _SIDE, _SIDE, _SIDE).transpose(0, 3, 1, 4, 2, 5)
        return np.ascontiguousarray(full).reshape(-1)

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        if self.exact:
            return self._pruned(keys)
        return _nearest(_normalise(_unpack(keys)), self.centres).numpy()


LUT_FULL_AFTER = 1 << 20  # distinct colours met before a file-backed palette builds (and caches) the whole table
_LUT_VERSION = b"megapix-lut-v1"


class Palette:
    def __init__(self, centres: np.ndarray, where: str = "a palette", lut_path: str | None = None):
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
        self._full = False  # every entry of _table computed
        self._search: _Search | None = None
        self.lut_path = lut_path  # where the full table is cached (palettes loaded from a file)

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
        return cls(centres, f"palette file {path!r}", lut_path=os.path.splitext(path)[0] + ".lut.npz")

    def save(self, path: str) -> None:
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
        if self._table is None and not self._load_lut():
            self._table = np.full(1 << 24, -1, dtype=np.int16)
        ids = self._table[keys]
        if not self._full:
            missing = ids < 0
            if missing.any():
                new = _distinct(keys[missing])
                if self.lut_path is not None and self._met + len(new) >= LUT_FULL_AFTER:
                    self.build_table()
                else:
                    self._table[new] = self._searcher()(new).astype(np.int16)
                    self._met += len(new)
                ids = self._table[keys]
        return ids.astype(np.int64).reshape(n, -1)

    # ---- the 2^24-colour table ----
    _met = 0  # distinct colours quantised on demand so far

    def _searcher(self) -> "_Search":
        if self._search is None:
            self._search = _Search(self.centres)
        return self._search

    def lut_key(self) -> bytes:
        """What a cached table must be keyed by: the centres' bytes (and the table's format version)."""
        return hashlib.sha256(_LUT_VERSION + np.ascontiguousarray(self.centres, np.float32).tobytes()).digest()

    def build_table(self) -> np.ndarray:
        """The exact ids of all 2^24 colours (int16, indexed by 0xRRGGBB); cached beside the palette file."""
        if not self._full and not self._load_lut():
            self._table = self._searcher().table()
            self._full = True
            self._save_lut()
        return self._table

    def _load_lut(self) -> bool:
        if self.lut_path is None or not os.path.isfile(self.lut_path):
            return False
        try:
            with np.load(self.lut_path, allow_pickle=False) as z:
                key, table = z["key"], z["ids"]
        except Exception:  # noqa: BLE001 - a torn or foreign cache file is rebuilt, never trusted
            return False
        if key.dtype != np.uint8 or key.tobytes() != self.lut_key() or table.dtype != np.int16 \
                or table.shape != (1 << 24,) or table.min() < 0 or table.max() >= VOCAB_SIZE:
            return False
        self._table, self._full = table, True
        return True

    def _save_lut(self) -> None:
        d = os.path.dirname(os.path.abspath(self.lut_path)) if self.lut_path else None
        if d is None:
            return
        try:  # a cache: a read-only or full directory only costs the next process the build
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.lut_path)}.tmp-", dir=d)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, key=np.frombuffer(self.lut_key(), np.uint8), ids=self._table)
                os.replace(tmp, self.lut_path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        except OSError:
            pass

    def decode(self, tokens, height: int, width: int) -> np.ndarray:
        """Palette ids [N, H*W] -> uint8 images [N, H, W, 3]: rint(127.5 * (centre + 1))."""
        tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens).astype(np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != height * width:
            raise ConfigError(f"decode takes ids [N, {height * width}] for {height}x{width}; got {tokens.shape}")
        if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= self.k:
            raise ConfigError(f"token ids must lie in [0, {self.k}); got range [{tokens.min()}, {tokens.max()}]")
        rgb = np.rint(127.5 * (self.centres[tokens] + 1.0))
        return np.clip(rgb, 0, 255).astype(np.uint8).reshape(tokens.shape[0], height, width, 3)


def _distinct(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique's hash path is several times slower on millions of int64 keys)."""
    s = np.sort(keys)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if len(s) else s


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
