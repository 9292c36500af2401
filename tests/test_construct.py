"""Construction that scales: no rank materialises more than its share of the model (plus one parameter).

- memory: a ~405M-parameter model (8 layers, d_model 2048) built through the real `build_module` under TP 2,
  PP 2 and DP 2 ZeRO-3 (the Trainer's path: DeepSpeed config on the layout, then deepspeed.initialize) with 2
  ranks each; each rank's peak RSS growth over construction is bounded by its share of the parameter bytes + the
  largest single parameter + a fixed allowance;
- meta: the whole iGPT-XL built for docs/parallelism.md's layouts with fake rank info under `structure_only()` (nothing
  allocated): per-rank parameter counts add up to the preset's total, pipeline stages hold the expected layers;
- equality: a TP shard built on meta and materialised equals the shard cut from the single-rank model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from test_parallel_helpers import ROOT, env, free_port

# The memory test's model: 8 x (12 d^2 + 2 d) + (512 + 1 + 64 + 1 + 512) d = 404.9M parameters (1.62 GB fp32);
# its largest parameter, mlp.c_fc/c_proj.weight (4 d x d), is 67 MB.
WIDE = dict(n_layer=8, d_model=2048, n_head=16, resolution=8, kernels="torch")
# What construction costs beyond parameters, independent of the model's size (measured on this CPU box):
# - the first meta-device operation in a process imports torch's meta machinery (~900 modules: +146 MB RSS,
#   once; a d=64 model costs the same);
# - glibc keeps freed temporaries (the full draws) as heap it has not yet returned (its dynamic mmap/trim
#   thresholds): 40-90 MB after construction;
# - under ZeRO-3, a parameter's partition is allocated while its full draw is alive, and the gloo broadcast
#   zero.Init does per parameter: together with the above, up to ~100 MB;
# - Python objects of ~100 modules and DeepSpeed's ZeRO-3 bookkeeping: a few MB.
# Measured use of the allowance (peak growth - share - largest parameter): TP 2 162 MB, PP 2 83 MB, ZeRO-3
# 242 MB. 320 MB hides no copy of anything: each rank's share here is ~775 MB, and the old construction (the
# whole model in fp32 on every rank) exceeds this bound by hundreds of MB (TP 2, ZeRO-3).
ALLOWANCE = 320 << 20

MEMORY_WORKER = r'''
import gc, json, os, resource, sys
import torch, torch.distributed as dist


def rss():  # resident now, bytes
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak():  # ru_maxrss: kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


from megapix.parallel.launch import init_distributed

init_distributed()
import deepspeed
import deepspeed.pipe  # imported before the measurement: import cost is not construction
from megapix.config import Config, ModelConfig, TrainConfig
from megapix.dsconfig import make_ds_config, resolve, zero_stage_of
from megapix.parallel import build_module
from megapix.parallel.layout import build_layout

tp, pp, zero = (int(a) for a in sys.argv[1:4])
model = ModelConfig(**json.loads(sys.argv[4]))
task = sys.argv[5]
cfg = Config(model=model, train=TrainConfig(global_batch=2, tensor_parallel=tp, pipeline_parallel=pp,
                                            zero_stage=zero, precision="fp32"))
world, rank = dist.get_world_size(), dist.get_rank()
cfg, ds = resolve(cfg, None, world)
layout = build_layout(world, rank, cfg.model, cfg.train, zero_stage_of(cfg, ds))
micro = cfg.train.global_batch // layout.dp
layout.ds_config = make_ds_config(cfg, ds, layout, micro)  # what the Trainer does before task.build
gc.collect()
dist.barrier()
if task == "finetune":  # fine-tuning's build: the same build_module, with its classifier head hook
    from megapix.finetune import ClassifierTask

    builder = ClassifierTask({}, num_classes=10, base_state=None, augment=False)
gc.collect()
rss0, peak0 = rss(), peak()
module, is_pipeline = builder.build(cfg, layout) if task == "finetune" else build_module(cfg, layout)
peak1, rss1 = peak(), rss()
params = list(module.parameters())
partitioned = all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in params)  # ZeRO-3 parameters
held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() if hasattr(p, "ds_tensor")
           else p.numel() * p.element_size() for p in params)
rec = dict(rank=rank, rss_before=rss0, maxrss_before=peak0, maxrss_after=peak1, rss_after=rss1, held=held,
           partitioned=partitioned)
if zero == 3:  # the Trainer's next step: the engine takes the already partitioned module as it is
    ids = {id(p): getattr(p, "ds_id", None) for p in params}  # None: not partitioned by construction
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3, foreach=True)
    mpu = layout.grid if tp > 1 else None
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=layout.ds_config, mpu=mpu)
    assert all(ids[id(p)] in (None, p.ds_id) for p in engine.module.parameters()), "a parameter was converted again"
    rec["maxrss_after_initialize"] = peak()
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"mem_{rank}.json"), "w") as f:
    json.dump(rec, f)  # a file per rank: the ranks' lines on one shared stdout can run into each other
'''


def _run_memory(tmp_path, tp, pp, zero, task):
    script = tmp_path / "mem_worker.py"
    script.write_text(MEMORY_WORKER)
    e = env()
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(script), str(tp), str(pp), str(zero), json.dumps(WIDE), task]
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(path.read_text()) for path in sorted(tmp_path.glob("mem_*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
@pytest.mark.parametrize("tp,pp,zero", [(2, 1, 0), (1, 2, 0), (1, 1, 3)], ids=["tp2", "pp2", "dp2-zero3"])
def test_construction_peak_is_the_rank_share_plus_one_parameter(tmp_path, tp, pp, zero, task):
    """Pre-training's module, and fine-tuning's (the same build with the classifier head hook, from scratch)."""
    from megapix.config import ModelConfig

    model = ModelConfig(**WIDE)
    total = model.num_parameters() * 4  # fp32 bytes
    largest = 4 * model.d_model * model.d_model * 4  # mlp.c_fc.weight, drawn whole before its shard is cut
    recs = _run_memory(tmp_path, tp, pp, zero, task)
    assert sorted(r["rank"] for r in recs) == [0, 1]
    MB = 1 << 20
    for r in recs:
        growth = r["maxrss_after"] - r["rss_before"]  # peak over construction, from what was resident before it
        bound = r["held"] + largest + ALLOWANCE
        print(f"{task} tp{tp} pp{pp} zero{zero} rank {r['rank']}: ru_maxrss {r['maxrss_before'] / MB:.0f} -> "
              f"{r['maxrss_after'] / MB:.0f} MB (resident before {r['rss_before'] / MB:.0f} MB), peak growth "
              f"{growth / MB:.0f} MB; holds {r['held'] / MB:.0f} MB of {total / MB:.0f} MB; bound {bound / MB:.0f} MB"
              + (f"; after deepspeed.initialize {r['maxrss_after_initialize'] / MB:.0f} MB"
                 if "maxrss_after_initialize" in r else ""))
        # the rank holds its share: half the model, give or take the replicated/unbalanced pieces (< 1%)
        assert r["held"] <= 0.51 * total, (r, total)
        assert r["partitioned"] == (zero == 3), r  # ZeRO-3: partitioned by construction, not by initialize
        assert growth <= bound, (f"rank {r['rank']}: construction grew the peak RSS by {growth / MB:.0f} MB, more "
                                 f"than its share {r['held'] / MB:.0f} MB + one parameter {largest / MB:.0f} MB + "
                                 f"{ALLOWANCE / MB:.0f} MB")


# ---- the whole iGPT-XL on the meta device, with fake rank info ----
def _fake_layout(world, rank, model, tp, pp, zero):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megapix.config import TrainConfig
    from megapix.parallel.layout import Layout, check_layout

    t = TrainConfig(global_batch=64, tensor_parallel=tp, pipeline_parallel=pp, zero_stage=zero)
    check_layout(world, model, t, zero)
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
    return Layout(tp=tp, pp=pp, dp=world // (tp * pp), zero_stage=zero, rank=rank, topology=topo), t


def _xl_meta_non_pipeline(tp, dp, zero):
    """{tp_rank: {name: local shape}} of build_module for each TP rank (DP rank 0), all on meta."""
    from megapix.config import Config, model_preset
    from megapix.parallel import build_module
    from megapix.parallel.construct import structure_only

    model = model_preset("igpt-xl")
    out = {}
    for r in range(tp):  # ranks 0..tp-1: model-parallel ranks are adjacent (the topology's axis order)
        layout, t = _fake_layout(tp * dp, r, model, tp, 1, zero)
        assert layout.tp_rank == r and layout.dp_rank == 0
        with structure_only():
            module, is_pipeline = build_module(Config(model=model, train=t), layout)
        assert not is_pipeline
        assert all(p.device.type == "meta" for p in module.parameters())
        out[r] = {n.removeprefix("model."): p for n, p in module.named_parameters()}
    return model, out


def test_igpt_xl_tp4_dp16_zero3_on_meta_counts_add_up():
    """iGPT-XL at TP 4 x DP 16, ZeRO-3 (the runner-up of configs/igpt_xl_imagenet.yaml). Each TP rank's shard,
    counted from build_module's meta structure, adds up to the preset's 6.81B over the TP group (replicated pieces
    counted once), and each rank keeps 1/16 of its shard under ZeRO-3."""
    from megapix.config import model_preset
    from megapix.parallel.tensor import kind_of

    model, ranks = _xl_meta_non_pipeline(4, 16, 3)
    total = model.num_parameters()
    assert round(total / 1e7) == 681  # docs/training.md: 6.81B (6810M) with the 4096-row position table
    sharded = sum(p.numel() for r in ranks.values() for n, p in r.items() if kind_of(n) != "replicated")
    replicated = sum(p.numel() for n, p in ranks[0].items() if kind_of(n) == "replicated")
    assert sharded + replicated == total
    per_rank = [sum(p.numel() for p in r.values()) for r in ranks.values()]
    assert len(set(per_rank)) == 1  # every TP rank the same size
    assert per_rank[0] == sharded // 4 + replicated
    assert per_rank[0] < total / 4 * 1.01  # the replicated embeddings/norms are < 1% of the model
    c_fc = ranks[0]["blocks.0.mlp.c_fc.weight"]
    assert tuple(c_fc.shape) == (4 * 3072 // 4, 3072)
    assert tuple(ranks[3]["blocks.59.attn.c_proj.weight"].shape) == (3072, 3072 // 4)
    assert tuple(ranks[1]["head.weight"].shape) == (512 // 4, 3072)
    # ZeRO-3 over DP 16: each rank's partition of its shard (DeepSpeed pads each parameter to a multiple of 16)
    zero_share = sum(-(-p.numel() // 16) for p in ranks[0].values())
    assert per_rank[0] / 16 <= zero_share < per_rank[0] / 16 + 16 * len(ranks[0])
    print(f"iGPT-XL TP4 x DP16 ZeRO-3: {total / 1e9:.3f}B parameters, {per_rank[0] / 1e9:.3f}B per TP shard, "
          f"{zero_share / 1e6:.1f}M per rank after ZeRO-3 ({zero_share * 4 / 2**30:.2f} GiB fp32)")
    assert model_preset("igpt-xl").n_layer == 60


def _stage_layers(model, tp, pp, world_tp_rank=0):
    """For each pipeline stage: (layer indices, {canonical name: meta parameter}) as DeepSpeed's PipelineModule
    partitions and builds them: our build_pipeline's layer specs, the module's own `_partition_layers` (meta
    counting included), and each stage's specs built under structure_only (as its `_build` does)."""
    from megapix.config import Config
    from megapix.parallel.construct import structure_only
    from megapix.parallel.pipeline import _pipeline_module_class, canonical_prefix, layer_specs

    stages = []
    for s in range(pp):
        layout, t = _fake_layout(tp * pp, s * tp + world_tp_rank, model, tp, pp, 0)  # pipe is the outer axis
        assert layout.pp_rank == s and layout.tp_rank == world_tp_rank
        cfg = Config(model=model, train=t)
        specs = layer_specs(cfg, layout)
        # PipelineModule's partitioning with its rank state faked (it needs a process group only in __init__)
        pm = object.__new__(_pipeline_module_class())
        torch.nn.Module.__init__(pm)
        pm._layer_specs, pm._topo, pm.num_stages, pm.global_rank, pm.loss_fn = specs, layout.topology, pp, 1, None
        pm._partition_layers(method="parameters")
        lo, hi = pm.parts[s], pm.parts[s + 1]
        params = {}
        with structure_only():
            for i in range(lo, hi):
                layer = specs[i].build()
                for n, p in layer.named_parameters():
                    assert p.device.type == "meta"
                    params[canonical_prefix(i, model.n_layer) + n] = p
        stages.append((list(range(lo, hi)), params))
    return stages


