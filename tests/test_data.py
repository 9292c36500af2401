"""File sources and `megapix prepare`, on tiny files written in the real formats (no downloads)."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from megapix.config import ConfigError
from megapix.data.augment import cifar_augment
from megapix.data.files import FILE_SOURCES, ConcatArray, ImageFolderImages, Subset
from megapix.data.palette import Palette
from megapix.commands.prepare import main as prepare_main
from megapix.data.prepare import prepare
from megapix.data.splits import fit_sample
from megapix.data.sources import open_source

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------------------
# fixtures: real formats, tiny
# ---------------------------------------------------------------------------------------------------------
def _batch(n, label_key, classes, seed):
    r = np.random.default_rng(seed)
    d = {b"batch_label": b"x", b"data": r.integers(0, 256, (n, 3072), dtype=np.uint8),
         label_key: r.integers(0, classes, n).tolist(), b"filenames": [b"f%d.png" % i for i in range(n)]}
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = r.integers(0, 20, n).tolist()
    return d


def _write_tar(path, top, members):
    with tarfile.open(path, "w:gz") as tf:
        for name, obj in members.items():
            raw = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return str(path)


@pytest.fixture(scope="module")
def cifar10_tar(tmp_path_factory):
    d = tmp_path_factory.mktemp("c10")
    members = {f"data_batch_{i}": _batch(20, b"labels", 10, i) for i in range(1, 6)}
    members["test_batch"] = _batch(20, b"labels", 10, 9)
    members["batches.meta"] = {b"label_names": [b"a"] * 10}
    return _write_tar(d / "cifar-10-python.tar.gz", "cifar-10-batches-py", members), members


@pytest.fixture(scope="module")
def cifar100_tar(tmp_path_factory):
    d = tmp_path_factory.mktemp("c100")
    members = {"train": _batch(50, b"fine_labels", 100, 1), "test": _batch(10, b"fine_labels", 100, 2)}
    return _write_tar(d / "cifar-100-python.tar.gz", "cifar-100-python", members), members


def _save_img(path, size, mode="RGB", fmt=None, seed=0):
    r = np.random.default_rng(seed)
    w, h = size
    base = r.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.clip(base + 60 * np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr).convert(mode)
    im.save(path, format=fmt)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("inet")
    sizes = [(40, 30), (30, 40), (64, 48), (300, 260), (33, 33)]
    modes = ["RGB", "L", "RGBA", "RGB", "P"]
    for split, n in (("train", 5), ("val", 2)):
        for c, cls in enumerate(("cat", "dog")):
            os.makedirs(root / split / cls)
            for i in range(n):
                ext = "jpg" if (i + c) % 2 else "png"
                mode = modes[i] if ext == "png" or modes[i] in ("RGB", "L") else "RGB"
                _save_img(root / split / cls / f"{i}.{ext}", sizes[i], mode, seed=10 * c + i)
    return str(root)


def _npy(tmp_path, name, arr, **kw):
    p = str(tmp_path / name)
    np.save(p, arr, **kw)
    return p


@pytest.fixture(scope="module")
def palette_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("pal")
    r = np.random.default_rng(1)
    pal = Palette(r.uniform(-1, 1, (512, 3)).astype(np.float32))
    p = str(d / "kmeans_centers.npy")
    pal.save(p)
    return p


def _igpt_dir(tmp_path, prefix="cifar10", T=64, hi=512, classes=10):
    d = tmp_path / "igpt"
    d.mkdir(exist_ok=True)
    r = np.random.default_rng(3)
    for part, n in (("tr", 30), ("va", 6), ("te", 8)):
        np.save(d / f"{prefix}_{part}X.npy", r.integers(0, hi, (n, T)).astype(np.uint16))
        np.save(d / f"{prefix}_{part}Y.npy", np.eye(classes, dtype=np.float32)[r.integers(0, classes, n)])
    return d


# ---------------------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------------------
def test_registry():
    assert set(FILE_SOURCES) == {"cifar10", "cifar100", "imagefolder", "npy", "igpt", "shards"}


def test_cifar10_tarball_and_dir(cifar10_tar, tmp_path):
    path, members = cifar10_tar
    src = open_source(f"cifar10:{path}", 32, seed=0)
    tr, va, te = (src.split(s) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (90, 10, 20) and src.num_classes == 10
    assert tr.images.shape == (90, 32, 32, 3) and tr.images.dtype == np.uint8
    # CHW rows -> HWC images, labels aligned
    raw = np.concatenate([members[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    lab = np.concatenate([members[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    hwc = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    allx = np.concatenate([tr.images, va.images])
    ally = np.concatenate([tr.labels, va.labels])
    order = np.argsort([x.tobytes() for x in allx])
    order0 = np.argsort([x.tobytes() for x in hwc])
    assert np.array_equal(allx[order], hwc[order0]) and np.array_equal(ally[order], lab[order0])
    assert te.images[3, 5, 7, 2] == members["test_batch"][b"data"][3, 2 * 1024 + 5 * 32 + 7]
    # holdout: deterministic given the seed, different for another seed
    again = open_source(f"cifar10:{path}", 32, seed=0).split("val")
    other = open_source(f"cifar10:{path}", 32, seed=1).split("val")
    assert np.array_equal(again.images, va.images) and not np.array_equal(other.images, va.images)
    # the extracted directory (and its parent) read the same
    with tarfile.open(path) as tf:
        tf.extractall(tmp_path, filter="data")
    for p in (tmp_path, tmp_path / "cifar-10-batches-py"):
        s = open_source(f"cifar10:{p}", 32, seed=0)
        assert np.array_equal(s.split("val").images, va.images)


def test_cifar100(cifar100_tar):
    path, members = cifar100_tar
    src = open_source(f"cifar100:{path}", 32, val_fraction=0.2, seed=0)
    assert (len(src.split("train")), len(src.split("val")), len(src.split("test"))) == (40, 10, 10)
    assert src.num_classes == 100
    assert np.array_equal(src.split("test").labels, members["test"][b"fine_labels"])


def test_cifar_errors(cifar10_tar, tmp_path):
    path, members = cifar10_tar
    with pytest.raises(ConfigError, match=r"32x32 but the model expects 64x64.*igpt-s"):
        open_source(f"cifar10:{path}", 64)
    with pytest.raises(ConfigError, match="does not exist"):
        open_source(f"cifar10:{tmp_path}/nope.tar.gz", 32)
    bad = tmp_path / "corrupt.tar.gz"
    bad.write_bytes(open(path, "rb").read()[:300])
    with pytest.raises(ConfigError, match="re-download"):
        open_source(f"cifar10:{bad}", 32)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(ConfigError, match="tarball"):
        open_source(f"cifar10:{junk}", 32)
    partial = _write_tar(tmp_path / "p.tar.gz", "cifar-10-batches-py", {"data_batch_1": members["data_batch_1"]})
    with pytest.raises(ConfigError, match="no member 'cifar-10-batches-py/data_batch_2'"):
        open_source(f"cifar10:{partial}", 32)
    shapes = dict(members, data_batch_3={b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    wrong = _write_tar(tmp_path / "w.tar.gz", "cifar-10-batches-py", shapes)
    with pytest.raises(ConfigError, match=r"uint8 \[N, 3072\]"):
        open_source(f"cifar10:{wrong}", 32)
    labels = dict(members, test_batch={**members["test_batch"], b"labels": [99] * 20})
    wrong = _write_tar(tmp_path / "l.tar.gz", "cifar-10-batches-py", labels)
    with pytest.raises(ConfigError, match="labels in"):
        open_source(f"cifar10:{wrong}", 32)
    garbage = _write_tar(tmp_path / "g.tar.gz", "cifar-10-batches-py", dict(members, test_batch=b"not a pickle"))
    with pytest.raises(ConfigError, match="not a readable CIFAR batch"):
        open_source(f"cifar10:{garbage}", 32)
    with pytest.raises(ConfigError, match="needs a path"):
        open_source("cifar10:", 32)


class _Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_cifar_crafted_pickle_never_runs(cifar10_tar, tmp_path):
    path, members = cifar10_tar
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(str(control)), protocol=2))  # the payload works when unpickled naively
    assert control.exists()
    marker = tmp_path / "marker"
    evil = _write_tar(tmp_path / "evil.tar.gz", "cifar-10-batches-py",
                      dict(members, data_batch_1={b"data": _Payload(str(marker)), b"labels": [0]}))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "megapix", "prepare", "--data", f"cifar10:{evil}", "--fit-palette",
                        "--resolution", "32", "--out", str(out), "--workers", "1", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "data_batch_1" in lines[0] and "evil.tar.gz" in lines[0], r.stderr
    assert "references __builtin__.exec" in lines[0] and "re-download" in lines[0]
    assert not marker.exists() and not out.exists()


def test_cifar_numpy1_pickles_load(cifar10_tar, tmp_path):
    """Batches written under numpy 1 name numpy.core.multiarray (the official tarball does): admitted."""
    path, members = cifar10_tar
    old = {}
    for name, obj in members.items():
        raw = pickle.dumps(obj, protocol=2)
        assert b"numpy._core.multiarray\n_reconstruct" in raw or name == "batches.meta"
        old[name] = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    src = open_source(f"cifar10:{_write_tar(tmp_path / 'np1.tar.gz', 'cifar-10-batches-py', old)}", 32, seed=0)
    ref = open_source(f"cifar10:{path}", 32, seed=0)
    assert np.array_equal(src.split("test").images, ref.split("test").images)
    assert np.array_equal(src.split("train").labels, ref.split("train").labels)
    objects = dict(members, test_batch={b"data": np.array([1, "x"], dtype=object), b"labels": [0]})
    with pytest.raises(ConfigError, match="not a CIFAR batch"):
        open_source(f"cifar10:{_write_tar(tmp_path / 'o.tar.gz', 'cifar-10-batches-py', objects)}", 32)


@pytest.mark.parametrize("spec", ["synthetic:abc", "synthetic:0", "synthetic:-1", "synthetic:1e3",
                                  "synthetic:100001", "digits:x", "foo", "foo:bar", "", "cifar10:"])
def test_malformed_specs_name_the_grammar(spec):
    with pytest.raises(ConfigError) as e:
        open_source(spec, 8)
    msg = str(e.value)
    assert "\n" not in msg
    if spec == "cifar10:":
        assert "needs a path: 'cifar10:PATH'" in msg
    else:
        assert repr(spec) in msg
        assert ("digits | digits-shifted[:COPIES] | shapes[:N] | outlines[:N] | outlines-large[:N] | synthetic[:N] | "
                "cifar10:PATH") in msg
        assert "npy:IMAGES.npy[,LABELS.npy]" in msg


def test_cifar_augment_deterministic():
    x = RNG.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    a = cifar_augment(x, np.arange(6), epoch=0, seed=1)
    assert np.array_equal(a, cifar_augment(x, np.arange(6), epoch=0, seed=1))
    assert not np.array_equal(a, cifar_augment(x, np.arange(6), epoch=1, seed=1))
    # per-index randomness: the same image index augments the same way in any batch
    assert np.array_equal(cifar_augment(x[[4, 2]], [4, 2], 0, 1), a[[4, 2]])


# ---------------------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------------------
def test_imagefolder_splits_and_views(imagefolder):
    src = open_source(f"imagefolder:{imagefolder}", 8, val_fraction=0.2, seed=0)
    tr, va, te = (src.split(s) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (8, 2, 4) and src.num_classes == 2
    assert sorted(np.concatenate([tr.labels, va.labels]).tolist()) == [0] * 5 + [1] * 5
    assert te.labels.tolist() == [0, 0, 1, 1]
    assert isinstance(tr.images, ImageFolderImages) and tr.images.shape == (8, 8, 8, 3)
    x = tr.images[np.arange(8)]
    assert x.shape == (8, 8, 8, 3) and x.dtype == np.uint8
    assert np.array_equal(tr.images[3], x[3]) and np.array_equal(np.asarray(te.images), te.images[:])
    # eval view is deterministic; train view is deterministic given (seed, epoch, index) and batch-independent
    assert np.array_equal(x, tr.images[np.arange(8)])
    b = tr.images.batch(np.arange(8), epoch=0, seed=5)
    assert np.array_equal(b, tr.images.batch(np.arange(8), epoch=0, seed=5))
    assert np.array_equal(b[[6, 1]], tr.images.batch(np.array([6, 1]), epoch=0, seed=5))
    assert not np.array_equal(b, tr.images.batch(np.arange(8), epoch=1, seed=5))
    assert not np.array_equal(b, x)
    # eval splits never augment; augment=False makes train deterministic too
    assert np.array_equal(va.images.batch([0, 1], 3, 3), va.images[[0, 1]])
    plain = open_source(f"imagefolder:{imagefolder}", 8, val_fraction=0.2, seed=0, augment=False).split("train")
    assert np.array_equal(plain.images.batch(np.arange(8), 2, 2), x)
    # holdout is seeded
    other = open_source(f"imagefolder:{imagefolder}", 8, val_fraction=0.2, seed=1).split("val")
    again = open_source(f"imagefolder:{imagefolder}", 8, val_fraction=0.2, seed=0).split("val")
    assert again.images.files == va.images.files and other.images.files != va.images.files
    # palette fitting gets real pixels
    assert fit_sample(src.split("train").images, 0).shape == (8, 8, 8, 3)


def test_imagefolder_eval_crop_is_centre_square(tmp_path):
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = [200, 10, 10]  # the centred 40x40 square is red; the sides are black
    os.makedirs(tmp_path / "train" / "a")
    Image.fromarray(arr).save(tmp_path / "train" / "a" / "x.png")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        src = open_source(f"imagefolder:{tmp_path}", 4, val_fraction=0.0)
    assert any("no val/ or test/" in str(m.message) for m in w)
    img = src.split("train").images[0]
    assert (img == [200, 10, 10]).all()


@pytest.mark.filterwarnings("ignore:.*no val/ or test/")
def test_imagefolder_errors(imagefolder, tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        open_source(f"imagefolder:{tmp_path}/missing", 8)
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="no class sub-directories"):
        open_source(f"imagefolder:{tmp_path}", 8)
    (tmp_path / "train" / "a").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        open_source(f"imagefolder:{tmp_path}", 8)
    (tmp_path / "train" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    src = open_source(f"imagefolder:{tmp_path}", 8, val_fraction=0.0)
    with pytest.raises(ConfigError, match="cannot decode image .*bad.jpg"):
        src.split("train").images[[0]]
    os.makedirs(tmp_path / "val" / "zebra")
    _save_img(tmp_path / "val" / "zebra" / "z.png", (10, 10))
    with pytest.raises(ConfigError, match="classes not in train/: zebra"):
        open_source(f"imagefolder:{tmp_path}", 8)


# ---------------------------------------------------------------------------------------------------------
# .npy
# ---------------------------------------------------------------------------------------------------------
def test_npy_source(tmp_path):
    x = RNG.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    y = RNG.integers(0, 7, 50)
    xp, yp = _npy(tmp_path, "x.npy", x), _npy(tmp_path, "y.npy", y)
    hp = _npy(tmp_path, "h.npy", np.eye(7, dtype=np.uint8)[y])
    src = open_source(f"npy:{xp},{yp}", 8, seed=0)
    tr, va, te = (src.split(s) for s in ("train", "val", "test"))
    assert (len(tr), len(va)) == (45, 5) and te is va and src.num_classes == 7
    assert isinstance(tr.images, Subset) and tr.images.shape == (45, 8, 8, 3)
    ids = np.sort(np.concatenate([[int(np.flatnonzero((x == im).all((1, 2, 3)))[0]) for im in np.asarray(s.images)]
                                  for s in (tr, va)]))
    assert ids.tolist() == list(range(50))
    k = [int(np.flatnonzero((x == im).all((1, 2, 3)))[0]) for im in np.asarray(va.images)]
    assert np.array_equal(va.labels, y[k])
    hot = open_source(f"npy:{xp},{hp}", 8, seed=0)
    assert np.array_equal(hot.split("train").labels, tr.labels) and hot.num_classes == 7
    # fancy indexing in any order reads the right rows
    assert np.array_equal(tr.images[[5, 0, 5]], np.asarray(tr.images)[[5, 0, 5]])
    # grey [N, H, W] -> RGB; no labels
    g = open_source(f"npy:{_npy(tmp_path, 'g.npy', x[..., 0])}", 8, seed=0).split("train")
    assert g.labels is None and g.images.shape == (45, 8, 8, 3)
    assert np.array_equal(g.images[[0]][..., 2], g.images[[0]][..., 0])


def test_npy_errors(tmp_path):
    x = RNG.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    xp = _npy(tmp_path, "x.npy", x)
    with pytest.raises(ConfigError, match="does not exist"):
        open_source(f"npy:{tmp_path}/nope.npy", 8)
    (tmp_path / "c.npy").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a readable .npy"):
        open_source(f"npy:{tmp_path}/c.npy", 8)
    with pytest.raises(ConfigError, match="not a readable .npy"):  # pickled object arrays are refused
        open_source(f"npy:{_npy(tmp_path, 'o.npy', np.array([{}], dtype=object), allow_pickle=True)}", 8)
    with pytest.raises(ConfigError, match="must be uint8 images"):
        open_source(f"npy:{_npy(tmp_path, 'f.npy', x.astype(np.float32))}", 8)
    with pytest.raises(ConfigError, match=r"8x8 but the model expects 16x16"):
        open_source(f"npy:{xp}", 16)
    with pytest.raises(ConfigError, match="have 19 entries but there are 20"):
        open_source(f"npy:{xp},{_npy(tmp_path, 'y.npy', np.zeros(19, int))}", 8)
    with pytest.raises(ConfigError, match="negative"):
        open_source(f"npy:{xp},{_npy(tmp_path, 'n.npy', -np.ones(20, int))}", 8)


# ---------------------------------------------------------------------------------------------------------
# released iGPT token arrays
# ---------------------------------------------------------------------------------------------------------
def test_igpt_tokens(tmp_path):
    d = _igpt_dir(tmp_path)
    for spec in (f"igpt:{d}/cifar10", f"igpt:{d}"):
        src = open_source(spec, 8)
        tr, va, te = (src.split(s) for s in ("train", "val", "test"))
        assert (len(tr), len(va), len(te)) == (30, 6, 8) and tr.images is None and src.num_classes == 10
        assert tr.tokens.shape == (30, 64)
        assert np.array_equal(te.labels, np.load(d / "cifar10_teY.npy").argmax(1))
        assert np.array_equal(np.asarray(tr.tokens), np.load(d / "cifar10_trX.npy"))
    with pytest.raises(ConfigError, match=r"holds tokens, not images.*drop --fit-palette"):
        prepare(f"igpt:{d}", str(tmp_path / "out"), resolution=8, fit_palette=True, progress=False)


def test_igpt_errors(tmp_path):
    d = _igpt_dir(tmp_path, hi=600)
    with pytest.raises(ConfigError, match="token ids >= 512"):
        open_source(f"igpt:{d}/cifar10", 8)
    d = _igpt_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"64 tokens per image \(8x8\) but the model expects 1024"):
        open_source(f"igpt:{d}/cifar10", 32)
    os.remove(d / "cifar10_teY.npy")
    with pytest.raises(ConfigError, match="cifar10_teY.npy' does not exist"):
        open_source(f"igpt:{d}/cifar10", 8)
    _igpt_dir(tmp_path, prefix="imagenet")
    with pytest.raises(ConfigError, match=r"several \(cifar10, imagenet\)"):
        open_source(f"igpt:{d}", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        open_source(f"igpt:{tmp_path / 'empty'}", 8)


# ---------------------------------------------------------------------------------------------------------
# prepare + shards
# ---------------------------------------------------------------------------------------------------------
def _shard_stats(out):
    return {f: (os.stat(os.path.join(out, f)).st_ino, os.stat(os.path.join(out, f)).st_mtime_ns)
            for f in os.listdir(out) if f[:1] != "." and f.endswith(".npy") and "labels" not in f}


@pytest.mark.slow
def test_prepare_roundtrip_resume_and_workers(tmp_path, palette_file):
    x = RNG.integers(0, 256, (70, 8, 8, 3), dtype=np.uint8)
    spec = f"npy:{_npy(tmp_path, 'x.npy', x)},{_npy(tmp_path, 'y.npy', RNG.integers(0, 3, 70))}"
    out = str(tmp_path / "shards")
    m = prepare(spec, out, resolution=8, palette=palette_file, shard_size=16, workers=1, progress=False)
    assert m["complete"] and [len(m["splits"][s]["shards"]) for s in ("train", "val")] == [4, 1]
    pal = Palette.load(palette_file)
    src, sh = open_source(spec, 8), open_source(f"shards:{out}", 8)
    for s in ("train", "val", "test"):
        toks = sh.split(s).tokens
        assert toks.dtype == np.uint16 and toks.shape == (len(src.split(s)), 64)
        assert np.array_equal(np.asarray(toks), pal.encode(np.asarray(src.split(s).images)))
        assert np.array_equal(sh.split(s).labels, src.split(s).labels)
    assert isinstance(sh.split("train").tokens, ConcatArray)
    idx = np.array([40, 3, 17, 3])
    assert np.array_equal(sh.split("train").tokens[idx], np.asarray(sh.split("train").tokens)[idx])
    assert open(sh.palette_path, "rb").read() == open(palette_file, "rb").read()

    # resume: delete one shard and leave a half-written temp file: only that shard is redone
    before = _shard_stats(out)
    os.remove(os.path.join(out, "train-00002.npy"))
    stale = os.path.join(out, ".train-00001.npy.tmp-99999")
    open(stale, "wb").write(b"half")
    prepare(spec, out, resolution=8, palette=palette_file, shard_size=16, workers=1, progress=False)
    after = _shard_stats(out)
    assert not os.path.exists(stale)
    assert {f for f in after if after[f] != before.get(f)} == {"train-00002.npy"}
    assert np.array_equal(np.asarray(open_source(f"shards:{out}", 8).split("train").tokens),
                          pal.encode(np.asarray(src.split("train").images)))

    # two worker processes write byte-identical shards
    out2 = str(tmp_path / "shards2")
    m2 = prepare(spec, out2, resolution=8, palette=palette_file, shard_size=16, workers=2, progress=False)
    sha = lambda mm: {s: [e["sha256"] for e in v["shards"]] for s, v in mm["splits"].items()}  # noqa: E731
    assert sha(m2) == sha(json.load(open(os.path.join(out, "manifest.json"))))

    # a different palette into the same directory is refused; nothing is touched
    other = str(tmp_path / "other.npy")
    Palette(np.zeros((512, 3), np.float32)).save(other)
    with pytest.raises(ConfigError, match="different settings \\(palette\\)"):
        prepare(spec, out, resolution=8, palette=other, shard_size=16, progress=False)
    assert _shard_stats(out) == after


def test_prepare_cli_fit_palette_imagefolder(imagefolder, tmp_path):
    out = str(tmp_path / "s")
    rc = prepare_main(["--data", f"imagefolder:{imagefolder}", "--fit-palette", "--resolution", "16", "--out", out,
                       "--shard-size", "4", "--workers", "1", "--val-fraction", "0.2", "--no-progress"])
    assert rc == 0
    pal = Palette.load(os.path.join(out, "palette.npy"))
    src = open_source(f"imagefolder:{imagefolder}", 16, val_fraction=0.2, augment=False)
    sh = open_source(f"shards:{out}", 16)
    for s in ("train", "val", "test"):
        assert np.array_equal(np.asarray(sh.split(s).tokens), pal.encode(np.asarray(src.split(s).images)))
    assert sh.num_classes == 2 and sh.split("test").labels.tolist() == [0, 0, 1, 1]
    # resuming a finished run redoes nothing and keeps the fitted palette
    before = _shard_stats(out)
    prepare_main(["--data", f"imagefolder:{imagefolder}", "--fit-palette", "--resolution", "16", "--out", out,
                  "--shard-size", "4", "--workers", "1", "--val-fraction", "0.2", "--no-progress"])
    assert _shard_stats(out) == before


def test_prepare_tokens_source(tmp_path):
    d = _igpt_dir(tmp_path)
    out = str(tmp_path / "s")
    prepare(f"igpt:{d}/cifar10", out, resolution=8, shard_size=7, progress=False)
    sh = open_source(f"shards:{out}", 8)
    assert sh.palette_path is None
    assert np.array_equal(np.asarray(sh.split("test").tokens), np.load(d / "cifar10_teX.npy"))
    assert np.array_equal(sh.split("train").labels, np.load(d / "cifar10_trY.npy").argmax(1))


def test_prepare_and_shard_errors(tmp_path, palette_file):
    x = RNG.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    spec = f"npy:{_npy(tmp_path, 'x.npy', x)}"
    out = str(tmp_path / "s")
    with pytest.raises(ConfigError, match="needs a palette"):
        prepare(spec, out, resolution=8, progress=False)
    with pytest.raises(ConfigError, match="palette file .* does not exist"):
        prepare(spec, out, resolution=8, palette=str(tmp_path / "none.npy"), progress=False)
    np.save(tmp_path / "bad.npy", np.zeros((512, 4), np.float32))
    with pytest.raises(ConfigError, match=r"\(512, 3\)"):
        prepare(spec, out, resolution=8, palette=str(tmp_path / "bad.npy"), progress=False)
    with pytest.raises(ConfigError, match="8x8 but the model expects 4x4"):
        prepare(spec, out, resolution=4, palette=palette_file, progress=False)
    with pytest.raises(ConfigError, match="distinct colours"):  # too few colours to fit 512
        prepare(f"npy:{_npy(tmp_path, 'z.npy', np.zeros((20, 8, 8, 3), np.uint8))}", out, resolution=8,
                fit_palette=True, progress=False)
    assert not os.path.exists(out)  # bad input leaves nothing behind

    # shards source
    with pytest.raises(ConfigError, match="no manifest.json"):
        os.makedirs(tmp_path / "empty")
        open_source(f"shards:{tmp_path / 'empty'}", 8)
    prepare(spec, out, resolution=8, palette=palette_file, shard_size=8, progress=False)
    with pytest.raises(ConfigError, match="prepared at 8x8 but the model expects 16x16"):
        open_source(f"shards:{out}", 16)
    shard = os.path.join(out, "train-00001.npy")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:-10])
    with pytest.raises(ConfigError, match="train-00001.npy' has .* bytes"):
        open_source(f"shards:{out}", 8)
    os.remove(shard)
    with pytest.raises(ConfigError, match="is missing; re-run `megapix prepare`"):
        open_source(f"shards:{out}", 8)
    mf = os.path.join(out, "manifest.json")
    m = json.load(open(mf))
    m["complete"] = False
    json.dump(m, open(mf, "w"))
    with pytest.raises(ConfigError, match="incomplete"):
        open_source(f"shards:{out}", 8)
    open(mf, "w").write("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        open_source(f"shards:{out}", 8)


# ---------------------------------------------------------------------------------------------------------
# load_splits: the one palette fit / reuse rule
# ---------------------------------------------------------------------------------------------------------
def _cfg(data="synthetic:64", seed=0, palette=None):
    from megapix.config import Config, DataConfig, TrainConfig, model_preset

    return Config(model=model_preset("tiny"), data=DataConfig(source=data, palette=palette),
                  train=TrainConfig(seed=seed))


def test_load_splits_fits_once_and_reuses_only_a_matching_palette(tmp_path, palette_file):
    from megapix.data import fit_palette, load_splits
    from megapix.data.splits import FIT_PIXELS, read_palette_record

    out = str(tmp_path / "run")
    splits, pal = load_splits(_cfg(), out)
    assert set(splits) == {"train", "val", "test"} and pal.centres.shape == (512, 3)
    rec = read_palette_record(out)
    assert rec["from"] == "fit" and rec["data"] == "synthetic:64" and rec["seed"] == 0
    assert rec["fit"]["max_pixels"] == FIT_PIXELS and rec["sample"]["images"] == len(splits["train"])
    saved = os.path.join(out, "palette.npy")
    # the one rule: the same palette as fit_palette and as `megapix prepare --fit-palette`
    assert np.array_equal(pal.centres, fit_palette(splits["train"].split.images, 0).centres)
    prepare("synthetic:64", str(tmp_path / "shards"), resolution=8, fit_palette=True, progress=False)
    assert np.array_equal(Palette.load(str(tmp_path / "shards" / "palette.npy")).centres, pal.centres)
    assert len(np.unique(splits["train"].tokens(np.arange(8)))) > 1

    before = open(saved, "rb").read(), os.path.getmtime(saved)
    _, again = load_splits(_cfg(), out)  # same spec and settings: reused, not rewritten
    assert np.array_equal(again.centres, pal.centres) and (open(saved, "rb").read(), os.path.getmtime(saved)) == before

    for cfg, words in ((_cfg("synthetic:80"), "'synthetic:64'.*'synthetic:80'"), (_cfg(seed=1), "seed 0.*seed 1"),
                       (_cfg(palette=palette_file), "differs from --palette")):
        with pytest.raises(ConfigError, match=words) as e:
            load_splits(cfg, out)
        assert "choose another --out" in str(e.value) and "--palette" in str(e.value) and "\n" not in str(e.value)
        assert open(saved, "rb").read() == before[0]  # never overwritten

    # an edited palette.npy no longer matches its record: refused; passing it explicitly accepts it as it is
    Palette(np.zeros((512, 3), np.float32)).save(saved)
    with pytest.raises(ConfigError, match="no matching record"):
        load_splits(_cfg(), out)
    _, used = load_splits(_cfg(palette=saved), out)
    assert not used.centres.any() and read_palette_record(out)["from"] == saved


def test_load_splits_palette_file_and_leftovers(tmp_path, palette_file):
    from megapix.data import load_splits
    from megapix.data.splits import read_palette_record

    out = tmp_path / "run"
    _, pal = load_splits(_cfg(palette=palette_file), str(out))  # copied into the run with its record
    assert open(out / "palette.npy", "rb").read() == open(palette_file, "rb").read()
    assert read_palette_record(str(out))["from"] == palette_file
    with pytest.raises(ConfigError, match="copied from --palette.*this run would fit"):
        load_splits(_cfg(), str(out))
    # a palette.npy with no record (an older run, another tool): refused, named, left alone
    old = tmp_path / "old"
    old.mkdir()
    Palette.load(palette_file).save(str(old / "palette.npy"))
    with pytest.raises(ConfigError, match=r"no matching record.*old/palette.npy to train on the palette already there"):
        load_splits(_cfg(), str(old))
    # token sources need no palette and write nothing
    d = _igpt_dir(tmp_path)
    splits, none = load_splits(_cfg(f"igpt:{d}/cifar10"), str(tmp_path / "tok"))
    assert none is None and not (tmp_path / "tok").exists() and len(splits["train"]) == 30
    # a data error leaves no --out behind
    with pytest.raises(ConfigError):
        load_splits(_cfg(f"npy:{tmp_path}/missing.npy"), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def _two_ranks(rank, out, port, results):
    import torch.distributed as tdist

    from megapix.data import load_splits

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for data in ("synthetic:64", "synthetic:80"):  # the second run's data differs from the saved palette's
            try:
                _, pal = load_splits(_cfg(data), out)
                results[(data, rank)] = ("ok", pal.centres.tobytes())
            except ConfigError as e:
                results[(data, rank)] = ("ConfigError", str(e))
            tdist.barrier()
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_load_splits_two_ranks_fit_once_and_share_errors(tmp_path):
    """Rank 0 fits while rank 1 waits and reads the same file; a refusal on rank 0 is a one-line ConfigError on
    every rank (no rank left waiting)."""
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = tmp.Manager().dict()
    tmp.spawn(_two_ranks, args=(str(tmp_path / "run"), port, results), nprocs=2, join=True)
    for data, expect in (("synthetic:64", "ok"), ("synthetic:80", "ConfigError")):
        assert results[(data, 0)][0] == results[(data, 1)][0] == expect, dict(results)
        assert results[(data, 0)][1] == results[(data, 1)][1]
    assert "'synthetic:64'" in results[("synthetic:80", 1)][1] and "'synthetic:80'" in results[("synthetic:80", 1)][1]


# ---------------------------------------------------------------------------------------------------------
# the DataLoader path
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_microbatches_same_for_any_workers_and_across_resume(imagefolder, palette_file):
    """ImageFolder with the paper's random crops, encoded in DataLoader workers: the same (tokens, mask) for 0
    and 2 workers, for a fresh loader started at step k (resume), and after a jump back."""
    from megapix.data.loader import GlobalBatches, MicroBatches, TokenData

    src = open_source(f"imagefolder:{imagefolder}", 8, val_fraction=0.2, seed=0)
    data = TokenData(src.split("train"), 64, Palette.load(palette_file), "train")
    sched = GlobalBatches(len(data), 4, seed=3)  # 8 images, global batch 4: steps 0..5 cross 3 epochs

    def run(workers, steps, dp_rank=1):
        mb = MicroBatches(data, sched, dp_rank, 2, 1, 0.25, seed=3, num_workers=workers)
        out = [mb(s) for s in steps]
        mb.close()
        return out

    ref = run(0, range(6))
    assert len(ref[0]) == 2 and ref[0][0][0].shape == (1, 64) and ref[0][0][1].shape == (1, 64)
    assert not torch.equal(ref[0][0][0], ref[2][0][0])  # another epoch: other crops (or images)
    for got in (run(2, range(6)), run(1, range(6))):
        for a, b in zip(ref, got):
            for (ta, ma), (tb, mb_) in zip(a, b):
                assert torch.equal(ta, tb) and torch.equal(ma, mb_)
    resumed = run(2, [3, 4, 5, 1])  # resume at 3, then a jump back restarts the loader
    for a, b in zip([ref[3], ref[4], ref[5], ref[1]], resumed):
        assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    with pytest.raises(ConfigError, match="num_workers"):
        MicroBatches(data, sched, 0, 2, 1, None, seed=3, num_workers=-1)


def test_digits_read_without_scikit_learn_equal_its_load_digits():
    """megapix.data.embedded.load_digits reads scikit-learn's file directly (no 3 s import): the same arrays."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    from megapix.data.embedded import load_digits

    images, labels = load_digits()
    d = sklearn_load_digits()
    np.testing.assert_array_equal(images, d.images)
    np.testing.assert_array_equal(labels, d.target)
    assert images.dtype == np.float64 and labels.dtype == np.int64
