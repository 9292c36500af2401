"""Sources that read user files: CIFAR tarballs, ImageFolder trees, .npy arrays, released iGPT token arrays,
prepared shards. Each constructor takes (path, *, resolution, val_fraction, seed, augment) and returns a Source.

Lazy splits. `Split.images` / `Split.tokens` is either a numpy array or an *indexable*: an object with
`len()`, `.shape`, `.dtype`, and `__getitem__` taking an int, a slice or an int array of indices and returning
a numpy array ([n, H, W, 3] uint8 images or [n, T] ids). `np.asarray(x)` materialises any of them. The
training loader calls `split.images[idx]`, except that when the object has `batch(indices, epoch, seed)`
(only `ImageFolderImages`, the ImageNet-layout reader) it calls that instead, which applies the paper's
random resize/crop for training, deterministically given (seed, epoch, index).

Every bad input (missing or corrupt file, wrong shape or dtype, ids >= 512, images of the wrong size for the
model) raises an InputError (megapix.errors; a DataError when a file holds bad data) with one line naming the
problem and the fix.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import os
import warnings

import numpy as np

from megapix.config import VOCAB_SIZE, ConfigError
from megapix.errors import DataError
from megapix.data import augment as aug
from megapix.data.base import SPLITS, Source, Split, check_size, holdout, holdout_fraction
from megapix.data.cifar import open_cifar
from megapix.utils import read_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
MANIFEST = "manifest.json"
SHARDS_FORMAT = "megapix-shards"


# ----------------------------------------------------------------------------------------------------------
# lazy array-likes
# ----------------------------------------------------------------------------------------------------------
def _as_index(idx, n: int):
    """Normalise an index into (int array, scalar?)."""
    if isinstance(idx, (int, np.integer)):
        i = int(idx)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return np.array([i % n]), True
    if isinstance(idx, slice):
        return np.arange(n)[idx], False
    arr = np.asarray(idx)
    if arr.dtype == bool:
        arr = np.nonzero(arr)[0]
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size and (arr.min() < -n or arr.max() >= n):
        raise IndexError(f"indices out of range for {n} items")
    return arr % n if arr.size else arr, False


class LazyArray(ABC):
    """Base for read-on-demand arrays: subclasses implement `_take(int64 indices) -> np.ndarray`."""

    shape: tuple
    dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, idx):
        rows, scalar = _as_index(idx, len(self))
        out = self._take(rows)
        return out[0] if scalar else out

    def __array__(self, dtype=None, copy=None):
        out = self._take(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)

    @abstractmethod
    def _take(self, rows: np.ndarray) -> np.ndarray:
        """The rows `rows` (an int64 array) as one uint8 array."""


class Subset(LazyArray):
    """Rows `index` of `base` (a memmap or any indexable), optionally grey -> RGB. Reads only what is asked."""

    def __init__(self, base, index: np.ndarray, gray_to_rgb: bool = False):
        self.base, self.index, self.gray_to_rgb = base, np.asarray(index, dtype=np.int64), gray_to_rgb
        tail = tuple(base.shape[1:])
        if gray_to_rgb:
            tail = tail[:2] + (3,)
        self.shape = (len(self.index),) + tail
        self.dtype = np.dtype(base.dtype)

    def _take(self, rows):
        src = self.index[rows]
        order = np.argsort(src, kind="stable")  # sorted reads are sequential on a memmap
        out = np.empty((len(rows),) + tuple(self.base.shape[1:]), dtype=self.dtype)
        if len(rows):
            out[order] = self.base[src[order]]
        if self.gray_to_rgb:
            out = out.reshape(len(rows), *self.shape[1:3], 1).repeat(3, axis=-1)
        return out


class ConcatArray(LazyArray):
    """Row-wise concatenation of arrays (memmapped shards) without copying them."""

    def __init__(self, parts: list, tail: tuple, dtype):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]),) + tuple(tail)
        self.dtype = np.dtype(dtype)

    def _take(self, rows):
        out = np.empty((len(rows),) + self.shape[1:], dtype=self.dtype)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for p in np.unique(which):
            sel = np.nonzero(which == p)[0]
            local = rows[sel] - self.offsets[p]
            order = np.argsort(local, kind="stable")
            out[sel[order]] = self.parts[p][local[order]]
        return out


class ImageFolderImages(LazyArray):
    """Images decoded from files on demand: uint8 [n, resolution, resolution, 3].

    `x[idx]` gives the evaluation view (shorter side 224, centre crop 224, downsample): deterministic.
    `x.batch(idx, epoch, seed)` gives the training view when `train` is set (random shorter side in
    [256, 384], random 224 crop, downsample; randomness keyed by (seed, epoch, idx)), else the evaluation view.
    """

    def __init__(self, files: list[str], resolution: int, train: bool = False):
        self.files = list(files)
        self.resolution = int(resolution)
        self.train = bool(train)
        self.shape = (len(self.files), self.resolution, self.resolution, 3)
        self.dtype = np.dtype(np.uint8)

    def _load(self, i: int, box_fn) -> np.ndarray:
        path = self.files[i]
        try:
            return aug.load_and_crop(path, self.resolution, box_fn)
        except FileNotFoundError:
            raise DataError(f"image file {path!r} has disappeared; restore it or re-create the dataset") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise DataError(f"cannot decode image {path!r} ({type(e).__name__}: {e}); remove or replace it") from None

    def _take(self, rows):
        out = np.empty((len(rows),) + self.shape[1:], dtype=np.uint8)
        for j, i in enumerate(rows):
            out[j] = self._load(int(i), aug.eval_box)
        return out

    def batch(self, indices, epoch: int, seed: int) -> np.ndarray:
        rows, _ = _as_index(indices, len(self))
        if not self.train:
            return self._take(rows)
        out = np.empty((len(rows),) + self.shape[1:], dtype=np.uint8)
        for j, i in enumerate(rows):
            rng = aug.image_rng(seed, epoch, int(i))
            out[j] = self._load(int(i), lambda w, h, rng=rng: aug.train_box(w, h, rng))
        return out


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _load_npy(path: str, what: str, mmap: bool = True) -> np.ndarray:
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file {path!r} does not exist; check the path")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError/OSError/EOFError/... for bad files
        raise DataError(f"{what} file {path!r} is not a readable .npy array ({type(e).__name__}: {e}); "
                        "re-create it with numpy.save (no pickled objects)") from None


def _labels_from(y, n: int, path: str) -> tuple[np.ndarray, int]:
    """int [N] or one-hot [N, C] -> (int64 [N], num_classes)."""
    y = np.asarray(y)
    if y.ndim == 2:
        if len(y) != n:
            raise ConfigError(f"labels {path!r} have {len(y)} rows but there are {n} images; they must match")
        num = int(y.shape[1])
        lab = np.empty(n, dtype=np.int64)
        for s in range(0, n, 65536):
            lab[s:s + 65536] = np.argmax(y[s:s + 65536], axis=1)
        return lab, num
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        raise DataError(f"labels {path!r} must be integers [N] or one-hot [N, C]; got {y.dtype} {y.shape}")
    if len(y) != n:
        raise ConfigError(f"labels {path!r} have {len(y)} entries but there are {n} images; they must match")
    lab = y.astype(np.int64)
    if n and lab.min() < 0:
        raise DataError(f"labels {path!r} contain negative values; class ids start at 0")
    return lab, (int(lab.max()) + 1 if n else 0)


class _LazySource(Source):
    """A source whose splits are read on demand (the palette fit samples them: megapix.data.splits)."""

    seed = 0

    def split(self, name: str) -> Split:
        if name not in self._splits:
            raise ConfigError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return self._splits[name]


# ----------------------------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout)
# ----------------------------------------------------------------------------------------------------------
def _scan_classes(root: str, classes: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = found
        if not classes:
            raise ConfigError(f"imagefolder: {root!r} has no class sub-directories; lay images out as "
                              f"{root}/<class>/<image>.jpg")
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ConfigError(f"imagefolder: {root!r} has classes not in train/: {', '.join(unknown[:5])}; "
                              "use the same class directories in every split")
    cls_id = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in found:
        d = os.path.join(root, c)
        imgs = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(d) for f in fs
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not imgs:
            raise ConfigError(f"imagefolder: class directory {d!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                              "add images or remove the directory")
        files += imgs
        labels += [cls_id[c]] * len(imgs)
    return classes, files, np.asarray(labels, dtype=np.int64)


class ImageFolderSource(_LazySource):
    """DIR/train/<class>/*.jpg|png (or DIR/<class>/... when there is no train/), DIR/val/<class>/...

    train = DIR/train minus a seeded holdout (4% by default, the paper's ImageNet choice); val = that holdout;
    test = DIR/val (ImageNet's official validation set, the paper's test set), else DIR/test, else (with a
    warning) the holdout again. Images are decoded lazily (see ImageFolderImages); the train split applies the
    paper's random resize/crop through `images.batch(idx, epoch, seed)` when `augment` is set.
    """

    default_val_fraction = 0.04

    def __init__(self, path, *, resolution, val_fraction=None, seed=0, augment=True):
        root = os.path.abspath(path)
        if not os.path.isdir(root):
            raise ConfigError(f"imagefolder: {path!r} is not a directory; expected DIR/train/<class>/<image>.jpg")
        self.name, self.seed = "imagefolder", seed
        frac = holdout_fraction(val_fraction, self.default_val_fraction)
        train_dir = os.path.join(root, "train")
        train_dir = train_dir if os.path.isdir(train_dir) else root
        classes, files, labels = _scan_classes(train_dir)
        self.classes, self.num_classes = classes, len(classes)
        tr, va = holdout(len(files), frac, seed)
        pick = lambda idx: [files[i] for i in idx]  # noqa: E731
        k = self.num_classes
        self._splits = {
            "train": Split(ImageFolderImages(pick(tr), resolution, train=augment), labels=labels[tr], num_classes=k),
            "val": Split(ImageFolderImages(pick(va), resolution), labels=labels[va], num_classes=k),
        }
        test_dir = next((os.path.join(root, d) for d in ("val", "test") if train_dir != root
                         and os.path.isdir(os.path.join(root, d))), None)
        if test_dir is None:
            warnings.warn(f"imagefolder: {path!r} has no val/ or test/ directory; the test split is the "
                          "held-out validation split", stacklevel=3)
            self._splits["test"] = self._splits["val"]
        else:
            _, tfiles, tlabels = _scan_classes(test_dir, classes)
            self._splits["test"] = Split(ImageFolderImages(tfiles, resolution), labels=tlabels, num_classes=k)


# ----------------------------------------------------------------------------------------------------------
# .npy arrays
# ----------------------------------------------------------------------------------------------------------
class NpySource(_LazySource):
    """"npy:IMAGES.npy[,LABELS.npy]": uint8 [N, H, W, 3] (or grey [N, H, W] / [N, H, W, 1], replicated to RGB);
    labels int [N] or one-hot [N, C]. Memory-mapped; splits read rows on demand.

    There is no separate test set in this format: train = all minus a seeded holdout (10% by default),
    val = the holdout, and test = the SAME images as val. Report test numbers from a real test set.
    """

    def __init__(self, arg, *, resolution, val_fraction=None, seed=0, augment=True):
        self.name, self.seed = "npy", seed
        paths = [p for p in arg.split(",") if p]
        if not 1 <= len(paths) <= 2:
            raise ConfigError(f"npy: expected 'npy:IMAGES.npy[,LABELS.npy]'; got 'npy:{arg}'")
        x = _load_npy(paths[0], "npy images")
        gray = x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 1)
        if x.dtype != np.uint8 or not (gray or (x.ndim == 4 and x.shape[-1] == 3)):
            raise ConfigError(f"npy: {paths[0]!r} must be uint8 images [N, H, W, 3] (or grey [N, H, W]); got "
                              f"{x.dtype} {x.shape}; convert with np.clip(np.rint(x), 0, 255).astype(np.uint8)")
        check_size(x.shape[1], x.shape[2], resolution, f"npy: {paths[0]!r}",
                    f"resize them to {resolution}x{resolution} or use a preset with resolution {x.shape[1]}")
        labels, k = (None, None)
        if len(paths) == 2:
            labels, k = _labels_from(_load_npy(paths[1], "npy labels"), len(x), paths[1])
        self.num_classes = k
        tr, va = holdout(len(x), holdout_fraction(val_fraction, 0.1), seed)
        lab = lambda idx: None if labels is None else labels[idx]  # noqa: E731
        self._splits = {
            "train": Split(Subset(x, tr, gray), labels=lab(tr), num_classes=k),
            "val": Split(Subset(x, va, gray), labels=lab(va), num_classes=k),
        }
        self._splits["test"] = self._splits["val"]


# ----------------------------------------------------------------------------------------------------------
# released iGPT token arrays
# ----------------------------------------------------------------------------------------------------------
_IGPT_PARTS = {"train": ("trX", "trY"), "val": ("vaX", "vaY"), "test": ("teX", "teY")}


def _check_tokens(x: np.ndarray, path: str, resolution: int) -> None:
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{path!r} must hold integer cluster ids [N, T]; got {x.dtype} {x.shape}")
    if x.shape[1] != resolution**2:
        side = int(round(x.shape[1] ** 0.5))
        raise ConfigError(f"{path!r} holds {x.shape[1]} tokens per image ({side}x{side}) but the model expects "
                          f"{resolution**2} ({resolution}x{resolution}); use a preset with resolution {side}")
    lo, hi = 0, 0
    for s in range(0, len(x), 65536):
        blk = x[s:s + 65536]
        if blk.size:
            lo, hi = min(lo, int(blk.min())), max(hi, int(blk.max()))
    if lo < 0 or hi >= VOCAB_SIZE:
        raise DataError(f"token ids >= {VOCAB_SIZE} (or < 0) in {path!r} (range [{lo}, {hi}]); these are not "
                        f"{VOCAB_SIZE}-colour palette ids")


class IgptTokenSource(_LazySource):
    """The released iGPT token arrays: DIR/{name}_{trX,trY,vaX,vaY,teX,teY}.npy; X = cluster ids [N, T],
    Y = one-hot labels. "igpt:DIR/cifar10" names the prefix; "igpt:DIR" works when DIR holds exactly one.
    The release has its own validation split, so val_fraction is not used. Tokens stay memory-mapped."""

    def __init__(self, path, *, resolution, val_fraction=None, seed=0, augment=True):
        self.name, self.seed = "igpt", seed
        if os.path.isdir(path):
            prefixes = sorted({f[:-len("_trX.npy")] for f in os.listdir(path) if f.endswith("_trX.npy")})
            if len(prefixes) != 1:
                which = f"several ({', '.join(prefixes)})" if prefixes else "no"
                raise ConfigError(f"igpt: {path!r} holds {which} *_trX.npy token arrays; name one as "
                                  f"igpt:{path.rstrip('/')}/<name>, e.g. igpt:{path.rstrip('/')}/cifar10")
            d, prefix = path, prefixes[0]
        else:
            d, prefix = os.path.dirname(path) or ".", os.path.basename(path)
        self.name = f"igpt:{prefix}"
        self._splits, k = {}, None
        for split, (xn, yn) in _IGPT_PARTS.items():
            xp, yp = os.path.join(d, f"{prefix}_{xn}.npy"), os.path.join(d, f"{prefix}_{yn}.npy")
            x = _load_npy(xp, "iGPT token")
            _check_tokens(x, xp, resolution)
            y, k = _labels_from(_load_npy(yp, "iGPT label"), len(x), yp)
            self._splits[split] = Split(tokens=x, labels=y)
        self.num_classes = k
        for s in self._splits.values():
            s.num_classes = k


# ----------------------------------------------------------------------------------------------------------
# prepared shards (the output of `megapix prepare`)
# ----------------------------------------------------------------------------------------------------------
def read_manifest(root: str) -> dict:
    mf = os.path.join(root, MANIFEST)
    if not os.path.isfile(mf):
        raise ConfigError(f"shards: {root!r} has no {MANIFEST}; create it with `megapix prepare --out {root}`")
    m = read_json(mf)
    if m is None:
        raise DataError(f"shards: {mf!r} is not valid JSON; re-run `megapix prepare` into a new --out")
    if not isinstance(m, dict) or m.get("format") != SHARDS_FORMAT or not isinstance(m.get("splits"), dict):
        raise DataError(f"shards: {mf!r} is not a megapix shard manifest; re-run `megapix prepare`")
    return m


def open_shard(path: str, count: int, tokens: int, nbytes: int | None = None) -> np.ndarray:
    """Memory-map one shard, checking that it is complete: uint16 [count, tokens] (and `nbytes` long)."""
    if not os.path.isfile(path):
        raise DataError(f"shard {path!r} is missing; re-run `megapix prepare` with the same arguments to redo it")
    if nbytes is not None and os.path.getsize(path) != nbytes:
        raise DataError(f"shard {path!r} has {os.path.getsize(path)} bytes, expected {nbytes}; re-run "
                        "`megapix prepare` with the same arguments to redo it")
    x = _load_npy(path, "shard")
    if x.dtype != np.uint16 or x.shape != (count, tokens):
        raise ConfigError(f"shard {path!r} is {x.dtype} {x.shape}, expected uint16 ({count}, {tokens}); re-run "
                          "`megapix prepare` with the same arguments to redo it")
    return x


class ShardSource(_LazySource):
    """Token shards written by `megapix prepare`: manifest.json, {split}-NNNNN.npy (uint16 [n, T]) and
    {split}-labels.npy. Tokens are a lazy concatenation of the memory-mapped shards. `palette_path` is the
    palette the shards were encoded with (None for shards made from token sources)."""

    def __init__(self, path, *, resolution, val_fraction=None, seed=0, augment=True):
        root = os.path.abspath(path)
        if not os.path.isdir(root):
            raise ConfigError(f"shards: {path!r} is not a directory; create it with `megapix prepare --out {path}`")
        m = read_manifest(root)
        self.name, self.seed, self.manifest = "shards", seed, m
        if not m.get("complete"):
            raise ConfigError(f"shards: {path!r} is incomplete (prepare was interrupted); re-run `megapix prepare` "
                              "with the same arguments to finish it")
        if m.get("resolution") != resolution:
            r = m.get("resolution")
            raise ConfigError(f"shards: {path!r} was prepared at {r}x{r} but the model expects "
                              f"{resolution}x{resolution}; re-run `megapix prepare --resolution {resolution}` "
                              f"or use a preset with resolution {r}")
        pal = m.get("palette") or {}
        self.palette_path = os.path.join(root, pal["file"]) if pal.get("file") else None
        self.num_classes = m.get("num_classes")
        T = resolution**2
        self._splits = {}
        for split in SPLITS:
            info = m["splits"].get(split)
            if info is None:
                raise ConfigError(f"shards: {path!r} has no {split!r} split in its manifest; re-run `megapix prepare`")
            parts = [open_shard(os.path.join(root, s["file"]), s["count"], T, s.get("bytes")) for s in info["shards"]]
            if sum(len(p) for p in parts) != info["count"]:
                raise ConfigError(f"shards: {split} shards in {path!r} do not add up to {info['count']} images; "
                                  "re-run `megapix prepare` into a new --out")
            tokens = parts[0] if len(parts) == 1 else ConcatArray(parts, (T,), np.uint16)
            labels = None
            if info.get("labels"):
                labels = np.asarray(_load_npy(os.path.join(root, info["labels"]), "shard labels"), dtype=np.int64)
                if labels.shape != (info["count"],):
                    raise ConfigError(f"shards: {info['labels']!r} has shape {labels.shape}, expected "
                                      f"({info['count']},); re-run `megapix prepare` into a new --out")
            self._splits[split] = Split(tokens=tokens if parts else np.zeros((0, T), np.uint16), labels=labels,
                                        num_classes=self.num_classes)


FILE_SOURCES: dict = {
    "cifar10": open_cifar("cifar10"),
    "cifar100": open_cifar("cifar100"),
    "imagefolder": ImageFolderSource,
    "npy": NpySource,
    "igpt": IgptTokenSource,
    "shards": ShardSource,
}
