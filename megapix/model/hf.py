"""Hugging Face ImageGPT interop: read and write HF ImageGPT directories without importing transformers.

This is how users bring the released OpenAI S/M/L weights (converted to HF layout). HF differences:
SOS is row 512 of a 513-row wte, projections are Conv1D ([in, out], transposed relative to nn.Linear) with
biases, and the caller puts SOS first; our model does the shift itself.
"""
from __future__ import annotations

import json
import math
import os

import torch

from megapix.config import VOCAB_SIZE, ConfigError, ModelConfig
from megapix.utils import atomic_path

_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        try:
            return load_file(st)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
            raise ConfigError(f"{st} is not a readable safetensors file ({e}); re-export or re-download it") from None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        from safetensors.torch import load_file

        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(os.path.join(path, shard)))
        return out
    binf = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binf):
        try:
            return torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{binf} could not be loaded as plain tensors ({e}); it may be corrupt") from None
    raise ConfigError(f"{path} holds no model.safetensors or pytorch_model.bin; pass an HF ImageGPT directory")


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    if hf.get("model_type") not in (None, "imagegpt"):
        raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}; expected 'imagegpt'")
    act = hf.get("activation_function", "quick_gelu")
    if act != "quick_gelu":
        raise ConfigError(f"activation_function {act!r} is not iGPT's quick_gelu; this checkpoint is not supported")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ConfigError(f"config.json sets {flag}, which iGPT does not use; this checkpoint is not supported")
    d = hf["n_embd"]
    if hf.get("n_inner") not in (None, 4 * d):
        raise ConfigError(f"n_inner={hf['n_inner']} differs from 4*n_embd; this checkpoint is not supported")
    n_pos = hf["n_positions"]
    res = hf.get("megapix_resolution") or math.isqrt(n_pos)
    if res * res > n_pos:
        raise ConfigError(f"n_positions={n_pos} is too small for a {res}x{res} image")
    fields = dict(n_layer=hf["n_layer"], d_model=d, n_head=hf["n_head"], resolution=res, n_positions=n_pos,
                  norm_eps=hf.get("layer_norm_epsilon", 1e-5), objective=hf.get("megapix_objective", "ar"))
    fields.update(overrides)
    return ModelConfig(**fields)


def load_pretrained(path: str, **overrides):
    """An HF ImageGPT directory (or a megapix export, which is one) -> ImageGPT with identical logits."""
    from megapix.model.igpt import ImageGPT

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{path} has no config.json; pass an HF ImageGPT directory or a megapix export")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path} is not valid JSON ({e})") from None
    sd = {k.removeprefix("transformer."): v for k, v in _read_state_dict(path).items()}
    has_bias = any(k.endswith(".bias") and v.abs().max() > 0 for k, v in sd.items())
    config = config_from_hf(hf, bias=has_bias, **overrides)
    with torch.device("meta"):
        model = ImageGPT(config)
    model.load_state_dict(hf_to_megapix(sd, config), assign=True, strict=True)
    return model.float()


def hf_to_megapix(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    d = config.d_model
    wte = sd["wte.weight"]
    if wte.shape != (VOCAB_SIZE + 1, d):
        raise ConfigError(f"wte.weight has shape {tuple(wte.shape)}; an iGPT checkpoint has ({VOCAB_SIZE + 1}, {d})")
    out = {"wte.weight": wte[:VOCAB_SIZE], "sos": wte[VOCAB_SIZE], "wpe.weight": sd["wpe.weight"],
           "norm_f.weight": sd["ln_f.weight"], "head.weight": sd["lm_head.weight"]}
    for i in range(config.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        out[b + "norm_1.weight"] = sd[h + "ln_1.weight"]
        out[b + "norm_2.weight"] = sd[h + "ln_2.weight"]
        for name in _CONV1D:
            out[b + name + ".weight"] = sd[h + name + ".weight"].t()
            if config.bias:
                out[b + name + ".bias"] = sd[h + name + ".bias"]
    return {k: v.float().contiguous() for k, v in out.items()}


def megapix_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    t = "transformer."
    out = {t + "wte.weight": torch.cat([sd["wte.weight"], sd["sos"][None]], 0), t + "wpe.weight": sd["wpe.weight"],
           t + "ln_f.weight": sd["norm_f.weight"], "lm_head.weight": sd["head.weight"]}
    for i in range(config.n_layer):
        h, b = f"{t}h.{i}.", f"blocks.{i}."
        out[h + "ln_1.weight"] = sd[b + "norm_1.weight"]
        out[h + "ln_2.weight"] = sd[b + "norm_2.weight"]
        for name in _CONV1D:
            w = sd[b + name + ".weight"]
            out[h + name + ".weight"] = w.t()
            out[h + name + ".bias"] = sd.get(b + name + ".bias", torch.zeros(w.shape[0], dtype=w.dtype))
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def hf_config(config: ModelConfig) -> dict:
    return {
        "model_type": "imagegpt",
        "architectures": ["ImageGPTForCausalImageModeling"],
        "vocab_size": VOCAB_SIZE + 1,
        "n_positions": config.n_positions,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "quick_gelu",
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": False,
        "megapix_objective": config.objective,
        "megapix_resolution": config.resolution,
    }


def save_state_dict_pretrained(state_dict: dict[str, torch.Tensor], config: ModelConfig, path: str) -> None:
    """Write an HF ImageGPT directory (config.json + model.safetensors) atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(config), f, indent=2)
        save_file(megapix_to_hf(state_dict, config), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})


def save_pretrained(model, path: str) -> None:
    save_state_dict_pretrained(model.state_dict(), model.config, path)
