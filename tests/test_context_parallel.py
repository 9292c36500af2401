"""Context parallelism (megapix/parallel/context.py): refusals, the load-balanced split, and a 2-rank feature
extraction equal to one rank's. The training-curve equivalence of CP layouts is in test_parallel.py."""
from __future__ import annotations

import pytest
import torch

from megapix.config import ConfigError, ModelConfig, TrainConfig
from megapix.parallel.context import local_positions
from megapix.parallel.layout import check_layout
from test_parallel_helpers import run_worker


@pytest.mark.parametrize("world,model,train,zero,needle", [
    (3, {}, dict(context_parallel=2), 0, "not divisible by TP 1 x PP 1 x CP 2"),
    (2, dict(resolution=5), dict(context_parallel=2), 0, "cuts the 25 positions into 2 x 2 chunks"),
    (4, {}, dict(context_parallel=2, pipeline_parallel=2), 1, "does not run with --pipeline-parallel 2"),
    (4, {}, dict(context_parallel=2, tensor_parallel=2, sequence_parallel=True), 0, "with --sequence-parallel"),
])
def test_check_layout_refuses_context_parallel(world, model, train, zero, needle):
    m = ModelConfig(**{"n_layer": 2, "d_model": 64, "n_head": 4, **model})
    with pytest.raises(ConfigError, match=needle):
        check_layout(world, m, TrainConfig(**{"global_batch": 8, **train}), zero)


def test_context_parallel_degree_must_be_positive():
    with pytest.raises(ConfigError, match="context_parallel"):
        TrainConfig(context_parallel=0)


def test_load_balanced_chunks_cover_the_sequence_once():
    """Rank r holds chunks r and 2cp-1-r: a head and a tail, so every rank has the same causal work."""
    assert local_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    for cp in (2, 4):
        held = torch.cat([local_positions(64, cp, r) for r in range(cp)])
        assert sorted(held.tolist()) == list(range(64))
        work = [sum(int(p) + 1 for p in local_positions(64, cp, r)) for r in range(cp)]  # keys seen, causal
        assert len(set(work)) == 1, work


CP_WORKER = r'''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["MEGAPIX_ROOT"])
from megapix.config import ModelConfig
from megapix.features import extract
from megapix.model import ImageGPT
from megapix.parallel.context import apply_context_parallel, pooled_features
dist.init_process_group("gloo")
group = dist.new_group([0, 1])
for objective in ("ar", "bert"):
    cfg = ModelConfig(n_layer=3, d_model=32, n_head=4, resolution=16, kernels="torch", objective=objective)
    tokens = torch.randint(0, 512, (3, 256), generator=torch.Generator().manual_seed(1))
    layers = [0, 1, 3]
    ref = extract(ImageGPT(cfg, seed=3).eval(), tokens, layers)
    model = apply_context_parallel(ImageGPT(cfg, seed=3).eval(), group, cfg.n_ctx)
    got = pooled_features(model, tokens, layers, group)
    err = (got - ref).abs().max().item()
    assert err < 1e-5, (objective, err)
dist.barrier()
if dist.get_rank() == 0:
    print("CP-FEATURES-OK", err)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_rank_context_parallel_features_equal_one_rank(tmp_path):
    """16x16 images (256 positions), each rank holding a head and a tail chunk: the pooled features of layers
    0, 1 and 3 (after norm_f) equal megapix.features.extract on one rank, AR and BERT."""
    proc = run_worker(tmp_path, "cp_worker.py", CP_WORKER)
    assert proc.returncode == 0 and "CP-FEATURES-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_planner_ring_pairs_follow_the_ring():
    """megapix.plan.ring_pairs (closed form) against the ring's own chunk positions: per query chunk, the key chunks
    not wholly in its future (causal) or all (BERT)."""
    from megapix.config import ModelConfig
    from megapix.parallel.context import chunk_starts
    from megapix.plan import ring_pairs

    for objective in ("ar", "bert"):
        m = ModelConfig(n_layer=1, d_model=32, n_head=2, resolution=16, objective=objective)
        for cp in (2, 4, 8):
            c = m.n_ctx // (2 * cp)
            keys = [k0 for r in range(cp) for k0 in chunk_starts(m.n_ctx, cp, r)]
            for rank in range(cp):
                want = [sum(1 for k0 in keys if not (objective == "ar" and k0 > q0 + c - 1))
                        for q0 in chunk_starts(m.n_ctx, cp, rank)]
                assert ring_pairs(m, cp, rank) == want, (objective, cp, rank)


@pytest.mark.slow
@pytest.mark.parametrize("compile_mode, atol", [("off", 1e-5), ("require", 1e-4)])
def test_two_rank_context_parallel_extract_command_equals_one_rank(tmp_path, compile_mode, atol):
    """`megapix extract --context-parallel 2` on 2 ranks (one CP group: both ranks hold a head and a tail chunk of
    every image, rank 0 writes the rows) dumps the features one eager rank dumps, AR at 8x8 (64 positions, 4
    chunks); eager and with compiled blocks (the ring behind a graph break)."""
    import json
    import subprocess
    import sys

    import numpy as np

    from megapix.cli import main
    from test_features import export
    from test_parallel_helpers import ROOT, env, free_port

    export(tmp_path / "m")
    args = ["extract", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:24", "--layers", "0,2,3",
            "--chunk-size", "8", "--batch-size", "5", "--splits", "train,test"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "megapix", *args, "--out", str(tmp_path / "cp"),
                           "--context-parallel", "2", "--compile", compile_mode], cwd=ROOT,
                          env={**env(), "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    man = json.loads((tmp_path / "cp" / "manifest.json").read_text())
    assert man["complete"] and man["context_parallel"] == 2 and man["world_size"] == 2
    for split in ("train", "test"):
        a = np.load(tmp_path / "one" / f"{split}_features.npy")
        b = np.load(tmp_path / "cp" / f"{split}_features.npy")
        assert a.shape == b.shape and not np.all(b == 0, axis=1).any()
        np.testing.assert_allclose(b, a, atol=atol)


def test_extract_refuses_a_context_parallel_degree_the_ranks_do_not_fill(tmp_path, capsys):
    """One line, exit 2, before the model is loaded and before any feature file exists."""
    from megapix.cli import main
    from test_features import export

    export(tmp_path / "m")
    code = main(["extract", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:16", "--context-parallel", "2",
                 "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--context-parallel 2 does not divide the 1 ranks" in err
    assert not list((tmp_path / "f").glob("*_features.npy*"))
