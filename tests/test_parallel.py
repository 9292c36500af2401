"""Layouts: refusals, tensor-parallel pieces, and the core equivalence test (same loss curve in every layout)."""
from __future__ import annotations

import pytest
import torch

from megapix.config import ConfigError, ModelConfig, TrainConfig
from megapix.parallel.layout import check_layout
from test_parallel_helpers import (EVAL_EVERY, LAYOUTS, SAMPLED, STEPS, layout_run, losses, records, reference_of,
                                   run_worker)

TOL = 1e-4  # fp32, absolute, per step
VAL_TOL = 1e-5  # val_loss: a fixed set, token-weighted, sharded over data-parallel ranks and all-reduced


# ---- refusals (no processes) ----
@pytest.mark.parametrize("world,model,train,zero,needle", [
    (3, {}, dict(tensor_parallel=2), 0, "not divisible by TP 2"),
    (8, dict(n_head=4, d_model=64), dict(tensor_parallel=8, global_batch=8), 0, "4 attention heads cannot be"),
    (3, dict(n_head=6, d_model=96), dict(tensor_parallel=3, global_batch=6), 0, "512-way head"),
    (4, dict(n_layer=2), dict(pipeline_parallel=4), 0, "2 layers cannot fill 4 pipeline stages"),
    (4, {}, dict(pipeline_parallel=2), 2, "does not support ZeRO-2"),
    (4, {}, dict(pipeline_parallel=2), 3, "does not support ZeRO-3"),
])
def test_check_layout_refuses(world, model, train, zero, needle):
    m = ModelConfig(**{"n_layer": 4, "d_model": 128, "n_head": 4, **model})
    t = TrainConfig(**{"global_batch": 8, **train})
    with pytest.raises(ConfigError, match=needle):
        check_layout(world, m, t, zero)


def test_check_layout_accepts_pipeline_with_zero1():
    check_layout(4, ModelConfig(n_layer=2), TrainConfig(pipeline_parallel=2, global_batch=8), 1)


def test_shard_merge_roundtrip():
    from megapix.parallel.tensor import merge_shards, shard_tensor

    d = 8
    for name, shape in [("blocks.0.attn.c_attn.weight", (3 * d, d)), ("blocks.0.attn.c_attn.bias", (3 * d,)),
                        ("blocks.0.mlp.c_fc.weight", (4 * d, d)), ("blocks.0.attn.c_proj.weight", (d, d)),
                        ("blocks.0.mlp.c_proj.weight", (d, 4 * d)), ("head.weight", (512, d)),
                        ("norm_f.weight", (d,)), ("wte.weight", (512, d))]:
        full = torch.randn(shape)
        for tp in (1, 2, 4):
            shards = [shard_tensor(name, full, tp, r) for r in range(tp)]
            assert torch.equal(merge_shards(name, shards), full), (name, tp)
    # q_r | k_r | v_r: rank 1 of 2 takes the second half of each of q, k and v
    full = torch.arange(3 * d).float()
    s = shard_tensor("blocks.0.attn.c_attn.bias", full, 2, 1)
    assert s.tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]


TP_WORKER = r'''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["MEGAPIX_ROOT"])
from megapix.config import ModelConfig
from megapix.model import ImageGPT, lm_loss
from megapix.parallel.tensor import (apply_sequence_parallel, apply_tensor_parallel, VocabParallelLoss, kind_of,
                                     merge_shards)
dist.init_process_group("gloo")
rank, tp = dist.get_rank(), dist.get_world_size()
group = dist.new_group(list(range(tp)))
torch.manual_seed(0)
for objective, sp in (("ar", False), ("bert", False), ("ar", True), ("bert", True)):
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=4, resolution=8, kernels="torch", objective=objective, bias=True)
    tokens = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(3, 64, generator=torch.Generator().manual_seed(2)) < 0.3) if objective == "bert" else None
    ref = ImageGPT(cfg, seed=5)
    with torch.no_grad():  # non-zero biases and head so every path is exercised
        for n, p in ref.named_parameters():
            if n.endswith("bias") or n.startswith("head"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    loss_ref = lm_loss(ref(tokens, mask), tokens, mask)
    loss_ref.backward()
    par = ImageGPT(cfg, seed=5)
    par.load_state_dict(ref.state_dict())
    apply_tensor_parallel(par, group, tp, rank)
    if sp:  # Megatron sequence parallelism on top: the same loss and gradients
        apply_sequence_parallel(par, group)
    loss = VocabParallelLoss(group, rank, objective == "bert")(par(tokens, mask), tokens, mask)
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) < 1e-5, (loss.item(), loss_ref.item())
    ref_grads = dict((n, p.grad) for n, p in ref.named_parameters())
    for n, p in par.named_parameters():
        if p.grad is None:  # sos is unused by BERT
            assert ref_grads[n] is None, n
            continue
        gathered = [torch.empty_like(p.grad) for _ in range(tp)]
        dist.all_gather(gathered, p.grad.contiguous(), group=group)
        if kind_of(n) == "replicated":  # identical on every TP rank, bit for bit (SP: all-reduced gradients)
            assert all(torch.equal(g, gathered[0]) for g in gathered), n
            assert getattr(p, "sequence_parallel", False) == (sp and (".norm_" in "." + n or n.endswith("c_proj.bias")))
        full = merge_shards(n, gathered)
        assert torch.allclose(full, ref_grads[n], atol=2e-5, rtol=1e-4), (n, (full - ref_grads[n]).abs().max())
        assert getattr(p, "tensor_model_parallel", False) == (kind_of(n) != "replicated"), n
if rank == 0:
    print("TP-OK")
'''


