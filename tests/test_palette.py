"""The 9-bit palette: fit/save/load, encode identical to Hugging Face's ImageGPTImageProcessor, decode, errors."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from megapix.config import ConfigError
from megapix.data.palette import Palette
from megapix.data.sources import open_source


def hf_ids(images: np.ndarray, centres: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import ImageGPTImageProcessor

        proc = ImageGPTImageProcessor(clusters=centres, do_resize=False)
        return np.asarray(proc(list(images), return_tensors="np")["input_ids"])


@pytest.fixture(scope="module")
def digits():
    return open_source("digits", 8, seed=0).split("train").images


@pytest.fixture(scope="module")
def fitted(digits):
    return Palette.fit(digits[:200], k=512, seed=0)  # 12800 pixels: enough colours, fast


def test_fit_save_load_roundtrip(fitted, digits, tmp_path):
    assert fitted.centres.shape == (512, 3) and fitted.centres.dtype == np.float32
    assert np.abs(fitted.centres).max() <= 1.0
    p = str(tmp_path / "kmeans_centers.npy")
    fitted.save(p)
    again = Palette.load(p)
    assert np.array_equal(again.centres, fitted.centres)
    assert np.array_equal(again.encode(digits[:50]), fitted.encode(digits[:50]))
    assert np.load(p, allow_pickle=False).shape == (512, 3)  # the released kmeans_centers.npy format
    assert np.array_equal(Palette.fit(digits[:200], k=512, seed=0).centres, fitted.centres)  # seeded


def test_encode_matches_hf_on_digits(fitted, digits):
    ids = fitted.encode(digits)
    assert ids.dtype == np.int64 and ids.shape == (len(digits), 64)
    assert np.array_equal(ids, hf_ids(digits, fitted.centres))


def test_encode_matches_hf_on_random_images():
    rng = np.random.default_rng(7)
    centres = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    pal = Palette(centres)
    imgs = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    # plus one image where every channel takes all 256 byte values (the normalisation's whole domain)
    y, x = np.mgrid[0:256, 0:256]
    grid = np.stack([x, y, (7 * x + 13 * y) % 256], -1).astype(np.uint8)[None]
    for batch in (imgs, grid):
        cold = pal.encode(batch)  # first call fills the table
        assert np.array_equal(cold, hf_ids(batch, centres))
        assert np.array_equal(pal.encode(batch), cold)  # warm call: table lookups only


def test_decode():
    rng = np.random.default_rng(1)
    centres = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    pal = Palette(centres)
    tok = rng.integers(0, 512, (3, 16))
    out = pal.decode(tok, 4, 4)
    assert out.dtype == np.uint8 and out.shape == (3, 4, 4, 3)
    assert np.array_equal(out, np.rint(127.5 * (centres[tok] + 1)).astype(np.uint8).reshape(3, 4, 4, 3))
    with pytest.raises(ConfigError, match="token ids must lie in"):
        pal.decode(np.full((1, 16), 512), 4, 4)


@pytest.mark.parametrize("shape", [(512, 4), (600, 3), (511, 3), (1, 3), (3,)])
def test_bad_palette_shapes(tmp_path, shape):
    """The model has 512 outputs: a palette of any other size is refused on load and on construction."""
    p = tmp_path / "p.npy"
    np.save(p, np.zeros(shape, np.float32))
    with pytest.raises(ConfigError, match=r"p\.npy' must have shape \(512, 3\)") as e:
        Palette.load(str(p))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"shape \(512, 3\)"):
        Palette(np.zeros(shape, np.float32))
    if shape[0] != 512:
        with pytest.raises(ConfigError, match="exactly 512 colours"):
            Palette.fit(np.zeros((4, 8, 8, 3), np.uint8), k=shape[0])


def test_bad_palette_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Palette.load(str(tmp_path / "missing.npy"))
    (tmp_path / "c.npy").write_bytes(b"\x93NUMPY corrupt")
    with pytest.raises(ConfigError, match="not a readable .npy"):
        Palette.load(str(tmp_path / "c.npy"))
    np.save(tmp_path / "r.npy", np.full((512, 3), 3.0, np.float32))
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        Palette.load(str(tmp_path / "r.npy"))


def test_fit_needs_enough_colours():
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    imgs[:, :4] = [255, 0, 0]
    with pytest.raises(ConfigError, match="only 2 distinct colours to fit 512"):
        Palette.fit(imgs, k=512)
    with pytest.raises(ConfigError, match="uint8"):
        Palette.fit(imgs.astype(np.float32))


def test_normalisation_matches_hf_on_every_byte_value():
    """Ids can only differ where the scaled pixel values differ: check all 256 byte values bit for bit."""
    from megapix.data.palette import _normalise

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import ImageGPTImageProcessor

        proc = ImageGPTImageProcessor(clusters=np.zeros((512, 3), np.float32), do_resize=False,
                                      do_color_quantize=False)
    v = np.arange(256, dtype=np.uint8)
    img = np.stack([v, v[::-1], v], -1).reshape(1, 16, 16, 3)
    hf = np.asarray(proc(list(img), return_tensors="np")["pixel_values"])[0]  # [3, 16, 16]
    ours = _normalise(img).numpy().reshape(16, 16, 3).transpose(2, 0, 1)
    assert hf.dtype == np.float32 and np.array_equal(hf.view(np.int32), ours.view(np.int32))


# ---------------------------------------------------------------------------------------------------------
# the pruned exact search, the whole table, and its cache
# ---------------------------------------------------------------------------------------------------------
def _hf_full_search(keys, centres):
    """HF's arithmetic over all 512 centres (megapix's reference implementation of it, checked above)."""
    import torch

    from megapix.data.palette import _nearest, _normalise, _unpack

    return _nearest(_normalise(_unpack(keys)), torch.from_numpy(centres)).numpy()


def _tie_centres(seed=3):
    """Random centres plus exact duplicates and centres on the byte grid: ties must keep the lowest index."""
    from megapix.data.palette import _NORM

    rng = np.random.default_rng(seed)
    c = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    c[300], c[400] = c[5], c[5]  # duplicates: HF's argmin returns 5
    c[10:20] = _NORM[rng.integers(0, 256, (10, 3))]  # exactly on colours: distance 0
    c[20], c[21] = _NORM[[100, 100, 100]], _NORM[[102, 100, 100]]  # a colour exactly between two centres
    return c


@pytest.fixture(scope="module")
def full_table():
    from megapix.data.palette import _Search

    centres = _tie_centres()
    search = _Search(centres)
    assert search.exact  # on this machine the pruned search reproduces torch.matmul's arithmetic
    return centres, search.table()


def test_full_table_equals_full_search(full_table):
    from megapix.data.palette import _NB, _SIDE, _Search, _cell_of

    centres, table = full_table
    assert table.shape == (1 << 24,) and table.dtype == np.int16
    rng = np.random.default_rng(0)
    search = _Search(centres)
    worst = np.argsort(search.count)[-3:]  # the cells with the most candidates, whole
    off = np.stack(np.meshgrid(*[np.arange(_SIDE)] * 3, indexing="ij"), -1).reshape(-1, 3)
    cells = []
    for c in worst:
        r, g, b = c // (_NB * _NB), (c // _NB) % _NB, c % _NB
        rgb = off + np.array([r, g, b]) * _SIDE
        cells.append((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2])
    ties = np.array([(101 << 16) | (100 << 8) | 100])  # equidistant from centres 20 and 21
    keys = np.concatenate([rng.integers(0, 1 << 24, 1 << 17), *cells, ties, np.arange(256) * 0x010101])
    assert np.all(_cell_of(cells[0]) == worst[0])
    ref = _hf_full_search(keys, centres)
    assert np.array_equal(table[keys], ref)
    assert np.array_equal(search(keys), ref)  # the on-demand path
    assert table[ties[0]] == ref[-257] and ref[-257] in (20, 21)


def test_encode_with_ties_matches_hf():
    centres = _tie_centres()
    # an image holding the exact colours of the duplicated/on-grid centres and random ones
    on = np.rint((centres[[5, 10, 11, 20, 21]] + 1) * 127.5).astype(np.uint8)
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    img[0, 0, :5] = on
    img[0, 1, 0] = [101, 100, 100]
    assert np.array_equal(Palette(centres).encode(img), hf_ids(img, centres))


def test_search_falls_back_when_the_arithmetic_differs(monkeypatch):
    """Where the kernel's dot product is not the fused chain (another BLAS), the full search is used."""
    import megapix.data.palette as pal

    def plain(x, c):  # no fused multiply-add: differs from torch.matmul in the last bit for many pairs
        return (x[..., 0] * c[..., 0] + x[..., 1] * c[..., 1]) + x[..., 2] * c[..., 2]

    monkeypatch.setattr(pal, "_dot_chain", plain)
    centres = _tie_centres()
    search = pal._Search(centres)
    assert not search.exact
    keys = np.random.default_rng(1).integers(0, 1 << 24, 4096)
    assert np.array_equal(search(keys), _hf_full_search(keys, centres))


