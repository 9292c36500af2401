"""The probe features of a model: pooled, normed activations of several layers (what `megapix extract` writes).

The probe feature of layer l (the paper, section 3.3): the mean over positions of layer_norm(h_l), where h_l is
the input of block l and the norm is that block's first norm (`blocks[l].norm_1`); for l = n_layer it is the
final norm (`norm_f`) of the last block's output. Several layers are concatenated in the order given.

`extract` runs the blocks only up to max(layers) and pools each requested layer as soon as its input exists, so
at no point is more than one layer's activation alive and pooling happens on the model's device.

The command that writes them to a resumable folder, over any number of ranks, is megapix.commands.extract.
"""
from __future__ import annotations

import os

import torch

from megapix.config import ConfigError
from megapix.model import check_tokens


def check_layers(layers, n_layer: int) -> list[int]:
    layers = [int(x) for x in layers]
    if not layers:
        raise ConfigError("no layers requested; pass e.g. --layers 3,4,5 or --layers all")
    bad = [x for x in layers if not 0 <= x <= n_layer]
    if bad:
        raise ConfigError(f"layer index {bad[0]} is out of range; this model has layers 0..{n_layer} "
                          f"({n_layer} = after the final norm)")
    return layers


# On a CPU a forward pass takes at most this many tokens, whatever the batch size asked: activations near cache size
# made extraction 1.3-2.1x faster than 256-512 rows (4 layers, d 64-256, 16x16 and 32x32, 2 cores:
# benchmarks/bench_extract.py) with the same features, each row's computed alone.
CPU_BATCH_TOKENS = 8192


def rows_per_forward(device, tokens_per_row: int, asked: int) -> int:
    """The rows one forward pass takes: `asked`, and on a CPU at most CPU_BATCH_TOKENS tokens' worth."""
    if torch.device(device).type != "cpu":
        return asked
    return min(asked, max(1, CPU_BATCH_TOKENS // max(1, tokens_per_row)))


@torch.inference_mode()
def extract(model, tokens, layers, batch_size: int = 256, device=None, autocast_dtype=None,
            out_dtype=torch.float32, cp_group=None) -> torch.Tensor:
    """Pooled, normed features: float tensor [N, len(layers) * d_model] (see the module docstring).

    tokens: palette ids [N, T] (tensor or array). BERT models see the unmasked input. The result stays on
    the model's device; `batch_size` rows are processed at a time (on a CPU at most CPU_BATCH_TOKENS tokens).
    cp_group: the model is context-parallel (megapix.parallel.context.apply_context_parallel over that group; every
    rank of it passes the same rows).
    """
    layers = check_layers(layers, model.config.n_layer)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokens = torch.as_tensor(tokens)
    check_tokens(tokens, model.config.n_positions)  # once for all rows, before any work
    n, d = tokens.shape[0], model.config.d_model
    out = torch.empty((n, len(layers) * d), dtype=out_dtype, device=device)
    batch_size = rows_per_forward(device, tokens.shape[1], batch_size)
    for lo in range(0, n, batch_size):
        batch = tokens[lo:lo + batch_size].to(device, non_blocking=True).long()
        out[lo:lo + len(batch)] = _pooled(model, batch, layers, autocast_dtype, cp_group).to(out_dtype)
    return out


def _pooled(model, tokens: torch.Tensor, layers: list[int], autocast_dtype=None, cp_group=None) -> torch.Tensor:
    """[B, len(layers) * d] float32 for one batch; blocks beyond max(layers) are never run."""
    ctx = (torch.autocast(tokens.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else torch.autocast(tokens.device.type, enabled=False))
    if cp_group is not None:  # each rank's positions' sums, all-reduced over the CP group
        from megapix.parallel.context import pooled_features

        with ctx:
            return pooled_features(model, tokens, layers, cp_group)
    with ctx:
        # no mask: the paper's features of unmasked input (BERT too); each layer is pooled as soon as it exists
        pooled = {l: x.float().mean(dim=1) for l, x in model.hidden_states(tokens, layers)}
    return torch.cat([pooled[l] for l in layers], dim=1)


# ----------------------------------------------------------------------------------------------------------
# layer specs
# ----------------------------------------------------------------------------------------------------------
def parse_layers(spec: str | None, n_layer: int, center: int | None = None, span: int | None = None) -> list[int]:
    """'3,4,5' | '2-6' (inclusive) | '2:7' (python-style, end excluded) | 'all' | center/span (e.g. 5 layers
    centred at L, clipped to the model) -> validated list of layer indices in 0..n_layer."""
    if center is not None:
        if spec not in (None, ""):
            raise ConfigError("pass either --layers or --center/--span, not both")
        span = 5 if span is None else span
        if span < 1:
            raise ConfigError(f"--span {span} must be >= 1")
        check_layers([center], n_layer)
        lo = max(0, min(center - span // 2, n_layer + 1 - span))
        return check_layers(range(lo, min(n_layer, lo + span - 1) + 1), n_layer)
    if span is not None:
        raise ConfigError("--span needs --center")
    spec = (spec or "all").replace(" ", "")
    if spec == "all":
        return list(range(n_layer + 1))
    out: list[int] = []
    try:
        for part in spec.split(","):
            if ":" in part:
                a, b = part.split(":")
                out += list(range(int(a), int(b)))
            elif "-" in part:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ConfigError(f"cannot parse --layers {spec!r}; use '3,4,5', '2-6', '2:7' or 'all'") from None
    if not out:
        raise ConfigError(f"--layers {spec!r} selects no layer")
    if len(set(out)) != len(out):
        raise ConfigError(f"--layers {spec!r} repeats a layer")
    return check_layers(out, n_layer)


def rank_device(name: str | None) -> torch.device:
    """--device, else this rank's GPU (LOCAL_RANK) when there is one, else the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def model_summary(model) -> dict:
    """The model fields a probe's results record."""
    c = model.config
    return {"n_layer": c.n_layer, "d_model": c.d_model, "n_head": c.n_head, "resolution": c.resolution,
            "objective": c.objective, "parameters": sum(p.numel() for p in model.parameters())}


