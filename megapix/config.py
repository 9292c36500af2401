"""Configuration: model presets, data and training settings, YAML/JSON loading with validation.

Every field is checked when a config is built, so a bad value fails at start-up with one line naming the
field and the fix, before any memory is allocated or any file written.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from megapix.errors import ConfigError  # noqa: F401  (re-exported: most of megapix imports it from here)


VOCAB_SIZE = 512  # the 9-bit palette


def opt(default=dataclasses.MISSING, help: str = "", *, flag: str | None = None, aliases: tuple = (),
        metavar: str | None = None, default_help: str | None = None, positional: bool = False,
        kind: str | None = None, cli: bool = True, bare: str | None = None):
    """A config field with its command-line description (megapix.cliargs generates the flag from it).

    flag: the flag's name (default --field-name); aliases: other accepted spellings; default_help: how help
    describes the default ("required", "the checkpoint's", ...); positional: an older positional spelling that
    is still accepted; kind="out": an output path (refused when it lies under a regular file); cli=False: set
    only in a --config file; bare: the value of the flag given without one (`--compile` = `--compile on`)."""
    meta = dict(help=help, flag=flag, aliases=tuple(aliases), metavar=metavar, default_help=default_help,
                positional=positional, kind=kind, cli=cli, bare=bare)
    return dataclasses.field(default=default, metadata=meta)


def checkpoint_field(required: bool = True, positional: bool = False):
    """The one way every command names a model to read: --checkpoint PATH."""
    return opt(None, "a training --out folder, its checkpoints/ folder, a checkpoint tag folder, or an HF/megapix "
               "export directory", metavar="PATH", default_help="required" if required else "none",
               positional=positional)


@dataclass
class ModelConfig:
    n_layer: int = opt(4, "transformer blocks")
    d_model: int = opt(128, "width of the residual stream")
    n_head: int = opt(4, "attention heads (must divide d_model)")
    resolution: int = opt(8, "image side in pixels; the context is resolution**2 tokens")
    n_positions: int | None = opt(None, "rows of the position table", default_help="resolution**2")
    objective: Literal["ar", "bert"] = opt("ar", "ar: autoregressive with a learned SOS; bert: masked, bidirectional")
    mask_rate: float = opt(0.15, "BERT only: fraction of positions masked per image")
    norm_eps: float = opt(1e-5, "layer-norm epsilon")
    # the original has no projection biases; HF's Conv1D layers do (zero after conversion)
    bias: bool = opt(False, "biases on the projections (HF ImageGPT checkpoints have them)")
    kernels: Literal["auto", "triton", "torch"] = opt(
        "auto", "attention/norm implementation: auto = Triton kernels on CUDA tensors, torch elsewhere")

    def __post_init__(self):
        if self.n_positions is None:
            self.n_positions = self.resolution**2
        _check_positive(self, "n_layer", "d_model", "n_head", "resolution", "n_positions")
        _check_finite(self)
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
        _check_choice(self, "objective")
        _check_choice(self, "kernels")
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

    def flops_per_token(self, seq_len: int | None = None, recompute: bool = False, executed: bool = False) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention's score and value
        matmuls, 4 L T d forward and twice that backward: the model FLOPs MFU divides (metrics, planner, GPU check;
        causal masking not discounted, the convention of Megatron/PaLM's MFU).

        recompute: activation checkpointing runs the blocks' forward again (2 per block weight + 4 L T d).
        executed: also the scores the flash-style backward recomputes instead of storing them (2 L T d; SDPA and
        megapix's Triton kernel both do), i.e. what the hardware runs and what torch.utils.flop_counter counts
        (tests/test_flops.py): the planner's compute time uses it.
        """
        T = seq_len or self.n_ctx
        d, L = self.d_model, self.n_layer
        matmul_params = L * 12 * d * d + VOCAB_SIZE * d
        flops = 6 * matmul_params + 12 * L * T * d
        if recompute:
            flops += 2 * L * 12 * d * d + 4 * L * T * d
        if executed:
            flops += 2 * L * T * d
        return flops


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
    source: str = opt("digits", "data source: digits, digits-shifted[:COPIES], shapes[:N], outlines[:N], "
                      "outlines-large[:N] (embedded), synthetic[:N], cifar10:PATH, cifar100:PATH, imagefolder:DIR, "
                      "npy:IMAGES.npy[,LABELS.npy], igpt:DIR/cifar10, shards:DIR, 'wds:PATTERN.tar[;test=PATTERN]', "
                      "'parquet:PATTERN.parquet[;test=PATTERN]'",
                      flag="--data", metavar="SPEC")
    palette: str | None = opt(None, "kmeans_centers.npy (512 x 3)", metavar="PATH",
                              default_help="fitted on the training images and saved in --out")
    val_fraction: float | None = opt(None, "held-out share of train",
                                     default_help="the paper's: 10% of small sets, 4% of ImageNet")
    augment: bool = opt(True, "the paper's train-time augmentation (ImageFolder resize/crop)")
    num_workers: int = opt(0, "DataLoader worker processes that decode and encode batches (0: in the training process)")
    skip_corrupt: bool = opt(False, "wds:/parquet: sources: skip damaged samples (each warned once; a sample that "
                             "does not decode gives way to the next of its split) instead of stopping")

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError("data.source must be a non-empty string such as 'digits' or 'cifar10:/path'")
        _check_finite(self)
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers!r} must be an integer >= 0")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must lie in [0, 1)")


