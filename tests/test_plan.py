"""megapix plan: the formulas' invariants, the CLI, and the memory model against what the DeepSpeed engine holds."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from megapix.config import model_preset
from megapix.parallel.layout import Layout, layout_problems
from megapix.plan import (DEVICES, PAPER_ITERATIONS, block_activation_bytes, candidates, ds_config_file, layer_params,
                          memory, partition_balanced, search, state_bytes, step_time)
from test_parallel_helpers import ROOT, env, free_port

H100 = DEVICES["h100"]


def problem(m, lay, global_batch, gpus_per_node):
    """megapix.parallel.layout.layout_problems, joined (None: the layout can run)."""
    return "; ".join(layout_problems(m, lay, global_batch, gpus_per_node)) or None


def test_one_device_table_for_the_planner_and_the_metrics_mfu(monkeypatch):
    """megapix.plan.devices is the one table of device peaks: the engine's MFU looks a GPU's name up there (the
    longest key it contains: an A100 is no A10), and `plan --gpu` offers the devices it has links for."""
    import torch

    from megapix import engine
    from megapix.plan.devices import PLANNED, device_for

    assert device_for("NVIDIA A100-SXM4-80GB") is DEVICES["a100"] and device_for("NVIDIA A10").peak_tflops == 125
    assert device_for("NVIDIA H100 80GB HBM3") is H100 and device_for("NVIDIA H200") is DEVICES["h200"]
    assert device_for("Tesla V100-SXM2-32GB").peak_tflops == 125 and device_for("AMD Instinct MI300X") is None
    assert set(PLANNED) == {"a100", "h100", "h200"} and not hasattr(engine, "PEAK_TFLOPS")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    assert engine.device_peak_tflops(None, "cuda")[0] == 312.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    assert engine.device_peak_tflops(None, "cuda")[0] is None


def test_search_is_bounded():
    """The divisors the search walks come in O(sqrt n); a cluster past MAX_GPUS is refused, one at it answers."""
    from megapix.plan.search import MAX_GPUS, _divisors, pinned_problem

    for n in (*range(1, 400), 720720, MAX_GPUS):
        assert _divisors(n) == [k for k in range(1, n + 1) if n % k == 0]
    assert "no layout divides" in pinned_problem(model_preset("igpt-s"), MAX_GPUS, 8, 128)


# ---- formulas ----
@pytest.mark.parametrize("name", ["tiny", "small", "bench", "igpt-s", "igpt-xl"])
def test_layer_params_sum_to_the_model_and_split_under_tp(name):
    for bias in (False, True):
        m = model_preset(name, bias=bias)
        assert sum(layer_params(m)) == m.num_parameters()
        for tp in (2, 4):
            if m.n_head % tp:
                continue
            shard = layer_params(m, tp)
            # replicated: embeddings, norms, row-parallel biases; everything else divides by tp
            replicated = (512 + 1 + m.n_positions) * m.d_model + m.n_layer * (2 + (2 if bias else 0)) * m.d_model \
                + m.d_model
            assert tp * (sum(shard) - replicated) + replicated == m.num_parameters()


def test_partition_balanced_equals_deepspeeds():
    from deepspeed.runtime.utils import partition_balanced as ds_partition

    cases = [layer_params(model_preset(n), tp) for n in ("tiny", "small", "igpt-l", "igpt-xl") for tp in (1, 2, 8)]
    cases += [[5, 1, 1, 1, 1, 7], [3, 3, 3], [1] * 10]
    for weights in cases:
        for parts in (2, 3, 4, 8, 16):
            if parts <= len(weights):
                assert partition_balanced(weights, parts) == list(ds_partition(weights, parts)), (weights, parts)


def test_state_bytes_table():
    P = 1000.0
    # bf16 ZeRO-2 over 8 ranks at the step: DeepSpeed's estimate 2P + 18P/8 less the bf16 gradient partition
    st = state_bytes(P, 8, 2, "bf16", False)
    assert sum(st.values()) == pytest.approx(2 * P + 16 * P / 8)
    assert sum(state_bytes(P, 1, 0, "fp32", False).values()) == 16 * P  # params, grads, Adam m and v
    assert state_bytes(P, 4, 0, "fp32", False)["master"] == 0  # torch AdamW on fp32 weights: no copy
    assert sum(state_bytes(P, 4, 3, "bf16", False).values()) == pytest.approx(20 * P / 4)


def test_activation_formula_per_kernel_path():
    m = model_preset("igpt-s")
    s, h, a, b = m.n_ctx, m.d_model, m.n_head, 2
    rows = s * b
    stats = 8 * rows + 4 * a * rows  # two fp32 rstd per row, the fp32 log-sum-exp per row and head
    # 16-bit: Korthikanti et al.'s 34 sbh less the dropout masks; the Triton kernel's [B, H, T, Dh] output is a
    # second copy beside c_proj's input, SDPA's is not
    assert block_activation_bytes(m, b, 1, "torch", 2) == 32 * rows * h + stats
    assert block_activation_bytes(m, b, 1, "triton", 2) == 34 * rows * h + stats
    # TP: norms and column-parallel inputs (8 sbh) replicated, the rest divided
    assert block_activation_bytes(m, b, 4, "torch", 2) == 8 * rows * h + 24 * rows * h / 4 + 8 * rows + a * rows
    full = memory(m, Layout(micro_batch=2), 2)
    ckpt = memory(m, Layout(micro_batch=2, checkpointing=True), 2)
    assert ckpt.activations < full.activations and ckpt.activations == full.activations_ckpt
    assert ckpt.peak < full.peak
    assert memory(m, Layout(micro_batch=2), 2, kernels="torch").activations < full.activations


def test_pipeline_bubble_and_in_flight_micro_batches():
    m = model_preset("igpt-l")
    for micro_batches in (4, 16):
        lay = Layout(pp=4, dp=1, micro_batch=1)
        t = step_time(m, lay, micro_batches, 1, 8, H100)
        per_stage = t.compute + t.elementwise + t.tp_comm
        assert t.bubble == pytest.approx(per_stage * 3 / micro_batches)
    # 1F1B: the first stage keeps min(p, m) micro-batches in flight (counted in tests/test_activations.py)
    few = memory(m, Layout(pp=4, micro_batch=1), 2)
    many = memory(m, Layout(pp=4, micro_batch=1), 16)
    assert many.activations == pytest.approx(2 * few.activations, rel=0.02)
    assert many.pipe_buffers > few.pipe_buffers


def test_search_returns_runnable_fitting_layouts_fastest_first():
    plans = search("igpt-xl", 8, 8, 80, H100, 64, best_per_layout=False)
    assert plans
    speeds = [p.timing.tokens_per_s for p in plans]
    assert speeds == sorted(speeds, reverse=True)
    for p in plans:
        L = p.layout
        assert p.memory.peak <= 80e9 and L.world == 64 and L.tp <= 8
        assert problem(model_preset("igpt-xl"), L, 64, 8) is None
        assert not (L.pp > 1 and L.zero_stage > 1)
        assert f"--tensor-parallel {L.tp} --pipeline-parallel {L.pp} --zero-stage {L.zero_stage}" in p.command
        assert p.ds_config["train_batch_size"] == 64 * L.cp  # DeepSpeed counts the CP ranks as data-parallel
        assert p.ds_config["gradient_accumulation_steps"] * L.micro_batch * L.dp == 64
    # XL does not fit on one 80 GB GPU (6.8B parameters x 16 bytes of states alone)
    assert search("igpt-xl", 1, 1, 80, H100, 64) == []
    # layouts DeepSpeed refuses never appear
    m = model_preset("igpt-xl")
    assert all(lay.tp in (1, 2, 4, 8) for lay in candidates(m, 64, 8, 64))  # 24 heads: 3 and 6 divide, 512 not


def test_xl_config_is_the_planners_choice():
    """configs/igpt_xl_imagenet.yaml is the planner's first choice for 8 nodes x 8 H100 80 GB at the paper's batch."""
    from megapix.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "igpt_xl_imagenet.yaml"))
    best = search("igpt-xl", 8, 8, 80, H100, 64)[0].layout
    t = cfg.train
    assert (t.tensor_parallel, t.pipeline_parallel, t.zero_stage, t.micro_batch, t.activation_checkpointing) == \
        (best.tp, best.pp, best.zero_stage, best.micro_batch, best.checkpointing)
    assert t.global_batch == 64 and t.max_steps == 2_000_000
    with open(os.path.join(ROOT, "slurm", "train_xl.sbatch")) as f:
        sbatch = f.read()
    assert f'"${{TP:={best.tp}}}" "${{PP:={best.pp}}}" "${{ZERO_STAGE:={best.zero_stage}}}"' in sbatch


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "megapix", "plan", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_table_json_and_errors():
    out = run_cli("--model", "igpt-s", "--nodes", "1", "--gpus-per-node", "8", "--gpu", "a100", "--json")
    assert out.returncode == 0, out.stderr
    plans = json.loads(out.stdout)
    assert plans and all(p["fits"] and p["world"] == 8 for p in plans)
    assert plans[0]["timing"]["tokens_per_s"] >= plans[-1]["timing"]["tokens_per_s"]
    # the trainer's flag names, and the old short spellings
    for flags in (("--tensor-parallel", "2", "--pipeline-parallel", "2", "--zero-stage", "1"),
                  ("--tp", "2", "--pp", "2", "--zero", "1")):
        one = run_cli("--model", "igpt-l", "--nodes", "1", "--gpus-per-node", "8", *flags, "--micro-batch", "4",
                      "--activation-checkpointing")
        assert one.returncode == 0, one.stderr
        assert "TP2 x PP2 x DP2, ZeRO-1, mb 4, ckpt" in one.stdout and "deepspeed " in one.stdout
        assert "stated device constants" in one.stdout
    bad = run_cli("--model", "igpt-l", "--nodes", "1", "--gpus-per-node", "8", "--tp", "3", "--pp", "1", "--zero", "0")
    assert bad.returncode == 2 and "megapix plan: error:" in bad.stderr and "TP 3" in bad.stderr
    # a pin alone names its own problem, not "no layout fits"
    three = run_cli("--tensor-parallel", "3", "--gpus-per-node", "8")
    assert three.returncode == 2 and "--tensor-parallel 3 does not divide the 8 GPUs" in three.stderr, three.stderr
    heads = run_cli("--model", "igpt-s", "--tensor-parallel", "16", "--nodes", "2", "--gpus-per-node", "16")
    assert heads.returncode == 2 and "heads" in heads.stderr, heads.stderr
    torch_path = run_cli("--model", "igpt-s", "--gpus-per-node", "1", "--kernels", "torch", "--json")
    assert torch_path.returncode == 0 and all("--kernels torch" in p["command"] for p in json.loads(torch_path.stdout))
    table = run_cli("--table", "--gpu", "h100")
    assert table.returncode == 0 and table.stdout.count("| igpt-") == 16


def test_every_row_has_a_ds_config_the_trainer_accepts():
    """Each row's DeepSpeed config is made by megapix.dsconfig (resolve + make_ds_config, the trainer's checks), so a
    ZeRO stage that disagrees with the file would raise here; ZeRO-0 rows name no file."""
    for gpus in (1, 2, 8):
        for p in search("igpt-s", 1, gpus, 80, H100, 128, best_per_layout=False):
            cfg = p.ds_config
            assert cfg["zero_optimization"]["stage"] == p.layout.zero_stage
            assert cfg["train_batch_size"] == 128 * p.layout.cp and cfg["bf16"]["enabled"] is True
            assert (ds_config_file(p.layout) is None) == (p.layout.zero_stage == 0)
            assert ("--deepspeed-config" in p.command) == (p.layout.zero_stage > 0)


# ---- the memory model against the engine ----
WORKER = r'''
import gc, json, os, sys, tempfile
sys.path.insert(0, os.environ["MEGAPIX_ROOT"])
import numpy as np
from megapix.parallel.launch import init_distributed
init_distributed()
import torch.distributed as dist
from megapix.config import Config, DataConfig, TrainConfig, model_preset
from megapix.engine import Trainer
from megapix.parallel.layout import Layout
from megapix.plan import deepspeed_estimate, stage_params, state_bytes
from megapix.plan.checks import engine_state_bytes

rank, world = dist.get_rank(), dist.get_world_size()
work = os.environ["PLAN_WORK"]
palette = os.path.join(work, "palette.npy")
if rank == 0 and not os.path.exists(palette):
    np.save(palette, np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
dist.barrier()
for spec in json.loads(os.environ["PLAN_LAYOUTS"]):
    lay = Layout(micro_batch=2, **spec)
    # not the bench preset: its 32x32 position table is all it adds to tiny's and small's terms, at 40% of the time
    for name, precision in (("tiny", "fp32"), ("small", "fp32"), ("tiny", "bf16")):
        m = model_preset(name, kernels="torch")
        cfg = Config(model=m, data=DataConfig(source="synthetic:32", palette=palette),
                     train=TrainConfig(global_batch=4 * lay.dp, micro_batch=2, max_steps=2, eval_every=0,
                                       zero_stage=lay.zero_stage, tensor_parallel=lay.tp, pipeline_parallel=lay.pp,
                                       precision=precision,
                                       out=os.path.join(work, name)))  # one --out for all ranks, as a real run
        tr = Trainer(cfg)  # micro-batch 2: at 1, autograd leaves sos.grad a view of a [1, T, d] gradient (T x more)
        inner = getattr(tr.engine.optimizer, "optimizer", tr.engine.optimizer)
        seen = {}
        inner.register_step_pre_hook(lambda *a: seen.update(engine_state_bytes(tr.engine)))
        tr.train_step(tr._next_batches())
        tr.step += 1
        # measured as this second step begins: Adam state from the first, gradients of this one
        tr.train_step(tr._next_batches())
        P = stage_params(m, lay.tp, lay.pp)[tr.layout.pp_rank]
        pred = state_bytes(P, lay.dp, lay.zero_stage, precision, lay.pp > 1)
        row = {"model": name, "precision": precision, "layout": lay.describe(batch=False), "rank": rank,
               "measured": seen,
               "predicted": pred, "deepspeed_bf16": deepspeed_estimate(m, lay),
               "planner_bf16": sum(state_bytes(P, lay.dp, lay.zero_stage, "bf16", lay.pp > 1).values())}
        with open(os.path.join(work, f"rows-{world}-{rank}.jsonl"), "a") as f:  # one file per rank: no interleaving
            f.write(json.dumps(row) + "\n")
        del tr, inner
        gc.collect()
'''

CHECKS = {  # world size -> layouts measured in that one launch
    1: [dict()],
    # DeepSpeed keeps the last engine's mpu in a module global (deepspeed.utils.groups), so in one process the
    # plain data-parallel engines are built before the model-parallel ones
    2: [dict(dp=2, zero_stage=1), dict(dp=2, zero_stage=2), dict(dp=2, zero_stage=3), dict(tp=2), dict(pp=2)],
    4: [dict(tp=2, pp=2)],
}


@pytest.mark.slow
def test_planner_state_bytes_equal_what_the_engine_holds(tmp_path):
    """CPU: for tiny/small (fp32) and tiny (bf16) in 1 rank, TP2, PP2, DP2 ZeRO-1/2/3 and TP2 x PP2, the
    planner's parameter, gradient, master and Adam bytes per rank equal the engine's tensors (walked at the optimizer
    step) within 2%."""
    script = tmp_path / "plan_worker.py"
    script.write_text(WORKER)
    rows = []
    for nproc, layouts in CHECKS.items():
        e = env()
        e.update(MEGAPIX_ROOT=ROOT, PLAN_WORK=str(tmp_path), PLAN_LAYOUTS=json.dumps(layouts))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                               "--master_port", str(free_port()), str(script)], cwd=ROOT, env=e, capture_output=True,
                              text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        for r in range(nproc):
            with open(tmp_path / f"rows-{nproc}-{r}.jsonl") as f:
                rows += [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 3 * sum(len(v) * k for k, v in CHECKS.items())
    print("\n| model | precision | layout | rank | engine (MiB) | planner (MiB) | diff | planner bf16 | DeepSpeed est. "
          "bf16 |")
    worst = 0.0
    for r in rows:
        meas, pred = sum(r["measured"].values()), sum(r["predicted"].values())
        diff = (pred - meas) / meas
        worst = max(worst, abs(diff))
        ds = "n/a" if r["deepspeed_bf16"] is None else f"{r['deepspeed_bf16'] / 2**20:.2f}"
        print(f"| {r['model']} | {r['precision']} | {r['layout']} | {r['rank']} | {meas / 2**20:.3f} | "
              f"{pred / 2**20:.3f} | "
              f"{diff:+.2%} | {r['planner_bf16'] / 2**20:.2f} | {ds} |")
        for key, p in r["predicted"].items():  # every component, not only the total
            m = r["measured"][key]
            assert abs(p - m) <= 0.02 * max(p, m) + 0.005 * meas, (r, key)
        assert abs(diff) <= 0.02, r
    print(f"worst |planner - engine| / engine = {worst:.3%}")


# ---- every command the planner prints runs ----
COMMANDS_WORKER = r'''
import json, os, shlex, sys
sys.path.insert(0, os.environ["MEGAPIX_ROOT"])
from megapix import train

for argv in json.loads(os.environ["PLAN_COMMANDS"]):
    code = train.main(argv)
    assert code == 0, (argv, code)
    sys.stdout.flush()
    os.write(1, f"RAN {shlex.join(argv)}\n".encode())  # one write(2): ranks share the pipe, print() may split
'''


def scaled_to_tiny(command: str, out: str) -> list[str]:
    """A printed command with the model, batch and length scaled to a CPU run: its layout flags and ds_config stay."""
    argv = shlex.split(command)
    assert argv[:5] == ["deepspeed", "--num_nodes", "1", "--num_gpus", argv[4]] and argv[5] == "megapix/train.py"
    args = argv[6:]
    for flag, value in (("--model", "tiny"), ("--global-batch", "4"), ("--micro-batch", "1")):
        args[args.index(flag) + 1] = value
    return args + ["--max-steps", "2", "--eval-every", "0", "--no-samples", "--out", out]


@pytest.mark.slow
def test_every_printed_command_runs_scaled_to_tiny(tmp_path):
    """Every distinct (TP, PP, ZeRO, ds_config) row `megapix plan` prints for igpt-s on 1 and on 2 GPUs, scaled to the
    tiny preset, runs 2 steps on CPU: through train.main in one 2-rank launch (a 1-GPU row's shape is always also a
    2-GPU row; data-parallel rows first: DeepSpeed keeps the last engine's mpu in a module global), and the 1-GPU
    best row, the first command a single-GPU user copies, through the deepspeed launcher exactly as printed."""
    rows, first, split = {}, None, {}
    for gpus in (2, 1):
        out = run_cli("--model", "igpt-s", "--nodes", "1", "--gpus-per-node", str(gpus), "--top", "0", "--json")
        assert out.returncode == 0, out.stderr
        plans = json.loads(out.stdout)
        for p in plans:
            L = p["layout"]
            key = (L["tp"], L["pp"], L["zero_stage"], p["ds_config_file"])
            if L["sp"] or L["cp"] > 1:  # one SP row and one CP row beside the rest (the first of each)
                split.setdefault("sp" if L["sp"] else "cp", p["command"])
                continue
            assert gpus == 2 or key in rows, f"a 1-GPU row with no 2-GPU twin: {key}"
            rows.setdefault(key, p["command"])
        first = plans[0]["command"]
    assert any(key[2] == 0 and key[3] is None for key in rows) and len(rows) >= 10
    keys = sorted(rows, key=lambda k: (k[0] > 1 or k[1] > 1, k[0], k[1], k[2]))
    commands = [scaled_to_tiny(rows[k], str(tmp_path / f"run-{i}")) for i, k in enumerate(keys)]
    assert "--sequence-parallel" in split["sp"] and "--context-parallel 2" in split["cp"]
    # the CP row (no TP) among the data-parallel ones, before any engine leaves an mpu behind; the SP row last
    n_dp = sum(1 for k in keys if k[0] == k[1] == 1)
    commands.insert(n_dp, scaled_to_tiny(split["cp"], str(tmp_path / "run-cp")))
    commands.append(scaled_to_tiny(split["sp"], str(tmp_path / "run-sp")))
    script = tmp_path / "commands_worker.py"
    script.write_text(COMMANDS_WORKER)
    e = env()
    e.update(MEGAPIX_ROOT=ROOT, PLAN_COMMANDS=json.dumps(commands))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script)], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("RAN ") == 2 * len(commands)  # every rank ran every row
    # the launcher as printed (a free --master_port added: tests share the machine)
    launcher = shlex.split(first)[:5]
    cmd = [*launcher, "--master_port", str(free_port()), "megapix/train.py",
           *scaled_to_tiny(first, str(tmp_path / "launcher"))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_readme_max_resolution_table_is_the_planners(capsys):
    """docs/planner.md's model-resolution table is `megapix plan --max-resolution --gpu h100`'s output, as printed."""
    from megapix.commands.plan import main as plan_main

    assert plan_main(["--max-resolution", "--gpu", "h100"]) == 0
    printed = capsys.readouterr().out.strip()
    with open(os.path.join(ROOT, "docs", "planner.md")) as f:
        readme = f.read()
    assert printed.count("| igpt-") == 12 and printed in readme


def test_check_table_sets_the_planner_beside_deepspeeds_estimators(capsys):
    """`megapix plan --check`: 7 layouts x tiny/small/bench, DeepSpeed's estimate where it has one (ZeRO-1/2/3)."""
    from megapix.commands.plan import main as plan_main

    assert plan_main(["--check"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(("| tiny", "| small", "| bench"))]
    assert len(rows) == 21 and sum(not r.endswith("| n/a |") for r in rows) == 9, rows


def test_planner_rules_for_sequence_and_context_parallelism():
    """SP needs TP > 1 and a TP that divides the positions; CP needs 2 x cp chunks of the sequence, no pipeline and no
    SP; ZeRO partitions over DP x CP (DeepSpeed's data axis)."""
    m = model_preset("igpt-s")  # 1024 positions, 8 heads
    assert "TP > 1" in problem(m, Layout(sp=True), 128, 8)
    assert problem(m, Layout(tp=2, sp=True, dp=4), 128, 8) is None
    assert "2 x 3 chunks" in problem(m, Layout(cp=3), 126, 8)
    assert "pipeline" in problem(m, Layout(pp=2, cp=2), 128, 8)
    assert "SP" in problem(m, Layout(tp=2, sp=True, cp=2), 128, 8)
    lays = list(candidates(m, 8, 8, 128))
    assert any(L.sp for L in lays) and any(L.cp > 1 for L in lays)
    assert all(L.tp > 1 for L in lays if L.sp) and all(L.pp == 1 and not L.sp for L in lays if L.cp > 1)
    one, cp2 = memory(m, Layout(dp=2, zero_stage=3), 128), memory(m, Layout(dp=1, cp=2, zero_stage=3), 128)
    assert cp2.params == one.params and cp2.optimizer == one.optimizer  # both partition over 2 data-axis ranks
    # each CP rank holds half the positions, plus the ring's K/V of the whole sequence and, in bf16, the merges' fp32
    # copies of the partial outputs (megapix.kernels.merge_attention): 84% of DP2's at igpt-s
    assert cp2.activations < 0.9 * one.activations
    # the CLI: a pin no layout can take is named
    bad = run_cli("--model", "igpt-s", "--tensor-parallel", "1", "--sequence-parallel")
    assert bad.returncode == 2 and "--sequence-parallel needs --tensor-parallel > 1" in bad.stderr, bad.stderr
    bad = run_cli("--model", "igpt-s", "--context-parallel", "2", "--pipeline-parallel", "2")
    assert bad.returncode == 2 and "--context-parallel 2 does not run with --pipeline-parallel 2" in bad.stderr
    ok = run_cli("--model", "igpt-xl", "--resolution", "128", "--nodes", "8", "--context-parallel", "2", "--top", "1")
    assert ok.returncode == 0 and "--resolution 128" in ok.stdout and "--context-parallel 2" in ok.stdout, ok.stderr


# ---- what `megapix plan` prints: the best layout first, its commands complete for a real run ----
def run_section(stdout: str) -> tuple[list[str], dict[str, str]]:
    """The commands under the best layout's "run it" (continuation lines joined) and the placeholders explained below
    them: {NAME: its explanation, continuation lines included}."""
    lines = stdout.splitlines()
    start, end = next(i for i, ln in enumerate(lines) if ln.startswith("run it")), lines.index("placeholders:")
    commands, current = [], ""
    for ln in lines[start + 1:end]:
        if not ln.startswith("  "):  # "or on SLURM (...)"
            continue
        current += " " + ln.strip().removesuffix("\\").strip()
        if not ln.endswith("\\"):
            commands.append(current.strip())
            current = ""
    explained, name = {}, None
    for ln in lines[end + 1:]:
        if not ln.startswith("  "):
            break
        head = ln[2:].split(" ", 1)[0]
        if head.isupper():
            name = head
            explained[name] = ln[2 + len(name):].strip()
        else:
            explained[name] += " " + ln.strip()
    return commands, explained


def placeholders_in(command: str) -> set[str]:
    """The capitalised words a command leaves to the user: an argument, or a VAR=value's value (its words)."""
    found = set()
    for token in shlex.split(command):
        value = token.split("=", 1)[1] if "=" in token and not token.startswith("--") else token
        found |= {w for w in value.split() if w.isupper() and w.isalpha()}
    return found


@pytest.mark.parametrize("args, multinode", [(("--model", "igpt-s", "--gpus-per-node", "1"), False),
                                             (("--model", "igpt-xl", "--nodes", "8", "--gpus-per-node", "8"), True)])
def test_plan_prints_the_best_layout_first_with_commands_for_a_real_run(args, multinode, capsys, monkeypatch):
    """The best layout comes first, then the ranked table; its launcher command carries --data, --palette, --out and
    --max-steps, across nodes a DeepSpeed hostfile, and a SLURM line with the batch script's own variables; every
    placeholder a command leaves is explained; no line is over 120 characters."""
    from megapix.commands.plan import main as plan_main

    monkeypatch.chdir(ROOT)  # the commands are printed for the repository root
    assert plan_main([*args, "--top", "5"]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    best = next(i for i, ln in enumerate(lines) if ln.startswith("best (row 1): "))
    head = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["#", "TP", "SP"])
    assert best < lines.index("placeholders:") < head, stdout
    first = search(args[1], 8 if multinode else 1, int(args[-1]), 80, H100, 64 if multinode else 128)[0]
    assert lines[best] == f"best (row 1): {first.model}: {first.layout.describe()} on {first.nodes} x " \
                          f"{first.gpus_per_node} GPUs, global batch {first.global_batch}"
    assert lines[head + 2].split()[:2] == ["1", str(first.layout.tp)]  # the table's row 1 is that layout
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    commands, explained = run_section(stdout)
    launcher, slurm = commands
    assert "megapix/train.py" in launcher and "--data DATA --palette PALETTE --out OUT --max-steps STEPS" in launcher
    # the plan's own command (--json's), with the hostfile and the real run's flags added
    assert shlex.split(launcher)[1:] == (["--hostfile", "HOSTFILE"] if multinode else []) + \
        shlex.split(first.command)[1:] + ["--data", "DATA", "--palette", "PALETTE", "--out", "OUT", "--max-steps",
                                          "STEPS"]
    used = set().union(*map(placeholders_in, commands))
    assert used == {"DATA", "PALETTE", "OUT", "STEPS"} | ({"HOSTFILE"} if multinode else set())
    assert used == set(explained), (used, explained)  # every placeholder explained, and nothing else
    assert "imagefolder:DIR" in explained["DATA"] and "shards:DIR" in explained["DATA"]
    assert "--fit-palette" in explained["PALETTE"] and "download.py --clusters" in explained["PALETTE"]
    assert f"{PAPER_ITERATIONS[first.model]:,}" in explained["STEPS"]
    script = "slurm/train_xl.sbatch" if multinode else "slurm/train.sbatch"
    assert slurm.startswith("mkdir -p logs && ") and slurm.endswith(script)
    with open(os.path.join(ROOT, script)) as f, open(os.path.join(ROOT, "slurm", "launch.sh")) as g:
        read = f.read() + g.read()
    for token in shlex.split(slurm):  # every variable the line sets is one the batch script reads
        if "=" in token and not token.startswith("--"):
            assert "${" + token.split("=")[0] in read, token
    if multinode:
        assert "--hostfile HOSTFILE --num_nodes 8 --num_gpus 8" in launcher
        assert "slots=8" in explained["HOSTFILE"] and "--nodes 8 --ntasks-per-node 8 --gpus-per-node 8" in slurm


@pytest.mark.slow
def test_the_printed_single_node_command_runs_as_printed(tmp_path):
    """The best layout's launcher command for one GPU, copied as printed and run from the repository root in a shell
    whose PATH does not hold the venv: the placeholders filled the way the lines under it explain (the palette fitted
    by the printed `megapix prepare` line, whose shards are the data), the model scaled to tiny and 2 steps."""
    from conftest import run_as_printed

    out = run_cli("--model", "igpt-s", "--gpus-per-node", "1", "--top", "3")
    assert out.returncode == 0, out.stderr
    (launcher, _slurm), explained = run_section(out.stdout)
    prep = tmp_path / "prep"
    prepare = re.search(r"`([^`]*megapix prepare [^`]*)`", explained["PALETTE"])[1]
    prepare = prepare.replace("DATA", "digits").replace("DIR", str(prep)).replace("--resolution 32", "--resolution 8")
    done = run_as_printed(prepare, timeout=600)
    assert done.returncode == 0 and (prep / "palette.npy").is_file(), done.stdout[-2000:] + done.stderr[-3000:]
    fill = {"DATA": f"shards:{prep}", "PALETTE": str(prep / "palette.npy"), "OUT": str(tmp_path / "run"), "STEPS": "2"}
    argv = [fill.get(a, a) for a in shlex.split(launcher)]
    for flag, value in (("--model", "tiny"), ("--global-batch", "4")):  # a CPU-sized run of the same layout
        argv[argv.index(flag) + 1] = value
    argv[1:1] = ["--master_port", str(free_port())]  # tests share the machine
    done = run_as_printed(shlex.join(argv), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        steps = [json.loads(line).get("step") for line in f if line.strip()]
    assert 2 in steps, steps


def test_docs_example_table_is_the_planners(capsys):
    """docs/planner.md's example output: its ranked table is `megapix plan --model igpt-xl --nodes 8 --gpus-per-node 8
    --gpu h100 --top 10`'s, as printed (the commands above it name the venv's programs, which depend on where the
    planner runs)."""
    from megapix.commands.plan import main as plan_main

    argv = ["--model", "igpt-xl", "--nodes", "8", "--gpus-per-node", "8", "--gpu", "h100", "--top", "10"]
    assert plan_main(argv) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("every layout that fits"):printed.index("a row in detail")]
    with open(os.path.join(ROOT, "docs", "planner.md")) as f:
        docs = f.read()
    assert table.count("\n") == 13 and table in docs
    assert printed[:printed.index("run it")] in docs  # the header and the best layout, as printed


# ---- the checkpoint's size, time and interval (megapix.plan.save) ----
def test_save_cost_is_young_daly_over_the_jobs_nodes():
    from megapix.plan.save import save_bytes, save_cost

    m = model_preset("igpt-xl")
    lay = Layout(tp=2, dp=32, zero_stage=3)
    mem = memory(m, lay, 64)
    assert save_bytes(mem, 3) == mem.master + mem.optimizer  # ZeRO-3: the weights are in the partitions
    assert save_bytes(mem, 1) == mem.params + mem.master + mem.optimizer
    c = save_cost(mem, 3, gpus_per_node=8, nodes=8, step_s=2.0, write_gbps=2.0, node_mtbf_hours=6000)
    assert c.seconds == pytest.approx(save_bytes(mem, 3) * 8 / 2e9)
    assert c.job_mtbf_s == pytest.approx(6000 * 3600 / 8)
    assert c.interval_s == pytest.approx((2 * c.seconds * c.job_mtbf_s) ** 0.5)
    assert c.save_every == round(c.interval_s / 2.0)
    twice = save_cost(mem, 3, gpus_per_node=8, nodes=32, step_s=2.0)  # 4x the nodes: half the interval
    assert twice.interval_s == pytest.approx(c.interval_s / 2)


def _bytes_per_rank(tag_dir) -> dict[tuple[int, int], int]:
    """{(dp rank, tp rank): bytes that rank wrote} from DeepSpeed's file names in a tag."""
    found: dict[tuple[int, int], int] = {}
    for name in os.listdir(tag_dir):
        size = os.path.getsize(os.path.join(tag_dir, name))
        if m := re.fullmatch(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt", name):
            key = (int(m.group(1)), int(m.group(2)))
        elif m := re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", name):
            key = (0, int(m.group(1)))  # DP rank 0 writes the module file of its TP shard
        else:
            continue
        found[key] = found.get(key, 0) + size
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name,lay", [("single", Layout()), ("dp2-zero1", Layout(dp=2, zero_stage=1)),
                                      ("dp2-zero3", Layout(dp=2, zero_stage=3)), ("tp2", Layout(tp=2))])
def test_planner_save_bytes_equal_what_a_real_save_writes(name, lay):
    """The planner's bytes per rank per save against the files of a real tiny save (fp32 on CPU) of that layout,
    the rank that writes the most, within 3% (pickle's names and structure on a ~170K-parameter model)."""
    from megapix.checkpoint.tags import read_latest
    from megapix.config import Config
    from megapix.plan.save import save_bytes
    from test_parallel_helpers import layout_run

    ck = os.path.join(str(layout_run(name)), "checkpoints")
    tag_dir = os.path.join(ck, read_latest(ck))
    written = max(_bytes_per_rank(tag_dir).values())
    with open(os.path.join(tag_dir, "megapix_config.json")) as f:
        m = Config.from_dict(json.load(f)).model
    planned = save_bytes(memory(m, lay, 8, "fp32"), lay.zero_stage)
    assert abs(planned - written) <= 0.03 * written, (name, planned, written)
