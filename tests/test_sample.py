"""KV-cache sampling equals sampling with full forward passes; completions keep their prefix; PNG grids."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megapix.config import ConfigError, ModelConfig
from megapix.model.igpt import ImageGPT
from megapix.sample import completion_grid, generate, save_png

CONFIG = dict(n_layer=2, d_model=64, n_head=4, resolution=8)


@pytest.fixture(scope="module")
def model():
    m = ImageGPT(ModelConfig(**CONFIG)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else (0.3 if name == "head.weight" else 0.1) * noise)
    return m


@torch.no_grad()
def reference_generate(model, prefix, temperature=1.0, top_k=None, generator=None):
    """The slow way: one full forward pass per new token, the same sampling arithmetic as generate()."""
    B, P = prefix.shape
    out = torch.zeros(B, model.config.n_ctx, dtype=torch.long)
    out[:, :P] = prefix
    for pos in range(P, model.config.n_ctx):
        logits = model(out[:, : pos + 1])[:, pos].float() / max(temperature, 1e-6)  # token pos is not seen
        if top_k:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        out[:, pos] = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
    return out


def test_cached_step_logits_equal_the_full_forward(model):
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = model.kv_cache()
        chunks = [model(tokens[:, :20], cache=cache)]  # a 20-position prefix at once, then one position at a time
        assert len(cache[0]) == 20 and chunks[0].shape == (2, 20, 512)
        for pos in range(20, 64):
            chunks.append(model(tokens[:, : pos + 1], cache=cache))
        # several positions past a non-empty cache at once: causal among themselves, all of the cache visible
        cache = model.kv_cache()
        chunks2 = [model(tokens[:, :7], cache=cache), model(tokens[:, :30], cache=cache), model(tokens, cache=cache)]
    cached = torch.cat(chunks, 1)
    assert full.abs().max() > 0.1
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(chunks2, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_needs_an_autoregressive_model():
    with pytest.raises(ConfigError, match="autoregressive"):
        ImageGPT(ModelConfig(**CONFIG, objective="bert")).kv_cache()


@pytest.mark.parametrize("prefix_len,temperature,top_k", [(0, 1.0, None), (24, 1.0, None), (5, 0.7, 40)])
def test_kv_cache_sampling_equals_full_forward_sampling(model, prefix_len, temperature, top_k):
    prefix = torch.randint(0, 512, (3, prefix_len), generator=torch.Generator().manual_seed(2))
    fast = generate(model, prefix, temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(7))
    slow = reference_generate(model, prefix, temperature, top_k, generator=torch.Generator().manual_seed(7))
    assert fast.shape == (3, 64) and fast.dtype == torch.long
    assert torch.equal(fast, slow)
    assert torch.equal(fast[:, :prefix_len], prefix)  # the completion keeps the given prefix
    assert fast.min() >= 0 and fast.max() < 512
    # Different seeds give different samples (the comparison above is not of a constant).
    other = generate(model, prefix, temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other[:, prefix_len:], fast[:, prefix_len:])


def test_top_k_restricts_to_the_k_most_likely(model):
    out = generate(model, torch.empty(4, 0, dtype=torch.long), top_k=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(out)
    assert torch.equal(out, logits.argmax(-1))  # top_k=1 is greedy decoding


def test_bert_models_cannot_sample():
    bert = ImageGPT(ModelConfig(**CONFIG, objective="bert"))
    with pytest.raises(ConfigError, match="autoregressive"):
        generate(bert, torch.empty(1, 0, dtype=torch.long))


class GreyPalette:
    """A stand-in palette: id -> grey level, enough to check the grid layout."""

    def decode(self, tokens, h, w):
        t = np.asarray(tokens).reshape(-1, h, w)
        return np.repeat((t % 256).astype(np.uint8)[..., None], 3, axis=-1)


def test_completion_grid_and_png(model, tmp_path):
    held = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(3))
    grid = completion_grid(model, GreyPalette(), held, n_uncond=4, seed=0)
    res, pad = 8, 1
    assert grid.dtype == np.uint8 and grid.shape == (3 * (res + pad) + pad, 4 * (res + pad) + pad, 3)
    # Each row: three completions of the top half, then the original; the top halves are all the original's.
    for r in range(2):
        y = pad + r * (res + pad)
        original = grid[y : y + res, pad + 3 * (res + pad) : pad + 3 * (res + pad) + res]
        assert np.array_equal(original[..., 0], (held[r].numpy().reshape(8, 8) % 256).astype(np.uint8))
        for c in range(3):
            x = pad + c * (res + pad)
            assert np.array_equal(grid[y : y + res // 2, x : x + res], original[: res // 2])
    path = tmp_path / "grid.png"
    save_png(grid, str(path), scale=3)
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (grid.shape[1] * 3, grid.shape[0] * 3)
        assert np.array_equal(np.asarray(img)[::3, ::3], grid)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # written atomically, no temp files left


def test_png_replaces_only_its_own_pictures(tmp_path):
    """A grid may replace the PNG megapix wrote there before (a rerun), never a user's picture of the same name."""
    from PIL import Image

    from megapix.config import ConfigError

    grid = np.zeros((4, 4, 3), np.uint8)
    ours = tmp_path / "samples.png"
    save_png(grid, str(ours))
    save_png(grid + 7, str(ours))  # a rerun: a new version of our own file
    with Image.open(ours) as img:
        assert np.asarray(img)[0, 0, 0] == 7
    theirs = tmp_path / "photo.png"
    Image.fromarray(grid + 200).save(theirs)
    before = theirs.read_bytes()
    with pytest.raises(ConfigError, match="not written by megapix"):
        save_png(grid, str(theirs))
    assert theirs.read_bytes() == before


