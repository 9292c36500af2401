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


_REQUIRED = ("n_embd", "n_head", "n_layer", "n_positions")


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json holds a {type(hf).__name__}, not an object; pass an HF ImageGPT config")
    if hf.get("model_type") not in (None, "imagegpt"):
        raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}; expected 'imagegpt'")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks {missing[0]!r} (an ImageGPT config needs {', '.join(_REQUIRED)}); "
                          "re-export the model or add the key")
    bad = [k for k in _REQUIRED if not isinstance(hf[k], int) or isinstance(hf[k], bool) or hf[k] < 1]
    if bad:
        raise ConfigError(f"config.json: {bad[0]}={hf[bad[0]]!r} must be a positive integer")
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
    if "lm_head.weight" not in sd and "score.weight" in sd:
        # a classifier export (save_classifier_pretrained) has no generative head: features and the backbone
        # are complete; a zero head gives uniform next-pixel logits, so say so for sampling
        import sys

        print(f"megapix: {path} is an image classifier without a generative head; its next-pixel logits are "
              "uniform (features are unaffected)", file=sys.stderr)
        sd["lm_head.weight"] = torch.zeros(VOCAB_SIZE, hf.get("n_embd", 1) if isinstance(hf, dict) else 1)
    has_bias = any(k.endswith(".bias") and v.abs().max() > 0 for k, v in sd.items())
    config = config_from_hf(hf, bias=has_bias, **overrides)
    with torch.device("meta"):
        model = ImageGPT(config)
    try:
        converted = hf_to_megapix(sd, config)
    except KeyError as e:
        raise ConfigError(f"{path}: the weights lack tensor {e.args[0]!r} for this config.json "
                          f"({config.n_layer} layers); the export is incomplete or the config does not match") from None
    model.load_state_dict(converted, assign=True, strict=True)
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


PROVENANCE = "megapix.json"  # data spec, palette file, resolution: what `megapix sample EXPORT` needs


def preprocessor_config(centres, resolution: int) -> dict:
    """transformers' ImageGPTImageProcessor settings that give megapix's Palette ids: rescale by 1/255 and
    normalise with mean = std = 0.5 (x / 127.5 - 1, the palette's scale), nearest cluster by squared distance.
    Images are resized (bilinear, as megapix's sources) to the model's resolution; at that size it is a no-op."""
    import numpy as np

    return {
        "image_processor_type": "ImageGPTImageProcessor",
        "clusters": np.asarray(centres, dtype=np.float32).tolist(),
        "do_color_quantize": True,
        "do_resize": True,
        "size": {"height": resolution, "width": resolution},
        "resample": 2,  # PIL bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def generation_config(config: ModelConfig) -> dict:
    """Sampling as `megapix sample` does it: start from SOS (id 512), one token per pixel, temperature 1, no
    top-k (HF's default top_k=50 would truncate the palette distribution)."""
    return {"bos_token_id": VOCAB_SIZE, "do_sample": True, "max_length": config.n_ctx + 1, "temperature": 1.0,
            "top_k": 0, "transformers_version": _hf_version()}


def _hf_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # noqa: BLE001 - not installed: the field is informative only
        return "4.0.0"


def model_card(config: ModelConfig, card: dict | None, provenance: dict | None) -> str:
    """README.md with the Hub's YAML header. card: preset, data, steps, loss, layout, command (any subset)."""
    card = dict(card or {})
    prov = provenance or {}
    rows = [("preset", card.pop("preset", None)), ("data", card.pop("data", prov.get("data"))),
            ("steps", card.pop("steps", None)), ("loss", card.pop("loss", None)),
            ("layout", card.pop("layout", None)), ("command", card.pop("command", None))]
    rows += sorted(card.items())
    lines = ["---", "library_name: transformers", "tags:", "- image-gpt", "- megapix", "---", "",
             f"# ImageGPT ({config.n_layer} layers, d={config.d_model}, {config.n_head} heads, "
             f"{config.resolution}x{config.resolution}, {config.objective.upper()})", "",
             "Trained with megapix. Weights in Hugging Face ImageGPT layout: load with "
             "`ImageGPTForCausalImageModeling.from_pretrained(DIR)` and `ImageGPTImageProcessor.from_pretrained(DIR)` "
             "(its clusters are this model's palette), or `megapix sample DIR` / `ImageGPT.from_pretrained(DIR)`. "
             "HF's model expects the SOS token (id 512) first.", "", "| | |", "|---|---|"]
    for k, v in rows:
        if v is not None:
            v = f"`{v}`" if k == "command" else (f"{v:.4f} nats/token" if k == "loss" and isinstance(v, float) else v)
            lines.append(f"| {k} | {v} |")
    lines.append(f"| parameters | {config.num_parameters() / 1e6:.2f}M |")
    return "\n".join(lines) + "\n"


def _palette_centres(palette):
    """A Palette (megapix.data.palette, checked when it was made: the model package does not import the data
    package) -> its float32 centres [k, 3]."""
    centres = getattr(palette, "centres", None)
    if centres is None:
        raise TypeError(f"palette must be a megapix Palette (Palette.load(path) reads a file), not {type(palette)}")
    return centres


def _write_dir(path: str, files: dict, tensors: dict[str, torch.Tensor], palette) -> None:
    """Write JSON/text files, model.safetensors and palette.npy into a fresh directory, then rename it onto
    `path`. Files are 0644 and the directory 0755: an export is meant to be shared (mkdtemp would give 0700)."""
    import numpy as np
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        os.makedirs(tmp)
        for name, content in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                if isinstance(content, str):
                    f.write(content)
                else:
                    json.dump(content, f, indent=2)
                    f.write("\n")
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if palette is not None:
            with open(os.path.join(tmp, "palette.npy"), "wb") as f:
                np.save(f, palette, allow_pickle=False)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)


