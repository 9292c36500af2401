"""wds: and parquet: sources (megapix/data/sharded.py): the same images as an ImageFolder of the same files, the
spec's options, damaged shards refused in one line or skipped and counted. Shards are written with
webdataset's TarWriter and pyarrow's own Parquet writer."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from megapix.config import ConfigError
from megapix.data.sources import open_source
from megapix.errors import DataError

N_CLASSES, PER_CLASS, TEST_PER_CLASS = 3, 8, 2


def _jpeg(rng, side: int) -> bytes:
    from PIL import Image

    img = rng.integers(0, 256, (side, side + 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_all(root: str, split: str, items: list[tuple[str, int, bytes]], shards: int) -> None:
    """The same JPEG bytes as an ImageFolder tree, webdataset tar shards and Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    for name, label, data in items:
        d = os.path.join(root, "folder", "train" if split == "train" else "val", f"c{label}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{name}.jpg"), "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(root, "wds"), exist_ok=True)
    os.makedirs(os.path.join(root, "pq"), exist_ok=True)
    # ImageFolder's order: by class folder, then file name; the shards keep it so the rows line up
    items = sorted(items, key=lambda t: (t[1], t[0]))
    for s, part in enumerate(np.array_split(np.arange(len(items)), shards)):
        with wds.TarWriter(os.path.join(root, "wds", f"{split}-{s:04d}.tar")) as sink:
            for i in part:
                name, label, data = items[i]
                sink.write({"__key__": name, "jpg": data, "cls": label})
        table = pa.table({"image": pa.array([{"bytes": items[i][2], "path": items[i][0]} for i in part]),
                          "label": pa.array([items[i][1] for i in part], pa.int64())})
        pq.write_table(table, os.path.join(root, "pq", f"{split}-{s:04d}.parquet"), row_group_size=5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sharded"))
    rng = np.random.default_rng(0)
    for split, per in (("train", PER_CLASS), ("test", TEST_PER_CLASS)):
        items = [(f"{split}{c}_{k:03d}", c, _jpeg(rng, 20 + k)) for c in range(N_CLASSES) for k in range(per)]
        _write_all(root, split, items, shards=3 if split == "train" else 1)
    return root


def _specs(root: str) -> dict:
    return {"imagefolder": f"imagefolder:{root}/folder",
            "wds": f"wds:{root}/wds/train-{{0000..0002}}.tar;test={root}/wds/test-*.tar",
            "parquet": f"parquet:{root}/pq/train-*.parquet;test={root}/pq/test-0000.parquet"}


def test_same_images_and_labels_as_the_folder(dataset):
    """Every split (eval view) and the train split's augmented view are the folder's, pixel for pixel."""
    srcs = {k: open_source(v, 8, None, 0) for k, v in _specs(dataset).items()}
    ref = srcs.pop("imagefolder")
    for name, src in srcs.items():
        assert src.num_classes == ref.num_classes == N_CLASSES, name
        for split in ("train", "val", "test"):
            a, b = ref.split(split), src.split(split)
            np.testing.assert_array_equal(a.labels, b.labels, err_msg=f"{name} {split}")
            np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images), err_msg=f"{name} {split}")
        idx = np.array([5, 0, 3])
        np.testing.assert_array_equal(ref.split("train").images.batch(idx, 2, 7),
                                      src.split("train").images.batch(idx, 2, 7), err_msg=name)


def test_bad_specs_are_one_line(dataset, tmp_path):
    cases = [
        (f"wds:{tmp_path}/nothing-{{0..3}}.tar", ConfigError, "no file matches"),
        (f"wds:{dataset}/wds/train-0000.tar;colour=red", ConfigError, "unknown option"),
        (f"wds:{dataset}/wds/train-0000.tar;image=png", DataError, "no image member"),
        (f"parquet:{dataset}/pq/train-0000.parquet;image=pixels", DataError, "has no column 'pixels'"),
        (f"parquet:{dataset}/pq/train-0000.parquet;label=fine", DataError, "has no column 'fine'"),
        ("wds:", ConfigError, "needs a file pattern"),
    ]
    for spec, err, words in cases:
        with pytest.raises(err, match=words) as e:
            open_source(spec, 8)
        assert "\n" not in str(e.value), spec


def _copy_truncated(src: str, dst: str, keep: float) -> None:
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[:int(len(data) * keep)])


