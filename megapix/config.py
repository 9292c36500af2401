"""Configuration: model presets, data and training settings, YAML/JSON loading with validation.

Every field is checked when a config is built, so a bad value fails at start-up with one line naming the
field and the fix, before any memory is allocated or any file written.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what would be accepted."""


VOCAB_SIZE = 512  # the 9-bit palette


@dataclass
class ModelConfig:
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    resolution: int = 8  # images are resolution x resolution; the context is resolution**2 tokens
    n_positions: int | None = None  # rows of the position table; defaults to resolution**2
    objective: str = "ar"  # "ar" (autoregressive, learned SOS) or "bert" (masked, bidirectional)
    mask_rate: float = 0.15  # BERT only: fraction of positions masked per image
    norm_eps: float = 1e-5
    bias: bool = False  # the original has no projection biases; HF's Conv1D layers do (zero after conversion)
    kernels: str = "auto"  # "auto" | "triton" | "torch": attention and norm implementation

    def __post_init__(self):
        if self.n_positions is None:
            self.n_positions = self.resolution**2
        _check_positive(self, "n_layer", "d_model", "n_head", "resolution", "n_positions")
        if self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                "choose n_head that divides d_model"
            )
        if self.n_ctx > self.n_positions:
            raise ConfigError(
                f"model.resolution={self.resolution} needs {self.n_ctx} positions but model.n_positions="
                f"{self.n_positions}; raise n_positions or lower the resolution"
            )
        _check_choice(self, "objective", ("ar", "bert"))
        _check_choice(self, "kernels", ("auto", "triton", "torch"))
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"model.mask_rate={self.mask_rate} must lie in (0, 1); the paper uses 0.15")

    @property
    def n_ctx(self) -> int:
        return self.resolution**2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def num_parameters(self) -> int:
        d, L = self.d_model, self.n_layer
        per_block = 12 * d * d + 2 * d + (9 * d if self.bias else 0)  # biases: c_attn 3d, c_proj d, c_fc 4d, c_proj d
        embeddings = VOCAB_SIZE * d + d + self.n_positions * d  # wte, sos, wpe
        return L * per_block + embeddings + d + VOCAB_SIZE * d  # + norm_f + head

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight plus attention's score/value matmuls.

        Causal masking is not discounted (the convention of Megatron/PaLM's MFU), so MFU is comparable.
        """
        T = seq_len or self.n_ctx
        d, L = self.d_model, self.n_layer
        matmul_params = L * 12 * d * d + VOCAB_SIZE * d
        return 6 * matmul_params + 12 * L * T * d


# The paper's presets at their model resolution, plus small ones for CPU work.
PRESETS: dict[str, dict[str, Any]] = {
    "igpt-s": dict(n_layer=24, d_model=512, n_head=8, resolution=32),
    "igpt-m": dict(n_layer=36, d_model=1024, n_head=8, resolution=32),
    "igpt-l": dict(n_layer=48, d_model=1536, n_head=16, resolution=32),
    # head_dim 128 is ours (the paper does not state n_head). 64x64 = 4096 positions: with a 1024-row
    # position table the count is the paper's 6801M; with 4096 rows it is ~6810M.
    "igpt-xl": dict(n_layer=60, d_model=3072, n_head=24, resolution=64),
    "tiny": dict(n_layer=4, d_model=128, n_head=4, resolution=8),
    "small": dict(n_layer=8, d_model=256, n_head=8, resolution=16),
    "bench": dict(n_layer=4, d_model=256, n_head=8, resolution=32),  # the CPU benchmark shape
}
PAPER_PARAMS = {"igpt-s": 76e6, "igpt-m": 455e6, "igpt-l": 1362e6, "igpt-xl": 6801e6}


def model_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass
class DataConfig:
    # "digits" (embedded default), "synthetic", "cifar10:PATH", "cifar100:PATH", "imagefolder:DIR",
    # "npy:IMAGES.npy[,LABELS.npy]", "igpt:DIR/cifar10" (released token arrays), "shards:DIR"
    source: str = "digits"
    palette: str | None = None  # kmeans_centers.npy; fitted on the training images (and saved) when absent
    val_fraction: float | None = None  # held-out share of train; None = the paper's (10% small sets, 4% ImageNet)
    augment: bool = True  # the paper's train-time augmentation (ImageFolder resize/crop)
    num_workers: int = 0

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError("data.source must be a non-empty string such as 'digits' or 'cifar10:/path'")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must lie in [0, 1)")


@dataclass
class TrainConfig:
    max_steps: int = 300
    global_batch: int = 64
    micro_batch: int | None = None  # per data-parallel rank; defaults to the whole per-rank share
    lr: float = 3e-3
    warmup_steps: int | None = None  # None: one epoch (the paper), capped at 10% of max_steps
    beta1: float = 0.9
    beta2: float = 0.95  # the paper: 0.999 gave loss spikes
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    out: str = "runs/default"
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 0  # 0: only at the end (and on preemption)
    log_every: int = 10
    time_budget: float = 0.0  # seconds; stop-and-save when exceeded (0: none)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    zero_stage: int | None = None  # overrides the DeepSpeed config when set
    activation_checkpointing: bool = False
    peak_tflops: float | None = None  # for MFU; default from a device table
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp32"

    def __post_init__(self):
        _check_positive(self, "max_steps", "global_batch", "lr", "tensor_parallel", "pipeline_parallel",
                        "eval_batches")
        if self.micro_batch is not None and self.micro_batch <= 0:
            raise ConfigError(f"train.micro_batch={self.micro_batch} must be positive")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        _check_choice(self, "precision", ("auto", "bf16", "fp32"))
        for name in ("eval_every", "save_every", "log_every", "time_budget", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: model_preset("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> "Config":
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with sections model/data/train")
        unknown = set(raw) - {"model", "data", "train"}
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; use model, data and train")
        model_raw = dict(raw.get("model") or {})
        preset = model_raw.pop("preset", None)
        base = dict(PRESETS[preset]) if preset in PRESETS else {}
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"{where}: unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return cls(
            model=_build(ModelConfig, {**base, **model_raw}, f"{where}: model"),
            data=_build(DataConfig, raw.get("data") or {}, f"{where}: data"),
            train=_build(TrainConfig, raw.get("train") or {}, f"{where}: train"),
        )


def load_config(path: str) -> Config:
    """Load a YAML or JSON config file (sections model/data/train; model may name a `preset`)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass an existing .yaml or .json file")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - parser errors differ by format; report them uniformly
        raise ConfigError(f"config file {path!r} could not be parsed ({type(e).__name__}: {e})") from None
    return Config.from_dict(raw or {}, where=path)


def _build(cls, raw: dict, where: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    try:
        return cls(**raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_positive(obj, *names):
    section = type(obj).__name__.replace("Config", "").lower()
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{section}.{name}={value!r} must be a positive number")


def _check_choice(obj, name, choices):
    section = type(obj).__name__.replace("Config", "").lower()
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r} is not one of {', '.join(choices)}")
