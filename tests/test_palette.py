"""The 9-bit palette: fit/save/load, encode identical to Hugging Face's ImageGPTImageProcessor, decode, errors."""
from __future__ import annotations

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
