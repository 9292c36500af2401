"""Sharded image sources: WebDataset tar shards (`wds:`) and Parquet files of image bytes (`parquet:`).

    wds:TRAIN_PATTERN[;test=PATTERN][;image=EXT[,EXT]][;label=EXT][;skip-corrupt]
    parquet:TRAIN_PATTERN[;test=PATTERN][;image=COLUMN][;label=COLUMN][;skip-corrupt]

A pattern holds braces and globs: 'wds:/data/in1k/train-{000000..001023}.tar',
'parquet:/data/in1k/train-*.parquet' (quote it in a shell: bash would expand the braces itself). The files are
read where they are: nothing is unpacked, copied or downloaded.

Random access without unpacking. Opening a source builds an index in memory: for a tar shard, one pass over its
headers (tarfile) records each sample's image member (offset, size) and reads its small label member; for Parquet,
each file's footer gives its row groups and the label column is read whole (a few bytes per image). Image i of a
split is then (file, offset, size) or (file, row group, row): one seek and one read. So the training loader draws
any global batch directly, and the global batches still depend only on (seed, data, step), as for every source.

Fields. A WebDataset sample is the members sharing a key (the path up to the first dot of the file name): the
image is the first of its extensions jpg, jpeg, png, webp (or `image=`), the label the integer text of `cls`
(or `label=`). A Parquet row's image is the column `image` (a struct with `bytes`, as Hugging Face datasets write
it, or a binary column; or `image=`) and its label the integer column `label` (or `label=`). Without any label
the source has no labels (pre-training needs none).

Splits: train is the train pattern minus a seeded holdout (4%, as ImageFolder, or --val-fraction), val that
holdout, test the `test=` pattern (else, with a warning, the holdout again). Images decode as ImageFolder's
(megapix.data.files.ImageFolderImages): the same pixels, so the same tokens, as a folder of the same files.

Damage: a truncated shard, a member that does not decode, a sample without its image or label, a label that is
not an integer, a missing column: one line naming the file and the member (DataError, exit 2). With
skip-corrupt (the spec option, or --skip-corrupt on train, prepare and extract) a damaged sample found while
indexing is left out of the index, and one that fails to decode is replaced by the next image of its split (so
a batch keeps its size and stays a function of (seed, data, step)); each is warned once and counted
(`Source.skipped`, and prepare's manifest).
"""
from __future__ import annotations

import glob
import io
import os
import warnings

import numpy as np

from megapix.config import ConfigError
from megapix.data import augment as aug
from megapix.data.base import Split, holdout, holdout_fraction
from megapix.data.files import ImageFolderImages, _LazySource
from megapix.errors import DataError

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_LABEL_EXT = "cls"
PARQUET_IMAGE, PARQUET_LABEL = "image", "label"
DEFAULT_VAL_FRACTION = 0.04  # ImageNet's, as ImageFolder: sharded data is ImageNet-scale data
ROW_GROUP_CACHE = 4  # decoded Parquet row groups kept per process (a batch usually touches a few)


def parse_spec(kind: str, arg: str, skip_corrupt: bool = False) -> dict:
    """'PATTERN[;key=value]...' -> {"train", "test", "image", "label", "skip_corrupt"}; unknown options refused."""
    parts = arg.split(";")
    opts = {"train": parts[0], "test": None, "image": None, "label": None, "skip_corrupt": skip_corrupt}
    if not opts["train"]:
        raise ConfigError(f"{kind}: needs a file pattern, e.g. '{kind}:/data/train-{{000000..000127}}."
                          f"{'tar' if kind == 'wds' else 'parquet'}'")
    for p in parts[1:]:
        key, eq, value = p.partition("=")
        if key == "skip-corrupt" and not eq:
            opts["skip_corrupt"] = True
        elif key in ("test", "image", "label") and eq and value:
            opts[key] = value
        else:
            raise ConfigError(f"{kind}: unknown option {p!r} in '{kind}:{arg}'; options are ;test=PATTERN, "
                              ";image=NAME, ;label=NAME and ;skip-corrupt")
    return opts


def expand(pattern: str, kind: str) -> list[str]:
    """Brace then glob expansion (webdataset's braceexpand): the existing files, sorted; none is an error."""
    from braceexpand import braceexpand

    files = set()
    for p in braceexpand(os.path.expanduser(pattern)):
        found = glob.glob(p) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
        files.update(os.path.abspath(f) for f in found if os.path.isfile(f))
    if not files:
        raise ConfigError(f"{kind}: no file matches {pattern!r}; check the path (braces and globs are expanded)")
    return sorted(files)


class Damage:
    """Skipped samples of one source: warned once each, counted; or raised when skipping is off."""

    def __init__(self, skip: bool):
        self.skip, self.seen = skip, set()

    def __call__(self, where: str, problem: str) -> None:
        if not self.skip:
            raise DataError(f"{where}: {problem}; repair or remove it, or pass --skip-corrupt to skip damaged samples")
        if where not in self.seen:
            self.seen.add(where)
            warnings.warn(f"skipped {where} ({problem}; --skip-corrupt)", stacklevel=2)


