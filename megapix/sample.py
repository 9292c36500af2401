"""Sampling with a KV cache, and image-completion grids as PNG.

Decoding runs the model's own forward with its KV cache (`ImageGPT.kv_cache`): the prompt in one pass, then
one position at a time, so a T-token image costs T small steps instead of T full forward passes.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from megapix.config import ConfigError
from megapix.model import ImageGPT
from megapix.utils import atomic_path


@torch.no_grad()
def generate(model, prefix: torch.Tensor, n_ctx: int | None = None, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
    """Complete token rows [B, P] (P >= 0) to [B, n_ctx] by ancestral sampling (autoregressive models only).
    `progress`: a tqdm bar advanced once per position."""
    if model.config.objective != "ar":
        raise ConfigError("sampling needs an autoregressive model; this one was trained with the BERT objective")
    n_ctx = n_ctx or model.config.n_ctx
    B, P = prefix.shape
    device = next(model.parameters()).device
    out = torch.zeros(B, n_ctx, dtype=torch.long, device=device)
    out[:, :P] = prefix.to(device)
    cache = model.kv_cache()
    for pos in range(P, n_ctx):
        # model(out[:, :pos + 1])[:, pos] predicts token pos from the tokens before it (out[:, pos] is not read);
        # the cache makes the first call run the prompt and every later call one new position.
        logits = model(out[:, : pos + 1], cache=cache)[:, -1].float() / max(temperature, 1e-6)
        if top_k:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        out[:, pos] = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        if progress is not None:
            progress.update(1)
    return out


def completion_grid(model, palette, held_out: torch.Tensor, n_uncond: int = 8, seed: int = 0,
                    temperature: float = 1.0) -> np.ndarray:
    """Rows: each held-out image's top half given, completed 3 ways, then the original; a last row of
    unconditional samples. Returns one uint8 RGB image [rows*res, cols*res, 3] (with 1-px gutters)."""
    from tqdm import tqdm

    res = model.config.resolution
    gen = torch.Generator().manual_seed(seed)
    half = (res // 2) * res
    n = held_out.shape[0]
    # the three completions of every image in one batch: a third of the sequential decoding steps
    with tqdm(total=res * res - half + res * res, desc="sampling", unit="pos", leave=False,
              disable=not sys.stdout.isatty()) as bar:
        completed = generate(model, held_out[:, :half].repeat(3, 1), temperature=temperature, generator=gen,
                             progress=bar)
        uncond = generate(model, torch.empty(n_uncond, 0, dtype=torch.long), temperature=temperature, generator=gen,
                          progress=bar)
    completions = completed.split(n)
    rows = [[*(c[i] for c in completions), held_out[i]] for i in range(n)]
    tiles = [palette.decode(torch.stack(r).cpu(), res, res) for r in rows]
    tiles.append(palette.decode(uncond.cpu(), res, res))
    cols = max(len(t) for t in tiles)
    pad = 1
    grid = np.full((len(tiles) * (res + pad) + pad, cols * (res + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, img in enumerate(row):
            y, x = pad + r * (res + pad), pad + c * (res + pad)
            grid[y : y + res, x : x + res] = img
    return grid


COLUMN_CAPTIONS = ("completion 1", "completion 2", "completion 3", "original")


def annotated(grid: np.ndarray, res: int, scale: int | None = None) -> np.ndarray:
    """The completion grid scaled up (tiles at least 64 px) with what a reader needs to read it: column captions on
    top, a caption above the last row (unconditional samples), and red ticks in the gutters where the given top
    half ends. Returns a uint8 RGB image."""
    from PIL import Image, ImageDraw, ImageFont

    pad = 1
    scale = scale or max(4, -(-64 // res))
    rows, cols = (grid.shape[0] - pad) // (res + pad), (grid.shape[1] - pad) // (res + pad)
    font = ImageFont.load_default()
    band = 14
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    cell, split_y = (res + pad) * scale, (rows - 1) * (res + pad) * scale
    canvas = Image.new("RGB", (img.width, img.height + 2 * band), "white")
    canvas.paste(img.crop((0, 0, img.width, split_y)), (0, band))
    canvas.paste(img.crop((0, split_y, img.width, img.height)), (0, split_y + 2 * band))
    draw = ImageDraw.Draw(canvas)
    for c, caption in enumerate(COLUMN_CAPTIONS[:cols]):
        draw.text((c * cell + pad * scale + 2, 2), caption, fill="black", font=font)
    draw.text((pad * scale + 2, split_y + band + 2), "unconditional samples", fill="black", font=font)
    tick_y = band + pad * scale + (res // 2) * scale  # the first generated row of each completion
    for r in range(rows - 1):
        y = tick_y + r * cell
        for c in range(min(cols, 3)):
            x = c * cell
            draw.rectangle((x, y - 1, x + pad * scale - 1, y), fill="red")
            draw.rectangle((x + cell, y - 1, x + cell + pad * scale - 1, y), fill="red")
    return np.asarray(canvas)


PNG_MARK = "megapix"  # the PNG "Software" text chunk of every picture megapix writes


def written_by_megapix(path: str) -> bool:
    """Whether `path` is a PNG that megapix wrote (and may therefore replace with a new version)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.text.get("Software", "").startswith(PNG_MARK)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def check_png_output(path: str, flag: str = "--out") -> None:
    """Refuse an output file that exists and is not a picture megapix wrote: a user's file is never replaced."""
    if os.path.isfile(path) and not written_by_megapix(path):
        raise ConfigError(f"{flag} {path} exists and was not written by megapix; refusing to replace it: choose "
                          "another path or move the file")


