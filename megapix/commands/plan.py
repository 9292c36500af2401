"""`megapix plan`: the command line. The layout flags are the trainer's (TrainConfig / ModelConfig fields, generated
by megapix.cliargs); for the planner an unset one is searched over. The old short spellings stay accepted."""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from dataclasses import asdict

from megapix import cliargs
from megapix.commands.runner import run
from megapix.config import PRESETS, ConfigError, ModelConfig, TrainConfig, model_preset
from megapix.parallel.layout import Layout, layout_problems
from megapix.plan.devices import DEVICES, EFFICIENCY, PLANNED
from megapix.plan.report import (ASSUMPTIONS, RESOLUTIONS, TABLE_GPUS, check_table, describe, max_resolution_table,
                                 readme_table, table)
from megapix.plan.run import run_block
from megapix.plan.save import NODE_MTBF_HOURS, WRITE_GBPS, describe_save, save_cost
from megapix.plan.search import MAX_GPUS, PAPER_BATCH, ds_config_file, pinned_problem, plan_one, search

LAYOUT_FIELDS = {TrainConfig: ("tensor_parallel", "pipeline_parallel", "zero_stage", "micro_batch", "global_batch",
                               "activation_checkpointing", "precision", "sequence_parallel", "context_parallel"),
                 ModelConfig: ("kernels", "resolution")}
