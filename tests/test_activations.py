"""The planner's activation terms against what autograd saves, counted with saved_tensors_hooks (megapix.plan.checks):
blocks and whole models on the torch path (bf16, fp32), a TP2 shard, activation checkpointing, and the micro-batches
a real DeepSpeed pipeline keeps in flight on each stage. The Triton path (interpreter, fp32) is counted the same way
in tests/test_model_kernels.py."""
from __future__ import annotations

import pytest
import torch

from megapix.config import model_preset
from megapix.plan.checks import SavedTensors
from megapix.model import ImageGPT
from megapix.model.igpt import Block
from megapix.parallel.layout import Layout
from megapix.plan import (block_activation_bytes, embed_activation_bytes, head_activation_bytes, in_flight,
                          stage_activation_bytes)
from test_parallel_helpers import launch_layouts

TOLERANCE = 0.03


def saved_by_block(m, b, dtype):
    block = Block(m).to(dtype)
    x = torch.randn(b, m.n_ctx, m.d_model, dtype=dtype, requires_grad=True)
    with SavedTensors(block.parameters()) as saved:
        block(x).float().sum()
    return saved.total


def saved_by_model(m, b, dtype):
    model = ImageGPT(m).to(dtype)
    tokens = torch.randint(0, 512, (b, m.n_ctx))
    with SavedTensors(model.parameters()) as saved:
        model.loss(tokens)
    return saved.total


def planned_model(m, b, kernels, nbytes):
    return (m.n_layer * block_activation_bytes(m, b, 1, kernels, nbytes) + embed_activation_bytes(m, b)
            + head_activation_bytes(m, b, 1, nbytes))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,b", [("igpt-s", 1), ("tiny", 2), ("small", 2)])
def test_torch_path_saves_what_the_planner_counts(name, b, dtype):
    m = model_preset(name, kernels="torch")
    nbytes = torch.empty(0, dtype=dtype).element_size()
    block = saved_by_block(m, b, dtype)
    assert block == pytest.approx(block_activation_bytes(m, b, 1, "torch", nbytes), rel=TOLERANCE)
    if name != "igpt-s":  # whole models: embedding ids, blocks, head and loss
        assert saved_by_model(m, b, dtype) == pytest.approx(planned_model(m, b, "torch", nbytes), rel=TOLERANCE)


def test_lean_norm_keeps_the_16_bit_input_and_one_rstd_per_row():
    """The torch path's block in bf16: 32 sbh (+ per-row statistics), where autograd through the formula kept an fp32
    copy and the fp32 product per norm (44 sbh); within 10% of the Triton path's 34 sbh."""
    m = model_preset("igpt-s", kernels="torch")
    sbh = m.n_ctx * m.d_model
    stats = 8 * m.n_ctx + 4 * m.n_head * m.n_ctx
    assert saved_by_block(m, 1, torch.bfloat16) == 32 * sbh + stats
    triton = block_activation_bytes(m, 1, 1, "triton", 2)
    assert abs(block_activation_bytes(m, 1, 1, "torch", 2) - triton) <= 0.10 * triton


# ---- layouts: a TP2 shard, pipelines of 2 and 4 stages, activation checkpointing, in one launch per world size ----
WORKER = r'''
import json, os, sys
sys.path.insert(0, os.environ["MEGAPIX_ROOT"])
import numpy as np
import torch
from megapix.parallel.launch import init_distributed
init_distributed()
import torch.distributed as dist
from megapix.config import Config, DataConfig, TrainConfig, model_preset
from megapix.engine import Trainer
from megapix.plan.checks import SavedTensors
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing

# DeepSpeed's checkpoint keeps each block's input on ctx.deepspeed_saved_tensors, out of saved_tensors_hooks' sight:
# count it on the same ctx, so it is released when DeepSpeed's is
counting = []
_forward = ds_checkpointing.CheckpointFunction.forward


def forward(ctx, run_function, all_outputs, *args):
    out = _forward(ctx, run_function, all_outputs, *args)
    if counting:
        ctx.megapix_held = [counting[0].hold(t) for t in args if torch.is_tensor(t)]
    return out


ds_checkpointing.CheckpointFunction.forward = staticmethod(forward)

rank, world = dist.get_rank(), dist.get_world_size()
work = os.environ["WORK"]
palette = os.path.join(work, "palette.npy")
if rank == 0 and not os.path.exists(palette):
    np.save(palette, np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
dist.barrier()
for spec in json.loads(os.environ["LAYOUTS"]):
    m = model_preset("tiny", kernels="torch")
    cfg = Config(model=m, data=DataConfig(source="synthetic:32", palette=palette),
                 train=TrainConfig(global_batch=8, micro_batch=2, max_steps=2, eval_every=0, zero_stage=0,
                                   tensor_parallel=spec["tp"], pipeline_parallel=spec["pp"], precision="fp32",
                                   activation_checkpointing=spec["ckpt"], sequence_parallel=spec.get("sp", False),
                                   context_parallel=spec.get("cp", 1), out=os.path.join(work, "run")))
    tr = Trainer(cfg)
    tr.train_step(tr._next_batches())  # the first step builds DeepSpeed's buffers; count the second
    tr.step += 1
    batches = tr._next_batches()
    with SavedTensors(tr.engine.module.parameters()) as saved:
        counting.append(saved)
        tr.train_step(batches)
        counting.clear()
    row = dict(spec, rank=rank, stage=tr.layout.pp_rank, micro_batches=len(batches), total=saved.total,
               peak=saved.peak)
    with open(os.path.join(work, f"rows-{world}-{rank}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    del tr
'''

