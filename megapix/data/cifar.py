"""CIFAR-10/100 from the python tarball (or its extracted folder), read without pickle's arbitrary code: an
unpickler that admits only the builtins a CIFAR batch holds. Used by megapix.data.files as `cifar10:PATH`."""
from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np

from megapix.config import ConfigError
from megapix.data.base import ArraySource, Source, check_size, holdout_fraction
from megapix.errors import DataError


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python tarballs
# ----------------------------------------------------------------------------------------------------------
_CIFAR = {
    "cifar10": dict(dir="cifar-10-batches-py", tar="cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], key=b"labels", classes=10),
    "cifar100": dict(dir="cifar-100-python", tar="cifar-100-python.tar.gz",
                     train=["train"], test=["test"], key=b"fine_labels", classes=100),
}


def _latin1_encode(text, encoding="latin1"):
    # protocol-2 pickles written by Python 3 carry bytes as _codecs.encode(str, "latin1"); nothing else
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _plain_dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject:  # object arrays would unpickle arbitrary objects from their payload
        raise _Refused(f"an array of dtype {dt}")
    return dt


def _cifar_globals() -> dict:
    """The only callables a CIFAR batch pickle may name: numpy's array reconstruction under the numpy 1
    (numpy.core) and numpy 2 (numpy._core) module paths, and the latin-1 bytes codec."""
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _plain_dtype,
               ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR python batch holds (dicts, lists, bytes/str, ints, plain numpy arrays):
    every other global is refused before it is resolved, so a crafted member cannot run code."""

    _allowed = None

    def find_class(self, module, name):
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _cifar_globals()
        obj = self._allowed.get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise _Refused("a persistent id")


class _Refused(pickle.UnpicklingError):
    pass


def _unpickle_cifar(raw: bytes, where: str, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    # The official CIFAR "python version" is a set of pickled dicts. They are read with _CifarUnpickler,
    # which admits only numpy array reconstruction, so no member can execute code; everything it returns is
    # then checked for type and shape before use.
    try:
        d = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Refused as e:
        raise DataError(f"{where} is not a CIFAR batch: it references {e}, which a CIFAR batch never holds "
                        "(refused without running it); re-download the tarball") from None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where} is not a readable CIFAR batch ({type(e).__name__}); "
                        "re-download the tarball") from None
    if not isinstance(d, dict) or b"data" not in d or spec["key"] not in d:
        raise DataError(f"{where} is not a CIFAR batch (expected a dict with b'data' and {spec['key']!r}); "
                        "re-download the tarball")
    x, y = d[b"data"], d[spec["key"]]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{where}: b'data' must be uint8 [N, 3072] (32x32x3 CHW); got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}; re-download the tarball")
    try:
        y = np.asarray(y, dtype=np.int64)
    except Exception:  # noqa: BLE001
        raise DataError(f"{where}: labels are not integers; re-download the tarball") from None
    if y.shape != (len(x),) or (len(y) and (y.min() < 0 or y.max() >= spec["classes"])):
        raise DataError(f"{where}: expected {len(x)} labels in [0, {spec['classes']}); got shape {y.shape}; "
                          "re-download the tarball")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), y


def _require_cifar_path(path: str, kind: str) -> None:
    if not os.path.exists(path):
        spec = _CIFAR[kind]
        raise ConfigError(f"{kind}: {path!r} does not exist; pass {spec['tar']} or its extracted {spec['dir']}/ "
                          "directory")


def _read_cifar(path: str, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    spec = _CIFAR[kind]
    names = spec["train"] + spec["test"]
    blobs: dict[str, bytes] = {}
    if os.path.isdir(path):
        d = path if os.path.isfile(os.path.join(path, names[0])) else os.path.join(path, spec["dir"])
        for n in names:
            f = os.path.join(d, n)
            if not os.path.isfile(f):
                raise ConfigError(f"{kind}: {f!r} is missing; point {kind}:PATH at {spec['tar']} or the extracted "
                                  f"{spec['dir']}/ directory")
            with open(f, "rb") as fh:
                blobs[n] = fh.read()
    elif os.path.isfile(path):
        try:
            with tarfile.open(path, "r:*") as tf:
                for n in names:
                    member = f"{spec['dir']}/{n}"
                    try:
                        info = tf.getmember(member)
                    except KeyError:
                        raise ConfigError(f"{kind}: {path!r} has no member {member!r}; "
                                          f"is this {spec['tar']}?") from None
                    fh = tf.extractfile(info) if info.isfile() else None
                    if fh is None:
                        raise DataError(f"{kind}: {member!r} in {path!r} is not a regular file; re-download it")
                    blobs[n] = fh.read()
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - tarfile/gzip/zlib/EOF errors for truncated or corrupt files
            raise DataError(f"{kind}: cannot read {path!r} as a tarball ({type(e).__name__}: {e}); "
                            f"re-download {spec['tar']}") from None
    else:
        _require_cifar_path(path, kind)
    xs, ys = {}, {}
    for n in names:
        xs[n], ys[n] = _unpickle_cifar(blobs.pop(n), f"{kind}: {n} in {path!r}", spec)
    cat = lambda group, d: np.concatenate([d[n] for n in spec[group]])  # noqa: E731
    return cat("train", xs), cat("train", ys), cat("test", xs), cat("test", ys)


def open_cifar(kind: str):
    def open_cifar(path, *, resolution, val_fraction=None, seed=0, augment=True) -> Source:
        """CIFAR python tarball (or extracted directory): train minus a seeded 10% holdout, val, test.

        Images are handed out as plain arrays; the CIFAR fine-tuning augmentation (pad 4, crop, flip) is
        `megapix.data.augment.cifar_augment`, applied by whoever trains.
        """
        _require_cifar_path(path, kind)  # a missing file first: it is the first thing to fix
        check_size(32, 32, resolution, "CIFAR", "pass --resolution 32 (or a 32x32 preset such as igpt-s)")
        frac = holdout_fraction(val_fraction, 0.1)
        trx, try_, tex, tey = _read_cifar(path, kind)
        return ArraySource(kind, trx, try_, tex, tey, _CIFAR[kind]["classes"], frac, seed)

    open_cifar.__name__ = f"open_{kind}"
    return open_cifar
