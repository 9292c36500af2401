"""The paper's augmentations, deterministic given (seed, epoch, index).

ImageNet (pre-training and fine-tuning): resize the shorter side to a random value in [256, 384], take a
random 224x224 crop, then downsample to the model's resolution. Evaluation: shorter side 224, centre crop 224
(that is: the centred square over the whole shorter side), downsample.

CIFAR fine-tuning: 4-pixel reflection pad, random 32x32 crop, random horizontal flip (`cifar_augment`; the
loader/fine-tuner decides when to apply it: CIFAR sources hand out plain arrays).

Every random draw comes from `np.random.default_rng([seed, epoch, index])`, so an image's augmentation does
not depend on which batch, rank or worker asks for it.
"""
from __future__ import annotations

import numpy as np

SHORT_MIN, SHORT_MAX, CROP = 256, 384, 224  # the paper's ImageNet numbers


def image_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF])


def train_box(width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """The paper's random crop as a box in the ORIGINAL image's pixel coordinates.

    Resizing the shorter side to S in [256, 384] and cropping 224x224 at (x0, y0) is the same region as a
    square of side 224 * short / S at (x0, y0) * short / S in the original, so the image is resampled once
    (crop + downsample in one step) instead of being upscaled to 256..384 first.
    """
    short = min(width, height)
    s = int(rng.integers(SHORT_MIN, SHORT_MAX + 1))
    scale = s / short  # original -> resized
    rw, rh = width * scale, height * scale
    x0 = float(rng.uniform(0, max(rw - CROP, 0.0)))
    y0 = float(rng.uniform(0, max(rh - CROP, 0.0)))
    side = CROP / scale
    return (x0 / scale, y0 / scale, x0 / scale + side, y0 / scale + side)


def eval_box(width: int, height: int) -> tuple[float, float, float, float]:
    """Shorter side 224 then centre crop 224: the centred square over the whole shorter side."""
    short = min(width, height)
    x0, y0 = (width - short) / 2, (height - short) / 2
    return (x0, y0, x0 + short, y0 + short)


def load_and_crop(path: str, resolution: int, box_fn) -> np.ndarray:
    """Decode `path`, crop the box `box_fn(width, height)` and downsample it to resolution x resolution (RGB).

    JPEGs are decoded at a reduced DCT scale (PIL's draft) when the crop still keeps at least twice the target
    resolution: the same pixels, several times faster on full-size ImageNet files.
    """
    from PIL import Image

    with Image.open(path) as im:
        w0, h0 = im.size
        box = box_fn(w0, h0)
        if im.format == "JPEG":
            side = max(box[2] - box[0], 1e-6)
            f = min(1.0, 2.0 * resolution / side)
            im.draft("RGB", (max(1, int(np.ceil(w0 * f))), max(1, int(np.ceil(h0 * f)))))
        im = im.convert("RGB")
        w, h = im.size
        sx, sy = w / w0, h / h0
        # crop to whole pixels first (as torchvision's crops do), so the filter never reads outside the crop
        side = max(1, min(w, h, int(round((box[2] - box[0]) * sx))))
        left = min(max(0, int(round(box[0] * sx))), w - side)
        top = min(max(0, int(round(box[1] * sy))), h - side)
        out = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BILINEAR)
        return np.asarray(out, dtype=np.uint8)


def cifar_augment(images: np.ndarray, indices, epoch: int, seed: int, pad: int = 4) -> np.ndarray:
    """CIFAR fine-tuning augmentation: reflection pad, random crop back to size, random horizontal flip.

    images: uint8 [n, H, W, 3]; indices: the dataset indices of those images (they key the randomness).
    """
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = np.empty_like(images)
    for j, idx in enumerate(np.asarray(indices).reshape(-1)):
        rng = image_rng(seed, epoch, idx)
        dy, dx = rng.integers(0, 2 * pad + 1, size=2)
        crop = padded[j, dy:dy + h, dx:dx + w]
        out[j] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out
