"""The one DeepSpeed-config builder, and the rule between the DeepSpeed JSON and megapix's config.

The JSON is the DeepSpeed user's language, so it is authoritative and never silently replaced:
- a setting that both the JSON and megapix's config (a --config file or a flag) set, with different values, is a
  ConfigError naming both: train_batch_size / --global-batch, train_micro_batch_size_per_gpu / --micro-batch,
  gradient_accumulation_steps / global / (micro x data-parallel ranks), gradient_clipping / --grad-clip,
  zero_optimization.stage / --zero-stage, bf16.enabled / --precision, tensorboard.enabled, csv_monitor.enabled and
  wandb.enabled / --report-to, wandb.project/team/group / --wandb-project/--wandb-entity/--wandb-group;
- a setting only the JSON makes is taken into megapix's effective config (the JSON's train_batch_size becomes the
  global batch, its gradient_clipping the clip, its bf16 section the precision), so the schedule, the data order
  and the saved config all follow it;
- what megapix does not implement is refused with a line that names the megapix equivalent: `optimizer` and
  `scheduler` sections (megapix builds AdamW and its warm-up + cosine schedule from --lr, --beta1/--beta2,
  --weight-decay, --warmup-steps, --max-steps), and fp16/amp (megapix trains in bf16 or fp32).
"Set by the user" is Config.is_set: named in the config file or a flag (Config.explicit), or differing from the
dataclass default when a Config is built in Python.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import torch

from megapix import __version__
from megapix.config import Config, ConfigError
from megapix.parallel import dist as pdist

# --report-to name -> DeepSpeed monitor section
MONITOR_SECTIONS = {"tensorboard": "tensorboard", "csv": "csv_monitor", "wandb": "wandb"}
# the JSON's wandb section -> (train field, flag): taken or refused like every other shared setting
_WANDB_KEYS = {"project": ("wandb_project", "--wandb-project"), "team": ("wandb_entity", "--wandb-entity"),
               "group": ("wandb_group", "--wandb-group")}

# JSON key -> (train field, flag)
_BATCH_KEYS = {
    "train_batch_size": ("global_batch", "--global-batch"),
    "train_micro_batch_size_per_gpu": ("micro_batch", "--micro-batch"),
}


def use_bf16(cfg: Config) -> bool:
    if cfg.train.precision == "auto":
        return torch.cuda.is_available()
    return cfg.train.precision == "bf16"


class UserDSConfig(dict):
    """The user's JSON as loaded; `path` names it in messages."""

    path: str | None = None


def load_ds_config(path: str | None) -> dict:
    """The user's DeepSpeed JSON as a dict ({} when none), checked for shape: one line per problem."""
    if not path:
        return UserDSConfig()
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config {path!r} does not exist; pass a file from ds_configs/")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path!r} is not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"DeepSpeed config {path!r} could not be read ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path!r} holds a JSON {type(ds).__name__}, not an object; "
                          "it must be {\"zero_optimization\": {...}, ...} (see ds_configs/)")
    ds = UserDSConfig(ds)
    ds.path = path
    _check_values(ds)
    return ds


def _name(ds) -> str:
    path = ds if isinstance(ds, str) or ds is None else getattr(ds, "path", None)
    return f"DeepSpeed config {os.path.basename(path)!r}" if path else "the DeepSpeed config"


def _is_set(value) -> bool:
    return value is not None and value != "auto"  # "auto" (HF/DeepSpeed convention): left for megapix to decide