_TP_SP_RUN: list = []


def tp_and_sp_workers(folder):
    """TP_WORKER, then test_sequence_parallel's SP_WORKER, in one 2-rank launch (once per session)."""
    if not _TP_SP_RUN:
        from test_sequence_parallel import SP_WORKER

        _TP_SP_RUN.append(run_worker(folder, "tp_sp_worker.py", TP_WORKER + SP_WORKER))
    return _TP_SP_RUN[0]


@pytest.mark.slow
def test_tensor_parallel_matches_single_rank_and_replicated_grads_agree(tmp_path):
    """TP 2 on gloo without DeepSpeed, plain and with sequence parallelism: loss and every gradient equal the
    plain model's (merged shards); replicated parameters (norms, embeddings, sos, row biases) get bit-identical
    gradients on both ranks."""
    proc = tp_and_sp_workers(tmp_path)
    assert proc.returncode == 0 and "TP-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# ---- the core equivalence test: same seed, data and global batch -> the same per-step losses ----
@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if LAYOUTS[n][0] >= 8 else n
                                  for n in LAYOUTS if reference_of(n) != n])  # 8 ranks: `-m "not slow"` skips them
def test_layout_reproduces_single_rank_curve(name):
    single = reference_of(name)
    reference = losses(layout_run(single))
    curve = losses(layout_run(name))
    summary = layout_run(name).with_suffix(".stdout").read_text()
    if "--sequence-parallel" in LAYOUTS[name][1]:  # it ran sequence-parallel, not silently plain TP
        assert "TP2+SP" in summary
    if "--context-parallel" in LAYOUTS[name][1]:
        assert "x CP2 x" in summary
    assert len(curve) == len(reference) == STEPS
    diffs = [abs(a - b) for a, b in zip(curve, reference)]
    print(f"{name}: max |loss - single| = {max(diffs):.2e} over {len(diffs)} steps")
    assert max(diffs) < TOL, (name, curve, reference)
    assert reference[-1] != reference[0]  # the curve moves, so equality is not trivial
    val_ref = [(r["step"], r["val_loss"]) for r in records(layout_run(single)) if "val_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records(layout_run(name)) if "val_loss" in r]
    assert [s for s, _ in val] == [s for s, _ in val_ref] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    vdiff = max(abs(a - b) for (_, a), (_, b) in zip(val, val_ref))
    print(f"{name}: max |val_loss - single| = {vdiff:.2e}")
    assert vdiff < VAL_TOL, (name, val, val_ref)
    # grad_norm (DeepSpeed's under ZeRO-1/2/3, megapix's own under ZeRO-0) is the global norm in every layout
    norms_ref = [r["grad_norm"] for r in records(layout_run(single))]
    norms = [r["grad_norm"] for r in records(layout_run(name))]
    ndiff = max(abs(a - b) / b for a, b in zip(norms, norms_ref))
    print(f"{name}: max relative |grad_norm - single| = {ndiff:.2e}")
    assert ndiff < 1e-3 and min(norms_ref) > 0, (name, norms, norms_ref)  # measured: < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLED)
def test_every_layout_finishes_and_writes_samples(name):
    """ZeRO-3 used to hang here (rank 0 sampled through partitioned weights while rank 1 sat in a barrier);
    TP/PP skipped samples.png silently. Now the weights are consolidated onto rank 0 and it samples alone.
    (The layout runs of the equivalence test write the samples: no launch of its own.)"""
    out = layout_run(name)
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out / "samples.png") in out.with_suffix(".stdout").read_text()  # the summary names it