LAUNCHES = {  # world size -> layouts counted in that one launch (tiny, fp32, micro-batch 2, 4 micro-batches a step)
    2: [dict(tp=1, pp=1, ckpt=False, cp=2), dict(tp=2, pp=1, ckpt=False), dict(tp=1, pp=2, ckpt=False),
        dict(tp=1, pp=2, ckpt=True), dict(tp=2, pp=1, ckpt=False, sp=True)],  # no mpu first: DeepSpeed keeps the last
    4: [dict(tp=1, pp=4, ckpt=False)],
}


@pytest.fixture(scope="module")
def layout_rows(tmp_path_factory):
    return launch_layouts(tmp_path_factory.mktemp("activations"), WORKER, LAUNCHES)


def _planned(row):
    m = model_preset("tiny", kernels="torch")
    cp = row.get("cp", 1)
    lay = Layout(tp=row["tp"], pp=row["pp"], dp=row["world"] // (row["tp"] * row["pp"] * cp), micro_batch=2,
                 checkpointing=row["ckpt"], sp=row.get("sp", False), cp=cp)
    stages = stage_activation_bytes(m, lay, 8, nbytes=4, kernels="torch", loss_transient=False)
    return m, lay, stages[row["stage"]]


@pytest.mark.slow
def test_tp2_shard_saves_what_the_planner_counts(layout_rows):
    rows = [r for r in layout_rows if r["tp"] == 2 and not r.get("sp")]
    assert len(rows) == 2
    for r in rows:
        m, lay, planned = _planned(r)
        assert r["peak"] == pytest.approx(planned, rel=TOLERANCE), r
        # one micro-batch at a time outside a pipeline: the peak is one micro-batch's saved tensors
        assert r["total"] == pytest.approx(r["micro_batches"] * r["peak"], rel=TOLERANCE), r


@pytest.mark.slow
@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_stages_keep_min_p_minus_i_m_micro_batches_in_flight(layout_rows, pp):
    """DeepSpeed's 1F1B schedule, counted: stage i's peak of saved bytes over one micro-batch's is min(p - i, m)."""
    rows = sorted((r for r in layout_rows if r["pp"] == pp and not r["ckpt"] and r["tp"] == 1),
                  key=lambda r: r["stage"])
    assert [r["stage"] for r in rows] == list(range(pp))
    for r in rows:
        per_micro = r["total"] / r["micro_batches"]
        counted = r["peak"] / per_micro
        assert counted == pytest.approx(in_flight(pp, r["stage"], r["micro_batches"]), abs=0.05), r
        m, lay, planned = _planned(r)
        assert r["peak"] == pytest.approx(planned, rel=TOLERANCE), r


@pytest.mark.slow
def test_activation_checkpointing_keeps_block_inputs_and_one_recompute(layout_rows):
    rows = [r for r in layout_rows if r["ckpt"]]
    assert len(rows) == 2
    for r in rows:
        m, lay, planned = _planned(r)
        assert r["peak"] == pytest.approx(planned, rel=TOLERANCE), r
        full = next(x for x in layout_rows if x["pp"] == 2 and not x["ckpt"] and x["stage"] == r["stage"])
        assert r["peak"] < full["peak"]


@pytest.mark.slow  # layout_rows launches the 2-rank runs
def test_sequence_and_context_parallel_save_what_the_planner_counts(layout_rows):
    """TP2 + SP: the replicated norm and column-parallel inputs (and the norms' rstd) are cut by t, ~8 sbh / t per block
    instead of 8 sbh; CP2: every activation holds s / cp positions, plus the ring's K/V of the whole sequence and
    the partial results (the planner's ring_block_bytes). Per rank, one micro-batch at a time."""
    tp_rows = {r["rank"]: r for r in layout_rows if r["tp"] == 2 and not r.get("sp")}
    for key in ("sp", "cp"):
        rows = [r for r in layout_rows if r.get(key)]
        assert len(rows) == 2
        for r in rows:
            m, lay, planned = _planned(r)
            assert r["peak"] == pytest.approx(planned, rel=TOLERANCE), r
            assert r["total"] == pytest.approx(r["micro_batches"] * r["peak"], rel=TOLERANCE), r
            if key == "sp":
                assert r["peak"] < tp_rows[r["rank"]]["peak"]  # SP measurably cuts TP's saved bytes
    # the SP block term against the TP one: 4 e rows h (the replicated tensors) and 8 rows (rstd) shrink by t
    m = model_preset("tiny", kernels="torch")
    rows = 2 * m.n_ctx
    cut = block_activation_bytes(m, 2, 2, "torch", 4) - block_activation_bytes(m, 2, 2, "torch", 4, sp=True)
    assert cut == 4 * rows * m.d_model * 4 / 2 + 8 * rows / 2


@pytest.mark.parametrize("with_residual", [False, True])
def test_lean_norm_gradients_equal_autograd_through_the_formula(with_residual):
    """_AddNorm's hand-written backward against autograd differentiating the same formula (float64), including a
    gradient flowing into residual_out."""
    from megapix.kernels.reference import add_norm_formula, add_norm_reference

    g = torch.Generator().manual_seed(0)
    shape = (3, 5, 16)
    leaves = [torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True),
              torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True) if with_residual else None,
              (1 + 0.1 * torch.randn(16, dtype=torch.float64, generator=g)).requires_grad_()]
    dy = torch.randn(shape, dtype=torch.float64, generator=g)
    dres = torch.randn(shape, dtype=torch.float64, generator=g)
    grads = []
    for fn in (add_norm_reference, add_norm_formula):
        y, res = fn(leaves[0], leaves[1], leaves[2], 1e-5)
        loss = (y * dy).sum() + ((res * dres).sum() if with_residual else 0)
        grads.append(torch.autograd.grad(loss, [t for t in leaves if t is not None]))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)