def _positive_int(ds, key, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{_name(ds)}: {key}={value!r} must be a positive integer")


def _check_values(ds: dict) -> None:
    where = _name(ds)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if _is_set(ds.get(key)):
            _positive_int(ds, key, ds[key])
    clip = ds.get("gradient_clipping")
    if _is_set(clip) and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip)
                          or clip < 0):
        raise ConfigError(f"{where}: gradient_clipping={clip!r} must be a number >= 0")
    zero = ds.get("zero_optimization")
    if zero is not None and not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object such as {{\"stage\": 2}}, not {zero!r}")
    stage = (zero or {}).get("stage")
    if _is_set(stage) and (isinstance(stage, bool) or stage not in (0, 1, 2, 3)):
        raise ConfigError(f"{where}: zero_optimization.stage={stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
    for key in ("bf16", "fp16", "amp", *MONITOR_SECTIONS.values()):
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{where}: {key} must be an object such as {{\"enabled\": true}}, not {ds[key]!r}")
    for key in _WANDB_KEYS:
        value = (ds.get("wandb") or {}).get(key)
        if _is_set(value) and not isinstance(value, str):
            raise ConfigError(f"{where}: wandb.{key}={value!r} must be a string (or null)")
    for key in ("fp16", "amp"):
        if _enabled(ds, key):
            raise ConfigError(f"{where}: megapix trains in bf16 or fp32, not {key}; remove the {key} section and "
                              "use \"bf16\": {\"enabled\": true} or --precision bf16")
    if "optimizer" in ds:
        raise ConfigError(f"{where}: megapix builds AdamW itself; remove the optimizer section and pass "
                          f"{_optimizer_hint(ds['optimizer'])} (train.lr, beta1, beta2, weight_decay in --config)")
    if "scheduler" in ds:
        raise ConfigError(f"{where}: megapix's schedule is linear warm-up then cosine decay to 0 over --max-steps; "
                          f"remove the scheduler section and pass {_scheduler_hint(ds['scheduler'])}")


def _enabled(ds: dict, key: str) -> bool:
    return (ds.get(key) or {}).get("enabled") is True


def _optimizer_hint(section) -> str:
    params = section.get("params", {}) if isinstance(section, dict) else {}
    parts = []
    if "lr" in params:
        parts.append(f"--lr {params['lr']}")
    betas = params.get("betas")
    if isinstance(betas, (list, tuple)) and len(betas) == 2:
        parts.append(f"--beta1 {betas[0]} --beta2 {betas[1]}")
    if "weight_decay" in params:
        parts.append(f"--weight-decay {params['weight_decay']}")
    return " ".join(parts) or "--lr, --beta1, --beta2, --weight-decay"


def _scheduler_hint(section) -> str:
    params = section.get("params", {}) if isinstance(section, dict) else {}
    parts = []
    if "warmup_num_steps" in params:
        parts.append(f"--warmup-steps {params['warmup_num_steps']}")
    if "total_num_steps" in params:
        parts.append(f"--max-steps {params['total_num_steps']}")
    return " ".join(parts) or "--warmup-steps and --max-steps"


def _conflict(ds, key, json_value, flag, field, value) -> ConfigError:
    return ConfigError(f"{_name(ds)} sets {key}={json_value} but {flag} (train.{field}) is {value}; "
                       f"set it in one place, or make them equal")


def launch_world() -> int:
    """The number of ranks: the process group's, else what the launcher put in the environment (torchrun and
    deepspeed: WORLD_SIZE; mpiexec: OMPI_COMM_WORLD_SIZE / PMI_SIZE; srun: SLURM_STEP_NUM_TASKS), else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def resolve(cfg: Config, ds: dict | str | None, world: int | None = None) -> tuple[Config, dict]:
    """(effective config, the JSON as a dict): the JSON's settings taken into megapix's config where the user did
    not set them, a ConfigError where both set a value and they disagree (see the module docstring).
    `ds` is a path (loaded with load_ds_config), a dict, or None. The returned Config records in
    `from_deepspeed` the train fields it took from the JSON."""
    if not isinstance(ds, dict):
        ds = load_ds_config(ds)
    else:
        _check_values(ds)
    t = cfg.train
    taken: dict = {}

    def take(key, json_value, name, flag, user_set, agrees):
        if not user_set:
            taken[name] = json_value
        elif not agrees:
            raise _conflict(ds, key, json.dumps(ds_value_of(key)), flag, name, getattr(t, name))

    def ds_value_of(key):
        node = ds
        for part in key.split("."):
            node = node.get(part, {})
        return node

    for key, (name, flag) in _BATCH_KEYS.items():
        if _is_set(ds.get(key)):
            take(key, ds[key], name, flag, cfg.is_set("train", name), getattr(t, name) == ds[key])
    if _is_set(ds.get("gradient_clipping")):
        clip = float(ds["gradient_clipping"])
        take("gradient_clipping", clip, "grad_clip", "--grad-clip", cfg.is_set("train", "grad_clip"),
             t.grad_clip == clip)
    stage = (ds.get("zero_optimization") or {}).get("stage")
    if _is_set(stage):
        take("zero_optimization.stage", stage, "zero_stage", "--zero-stage", t.zero_stage is not None,
             t.zero_stage == stage)
    bf16 = (ds.get("bf16") or {}).get("enabled")
    if isinstance(bf16, bool):  # --precision auto means "whatever the JSON says"
        take("bf16.enabled", "bf16" if bf16 else "fp32", "precision", "--precision", t.precision != "auto",
             (t.precision == "bf16") == bf16)
    _take_monitors(cfg, ds, taken)
    _take_accumulation(cfg, ds, taken, world)
    out = dataclasses.replace(cfg, train=dataclasses.replace(t, **taken))
    out.explicit = cfg.explicit
    out.from_deepspeed = frozenset(taken)
    return out, ds


def _take_monitors(cfg: Config, ds: dict, taken: dict) -> None:
    """The JSON's monitor sections become --report-to where the user did not set it; a disagreement is an error."""
    t = cfg.train
    monitors = {name: (ds.get(section) or {}).get("enabled") for name, section in MONITOR_SECTIONS.items()}
    monitors = {name: on for name, on in monitors.items() if isinstance(on, bool)}
    wandb = ds.get("wandb") or {}
    for key, (name, flag) in _WANDB_KEYS.items():
        if _is_set(wandb.get(key)):
            if not cfg.is_set("train", name):
                taken[name] = wandb[key]
            elif getattr(t, name) != wandb[key]:
                raise _conflict(ds, f"wandb.{key}", json.dumps(wandb[key]), flag, name, getattr(t, name))
    if not monitors:
        return
    if not cfg.is_set("train", "report_to"):
        taken["report_to"] = ",".join(name for name, on in monitors.items() if on) or "none"
        return
    requested = set(t.report_to.split(","))
    for name, on in monitors.items():
        if (name in requested) != on:
            raise ConfigError(f"{_name(ds)} sets {MONITOR_SECTIONS[name]}.enabled={json.dumps(on)} but "
                              f"--report-to (train.report_to) is {t.report_to}; set it in one place, or make "
                              "them agree")


def _take_accumulation(cfg: Config, ds: dict, taken: dict, world: int | None) -> None:
    """gradient_accumulation_steps with DeepSpeed's rule, batch = micro x accumulation x data-parallel ranks: it
    fills in the one of global and micro batch that is not set, or must agree with both."""
    t, gas = cfg.train, ds.get("gradient_accumulation_steps")
    if not _is_set(gas):
        return
    world = launch_world() if world is None else world
    dp = max(1, world // max(1, t.tensor_parallel * t.pipeline_parallel * t.context_parallel))
    global_batch = taken.get("global_batch", t.global_batch)
    micro = taken.get("micro_batch", t.micro_batch)
    global_given = "global_batch" in taken or cfg.is_set("train", "global_batch")
    if micro is not None and not global_given:
        taken["global_batch"] = micro * gas * dp
    elif micro is None:
        if global_batch % (gas * dp):
            raise ConfigError(f"{_name(ds)} sets gradient_accumulation_steps={gas}, which does not divide the "
                              f"global batch {global_batch} over {dp} data-parallel rank(s); change one of them")
        taken["micro_batch"] = global_batch // (gas * dp)
    elif global_batch != micro * gas * dp:
        raise ConfigError(f"{_name(ds)} sets gradient_accumulation_steps={gas}, but global batch {global_batch} "
                          f"!= micro batch {micro} x {gas} x {dp} data-parallel rank(s); set two of the three")


def zero_stage_of(cfg: Config, ds: dict) -> int:
    """The ZeRO stage: megapix's (after resolve it agrees with the JSON), else the JSON's, else 0."""
    if cfg.train.zero_stage is not None:
        return cfg.train.zero_stage
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def make_ds_config(cfg: Config, ds: dict, layout, micro: int) -> dict:
    """The DeepSpeed config handed to deepspeed.initialize: the user's JSON with batch geometry, clipping, ZeRO
    stage and precision written from the effective config. Values the JSON set must already agree (resolve);
    a disagreement here is a ConfigError, never an override."""
    t = cfg.train
    named = getattr(ds, "path", None)
    ds = json.loads(json.dumps(ds))  # deep copy
    accumulation = t.global_batch // (micro * layout.dp)
    if accumulation * micro * layout.dp != t.global_batch:
        raise ConfigError(f"global batch {t.global_batch} is not micro batch {micro} x {layout.dp} data-parallel "
                          "rank(s) x an integer; change --global-batch or --micro-batch")
    # DeepSpeed counts the context-parallel ranks as data-parallel ones (its data axis is dp x cp), each with the
    # same images: its train_batch_size is the global batch times cp
    want = {"train_batch_size": t.global_batch * getattr(layout, "cp", 1), "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation, "gradient_clipping": float(t.grad_clip)}
    for key, value in want.items():
        if _is_set(ds.get(key)) and ds[key] != value:
            raise ConfigError(f"{_name(named)} sets {key}={ds[key]} but this run needs {value} (global batch "
                              f"{t.global_batch}, micro batch {micro}, {layout.dp} data-parallel rank(s)); "
                              "make them agree")
        ds[key] = value
    ds.setdefault("steps_per_print", 10**9)
    zero = ds.setdefault("zero_optimization", {})
    if _is_set(zero.get("stage")) and zero["stage"] != layout.zero_stage:
        raise ConfigError(f"{_name(named)} sets zero_optimization.stage={zero['stage']} but the layout uses "
                          f"ZeRO-{layout.zero_stage}; make them agree")
    zero["stage"] = layout.zero_stage
    if getattr(layout, "sp", False) and layout.pp > 1:
        # DeepSpeed's pipe splits each stage's output over the TP ranks and re-gathers it, which assumes every TP rank
        # holds the same tensor; under sequence parallelism each holds its own chunk of the positions
        pipe = ds.setdefault("pipeline", {})
        for key in ("pipe_partitioned", "grad_partitioned"):
            if pipe.get(key):
                raise ConfigError(f"{_name(named)} sets pipeline.{key}=true, which --sequence-parallel cannot use "
                                  "(each TP rank sends its own chunk of the positions); remove it")
            pipe[key] = False
    if torch.cuda.is_available() is False and zero.get("offload_optimizer"):
        ds["zero_force_ds_cpu_optimizer"] = False  # torch's Adam on CPU ranks; DeepSpeedCPUAdam needs a build
    bf16 = use_bf16(cfg)
    if isinstance(ds.get("bf16", {}).get("enabled"), bool) and ds["bf16"]["enabled"] != bf16:
        raise ConfigError(f"{_name(named)} sets bf16.enabled={json.dumps(ds['bf16']['enabled'])} but the precision "
                          f"is {t.precision}; make them agree")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds.pop("fp16", None)  # only a disabled one reaches here (load_ds_config refuses an enabled one)
    ds.pop("amp", None)
    _monitors(ds, cfg, named)
    return ds


def _monitors(ds: dict, cfg: Config, named: dict) -> None:
    """DeepSpeed's monitor sections for --report-to (after resolve, the JSON's agree with it or were taken into it),
    written under --out unless the JSON names a path; a monitor whose package is missing is off, said in one line."""
    t = cfg.train
    for name in t.report_to.split(","):  # after resolve, the JSON's monitors agree with (or were taken into) it
        if name in MONITOR_SECTIONS:
            ds[MONITOR_SECTIONS[name]] = {**ds.get(MONITOR_SECTIONS[name], {}), "enabled": True}
    if ds.get("tensorboard", {}).get("enabled") and not _tensorboard_available():
        ds["tensorboard"]["enabled"] = False  # the csv monitor still writes; install tensorboard for event files
        if pdist.is_rank0():
            asked = (f"{_name(named)}'s tensorboard section" if "report_to" in cfg.from_deepspeed
                     else "--report-to tensorboard")
            print(f"megapix: {asked}: the tensorboard package is not installed, so no TensorBoard events are "
                  "written (pip install tensorboard); csv and metrics.jsonl are written as usual", flush=True)
    if "wandb" in t.report_to.split(","):
        ds["wandb"] = {**ds["wandb"], "project": t.wandb_project or "megapix", "team": t.wandb_entity,
                       "group": t.wandb_group}
        if not _wandb_available():
            ds["wandb"]["enabled"] = False  # the other monitors and metrics.jsonl still write
            if pdist.is_rank0():
                print("megapix: --report-to wandb: the wandb package is not installed, so nothing goes to W&B "
                      "(pip install wandb, or megapix's [wandb] extra); the other monitors write as usual", flush=True)
    for key in ("tensorboard", "csv_monitor"):  # DeepSpeed's monitor, written under --out unless a path is set
        if ds.get(key, {}).get("enabled"):
            ds[key].setdefault("output_path", os.path.join(os.path.abspath(t.out), "monitor"))
            ds[key].setdefault("job_name", "megapix")


def monitor_notes(cfg: Config, ds_final: dict) -> list[str]:
    """Lines for the end-of-run summary about monitors asked for but not written (the start-up warning, again)."""
    asked, notes = cfg.train.report_to.split(","), []
    if "tensorboard" in asked and not ds_final.get("tensorboard", {}).get("enabled"):
        notes.append("warning: TensorBoard was asked for (--report-to tensorboard or the DeepSpeed JSON) but the "
                     "tensorboard package is not installed: no TensorBoard events were written (pip install "
                     "tensorboard); metrics.jsonl has every step")
    if "wandb" in asked and not ds_final.get("wandb", {}).get("enabled"):
        notes.append("warning: W&B was asked for (--report-to wandb or the DeepSpeed JSON) but the wandb package is "
                     "not installed: nothing was logged to W&B (pip install wandb); metrics.jsonl has every step")
    return notes


def _wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def _tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def describe(cfg: Config, ds_final: dict | None, ds_path: str | None) -> str:
    """The effective configuration, compact: one line per section (printed once by rank 0)."""
    d = cfg.to_dict()
    lines = [f"  {sec}: " + " ".join(f"{k}={v}" for k, v in d[sec].items()) for sec in ("model", "data", "train")]
    if ds_final is not None:
        z = ds_final.get("zero_optimization", {})
        extra = f" (taken from it: {', '.join(sorted(cfg.from_deepspeed))})" if cfg.from_deepspeed else ""
        lines.append(f"  deepspeed: {ds_path or 'no JSON'}{extra}: batch {ds_final.get('train_batch_size')} = micro "
                     f"{ds_final.get('train_micro_batch_size_per_gpu')} x accumulation "
                     f"{ds_final.get('gradient_accumulation_steps')} x dp, zero {z.get('stage')}, bf16 "
                     f"{ds_final.get('bf16', {}).get('enabled')}, clip {ds_final.get('gradient_clipping')}")
    return "megapix: effective configuration\n" + "\n".join(lines)


def run_record(cfg: Config, ds_final: dict | None, ds_path: str | None) -> dict:
    """<out>/config.json: what this run trains with (megapix's config and the final DeepSpeed config), and where
    settings came from."""
    return {"megapix_version": __version__, "config": cfg.to_dict(), "deepspeed": ds_final,
            "deepspeed_config_path": ds_path and os.path.abspath(ds_path),
            "set_by_user": sorted(cfg.explicit), "taken_from_deepspeed": sorted(cfg.from_deepspeed)}
