"""Linear probes over dumped features (what `megapix probe --features DIR` fits; the command is
megapix.commands.probe).

Multinomial logistic regression on the output of `megapix extract`, for every dumped layer, for the
concatenation of all of them, and for the 5-layer concatenation centred at the best single layer (the
iGPT-XL probe), when the dump holds enough contiguous layers.

- Features are standardised with the statistics of the rows the probe is fitted on.
- Solvers: full-batch L-BFGS (torch.optim.LBFGS with a strong-Wolfe line search, on the device) for
  CIFAR-sized data; mini-batch SGD (momentum 0.9, cosine schedule) for ImageNet-sized data. `--solver auto`
  picks L-BFGS below `--sgd-threshold` training rows (default 200k) and SGD above.
- Loss: mean cross-entropy + l2/2 * ||W||^2 (the bias is not penalised).
- The L2 strength is chosen on the validation split (fit on train, score on val, over the grid); the probe is
  then REFITTED ON TRAIN+VAL with the chosen strength (statistics recomputed on train+val), and that model's
  test accuracy is reported. The val accuracy reported is the train-only fit's at the chosen strength.

Writes DIR/probe_results.json, DIR/probe_results.md and DIR/probe_accuracy.png.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from megapix.config import ConfigError
from megapix.utils import read_json


# ----------------------------------------------------------------------------------------------------------
# reading a feature dump
# ----------------------------------------------------------------------------------------------------------
FEATURES_FORMAT = "megapix-features"


def _redo(path: str) -> str:
    return f"re-run `megapix extract --out {path}` (same arguments) to write it again"


def _read_npy(path: str, what: str, dump: str, mmap: bool) -> np.ndarray:
    """A .npy file of the dump, never unpickled; a missing, truncated or corrupt file is one ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file {path!r} is missing; {_redo(dump)}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError/EOFError/OSError/... for bad files
        raise ConfigError(f"{what} file {path!r} is truncated or corrupt ({type(e).__name__}: {e}); "
                          f"{_redo(dump)}") from None


def load_split(path: str, split: str):
    """(features [N, width] memory-mapped, labels int64 [N] or None, manifest) of one split of a complete
    `megapix extract` dump. Every file is checked against the manifest (rows, width, label count), so a
    truncated or mismatched file is refused in one line naming it instead of failing inside the solver."""
    man_path = os.path.join(path, "manifest.json")
    if not os.path.isfile(man_path):
        raise ConfigError(f"{path} has no manifest.json; run `megapix extract` (to completion) first")
    manifest = read_json(man_path)
    if not isinstance(manifest, dict):
        raise ConfigError(f"{man_path} is not readable JSON; {_redo(path)}")
    files = manifest.get("files")
    if manifest.get("format") != FEATURES_FORMAT or not manifest.get("complete") or not isinstance(files, dict):
        raise ConfigError(f"{man_path} is not a complete megapix feature dump; {_redo(path)}")
    if split not in files:
        raise ConfigError(f"{path} has no {split!r} split; it holds {', '.join(files)}")
    entry = files[split] if isinstance(files[split], dict) else {}
    if not isinstance(entry.get("features"), str):
        raise ConfigError(f"{man_path} names no features file for {split!r}; {_redo(path)}")
    fpath = os.path.join(path, entry["features"])
    feats = _read_npy(fpath, "features", path, mmap=True)
    try:
        width = len(manifest["layers"]) * int(manifest["d_model"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{man_path} lacks its layers/d_model; {_redo(path)}") from None
    rows = (manifest.get("counts") or {}).get(split)
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating) or feats.shape[1] != width \
            or (rows is not None and feats.shape[0] != rows):
        raise ConfigError(f"features file {fpath!r} is {feats.dtype} {feats.shape} but the manifest says float "
                          f"({rows if rows is not None else 'N'}, {width}); {_redo(path)}")
    labels = None
    if entry.get("labels"):
        lpath = os.path.join(path, entry["labels"])
        labels = _read_npy(lpath, "labels", path, mmap=False)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != feats.shape[0] \
                or (len(labels) and labels.min() < 0):
            raise ConfigError(f"labels file {lpath!r} is {labels.dtype} {labels.shape} but the features have "
                              f"{feats.shape[0]} rows (non-negative integer labels expected); {_redo(path)}")
    return feats, labels, manifest


# ----------------------------------------------------------------------------------------------------------
# the probe itself
# ----------------------------------------------------------------------------------------------------------
class Standardizer:
    def __init__(self, X: torch.Tensor, chunk: int = 65536):
        n, d = X.shape
        s = torch.zeros(d, dtype=torch.float64, device=X.device)
        s2 = torch.zeros(d, dtype=torch.float64, device=X.device)
        for lo in range(0, n, chunk):
            x = X[lo:lo + chunk].double()
            s += x.sum(0)
            s2 += (x * x).sum(0)
        mean = s / max(n, 1)
        var = (s2 / max(n, 1) - mean * mean).clamp_min(0)
        self.mean = mean.float()
        self.std = var.sqrt().float().clamp_min(1e-6)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.to(x.device)) / self.std.to(x.device)