MONITORS = ("tensorboard", "csv", "wandb", "none")  # --report-to: DeepSpeed's "tensorboard", "csv_monitor", "wandb"
MIN_COLLECTIVE_TIMEOUT = 10.0  # seconds: below it a rendezvous or a checkpoint's sync times out on a healthy job


@dataclass
class TrainConfig:
    max_steps: int = opt(300, "optimizer steps to train")
    global_batch: int = opt(64, "images per optimizer step, over all data-parallel ranks (DeepSpeed train_batch_size)")
    micro_batch: int | None = opt(None, "images per forward pass on one data-parallel rank; the global batch stays "
                                  "fixed (DeepSpeed train_micro_batch_size_per_gpu)",
                                  default_help="the whole per-rank share, no accumulation")
    lr: float = opt(3e-3, "peak learning rate (AdamW)")
    warmup_steps: int | None = opt(None, "linear warm-up steps before the cosine (or WSD's stable phase)",
                                   default_help="one epoch (the paper), at most 10% of max-steps")
    schedule: Literal["cosine", "wsd"] = opt("cosine", "after the warm-up: cosine to 0 (the paper), or wsd: the "
                                             "peak held, then 1-sqrt to 0 over --decay-steps (continuable)")
    decay_steps: int | None = opt(None, "--schedule wsd: the decay's steps (the last)", default_help="max-steps/10")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2 (the paper: 0.999 gave loss spikes)")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay")
    grad_clip: float = opt(0.0, "clip the global gradient norm to this (0: off; DeepSpeed gradient_clipping)")
    seed: int = opt(0, "seed of the data order, the holdout, the palette fit and the initialisation")
    out: str = opt("runs/default", "output folder: checkpoints/, metrics.jsonl, loss.png, config.json, samples.png",
                   metavar="DIR", kind="out")
    eval_every: int = opt(50, "steps between validation losses (0: none)")
    eval_batches: int = opt(4, "validation micro-batches per evaluation")
    save_every: int = opt(0, "steps between checkpoints (0: only at the end and on preemption)")
    async_save: bool = opt(False, "write each checkpoint from a background thread while training goes on (a host "
                           "copy of this rank's checkpoint in memory until written); `latest` moves only when every "
                           "rank's files are written and fsynced")
    keep_last: int = opt(3, "global_step checkpoints kept in <out>/checkpoints: after each save the older ones are "
                         "deleted, never the tag `latest` names nor the best (0: keep all)")
    save_best: bool = opt(True, "save a checkpoint at each new best validation score, named in "
                          "<out>/checkpoints/best.json (kept by --keep-last)")
    report_to: str = opt("none", "DeepSpeed monitors that also receive the per-step metrics, under <out>/monitor: "
                         "tensorboard, csv, wandb (Weights & Biases; WANDB_MODE=offline works without a network), "
                         "comma-separated, or none", metavar="LIST",
                         default_help="none, or the monitors the DeepSpeed JSON enables")
    wandb_project: str | None = opt(None, "W&B project (--report-to wandb)", metavar="NAME",
                                    default_help="the DeepSpeed JSON's wandb.project, else megapix")
    wandb_entity: str | None = opt(None, "W&B entity (user or team)", metavar="NAME", default_help="your default")
    wandb_name: str | None = opt(None, "W&B run name", metavar="NAME", default_help="the --out folder's name")
    wandb_group: str | None = opt(None, "W&B group of runs", metavar="NAME", default_help="none")
    log_every: int = opt(10, "steps between plain progress lines on stdout (metrics.jsonl has every step)")
    time_budget: float = opt(0.0, "seconds; save and exit 75 when exceeded (0: none)")
    collective_timeout: float = opt(1800.0, "seconds a collective (all-reduce, barrier, a checkpoint's sync) waits "
                                    "for a peer before every rank stops with 75, naming the rank that stopped "
                                    "answering; long enough for the slowest rank to write a big checkpoint")
    on_nonfinite: Literal["stop", "rollback"] = opt(
        "stop", "a non-finite loss or gradient norm on any rank (or a --spike-factor spike): stop = exit 1 naming the "
        "step, saving nothing new; rollback = reload the last checkpoint (--save-every makes them) and go on past "
        "that global batch, recorded in metrics.jsonl and the checkpoints. Stop is the default: a divergence is "
        "usually a setting (the lr) that rollback would only meet again, and without --save-every there is no "
        "checkpoint to roll back to. No skip: DeepSpeed has applied the update before the loss and norm are known "
        "(bf16/fp32 steps never skip), so rollback is the exact way to drop a batch")
    spike_factor: float = opt(0.0, "treat a loss above this many times the median of the previous 20 steps' losses "
                              "like a non-finite one (--on-nonfinite decides what happens; 0: off)")
    tensor_parallel: int = opt(1, "tensor-parallel ranks (Megatron column/row split)")
    sequence_parallel: bool = opt(False, "with --tensor-parallel > 1: split the norms, residuals and the inputs of "
                                  "the column-parallel linears along the sequence over the TP ranks (Megatron SP)")
    pipeline_parallel: int = opt(1, "pipeline stages")
    context_parallel: int = opt(1, "context-parallel ranks: each holds a head and a tail chunk of every sequence, "
                                "attention is a ring over them (megapix/parallel/context.py)")
    zero_stage: Literal[0, 1, 2, 3] | None = opt(None, "ZeRO stage (DeepSpeed zero_optimization.stage)",
                                                 default_help="the DeepSpeed JSON's, else 0")
    activation_checkpointing: bool = opt(False, "recompute block activations in the backward pass")
    compile: Literal["off", "on", "require"] = opt(
        "off", "torch.compile each transformer block (inductor): on (eager, with one line, where it cannot compile), "
        "require (exit 2 where it cannot) or off; a bare --compile means on", bare="on")
    peak_tflops: float | None = opt(None, "device peak TFLOP/s for MFU", default_help="from a table of GPUs")
    precision: Literal["auto", "bf16", "fp32"] = opt(
        "auto", "auto: bf16 on GPU, fp32 on CPU (or what the DeepSpeed JSON's bf16 section says)")
    profile_comms: int = opt(0, "diagnostic: record every collective and p2p message of this many steps on every rank "
                             "(those after the first this process runs, which builds DeepSpeed's buffers) and write "
                             "their calls and bytes per op and group, beside the planner's bytes, to "
                             "<out>/comms_profile.json (0: off)", metavar="N")
    # issue 29: a linear probe of a fixed labelled subset during pre-training (megapix/trainprobe.py)
    probe_every: int = opt(0, "steps between linear probes of mean-pooled features (probe_acc/layer_L in "
                           "metrics.jsonl; 0: off)", metavar="N")
    probe_data: str | None = opt(None, "labelled data of --probe-every", metavar="SPEC", default_help="--data")
    probe_layers: str | None = opt(None, "layers --probe-every probes: '2,4', '1-3' or 'all'",
                                   default_help="4 spread over depth, as the attentive probe")
    probe_rows: int = opt(256, "--probe-every: first rows of the probe data's train split fitted (at most as many "
                          "val rows scored)")

    def __post_init__(self):
        _check_positive(self, "max_steps", "global_batch", "lr", "tensor_parallel", "pipeline_parallel",
                        "context_parallel", "eval_batches", "collective_timeout", "probe_rows")
        _check_finite(self)
        if self.collective_timeout < MIN_COLLECTIVE_TIMEOUT:
            raise ConfigError(f"train.collective_timeout={self.collective_timeout:g} is below the floor of "
                              f"{MIN_COLLECTIVE_TIMEOUT:g} seconds (no rendezvous nor checkpoint sync is that fast): "
                              f"pass --collective-timeout {MIN_COLLECTIVE_TIMEOUT:g} or more (default 1800)")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("train.sequence_parallel splits the sequence over the tensor-parallel ranks, but "
                              "tensor_parallel is 1; add --tensor-parallel 2 (or more) or drop --sequence-parallel")
        if self.micro_batch is not None and self.micro_batch <= 0:
            raise ConfigError(f"train.micro_batch={self.micro_batch} must be positive")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        _check_choice(self, "precision")
        _check_choice(self, "on_nonfinite")
        _check_choice(self, "compile")
        _check_choice(self, "schedule")
        if self.decay_steps is not None and self.schedule != "wsd":
            raise ConfigError(f"train.decay_steps={self.decay_steps} is WSD's decay: add --schedule wsd or drop it")
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 10)  # its cap
        if self.decay_steps is not None and not 1 <= self.decay_steps <= self.max_steps - warmup:
            raise ConfigError(f"train.decay_steps={self.decay_steps} must lie in [1, max_steps - warm-up = "
                              f"{self.max_steps - warmup}]: pass a smaller --decay-steps or a larger --max-steps")
        if self.spike_factor != 0 and not self.spike_factor > 1:
            raise ConfigError(f"train.spike_factor={self.spike_factor} must be 0 (off) or above 1, e.g. 3")
        monitors = [m.strip() for m in self.report_to.split(",")]
        if not set(monitors) <= set(MONITORS) or ("none" in monitors and len(monitors) > 1):
            raise ConfigError(f"train.report_to={self.report_to!r}: use any of tensorboard, csv, wandb "
                              "(comma-separated), or none")
        self.report_to = ",".join(m for m in MONITORS if m in monitors)  # one spelling: the record compares it
        for name in ("eval_every", "save_every", "keep_last", "log_every", "time_budget", "weight_decay", "grad_clip",
                     "seed", "profile_comms", "probe_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must lie in [0, 1)")



