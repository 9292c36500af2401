"""Command-line flags generated from the config dataclasses: the dataclass is the one place a setting, its type,
its default and its help live; argparse only reads them.

A field becomes a flag by its name (`max_steps` -> `--max-steps`), typed from its annotation: int, float, str;
`X | None` (the default None means "decided later", told by the field's `default_help`); `Literal[...]` ->
choices; bool -> `--x/--no-x`. Field metadata (see `opt`) adds help, another flag name, aliases, a metavar, a
positional spelling still accepted for an older interface, and `kind="out"` for output paths (refused at parse
time when a parent is a regular file, before anything is created). Every help line ends with its default.

Parsed values are the flags the user gave (argparse default SUPPRESS), so callers can layer them over a config
file and know which fields were set by the user. A run's config follows one rule, field by field (a flag
overrides a field, never a whole section): defaults (or a resumed run's saved config) < model preset < --config
file < flags (`config_from_args`).

Convention for a command (how `megapix <cmd>` uses this; finetune adopts it the same way):
    @dataclass class FooConfig: fields with opt(...) metadata, validation in __post_init__ (ConfigError)
    parser = command_parser("megapix foo", "what it does", FooConfig)
    args = parse_command(parser, FooConfig, argv)        # -> a validated FooConfig
A model is always named by `--checkpoint PATH` (field `checkpoint` with `checkpoint_field()`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import types
import typing
from typing import Any, Literal

from megapix import __version__
from megapix.config import (PRESETS, Config, ConfigError, DataConfig, ModelConfig, TrainConfig, field_types,
                            read_config_file)

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


# ---- types ----
def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


_finite_float.__name__ = "float"


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


_int.__name__ = "int"


def check_out_path(path: str, flag: str = "--out") -> str:
    """An output path whose parents are directories (or do not exist yet): a regular file above it is refused
    before anything is created."""
    if not path:
        raise ConfigError(f"{flag} is empty; pass a folder or file name")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path!r} lies under {parent!r}, which is a regular file; choose a path in a folder")
    return path


def _out_type(flag: str):
    def parse(text: str) -> str:
        try:
            return check_out_path(text, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag} ")) from None

    parse.__name__ = "path"
    return parse


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _literal_choices(tp):
    return list(typing.get_args(tp)) if typing.get_origin(tp) is Literal else None


def _describe_default(f) -> str:
    if f.metadata.get("default_help"):
        return f.metadata["default_help"]
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def flag_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `megapix train: error: argument --lr: ... (see --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=110)

    def _split_lines(self, text, width):
        """argparse's wrapping, but never inside a flag: `--context-parallel` stays whole (copyable, findable)."""
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def command_parser(prog: str, description: str) -> Parser:
    p = Parser(prog=prog, description=description, formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"megapix {__version__}")
    return p


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    """--local_rank, which the deepspeed launcher appends (ranks are read from the environment)."""
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                   dest="_local_rank")


def add_fields(p: argparse.ArgumentParser, cls, *, prefix: str = "", title: str | None = None,
               exclude: tuple = (), only: tuple | None = None, run_defaults: dict | None = None) -> dict[str, str]:
    """Add one flag per field of dataclass `cls`; returns dest -> field name. Values the user does not give are
    absent from the parsed namespace (default SUPPRESS). Positional spellings go in field order. `run_defaults`
    (field -> value): what a run without --config uses where it differs from the field's own default."""
    group = p.add_argument_group(title) if title else p
    hints = field_types(cls)
    dests = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or f.name in exclude or (only is not None and f.name not in only):
            continue
        tp = _unwrap_optional(hints[f.name])
        flag = flag_name(f)
        dest = prefix + f.name
        text = f.metadata.get("help", "")
        default = _describe_default(f)
        if run_defaults and f.name in run_defaults and str(run_defaults[f.name]) != default:
            default = f"{run_defaults[f.name]}; {default} under a --config file"
        kw: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS,
                                  help=f"{text} (default: {default})".lstrip().replace("%", "%%"))
        names = [flag, *f.metadata.get("aliases", ())]
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            choices = _literal_choices(tp)
            if choices is not None:
                kw["choices"] = choices
                kw["type"] = _int if isinstance(choices[0], int) else str
                if f.metadata.get("bare") is not None:
                    kw.update(nargs="?", const=f.metadata["bare"])
            elif f.metadata.get("kind") == "out":
                kw["type"] = _out_type(flag)
            else:
                kw["type"] = {int: _int, float: _finite_float}.get(tp, str)
            if choices is None:
                kw["metavar"] = f.metadata.get("metavar") or {int: "N", float: "X"}.get(tp, f.name.upper())
        group.add_argument(*names, **kw)
        if f.metadata.get("positional"):
            # the older positional spelling, still accepted; --flag is the documented one
            p.add_argument(dest + "@pos", nargs="?", default=argparse.SUPPRESS, type=kw.get("type", str),
                           metavar=f.name.upper(), help=f"same as {flag}")
        dests[dest] = f.name
    return dests


