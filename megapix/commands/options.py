"""What each command besides train accepts: one dataclass per command, its fields the flags (megapix.cliargs
generates them: name, type, default and help in one place), its __post_init__ the checks that need no file.
A model to read is always --checkpoint PATH (config.checkpoint_field). The run's own settings (model, data,
train) are megapix.config's."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

from megapix.config import ConfigError, TrainConfig, _check_finite, checkpoint_field, opt

def _check_nonneg_int(cmd: str, obj, *names):
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be >= 0 ({cmd})")


def _check_min1(cmd: str, obj, *names):
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be >= 1 ({cmd})")


def _check_fraction(obj):
    if obj.val_fraction is not None and not 0.0 <= obj.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction={obj.val_fraction} must lie in [0, 1)")


def compile_field(scope: str):
    """--compile of a command that runs the model's forward (the trainer's is TrainConfig.compile)."""
    return opt("off", f"torch.compile each block of the model's forward{scope}: on, require (exit 2 where it cannot) "
               "or off; a bare --compile means on", bare="on")


@dataclass
class ExtractConfig:
    checkpoint: str | None = checkpoint_field()
    out: str | None = opt(None, "output folder: {split}_features.npy, {split}_labels.npy, manifest.json",
                          metavar="DIR", kind="out", default_help="required")
    data: str | None = opt(None, "data source: digits, cifar10:PATH, imagefolder:DIR, ...", metavar="SPEC",
                           default_help="the checkpoint's")
    palette: str | None = opt(None, "kmeans_centers.npy", metavar="PATH", default_help="the checkpoint's palette.npy")
    layers: str | None = opt(None, "'3,4,5', '2-6', '2:7' or 'all'; 0..n_layer, n_layer = after the final norm",
                             default_help="all")
    center: int | None = opt(None, "centre layer of a concatenation (the iGPT-XL 5-layer probe)")
    span: int | None = opt(None, "layers in the --center concatenation", default_help="5")
    splits: str = opt("train,val,test", "comma-separated splits to extract")
    dtype: Literal["float16", "float32"] = opt("float32", "dtype of the stored features")
    batch_size: int = opt(256, "images per forward pass")
    chunk_size: int = opt(2048, "rows per resumable unit of work")
    val_fraction: float | None = opt(None, "held-out share of train", default_help="the source's")
    seed: int = opt(0, "seed of the train/val holdout (use the training seed)")
    precision: Literal["fp32", "bf16"] = opt("fp32", "bf16 autocast (GPUs; also CPUs with AMX/AVX512-BF16)")
    device: str | None = opt(None, "cpu, cuda, cuda:N", default_help="cuda:LOCAL_RANK when available, else cpu")
    overwrite: bool = opt(False, "discard an existing or partial extraction in --out")
    context_parallel: int = opt(1, "ranks sharing each image's positions (ring attention, as in training); "
                                "consecutive ranks form a group, the groups share the rows")
    compile: Literal["off", "on", "require"] = compile_field("")
    skip_corrupt: bool = opt(False, "wds:/parquet: sources: skip damaged samples instead of stopping")

    def __post_init__(self):
        _check_finite(self)
        _check_min1("extract", self, "batch_size", "chunk_size", "span", "context_parallel")
        _check_nonneg_int("extract", self, "seed")
        _check_fraction(self)


PROBE_L2_GRID = "1e-6,1e-5,1e-4,1e-3,1e-2,1e-1"


@dataclass
class ProbeConfig:
    dir: str | None = opt(None, "the --out folder of `megapix extract`", flag="--features", metavar="DIR",
                          positional=True, default_help="required without --attentive")
    out: str | None = opt(None, "folder for probe_results.json/.md and probe_accuracy.png", metavar="DIR",
                          kind="out", default_help="the features folder")
    solver: Literal["auto", "lbfgs", "sgd"] = opt("auto", "auto: SGD at or above --sgd-threshold train rows")
    sgd_threshold: int = opt(200_000, "train rows from which auto picks SGD")
    l2: str = opt(PROBE_L2_GRID, "comma-separated L2 grid")
    layers: str | None = opt(None, "probe only these dumped layers", default_help="all dumped")
    concat: bool = opt(True, "also probe concatenations of layers")
    max_iter: int = opt(500, "L-BFGS iterations per fit")
    epochs: int = opt(30, "SGD epochs per fit")
    sgd_lr: float = opt(0.5, "SGD learning rate")
    batch_size: int = opt(1024, "SGD mini-batch")
    device: str | None = opt(None, "cpu or cuda", default_help="cuda when available")
    control: str | None = opt(None, "a random-init model's probed feature dump: its probe_results.json is drawn "
                              "as the control curve", metavar="FEATURES_DIR", default_help="none")
    # the attentive probe (megapix/attentive.py): trained over the model itself, not over a features folder
    attentive: bool = opt(False, "an attention-pooling probe trained over the frozen model of --checkpoint (AIM's "
                          "design); its rows join the linear ones in --out")
    checkpoint: str | None = checkpoint_field(required=False)
    data: str | None = opt(None, "labelled data source for --attentive (splits as in extract)", metavar="SPEC",
                           default_help="the checkpoint's")
    palette: str | None = opt(None, "kmeans_centers.npy for --attentive", metavar="PATH",
                              default_help="the checkpoint's palette.npy")
    val_fraction: float | None = opt(None, "held-out share of train (--attentive)", default_help="the source's")
    seed: int = opt(0, "seed of the holdout, the probe's initialisation and its batch order (--attentive)")
    attentive_epochs: int = opt(100, "epochs of each attentive probe; val accuracy picks the epoch")
    attentive_lr: str = opt("3e-3,1e-2,3e-2", "comma-separated AdamW learning rates; val accuracy picks one per "
                            "layer", metavar="LRS")
    attentive_batch_size: int = opt(256, "images per attentive step, over all ranks")
    queries: int = opt(1, "learned queries of the attention pooling (their outputs are averaged)")
    attentive_heads: int = opt(8, "attention heads of the pooling; must divide the model width (AIM uses a fixed "
                               "count too, 12)")
    state_cache_gb: float = opt(4.0, "GiB per rank of the model's token states kept in memory after their first "
                                "pass (0: the model runs for every batch)")
    compile: Literal["off", "on", "require"] = compile_field(" (--attentive)")

    def __post_init__(self):
        _check_finite(self)
        _check_min1("probe", self, "max_iter", "epochs", "batch_size", "attentive_epochs", "attentive_batch_size",
                    "queries", "attentive_heads")
        if self.sgd_lr <= 0:
            raise ConfigError(f"--sgd-lr={self.sgd_lr} must be positive")
        if self.state_cache_gb < 0:
            raise ConfigError(f"--state-cache-gb={self.state_cache_gb} must be >= 0 (0 keeps no states)")
        _check_fraction(self)
        if self.attentive:
            if self.dir is not None:
                raise ConfigError(f"--attentive trains over the model, not over features ({self.dir}): pass "
                                  "--checkpoint RUN instead of a features folder")
            if self.checkpoint is None:
                raise ConfigError("--attentive needs the model: pass --checkpoint RUN (a training --out folder, a "
                                  "checkpoint tag or an export)")
            return
        given = [f for f in ("checkpoint", "data", "palette") if getattr(self, f) is not None]
        if given:
            raise ConfigError(f"--{given[0]} is for --attentive; a linear probe reads a features folder: "
                              f"megapix probe --features DIR, or add --attentive")
        if self.dir is None:
            raise ConfigError("a linear probe needs a features folder: megapix probe --features DIR (the --out of "
                              "megapix extract), or --attentive --checkpoint RUN")


@dataclass
class SampleConfig:
    checkpoint: str | None = checkpoint_field(positional=True)
    out: str = opt("samples.png", "the PNG grid to write", metavar="FILE", kind="out")
    data: str | None = opt(None, "data source for held-out images", metavar="SPEC", default_help="the run's")
    palette: str | None = opt(None, "kmeans_centers.npy", metavar="PATH", default_help="the run's palette.npy")
    n: int = opt(8, "held-out images to complete (3 completions of each top half, then the original)")
    temperature: float = opt(1.0, "softmax temperature")
    seed: int | None = opt(None, "sampling seed", default_help="a new one each call, printed")

    def __post_init__(self):
        _check_finite(self)
        _check_min1("sample", self, "n")
        if self.seed is not None:
            _check_nonneg_int("sample", self, "seed")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature={self.temperature} must be positive")
        if os.path.isdir(self.out):  # a file output never replaces a directory
            raise ConfigError(f"--out {self.out!r} is a directory; pass a .png file name")


@dataclass
class ExportConfig:
    checkpoint: str | None = checkpoint_field(positional=True)
    out: str | None = opt(None, "the HF ImageGPT directory to write (config.json, model.safetensors, palette.npy)",
                          metavar="DIR", kind="out", positional=True, default_help="required")


@dataclass
class PrepareConfig:
    data: str | None = opt(None, "source spec, e.g. cifar10:cifar-10-python.tar.gz, imagefolder:DIR, "
                           "npy:X.npy[,Y.npy], igpt:DIR/cifar10", metavar="SPEC", default_help="required")
    out: str | None = opt(None, "output directory (re-run with the same arguments to resume)", metavar="DIR",
                          kind="out", default_help="required")
    resolution: int | None = opt(None, "image side in pixels (tokens = side**2)", default_help="required")
    palette: str | None = opt(None, "kmeans_centers.npy ((512, 3) float, values in [-1, 1])", metavar="PATH",
                              default_help="none: pass this or --fit-palette")
    fit_palette: bool = opt(False, "fit a 512-colour palette on the train split")
    shard_size: int = opt(65536, "images per shard")
    workers: int = opt(max(1, min(8, os.cpu_count() or 1)), "encoding processes", default_help="min(8, CPUs)")
    seed: int = opt(0, "holdout and palette-fit seed")
    val_fraction: float | None = opt(None, "held-out share of train", default_help="the source's: 0.1 CIFAR, "
                                     "0.04 ImageNet")
    progress: bool = opt(True, "show a progress bar")
    skip_corrupt: bool = opt(False, "wds:/parquet: sources: skip damaged samples (counted in the manifest) "
                             "instead of stopping")

    def __post_init__(self):
        _check_finite(self)
        if self.palette and self.fit_palette:
            raise ConfigError("--palette and --fit-palette exclude each other; pass one")
        _check_min1("prepare", self, "resolution", "shard_size", "workers")
        _check_nonneg_int("prepare", self, "seed")
        _check_fraction(self)


# the TrainConfig fields that are finetune flags too (one definition of each training setting)
TRAIN_FIELDS = ("global_batch", "micro_batch", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "seed",
                "zero_stage", "tensor_parallel", "pipeline_parallel", "activation_checkpointing", "precision",
                "compile")


@dataclass
class FinetuneConfig:
    """`megapix finetune` options (flags generated by megapix.cliargs, as for every command): the fine-tuning
    sweep's own here, the training settings in `train` (a TrainConfig; its TRAIN_FIELDS are flags too), so
    fine-tuning and pre-training share one definition of each. The learning rate, the length and the evaluation
    period are the sweep's (per run: TrainConfig.lr, max_steps, eval_every)."""

    out: str | None = opt(None, "output folder: finetune_results.json, metrics.jsonl, best_model/", kind="out",
                          metavar="DIR", default_help="required")
    checkpoint: str | None = checkpoint_field(required=False)
    model: str | None = opt(None, "preset for --from-scratch without a --checkpoint (e.g. tiny)", metavar="PRESET",
                              default_help="none")
    from_scratch: bool = opt(False, "random initialisation (same architecture and palette): the baseline")
    data: str | None = opt(None, "labelled source: digits, cifar10:PATH, ...", metavar="SPEC",
                             default_help="the checkpoint's")
    palette: str | None = opt(None, "kmeans_centers.npy", metavar="PATH",
                                default_help="the checkpoint's; fitted when there is none")
    lr: str = opt("3e-4,1e-4,3e-5", "one learning rate or a comma-separated sweep (one early-stopped run each)",
                  metavar="LRS")
    max_epochs: int = opt(10, "epochs per run")
    max_steps: int | None = opt(None, "steps per run; overrides --max-epochs", default_help="from --max-epochs")
    patience: int = opt(3, "evaluations without a validation-accuracy gain before a run stops")
    eval_every: int | None = opt(None, "steps between validation evaluations", default_help="one epoch")
    augment: Literal["auto", "none", "shift", "cifar"] = opt(
        "auto", "train-time augmentation: auto (shift for the embedded digits, CIFAR's pad/crop/flip otherwise), none, "
        "shift, cifar")
    val_fraction: float | None = opt(None, "held-out share of train for early stopping", default_help="the paper's")
    deepspeed_config: str | None = opt(None, "DeepSpeed JSON config (its values and megapix's must agree)",
                                       aliases=("--deepspeed_config",), metavar="JSON", default_help="none")
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig, metadata={
        "cli": False, "help": f"the training settings (flags: {', '.join(TRAIN_FIELDS)})"})

    def __post_init__(self):
        if not self.out:
            raise ConfigError("--out is required: the folder for finetune_results.json, metrics.jsonl, best_model/")
        for name in ("max_steps", "max_epochs", "eval_every"):  # 0 is a value, not "unset"
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value} must be >= 1"
                                  + (" (leave it unset to train --max-epochs)" if name == "max_steps" else ""))


# ----------------------------------------------------------------------------------------------------------
# the CLI: options as a dataclass (help in field metadata), a parser built from it
# ----------------------------------------------------------------------------------------------------------
# TrainConfig's fields that `megapix finetune` takes as flags, with TrainConfig's defaults and help: the optimiser,
# clipping, seed, batch geometry, layout and precision are the trainer's settings, not copies of them.