def fit_logreg(X: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, solver: str = "lbfgs",
               device=None, max_iter: int = 500, epochs: int = 30, lr: float = 0.5, batch_size: int = 1024,
               init=None, seed: int = 0):
    """Fit a multinomial logistic regression on already-standardised X. Returns (W [d, C], b [C]) on device.

    lbfgs: X must fit on the device (it is moved there). sgd: X may stay on the host; mini-batches move.
    """
    device = torch.device(device) if device is not None else X.device
    d = X.shape[1]
    W = torch.zeros(d, num_classes, device=device) if init is None else init[0].clone().to(device)
    b = torch.zeros(num_classes, device=device) if init is None else init[1].clone().to(device)
    W.requires_grad_(True)
    b.requires_grad_(True)
    y = y.to(device)
    if solver == "lbfgs":
        Xd = X.to(device).float()
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-10)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(Xd @ W + b, y) + 0.5 * l2 * (W * W).sum()
            loss.backward()
            return loss

        opt.step(closure)
    elif solver == "sgd":
        n = X.shape[0]
        steps_per_epoch = max(1, math.ceil(n / batch_size))
        total = epochs * steps_per_epoch
        opt = torch.optim.SGD([W, b], lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for lo in range(0, n, batch_size):
                idx = perm[lo:lo + batch_size]
                xb = X[idx].to(device, non_blocking=True).float()
                loss = F.cross_entropy(xb @ W + b, y[idx.to(device)]) + 0.5 * l2 * (W * W).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    else:
        raise ConfigError(f"unknown solver {solver!r}; use lbfgs or sgd")
    return W.detach(), b.detach()


@torch.no_grad()
def accuracy(W, b, X: torch.Tensor, y: torch.Tensor, chunk: int = 65536) -> float:
    correct = 0
    for lo in range(0, X.shape[0], chunk):
        xb = X[lo:lo + chunk].to(W.device).float()
        correct += int(((xb @ W + b).argmax(1) == y[lo:lo + chunk].to(W.device)).sum())
    return correct / max(1, X.shape[0])


def probe(train, val, test, num_classes: int, l2_grid, solver: str = "lbfgs", device="cpu", **fit_kw) -> dict:
    """One probe: pick l2 on val (fit on train), refit on train+val, score test.

    train/val/test: (features [N, d] float tensor on host, labels LongTensor); test may be None.
    """
    (Xtr, ytr), (Xva, yva) = train, val
    std = Standardizer(Xtr.to(device) if solver == "lbfgs" else Xtr)
    Ztr, Zva = _apply(std, Xtr, device, solver), _apply(std, Xva, device, solver)
    by_l2, init = {}, None
    for l2 in sorted(l2_grid, reverse=True):  # strong to weak, warm-started
        W, b = fit_logreg(Ztr, ytr, num_classes, l2, solver, device, init=init, **fit_kw)
        init = (W, b) if solver == "lbfgs" else None
        by_l2[l2] = accuracy(W, b, Zva, yva)
    best_l2 = max(sorted(by_l2, reverse=True), key=lambda k: by_l2[k])  # ties: the stronger penalty
    out = {"l2": best_l2, "val_acc": by_l2[best_l2], "val_acc_by_l2": {f"{k:g}": v for k, v in by_l2.items()}}
    if test is not None and test[1] is not None:
        Xall, yall = torch.cat([Xtr, Xva]), torch.cat([ytr, yva])
        std = Standardizer(Xall.to(device) if solver == "lbfgs" else Xall)
        W, b = fit_logreg(_apply(std, Xall, device, solver), yall, num_classes, best_l2, solver, device, **fit_kw)
        out["test_acc"] = accuracy(W, b, _apply(std, test[0], device, solver), test[1])
        out["train_acc"] = accuracy(W, b, _apply(std, Xall, device, solver), yall)
    return out


def _apply(std: Standardizer, X: torch.Tensor, device, solver: str) -> torch.Tensor:
    if solver == "lbfgs":
        return std(X.to(device))
    out = torch.empty(X.shape, dtype=torch.float32)  # host copy, standardised in chunks
    for lo in range(0, X.shape[0], 65536):
        out[lo:lo + 65536] = std(X[lo:lo + 65536].to(device)).cpu()
    return out


def concatenations(chosen: list[int], singles: list[dict]) -> list[tuple[str, list[int]]]:
    """(name, layers) of the concatenations to probe after the single layers: the 5 contiguous layers centred at
    the best single layer by val (the iGPT-XL probe) when the layers allow it, and all of them unless that is the
    same set."""
    best = max(singles, key=lambda r: r["val_acc"])["layers"][0]
    out = []
    if len(chosen) > 5 or (len(chosen) == 5 and chosen == list(range(chosen[0], chosen[0] + 5))):
        pos = chosen.index(best)
        lo = max(0, min(pos - 2, len(chosen) - 5))
        window = chosen[lo:lo + 5]
        if window == list(range(window[0], window[0] + 5)):
            out.append((f"concat5@{best}", window))
    if len(chosen) != 5 or not out:
        out.append(("concat all", chosen))
    return out