def test_truncated_tar_refused_or_skipped(dataset, tmp_path):
    bad = str(tmp_path / "train-0000.tar")
    _copy_truncated(f"{dataset}/wds/train-0000.tar", bad, 0.6)
    with pytest.raises(DataError, match=r"train-0000.tar.*truncated.*--skip-corrupt"):
        open_source(f"wds:{bad}", 8)
    whole = open_source(f"wds:{dataset}/wds/train-0000.tar", 8, val_fraction=0.0)
    with pytest.warns(UserWarning, match="skipped"):
        src = open_source(f"wds:{bad}", 8, val_fraction=0.0, skip_corrupt=True)
    assert src.skipped == 1 and 0 < len(src.split("train")) < len(whole.split("train"))
    n = len(src.split("train"))
    np.testing.assert_array_equal(np.asarray(src.split("train").images), np.asarray(whole.split("train").images)[:n])


def test_undecodable_member_refused_or_replaced(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(1)
    good = [_jpeg(rng, 16) for _ in range(4)]
    path = str(tmp_path / "s.tar")
    with wds.TarWriter(path) as sink:
        for i, data in enumerate(good[:2] + [b"not a jpeg"] + good[2:]):
            sink.write({"__key__": f"k{i}", "jpg": data, "cls": i % 2})
    src = open_source(f"wds:{path}", 8, val_fraction=0.0)
    with pytest.raises(DataError, match=r"s.tar member at byte \d+: does not decode.*--skip-corrupt"):
        np.asarray(src.split("train").images)
    skip = open_source(f"wds:{path};skip-corrupt", 8, val_fraction=0.0)
    with pytest.warns(UserWarning, match="does not decode"):
        imgs = np.asarray(skip.split("train").images)
    assert skip.skipped == 1 and len(imgs) == 5
    np.testing.assert_array_equal(imgs[2], imgs[3])  # the damaged one gave way to the next image


def test_damaged_parquet_refused_or_skipped(dataset, tmp_path):
    import shutil

    shutil.copy(f"{dataset}/pq/train-0000.parquet", tmp_path / "train-0000.parquet")
    _copy_truncated(f"{dataset}/pq/train-0001.parquet", str(tmp_path / "train-0001.parquet"), 0.5)
    with pytest.raises(DataError, match=r"train-0001.parquet: not a readable Parquet file.*--skip-corrupt"):
        open_source(f"parquet:{tmp_path}/train-*.parquet", 8)
    with pytest.warns(UserWarning, match="skipped"):
        src = open_source(f"parquet:{tmp_path}/train-*.parquet;skip-corrupt", 8, val_fraction=0.0)
    one = open_source(f"parquet:{tmp_path}/train-0000.parquet", 8, val_fraction=0.0)
    assert src.skipped == 1 and len(src.split("train")) == len(one.split("train"))


def _damage_first_header(path: str) -> None:
    """Break the checksum of a tar's first header: tarfile refuses the file, the members' bytes are intact."""
    with open(path, "r+b") as f:
        f.seek(148)  # the header's chksum field
        f.write(b"0000000\0")


@pytest.mark.slow
def test_prepare_workers_reuse_the_driver_index(dataset, tmp_path, monkeypatch):
    """prepare's worker processes read through the index the driver built (Source.for_workers): the shards are
    byte-identical with 1 and 2 workers, and for wds: no worker reads a tar header. Once the driver has indexed
    the tars their headers are damaged, so a worker that indexed them again would fail (DataError).
    With workers, the driver builds the palette's colour table for them once it covers the pixels to encode
    (LUT_FULL_AFTER, lowered here): it is cached in --out and gives the same ids as the on-demand search."""
    import shutil

    from megapix.data import prepare as prep

    pal = str(tmp_path / "pal.npy")
    np.save(pal, np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    copy = tmp_path / "wds"
    shutil.copytree(f"{dataset}/wds", copy)
    specs = {"wds": f"wds:{copy}/train-{{0000..0002}}.tar;test={copy}/test-*.tar",
             "parquet": _specs(dataset)["parquet"]}
    sha = lambda m: {s: [e["sha256"] for e in v["shards"]] for s, v in m["splits"].items()}  # noqa: E731
    one = {k: prep.prepare(spec, str(tmp_path / f"{k}-1"), resolution=8, palette=pal, shard_size=10, workers=1,
                           progress=False) for k, spec in specs.items()}

    opened = prep._checked_source

    def then_damage(spec, *args):
        out = opened(spec, *args)
        if spec.startswith("wds:"):
            for f in copy.iterdir():
                _damage_first_header(str(f))
        return out

    monkeypatch.setattr(prep, "_checked_source", then_damage)
    monkeypatch.setattr(prep, "LUT_FULL_AFTER", 1)
    for k, spec in specs.items():
        assert not (tmp_path / f"{k}-1" / "palette.lut.npz").exists()  # one process: the search, on demand
        two = prep.prepare(spec, str(tmp_path / f"{k}-2"), resolution=8, palette=pal, shard_size=10, workers=2,
                           progress=False)
        assert len(two["splits"]["train"]["shards"]) > 1 and sha(two) == sha(one[k]), k
        assert (tmp_path / f"{k}-2" / "palette.lut.npz").is_file(), k
    with pytest.raises(DataError, match="not a readable tar shard"):  # what a worker's re-indexing would meet
        open_source(specs["wds"], 8)


@pytest.mark.slow
def test_prepare_and_train_from_shards(dataset, tmp_path, tiny_config):
    """`megapix prepare` on wds: and parquet: gives the folder's tokens (wds with 2 worker processes); training
    reads wds: directly with the folder's loss curve, extract parquet: with the folder's features; --skip-corrupt
    is counted in the manifest."""
    from conftest import run

    pal = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
    np.save(tmp_path / "pal.npy", pal)
    tokens = {}
    for name, spec in _specs(dataset).items():
        out = tmp_path / f"prep-{name}"
        r = run(["-m", "megapix", "prepare", "--data", spec, "--out", str(out), "--resolution", "8", "--palette",
                 str(tmp_path / "pal.npy"), "--workers", "2" if name == "wds" else "1", "--shard-size", "10",
                 "--no-progress"])
        assert r.returncode == 0, r.stderr[-2000:]
        src = open_source(f"shards:{out}", 8)
        tokens[name] = [np.asarray(src.split(s).tokens) for s in ("train", "val", "test")]
    for name in ("wds", "parquet"):
        for a, b in zip(tokens["imagefolder"], tokens[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)

    bad = tmp_path / "bad"
    bad.mkdir()
    _copy_truncated(f"{dataset}/wds/train-0001.tar", str(bad / "train-0001.tar"), 0.6)
    spec = f"wds:{{{dataset}/wds/train-0000.tar,{bad}/train-0001.tar}}"
    r = run(["-m", "megapix", "prepare", "--data", spec, "--out", str(tmp_path / "p-bad"), "--resolution", "8",
             "--palette", str(tmp_path / "pal.npy"), "--workers", "1", "--no-progress"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--skip-corrupt" in r.stderr, r.stderr
    assert not (tmp_path / "p-bad" / "manifest.json").exists()
    r = run(["-m", "megapix", "prepare", "--data", spec, "--out", str(tmp_path / "p-bad"), "--resolution", "8",
             "--palette", str(tmp_path / "pal.npy"), "--workers", "1", "--no-progress", "--skip-corrupt"])
    assert r.returncode == 0 and "1 damaged samples skipped" in r.stdout, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "p-bad" / "manifest.json").read_text())
    assert manifest["skipped"] == {"indexing": 1, "decoding": 0} and manifest["settings"]["skip_corrupt"]

    losses = {}
    for name in ("imagefolder", "wds"):
        out = tmp_path / f"run-{name}"
        r = run(["megapix/train.py", "--config", tiny_config, "--out", str(out), "--data", _specs(dataset)[name],
                 "--palette", str(tmp_path / "pal.npy"), "--resolution", "8", "--max-steps", "3", "--no-samples",
                 "--eval-every", "0"])
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                        if "loss" in m]
    assert len(losses["wds"]) == 3 and losses["wds"] == losses["imagefolder"]

    feats = {}
    for name in ("imagefolder", "parquet"):  # extract reads a sharded source as the folder
        out = tmp_path / f"feat-{name}"
        r = run(["-m", "megapix", "extract", "--checkpoint", str(tmp_path / "run-wds"), "--data", _specs(dataset)[name],
                 "--layers", "1", "--splits", "test", "--out", str(out)])
        assert r.returncode == 0, r.stderr[-3000:]
        feats[name] = np.load(out / "test_features.npy")
    np.testing.assert_array_equal(feats["imagefolder"], feats["parquet"])