# ---- WebDataset tar shards ----
def _member_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name, the rest the extension."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem), ext.lower()


def _index_tar(path: str, image_exts: tuple, label_ext: str, damage: Damage) -> tuple[list, list]:
    """([(offset, size)], [label or None]) of the samples of one shard, in file order."""
    import tarfile

    size = os.path.getsize(path)
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:  # plain tar only: compressed members cannot be seeked
            for m in tar:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    damage(f"{path} member {m.name}", f"the shard is truncated ({size} bytes)")
                    break
                key, ext = _member_key(m.name)
                entry = samples.setdefault(key, {})
                if ext == label_ext:
                    entry["label"] = tar.extractfile(m).read()
                elif ext in image_exts and "image" not in entry:
                    entry["image"] = (m.offset_data, m.size)
            else:  # tarfile ends quietly at a cut header: a whole tar ends in two zero blocks
                if not _ends_cleanly(path, tar.offset, size):
                    damage(f"{path} after {len(samples)} samples", f"the shard is truncated ({size} bytes)")
    except tarfile.ReadError as e:
        if not samples:
            raise DataError(f"{path} is not a readable tar shard ({e}); webdataset shards are plain .tar "
                            "(not compressed), written by webdataset.TarWriter or tar") from None
        damage(f"{path} after {len(samples)} samples", f"the shard is truncated or damaged ({e})")
    return _samples(path, samples, image_exts, label_ext, damage)


def _ends_cleanly(path: str, end: int, size: int) -> bool:
    """Whether the bytes after the last member are the end-of-archive marker: at least two zero blocks."""
    if size - end < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(end)
        return not any(f.read())


def _samples(path, samples: dict, image_exts, label_ext, damage: Damage) -> tuple[list, list]:
    any_label = any("label" in e for e in samples.values())
    where, labels = [], []
    for key, e in samples.items():
        if "image" not in e:
            damage(f"{path} sample {key}", f"no image member ({', '.join(image_exts)})")
            continue
        label = None
        if any_label:
            raw = e.get("label")
            try:
                label = int(raw.decode().strip())
            except (AttributeError, UnicodeDecodeError, ValueError):
                what = "missing" if raw is None else "not an integer"
                damage(f"{path} sample {key}", f"its .{label_ext} member is {what}")
                continue
        where.append(e["image"])
        labels.append(label)
    return where, labels


class TarStore:
    """Every sample of a list of shards: read(i) -> the image's encoded bytes."""

    def __init__(self, files: list[str], image_exts: tuple, label_ext: str, damage: Damage):
        self.files, self.rows, labels = files, [], []
        for f, path in enumerate(files):
            where, lab = _index_tar(path, image_exts, label_ext, damage)
            self.rows += [(f, off, n) for off, n in where]
            labels += lab
        self.labels = _label_array(labels, files, damage)

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, i: int) -> bytes:
        f, off, n = self.rows[i]
        with open(self.files[f], "rb") as fh:  # opened per read: fork- and pickle-safe for loader workers
            fh.seek(off)
            return fh.read(n)

    def describe(self, i: int) -> str:
        f, off, _ = self.rows[i]
        return f"{self.files[f]} member at byte {off}"


def _label_array(labels: list, files: list[str], damage: Damage) -> np.ndarray | None:
    if not labels or all(x is None for x in labels):
        return None
    if any(x is None for x in labels):
        raise DataError(f"{files[0]} ...: some shards have labels and some do not; label every sample or none")
    lab = np.asarray(labels, dtype=np.int64)
    if lab.min() < 0:
        raise DataError(f"{files[0]} ...: negative labels; class ids start at 0")
    return lab


# ---- Parquet ----
class ParquetStore:
    """Every row of a list of Parquet files: read(i) -> the image's encoded bytes (row groups cached)."""

    def __init__(self, files: list[str], image_col: str | None, label_col: str | None, damage: Damage):
        import pyarrow.parquet as pq

        self.files, self.rows, self.image_col, labels = [], [], image_col or PARQUET_IMAGE, []
        self._cache: dict = {}
        for path in files:
            try:
                meta = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for a damaged footer
                damage(f"{path}", f"not a readable Parquet file ({type(e).__name__}: {e})")
                continue
            names = meta.schema_arrow.names
            if self.image_col not in names:
                raise DataError(f"{path} has no column {self.image_col!r} (columns: {', '.join(names)}); name the "
                                "image column with ';image=COLUMN' in the spec")
            want = label_col or (PARQUET_LABEL if PARQUET_LABEL in names else None)
            if want is not None and want not in names:
                raise DataError(f"{path} has no column {want!r} (columns: {', '.join(names)}); name the label "
                                "column with ';label=COLUMN' in the spec")
            f = len(self.files)
            self.files.append(path)
            for g in range(meta.num_row_groups):
                self.rows += [(f, g, r) for r in range(meta.metadata.row_group(g).num_rows)]
            labels += (meta.read(columns=[want]).column(0).to_pylist() if want
                       else [None] * meta.metadata.num_rows)
        self.labels = _label_array(labels, files, damage)

    def __len__(self) -> int:
        return len(self.rows)

    def _group(self, f: int, g: int):
        key = (os.getpid(), f, g)  # a loader worker builds its own cache
        if key not in self._cache:
            import pyarrow.parquet as pq

            if len(self._cache) >= ROW_GROUP_CACHE:
                self._cache.pop(next(iter(self._cache)))
            col = pq.ParquetFile(self.files[f]).read_row_group(g, columns=[self.image_col]).column(0).combine_chunks()
            self._cache[key] = col.field("bytes") if hasattr(col, "field") else col
        return self._cache[key]

    def read(self, i: int) -> bytes:
        f, g, r = self.rows[i]
        value = self._group(f, g)[r].as_py()
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"the {self.image_col!r} value is {type(value).__name__}, not image bytes")
        return value

    def describe(self, i: int) -> str:
        f, g, r = self.rows[i]
        return f"{self.files[f]} row group {g} row {r}"

    def __getstate__(self):  # the cache stays behind when a loader worker receives the source
        return {**self.__dict__, "_cache": {}}