def save_png(image: np.ndarray, path: str, scale: int = 4, run_folder: bool = False, step: int | None = None) -> None:
    """Write `image` as a PNG scaled by `scale`. An existing file at `path` is replaced only when megapix wrote it,
    or when `path` lies in a run folder this run owns (`run_folder`: a training run's samples.png). `step`: the
    training step the picture shows, kept in the PNG."""
    from PIL import Image, PngImagePlugin


    if not run_folder:
        check_png_output(path, "output")
    img = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", PNG_MARK)
    if step is not None:
        info.add_text("megapix-step", str(step))
    from megapix.runfolder import disk_errors

    with disk_errors(path), atomic_path(path) as tmp:  # a refused write: one line, and no half-written PNG
        img.save(tmp, format="PNG", pnginfo=info)


def write_run_samples(trainer, n: int = 8) -> str | None:
    """<out>/samples.png at the end of a training run: completions of held-out images and unconditional samples
    (AR models), from a consolidated copy of the weights on rank 0 (Trainer.full_state_dict), so every layout
    writes them and no rank waits in a collective while rank 0 samples. Collective. Returns the path (rank 0), or
    None with a line saying why not."""
    cfg = trainer.cfg
    if cfg.model.objective != "ar" or trainer.palette is None:
        if trainer.is_rank0:
            why = "BERT models do not generate" if cfg.model.objective != "ar" else "token data has no palette"
            print(f"megapix: no samples.png ({why})", flush=True)
        return None
    state = trainer.full_state_dict()
    if not trainer.is_rank0:
        return None
    with torch.device("meta"):
        model = ImageGPT(cfg.model)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, assign=True, strict=True)
    model = model.to(trainer.device).eval()
    test = trainer.splits["test"]
    held = test.tokens(np.arange(min(n, len(test)))).to(trainer.device)
    path = os.path.join(trainer.out, "samples.png")
    step = int(trainer.step)
    if _sampled_at(path) == step:  # a resume that trained no step: the picture of these weights is already there
        print(f"megapix: {path} already shows step {step}; not sampled again", flush=True)
        return path
    began = time.monotonic()
    print(f"megapix: sampling {path} ({len(held)} completions x 3 and 8 unconditional images, "
          f"{cfg.model.resolution}x{cfg.model.resolution})", flush=True)
    grid = completion_grid(model, trainer.palette, held, seed=cfg.train.seed)
    save_png(annotated(grid, cfg.model.resolution), path, scale=1, run_folder=True, step=step)
    print(f"megapix: wrote {path} in {time.monotonic() - began:.0f} s", flush=True)
    return path


def _sampled_at(path: str) -> int | None:
    """The training step a megapix samples.png was drawn at (its PNG text chunk), or None."""
    from PIL import Image

    if not written_by_megapix(path):
        return None
    with Image.open(path) as img:
        step = img.text.get("megapix-step", "")
    return int(step) if step.isdigit() else None