def given(ns: argparse.Namespace, dests: dict[str, str]) -> dict[str, Any]:
    """field name -> value for the flags the user gave (a positional spelling counts; both must agree)."""
    values = vars(ns)
    out = {}
    for dest, name in dests.items():
        flag_value, pos_value = values.get(dest, _UNSET), values.get(dest + "@pos", _UNSET)
        if flag_value is not _UNSET and pos_value is not _UNSET and flag_value != pos_value:
            raise ConfigError(f"{name} given twice ({pos_value!r} and --{name.replace('_', '-')} {flag_value!r}); "
                              "pass it once")
        value = flag_value if flag_value is not _UNSET else pos_value
        if value is not _UNSET:
            out[name] = value
    return out


_UNSET = object()


def build(cls, values: dict[str, Any], where: str = "arguments"):
    """Construct a validated dataclass; a missing required value or a bad one is a ConfigError."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("default_help") == "required" and values.get(f.name, f.default) is None:
            raise ConfigError(f"{flag_name(f)} is required ({f.metadata.get('help', '')})")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_command(prog: str, description: str, cls, argv=None, *, launcher: bool = False):
    """The whole flow for a command whose options are one dataclass: parser, parse, build -> cls instance."""
    p = command_parser(prog, description)
    dests = add_fields(p, cls)
    if launcher:
        add_launcher_args(p)
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    return build(cls, given(ns, dests))


# ---- a run's configuration (train; finetune adopts the same) ----
def add_config_args(p: argparse.ArgumentParser, exclude: dict[str, tuple] | None = None,
                    run_defaults: dict | None = None) -> None:
    """--config FILE, --model PRESET, --deepspeed_config JSON, and one flag per field of ModelConfig, DataConfig
    and TrainConfig (dest "section.field"; `exclude` drops fields a command defines differently; `run_defaults`, a
    config dict such as config.DEFAULT_RUN: what the command runs without --config, shown as the defaults)."""
    exclude, run_defaults = exclude or {}, run_defaults or {}
    p.add_argument("--config", metavar="FILE", help="YAML/JSON config with sections model/data/train; flags override "
                   "it (default: none)")
    p.add_argument("--model", metavar="PRESET", help=f"model preset: {', '.join(PRESETS)}; its fields lie beneath the "
                   "config file's model fields and the model flags (replaces the file's `preset:`) (default: tiny)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", metavar="JSON",
                   help="DeepSpeed JSON (ds_configs/); authoritative: its settings are taken in, a conflicting "
                   "megapix setting is an error (default: none)")
    for sec, cls in SECTIONS.items():
        shown = {k: v for k, v in run_defaults.get(sec, {}).items() if k != "preset"}
        add_fields(p, cls, prefix=f"{sec}.", title=f"{sec} (config file section {sec})",
                   exclude=tuple(exclude.get(sec, ())), run_defaults=shown)


def given_settings(args: argparse.Namespace) -> dict[str, dict]:
    """What the user set, by section: a model preset's fields (--model, else the file's `preset:`), then the
    --config file's fields (the whole file validated first, even where flags override it), then the flags: a flag
    overrides a field, never a whole section."""
    path = getattr(args, "config", None)
    raw = dict(read_config_file(path)) if path else {}
    if path:
        Config.from_dict(raw, where=path)  # every value of the file valid on its own
    given = {sec: dict(raw.get(sec) or {}) for sec in SECTIONS}
    preset = given["model"].pop("preset", None)
    preset = getattr(args, "model", None) or preset
    for dest, value in vars(args).items():
        sec, _, name = dest.partition(".")
        if sec in SECTIONS and name:
            given[sec][name] = value
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
        given["model"] = {**PRESETS[preset], **given["model"]}
    return given


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> Config:
    """One validated Config by one rule, field by field: base < what the user set (given_settings: preset <
    --config file < flags). `base` is a config dict: the dataclass defaults when None, the train command's default
    run without --config (config.DEFAULT_RUN), a saved run's config (Config.to_dict) when resuming it.
    Config.explicit records what the user set (the DeepSpeed JSON rules and a resume's checks need to know)."""
    given = given_settings(args)
    base = dict(base or {})
    base_model = dict(base.get("model") or {})
    if "preset" in base_model:  # a base written as a config file (the default run): its preset as fields
        base_model = {**PRESETS[base_model.pop("preset")], **base_model}
    base["model"] = base_model
    raw = {sec: {**(base.get(sec) or {}), **given[sec]} for sec in SECTIONS}
    where = f"{args.config} (with flags)" if getattr(args, "config", None) else "arguments"
    cfg = Config.from_dict(raw, where=where)
    cfg.explicit = frozenset(f"{sec}.{k}" for sec in SECTIONS for k in given[sec])
    return cfg