# ---- the lazy images and the source ----
class EncodedImages(ImageFolderImages):
    """Rows `rows` of a store, decoded on demand with ImageFolder's views (eval: centre crop; train: the paper's
    random resize/crop keyed by (seed, epoch, index))."""

    def __init__(self, store, rows: np.ndarray, resolution: int, train: bool, damage: Damage):
        super().__init__([], resolution, train)
        self.store, self.rows, self.damage = store, np.asarray(rows, dtype=np.int64), damage
        self.shape = (len(self.rows), self.resolution, self.resolution, 3)

    def _load(self, i: int, box_fn) -> np.ndarray:
        for k in range(len(self.rows)):  # a damaged image (skip-corrupt) gives way to the next one of the split
            j = int(self.rows[(i + k) % len(self.rows)])
            try:
                return aug.load_and_crop(io.BytesIO(self.store.read(j)), self.resolution, box_fn)
            except FileNotFoundError:
                raise DataError(f"{self.store.describe(j)}: the file has disappeared; restore it") from None
            except Exception as e:  # noqa: BLE001 - PIL and pyarrow raise many types for damaged data
                self.damage(self.store.describe(j), f"does not decode ({type(e).__name__}: {e})")
        raise DataError(f"no image of this split decodes ({len(self.rows)} tried)")


class ShardedImageSource(_LazySource):
    """`wds:` and `parquet:` (see the module docstring)."""

    default_val_fraction = DEFAULT_VAL_FRACTION

    def __init__(self, kind: str, arg: str, *, resolution, val_fraction=None, seed=0, augment=True,
                 skip_corrupt=False):
        o = parse_spec(kind, arg, skip_corrupt)
        self.name, self.seed, self.damage = kind, seed, Damage(o["skip_corrupt"])
        store = self._store(kind, o, o["train"])
        if not len(store):
            raise DataError(f"{kind}: {o['train']!r} holds no samples")
        tr, va = holdout(len(store), holdout_fraction(val_fraction, self.default_val_fraction), seed)
        self.num_classes = None if store.labels is None else int(store.labels.max()) + 1
        self._splits = {"train": self._split(store, tr, resolution, augment),
                        "val": self._split(store, va, resolution, False)}
        if o["test"] is None:
            warnings.warn(f"{kind}: no ;test=PATTERN in the spec; the test split is the held-out validation split",
                          stacklevel=3)
            self._splits["test"] = self._splits["val"]
        else:
            test = self._store(kind, o, o["test"])
            self._splits["test"] = self._split(test, np.arange(len(test)), resolution, False)

    @property
    def skipped(self) -> int:
        return len(self.damage.seen)

    def for_workers(self) -> ShardedImageSource:
        """Itself: prepare's workers read images through this index instead of reading every shard's headers
        (tar) or footer and label column (Parquet) again. The stores hold paths, offsets and labels only."""
        return self

    def _store(self, kind: str, o: dict, pattern: str):
        files = expand(pattern, kind)
        if kind == "wds":
            exts = tuple(e.lower() for e in o["image"].split(",")) if o["image"] else WDS_IMAGE_EXTS
            return TarStore(files, exts, (o["label"] or WDS_LABEL_EXT).lower(), self.damage)
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("parquet: needs pyarrow; install it with pip install 'megapix[shards]'") from None
        return ParquetStore(files, o["image"], o["label"], self.damage)

    def _split(self, store, rows, resolution: int, train: bool) -> Split:
        labels = None if store.labels is None else store.labels[rows]
        return Split(EncodedImages(store, rows, resolution, train, self.damage), labels=labels,
                     num_classes=self.num_classes)


def wds_source(arg, **kw) -> ShardedImageSource:
    return ShardedImageSource("wds", arg, **kw)


def parquet_source(arg, **kw) -> ShardedImageSource:
    return ShardedImageSource("parquet", arg, **kw)