def test_annotated_grid_has_captions_and_half_marks():
    from megapix.sample import annotated

    res, pad, rows, cols = 8, 1, 3, 4
    grid = np.full((rows * (res + pad) + pad, cols * (res + pad) + pad, 3), 128, np.uint8)
    img = annotated(grid, res)
    scale, band = 8, 14  # tiles scaled to at least 64 px
    assert img.shape == (grid.shape[0] * scale + 2 * band, grid.shape[1] * scale, 3)
    assert (img[:band] < 100).any()  # the column captions' ink above the first row
    # a red tick in the gutter left of the first completion where the given top half ends
    y = band + pad * scale + (res // 2) * scale
    assert tuple(img[y, 0]) == (255, 0, 0) and tuple(img[y - 3 * scale, 0]) != (255, 0, 0)


@pytest.mark.slow
def test_sample_draws_a_new_picture_each_call_and_a_resume_without_steps_keeps_samples_png(tiny_config, tmp_path):
    import re

    from conftest import run

    out = tmp_path / "run"
    train = ["megapix/train.py", "--config", tiny_config, "--out", str(out), "--max-steps", "2", "--eval-every", "0"]
    first = run(train)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "megapix: sampling" in first.stdout and "megapix: wrote" in first.stdout  # not silent
    before = (out / "samples.png").read_bytes()
    again = run([*train, "--resume"])  # a finished run: no step to train, the picture stays
    assert again.returncode == 0 and "already shows step 2; not sampled again" in again.stdout, again.stdout[-2000:]
    assert (out / "samples.png").read_bytes() == before
    pngs, seeds = [], []
    for i, extra in enumerate(([], [], ["--seed", None])):
        extra = [x if x is not None else seeds[0] for x in extra]
        proc = run(["-m", "megapix", "sample", "--checkpoint", str(out), "--out", str(tmp_path / f"s{i}.png"), *extra])
        assert proc.returncode == 0, proc.stderr[-2000:]
        seeds.append(re.search(r"--seed (\d+) draws it again", proc.stdout).group(1))
        pngs.append((tmp_path / f"s{i}.png").read_bytes())
    assert pngs[0] != pngs[1] and pngs[2] == pngs[0] and seeds[2] == seeds[0]