SECTION_NAMES = ("model", "data", "train")

# What `make train` trains (configs/tiny_digits.yaml holds the same, tests/test_config.py checks): the run of the
# train command when no --config is given. The tiny preset at 10x10 on digits-shifted (each digit at a random
# offset on a 10x10 canvas), where a linear probe on raw pixels is far from the ceiling; the library's own
# defaults (Config()) stay the colourised 8x8 digits, on which every probe sits at chance.
DEFAULT_RUN = {"model": {"preset": "tiny", "resolution": 10}, "data": {"source": "digits-shifted"},
               "train": {"max_steps": 300, "global_batch": 64, "lr": 3.0e-3, "out": "runs/digits"}}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: model_preset("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Where values came from, not what they are (so kept out of to_dict, equality and repr), per instance:
    # "section.field" names the user set (config file or flags; the rest are defaults or a resumed run's), which
    # tells a DeepSpeed JSON value that disagrees with a user's setting (an error) from one that replaces a
    # default (taken); and the train fields dsconfig.resolve took from the DeepSpeed JSON.
    explicit: frozenset = field(default=frozenset(), compare=False, repr=False)
    from_deepspeed: frozenset = field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict:
        return {sec: dataclasses.asdict(getattr(self, sec)) for sec in SECTION_NAMES}

    def is_set(self, section: str, name: str) -> bool:
        """Whether the user set this field: named in a config file or flag, or (API use) not the default."""
        if f"{section}.{name}" in self.explicit:
            return True
        sub = getattr(self, section)
        default = {f.name: f.default for f in fields(sub)}[name]
        return getattr(sub, name) != default

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
        cfg = cls(
            model=_build(ModelConfig, {**base, **model_raw}, f"{where}: model"),
            data=_build(DataConfig, raw.get("data") or {}, f"{where}: data"),
            train=_build(TrainConfig, raw.get("train") or {}, f"{where}: train"),
        )
        cfg.explicit = frozenset(f"{sec}.{k}" for sec in ("model", "data", "train") for k in (raw.get(sec) or {}))
        return cfg


def _fits(value, tp) -> bool:
    """Whether a JSON value has a field's type (bool is not a number here; an int is a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if args and origin is not None:  # X | None, Optional[X]
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) and not (tp is int and isinstance(value, bool))


# Settings added after the run record's format was fixed: a record an earlier megapix wrote lacks them, and their
# defaults are what that megapix did (no W&B names, eager, no probes while training, the cosine), so such a run
# resumes.
LATER_FIELDS = {"train": ("wandb_project", "wandb_entity", "wandb_name", "wandb_group", "compile", "probe_every",
                          "probe_data", "probe_layers", "probe_rows", "schedule", "decay_steps"),
                "data": ("skip_corrupt",)}


def check_record_config(raw, where: str) -> Config:
    """A config megapix wrote (a run's config.json "config", a checkpoint's megapix_config.json), trusted only when
    whole: an object with the three sections, every field present (but LATER_FIELDS) with a value of its type and
    nothing else, and valid. Otherwise one ConfigError naming `where` and the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} does not hold a JSON object of sections model/data/train")
    for sec, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        section = raw.get(sec)
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: field {sec!r} is {'missing' if section is None else 'not a JSON object'}")
        hints = field_types(cls)
        for name in sorted(set(section) - set(hints)):
            raise ConfigError(f"{where}: field '{sec}.{name}' is not a megapix setting")
        for name, tp in hints.items():
            if name not in section:
                if name in LATER_FIELDS.get(sec, ()):
                    continue  # written before the setting existed: its default is what that run did
                raise ConfigError(f"{where}: field '{sec}.{name}' is missing")
            if not _fits(section[name], tp):
                shown = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
                raise ConfigError(f"{where}: field '{sec}.{name}' is {section[name]!r}, not of type {shown}")
    for name in sorted(set(raw) - set(SECTION_NAMES)):
        raise ConfigError(f"{where}: field {name!r} is not a section (model, data, train)")
    return Config.from_dict(raw, where=where)