OLD_SPELLINGS = {"--tp": "tensor_parallel", "--pp": "pipeline_parallel", "--zero": "zero_stage"}
PLANNER_DEFAULTS = {"global_batch": "the paper's: 128, 64 for igpt-xl", "precision": "bf16 (auto is bf16: GPUs)",
                    "kernels": "triton (auto is Triton: GPUs)", "resolution": "the preset's"}


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.command_parser("megapix plan", "per-GPU memory, step time and MFU of training layouts; with no "
                               "layout given, every layout that fits, fastest first")
    p.add_argument("--model", default="igpt-xl", help=f"preset: {', '.join(PRESETS)} (default: igpt-xl)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", choices=sorted(PLANNED), default="h100", help="device model (peak, HBM, links)")
    p.add_argument("--gpu-memory", type=float, help="GB per GPU (default: the device's)")
    group = p.add_argument_group("layout (the trainer's flags; each one given pins that axis, the rest are searched)")
    for cls, names in LAYOUT_FIELDS.items():
        cliargs.add_fields(group, cls, only=names)
    for action in group._group_actions:  # the trainer's default is not the planner's: say what an unset flag means
        if action.dest in LAYOUT_FIELDS[TrainConfig] + LAYOUT_FIELDS[ModelConfig] and action.help:
            default = PLANNER_DEFAULTS.get(action.dest, "searched")
            action.help = action.help[:action.help.rfind("(default:")] + f"(default: {default})"
    for flag, dest in OLD_SPELLINGS.items():
        p.add_argument(flag, dest=dest, type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--efficiency", type=float, default=EFFICIENCY, help="achieved fraction of peak on matmuls")
    p.add_argument("--write-gbps", type=float, default=WRITE_GBPS,
                   help=f"checkpoint write bandwidth per node, GB/s (default: {WRITE_GBPS:g})")
    p.add_argument("--node-mtbf-hours", type=float, default=NODE_MTBF_HOURS,
                   help=f"mean time between failures of one node, hours: the suggested --save-every "
                        f"(default: {NODE_MTBF_HOURS:g}, Llama 3's clusters)")
    p.add_argument("--top", type=int, default=20, help="rows of the ranked table (0: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--table", action="store_true", help="docs/planner.md's table: igpt-s/m/l/xl on 1, 8, 64, 256 GPUs")
    p.add_argument("--max-resolution", action="store_true",
                   help=f"docs/planner.md: the largest of {', '.join(map(str, RESOLUTIONS))} each preset fits at on "
                        f"{', '.join(map(str, TABLE_GPUS))} GPUs, with and without SP/CP, and the layout")
    p.add_argument("--check", action="store_true",
                   help="planner model-state bytes next to DeepSpeed's estimators for tiny/small/bench")
    return p


def _positive(flag: str, v, finite: bool = False) -> None:
    if v is not None and (v <= 0 or (finite and not math.isfinite(v))):
        raise ConfigError(f"{flag}={v} must be {'a positive finite number' if finite else 'positive'}")


def validate(a) -> dict:
    """The pinned axes (None: searched), after refusing, in one line each, what no cluster has."""
    pin = {name: getattr(a, name, None) for name in LAYOUT_FIELDS[TrainConfig] + LAYOUT_FIELDS[ModelConfig]}
    for name in ("nodes", "gpus_per_node"):
        _positive(f"--{name.replace('_', '-')}", getattr(a, name))
    for name in ("gpu_memory", "efficiency", "write_gbps", "node_mtbf_hours"):
        _positive(f"--{name.replace('_', '-')}", getattr(a, name), finite=True)
    if a.top < 0:
        raise ConfigError(f"--top={a.top} is a number of rows: 0 (all) or more")
    if a.efficiency > 1:
        raise ConfigError(f"--efficiency={a.efficiency} is a fraction of the peak: at most 1")
    if a.nodes * a.gpus_per_node > MAX_GPUS:
        raise ConfigError(f"--nodes {a.nodes} x --gpus-per-node {a.gpus_per_node} = {a.nodes * a.gpus_per_node:,} "
                          f"GPUs; the planner searches clusters of up to {MAX_GPUS:,}")
    for name in ("tensor_parallel", "pipeline_parallel", "micro_batch", "global_batch", "context_parallel",
                 "resolution"):
        _positive(f"--{name.replace('_', '-')}", pin[name])
    return pin


def main(argv=None) -> int:
    return run("megapix plan", lambda: _plan(argv))


def parse_args(argv=None):
    """The parsed flags, checked (validate): what `megapix plan` would plan, without planning it."""
    a = build_parser().parse_args(argv)
    validate(a)
    return a


def _plan(argv) -> int:
    a = build_parser().parse_args(argv)
    dev = DEVICES[a.gpu]
    pin = validate(a)
    mem_gb = a.gpu_memory or dev.memory_gb
    if a.table:
        print(readme_table(dev, a.efficiency))
        return 0
    if a.check:
        print(check_table())
        return 0
    if a.max_resolution:
        print(max_resolution_table(dev, mem_gb, a.efficiency))
        return 0
    if a.model not in PRESETS:
        raise ConfigError(f"unknown model preset {a.model!r}; choose one of {', '.join(PRESETS)}")
    m = model_preset(a.model, **({"resolution": pin["resolution"]} if pin["resolution"] is not None else {}))
    gb = pin["global_batch"] or PAPER_BATCH.get(a.model, 64)
    run = dict(precision="bf16" if pin["precision"] in (None, "auto") else pin["precision"],
               kernels="triton" if pin["kernels"] in (None, "auto") else pin["kernels"])
    if pin["tensor_parallel"] and pin["pipeline_parallel"] and pin["zero_stage"] is not None:
        return one_layout(a, m, pin, gb, dev, mem_gb, **run)
    return ranked(a, m, pin, gb, dev, mem_gb, **run)


def one_layout(a, m: ModelConfig, pin: dict, gb: int, dev, mem_gb: float, precision: str, kernels: str) -> int:
    """Every axis pinned: that layout in detail; exit 1 when it does not fit."""
    tp, pp, k = pin["tensor_parallel"], pin["pipeline_parallel"], pin["context_parallel"] or 1
    world = a.nodes * a.gpus_per_node
    if world % (tp * pp * k):
        raise ConfigError(f"{world} GPUs are not divisible by TP {tp} x PP {pp} x CP {k}; choose TP x PP x CP "
                          f"dividing {world}")
    dp = world // (tp * pp * k)
    if gb % dp:
        raise ConfigError(f"global batch {gb} is not divisible by DP {dp}; pass --global-batch, a multiple of {dp}")
    lay = Layout(tp, pp, dp, pin["zero_stage"], pin["micro_batch"] or 1, bool(pin["activation_checkpointing"]),
                 bool(pin["sequence_parallel"]), k)
    why = layout_problems(m, lay, gb, a.gpus_per_node)
    if why:
        raise ConfigError(f"layout {lay.describe()} cannot run: {why[0]}")
    p = plan_one(a.model, m, lay, gb, a.nodes, a.gpus_per_node, dev, mem_gb, a.efficiency, precision, kernels)
    if a.json:
        print(json.dumps({**p.to_dict(), "save": asdict(plan_save(a, p))}, indent=1))
    else:
        print(describe(p))
        print("\n".join(describe_save(plan_save(a, p), a.write_gbps, a.node_mtbf_hours,
                                       TrainConfig.collective_timeout)))
        print(f"  fits in {mem_gb:g} GB: {'yes' if p.fits else 'NO'}; ds_config ({ds_config_file(lay) or 'no file'} "
              "+ flags):")
        print(textwrap.fill(json.dumps(p.ds_config), width=116, initial_indent="    ", subsequent_indent="    ",
                            break_on_hyphens=False, break_long_words=False))
        if p.fits:
            print("\n".join(["", *run_block(p), ""]))
        print(ASSUMPTIONS)
    return 0 if p.fits else 1


def ranked(a, m: ModelConfig, pin: dict, gb: int, dev, mem_gb: float, precision: str, kernels: str) -> int:
    """Some axes searched: every layout that fits, fastest first; exit 1 when none does."""
    axes = dict(tp=pin["tensor_parallel"], pp=pin["pipeline_parallel"], zero=pin["zero_stage"],
                micro=pin["micro_batch"], ckpt=pin["activation_checkpointing"], sp=pin["sequence_parallel"],
                cp=pin["context_parallel"])
    why = pinned_problem(m, a.nodes * a.gpus_per_node, a.gpus_per_node, gb, **axes)
    if why:
        raise ConfigError(why)
    plans = search(a.model, a.nodes, a.gpus_per_node, mem_gb, dev, gb, a.efficiency, precision=precision,
                   kernels=kernels, resolution=pin["resolution"], **axes)
    if a.json:
        print(json.dumps([{**p.to_dict(), "save": asdict(plan_save(a, p))} for p in plans], indent=1))
        return 0 if plans else 1
    print(f"{a.model} ({m.num_parameters() / 1e6:.0f}M parameters, {m.n_ctx} tokens/image) on {a.nodes} x "
          f"{a.gpus_per_node} {dev.name} ({mem_gb:g} GB),\nglobal batch {gb}, {precision}, {kernels} kernels: "
          f"{len(plans)} layouts fit")
    if not plans:
        print("no layout fits in memory: add GPUs, lower --global-batch, or use a GPU with more memory",
              file=sys.stderr)
        return 1
    best = plans[0]
    print("\nbest (row 1): " + describe(best))
    print("\n".join(describe_save(plan_save(a, best), a.write_gbps, a.node_mtbf_hours, TrainConfig.collective_timeout)))
    print(f"  ds_config: {ds_config_file(best.layout) or 'none (ZeRO-0)'} + the command's flags "
          "(--json prints it whole)")
    print("\n".join(["", *run_block(best), ""]))
    shown = plans[:a.top] if a.top else plans
    print(f"every layout that fits, fastest first ({len(shown)} of {len(plans)}; memory per GPU in GiB):")
    print(table(plans, a.top or None))
    if len(shown) > 1:
        print(f"a row in detail, with its commands: add its layout flags to this command (--json: every row's); "
              f"row 2's:\n  {' '.join(layout_flags(shown[1].layout))}")
    print(ASSUMPTIONS)
    return 0


def plan_save(a, p):
    """The plan's checkpoint: bytes, seconds and the suggested interval (megapix.plan.save)."""
    return save_cost(p.memory, p.layout.zero_stage, p.gpus_per_node, p.nodes, p.timing.step, a.write_gbps,
                     a.node_mtbf_hours)


def layout_flags(lay: Layout) -> list[str]:
    """The flags that pin every axis of a row's layout (`megapix plan` then shows that one layout in detail)."""
    flags = [f"--tensor-parallel {lay.tp}", f"--pipeline-parallel {lay.pp}", f"--zero-stage {lay.zero_stage}",
             f"--micro-batch {lay.micro_batch}"]
    flags += ["--sequence-parallel"] if lay.sp else []
    flags += [f"--context-parallel {lay.cp}"] if lay.cp > 1 else []
    return flags + ["--activation-checkpointing"] if lay.checkpointing else flags