@pytest.mark.parametrize("tp,pp", [(2, 2), (1, 4)], ids=["tp2xpp2", "pp4"])
def test_igpt_xl_pipeline_on_meta_partition_and_counts(tp, pp):
    """iGPT-XL's 62 pipeline layers (embed, 60 blocks, head) split by parameters into pp stages of whole,
    contiguous layers; over all stages and TP ranks the parameters add up to the preset's total."""
    from megapix.config import model_preset
    from megapix.parallel.tensor import kind_of

    model = model_preset("igpt-xl")
    total = model.num_parameters()
    per_tp = [_stage_layers(model, tp, pp, r) for r in range(tp)]
    stages = per_tp[0]
    layers = [i for idx, _ in stages for i in idx]
    assert layers == list(range(model.n_layer + 2))  # every layer once, in order
    assert 0 in stages[0][0] and model.n_layer + 1 in stages[-1][0]  # embed first, head last
    blocks = [sum(1 for i in idx if 1 <= i <= model.n_layer) for idx, _ in stages]
    expected = {4: [15, 15, 15, 15], 2: [30, 30]}[pp]  # balanced by parameters: a block is 113M, embed/head ~14M
    assert blocks == expected, [(idx[0], idx[-1]) for idx, _ in stages]
    counted = 0
    for r, st in enumerate(per_tp):
        for _, params in st:
            counted += sum(p.numel() for n, p in params.items() if r == 0 or kind_of(n) != "replicated")
    assert counted == total
    stage_sizes = [sum(p.numel() for p in params.values()) for _, params in stages]
    assert max(stage_sizes) < total / (tp * pp) * 1.01
    print(f"iGPT-XL TP{tp} x PP{pp}: stages hold layers "
          + ", ".join(f"{idx[0]}-{idx[-1]}" for idx, _ in stages)
          + f"; {', '.join(f'{n / 1e9:.3f}B' for n in stage_sizes)} per rank")


# ---- a materialised TP shard is the shard of the single-rank model (no process group needed) ----
@pytest.mark.parametrize("tp", [2, 4])
def test_materialised_tp_shard_equals_the_cut_of_the_single_rank_model(tp):
    from megapix.config import Config, ModelConfig
    from megapix.model import ImageGPT
    from megapix.parallel import build_module
    from megapix.parallel.tensor import kind_of, shard_tensor

    model = ModelConfig(n_layer=2, d_model=64, n_head=4, resolution=8, kernels="torch", bias=True)
    ref = ImageGPT(model, seed=7).state_dict()
    for r in range(tp):
        layout, t = _fake_layout(tp, r, model, tp, 1, 0)
        t.seed = 7
        module, _ = build_module(Config(model=model, train=t), layout)
        got = {n.removeprefix("model."): p for n, p in module.named_parameters()}
        assert got.keys() == ref.keys()
        for n, p in got.items():
            assert torch.equal(p.detach(), shard_tensor(n, ref[n], tp, r)), (n, r)
            assert getattr(p, "tensor_model_parallel", False) == (kind_of(n) != "replicated"), n