def test_table_cache_beside_the_palette_file(full_table, tmp_path, monkeypatch):
    import megapix.data.palette as pal

    centres, table = full_table
    path = str(tmp_path / "kmeans_centers.npy")
    Palette(centres).save(path)
    p = Palette.load(path)
    assert p.lut_path == str(tmp_path / "kmeans_centers.lut.npz")
    monkeypatch.setattr(pal._Search, "table", lambda self: table)  # the build itself is tested above
    p.build_table()
    assert os.path.isfile(p.lut_path) and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]

    def no_search(*a, **k):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr(pal, "_Search", no_search)
    img = np.random.default_rng(2).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    cold = Palette.load(path).encode(img)  # a fresh process: a lookup in the cached table
    assert np.array_equal(cold, hf_ids(img, centres))

    # never trusted when it does not check out: other centres (key), a torn file, out-of-range ids
    other = centres.copy()
    other[0] = 0.5
    Palette(other).save(path)
    with pytest.raises(AssertionError, match="cached table"):
        Palette.load(path).encode(img)
    Palette(centres).save(path)
    z = open(p.lut_path, "rb").read()
    with open(p.lut_path, "wb") as f:
        f.write(z[: len(z) // 2])
    with pytest.raises(AssertionError, match="cached table"):
        Palette.load(path).encode(img)
    bad = table.copy()
    bad[0] = 600
    np.savez(p.lut_path, key=np.frombuffer(Palette(centres).lut_key(), np.uint8), ids=bad)
    with pytest.raises(AssertionError, match="cached table"):
        Palette.load(path).encode(img)


def test_file_palette_builds_the_whole_table_after_enough_colours(full_table, tmp_path, monkeypatch):
    import megapix.data.palette as pal

    centres, table = full_table
    monkeypatch.setattr(pal, "LUT_FULL_AFTER", 3000)
    monkeypatch.setattr(pal._Search, "table", lambda self: table)  # the build itself is tested above
    built = []
    real = pal.Palette.build_table
    monkeypatch.setattr(pal.Palette, "build_table", lambda self: built.append(1) or real(self))
    rng = np.random.default_rng(9)
    path = str(tmp_path / "p.npy")
    Palette(centres).save(path)
    p = Palette.load(path)
    small = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    p.encode(small)
    assert not built  # a few colours: quantised on demand
    big = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(p.encode(big), hf_ids(big, centres)) and built == [1]
    assert p._full and os.path.isfile(p.lut_path)  # whole, and cached for the next process
    fresh = Palette(centres)  # no file: never builds the whole table
    fresh.encode(big)
    assert not fresh._full