def _extras(config: ModelConfig, palette, card, provenance) -> tuple[dict, object]:
    centres = None if palette is None else _palette_centres(palette)
    files = {"generation_config.json": generation_config(config)}
    prov = {"format": "megapix-export", "resolution": config.resolution, "objective": config.objective,
            **(provenance or {})}
    if centres is not None:
        files["preprocessor_config.json"] = preprocessor_config(centres, config.resolution)
        prov["palette"] = "palette.npy"
    files[PROVENANCE] = prov
    files["README.md"] = model_card(config, card, prov)
    return files, centres


def save_state_dict_pretrained(state_dict: dict[str, torch.Tensor], config: ModelConfig, path: str,
                               palette=None, card: dict | None = None, provenance: dict | None = None) -> None:
    """Write an HF ImageGPT directory atomically: config.json, model.safetensors, generation_config.json,
    README.md (model card), megapix.json (provenance) and, with a palette, palette.npy and
    preprocessor_config.json (so ImageGPTImageProcessor.from_pretrained(path) gives the palette's ids).

    palette: a megapix Palette (Palette.load reads a kmeans_centers.npy). card: model-card fields (preset, data,
    steps, loss, layout, command, ...). provenance: extra megapix.json fields, e.g. {"data": "digits-shifted"}
    (the data spec lets `megapix sample PATH` run without flags).
    """
    files, centres = _extras(config, palette, card, provenance)
    files["config.json"] = hf_config(config)
    _write_dir(path, files, megapix_to_hf(state_dict, config), centres)


def save_pretrained(model, path: str, palette=None, card: dict | None = None, provenance: dict | None = None) -> None:
    save_state_dict_pretrained(model.state_dict(), model.config, path, palette, card, provenance)


def save_classifier_pretrained(state_dict: dict[str, torch.Tensor], config: ModelConfig, weight: torch.Tensor,
                               path: str, bias: torch.Tensor | None = None, labels: list[str] | None = None,
                               palette=None, card: dict | None = None, provenance: dict | None = None) -> None:
    """Write a fine-tuned classifier as a directory that transformers' ImageGPTForImageClassification loads with
    every weight present (transformer.* and score.weight).

    state_dict: the backbone's megapix state dict; weight: the head [num_classes, d_model] applied to the mean
    over positions of norm_f's output, which is what HF's classifier computes. HF's `score` has no bias, and
    no exact mapping exists (the pooled, normed feature has no constant component to fold it into), so a
    non-zero `bias` is refused: fine-tune with a bias-free head (or zero it) to export. HF's model takes
    [SOS, tok_0 .. tok_{n-2}] as input_ids, as its causal model does; the result then equals megapix's logits.
    """
    weight = weight.detach().float().cpu()
    if weight.ndim != 2 or weight.shape[1] != config.d_model:
        raise ConfigError(f"classifier weight has shape {tuple(weight.shape)}; "
                          f"expected [num_classes, {config.d_model}]")
    if bias is not None and bias.detach().abs().max() > 0:
        raise ConfigError("the classifier head has a non-zero bias, which transformers' "
                          "ImageGPTForImageClassification (score: Linear without bias) cannot hold; fine-tune "
                          "with a bias-free head to export it")
    n = weight.shape[0]
    labels = [str(i) for i in range(n)] if labels is None else [str(x) for x in labels]
    if len(labels) != n:
        raise ConfigError(f"{len(labels)} label names for a {n}-class head")
    tensors = {k: v for k, v in megapix_to_hf(state_dict, config).items() if k != "lm_head.weight"}
    tensors["score.weight"] = weight.contiguous()
    hf = hf_config(config)
    hf.update(architectures=["ImageGPTForImageClassification"], num_labels=n,
              id2label={str(i): x for i, x in enumerate(labels)}, label2id={x: i for i, x in enumerate(labels)})
    files, centres = _extras(config, palette, card, {"task": "image-classification", **(provenance or {})})
    files["config.json"] = hf
    _write_dir(path, files, tensors, centres)


def read_provenance(path: str) -> dict | None:
    """The megapix.json of an export (data spec, palette file name, resolution), or None for a plain HF dir."""
    p = os.path.join(path, PROVENANCE)
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            prov = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p} is not readable JSON ({e}); re-export the model") from None
    if not isinstance(prov, dict):
        raise ConfigError(f"{p} holds no JSON object; re-export the model")
    if prov.get("palette"):
        prov["palette_path"] = os.path.join(path, prov["palette"])
    return prov