def load_config(path: str) -> Config:
    """Load a YAML or JSON config file (sections model/data/train; model may name a `preset`)."""
    return Config.from_dict(read_config_file(path), where=path)


def read_config_file(path: str) -> dict:
    """The raw mapping of a YAML or JSON config file (validated when built into a Config)."""
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
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections model/data/train")
    return raw


def check_kernels_available(kernels: str) -> None:
    """--kernels triton needs a CUDA device, or Triton's CPU interpreter (TRITON_INTERPRET=1, slow but exact)."""
    if kernels != "triton" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--kernels triton needs a CUDA GPU and this machine has none; use --kernels auto (Triton "
                          "on GPU, torch elsewhere) or torch, or set TRITON_INTERPRET=1 to run the kernels in "
                          "Triton's CPU interpreter")


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


def _section(obj) -> str:
    return type(obj).__name__.replace("Config", "").lower()


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """typing.get_type_hints(cls), resolved once per class (read it, never change it): resolving the string
    annotations took 1.4 ms a call, 8 ms per TrainConfig built, 44 of 47 s of a 2654-plan planner search."""
    return typing.get_type_hints(cls)


def _check_choice(obj, name):
    """The value must be one of the field's Literal choices (the same list the flag offers)."""
    choices = literal_choices(field_types(type(obj))[name])
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{_section(obj)}.{name}={value!r} is not one of {', '.join(map(str, choices))}")


def literal_choices(tp) -> list:
    """The values of Literal[...] (or Literal[...] | None), else []."""
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    return [c for a in typing.get_args(tp) if typing.get_origin(a) is Literal for c in typing.get_args(a)]


def _check_finite(obj):
    """NaN and infinity pass `> 0` checks; refuse them for every float field."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_section(obj)}.{f.name}={value} is not a finite number")
