"""Sequence parallelism (megapix/parallel/sequence.py): refusals and the saved-activation bytes it cuts. The
model-level and training-curve equivalence of SP with one rank are in test_parallel.py."""
from __future__ import annotations

import pytest

from megapix.config import ConfigError, ModelConfig, TrainConfig
from megapix.parallel.layout import check_layout


def test_sequence_parallel_without_tp_is_refused():
    with pytest.raises(ConfigError, match="tensor_parallel is 1; add --tensor-parallel 2"):
        TrainConfig(sequence_parallel=True)


def test_sequence_parallel_needs_positions_divisible_by_tp():
    m = ModelConfig(n_layer=2, d_model=64, n_head=4, resolution=7)  # 49 positions
    with pytest.raises(ConfigError, match="splits the 49 positions over TP 2"):
        check_layout(2, m, TrainConfig(tensor_parallel=2, sequence_parallel=True, global_batch=2), 0)
    check_layout(2, m, TrainConfig(tensor_parallel=2, global_batch=2), 0)  # plain TP does not split positions


SP_WORKER = r'''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["MEGAPIX_ROOT"])
from megapix.config import ModelConfig
from megapix.model import ImageGPT
from megapix.parallel.tensor import apply_sequence_parallel, apply_tensor_parallel
if not dist.is_initialized():  # it runs after test_parallel's TP worker, in the same launch
    dist.init_process_group("gloo")
rank, tp = dist.get_rank(), dist.get_world_size()
group = dist.new_group(list(range(tp)))
B, T, D = 3, 64, 48  # T != D, so a saved tensor's last dim tells width d from positions

def build(cfg, sp):
    par = ImageGPT(cfg, seed=5)
    apply_tensor_parallel(par, group, tp, rank)
    return apply_sequence_parallel(par, group) if sp else par

# Saved activations of one block (block 1: its input is already a chunk under SP), counted with
# saved_tensors_hooks, parameters left out. The replicated part is what has the full width d: the norms' inputs
# and the column-parallel linears' inputs (Megatron's 4 x sbh), plus the norms' rstd. Under TP it holds all T
# positions, under SP this rank's T / tp.
cfg = ModelConfig(n_layer=2, d_model=D, n_head=4, resolution=8, kernels="torch", bias=True)
tokens = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1))
saved = {}
for sp in (False, True):
    par = build(cfg, sp)
    params = {p.data_ptr() for p in par.parameters()}
    seen, count = set(), {"per_position": 0, "all": 0}
    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.data_ptr() not in params and key not in seen:
            seen.add(key)
            n = t.numel() * t.element_size()
            count["all"] += n
            if t.shape[-1] in (D, 1):  # [.., d] activations and the norms' [.., 1] rstd
                count["per_position"] += n
        return t
    h = par.embed(tokens)
    h = par.blocks[0](h)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        par.blocks[1](h)
    saved[sp] = dict(count)
replicated = saved[False]["per_position"]
whole, rest = divmod(replicated - 2 * B * T * 4, B * T * D * 4)  # fp32 [B, T, d] tensors beside the 2 rstd
assert rest == 0 and whole >= 4, saved  # at least Megatron's 4 (torch's CPU rms_norm kept x * rstd too: 6)
assert saved[True]["per_position"] * tp == replicated, saved
assert saved[False]["all"] - saved[True]["all"] == replicated - replicated // tp, saved  # nothing else grew
dist.barrier()
if rank == 0:
    print("SP-OK", saved)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_sequence_parallel_cuts_saved_activations(tmp_path):
    """TP 2 + SP on gloo: one block's saved per-position activations (norm and column-parallel inputs, the norms'
    rstd) drop by t = 2 (Korthikanti et al.'s 8 sbh -> 8 sbh / t in bf16 bytes), and nothing else saved grows.
    (SP's loss and gradients equal one rank's: test_parallel.py's TP worker runs it too, in the same launch.)"""
    from test_parallel import tp_and_sp_workers

    proc = tp_and_sp_workers(tmp_path)
    assert proc.returncode == 0 and "SP-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    print(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args,needle", [(["--sequence-parallel"], "tensor_parallel is 1"),
                                         (["--context-parallel", "2"], "not divisible by TP 1 x PP 1 x CP 2")])
def test_cli_refuses_sequence_splits_it_cannot_run(tmp_path, args, needle):
    """One line, exit 2, no --out folder: the refusal comes before any data, model or file."""
    from conftest import run

    out = tmp_path / "run"
    proc = run(["megapix/train.py", "--out", str(out), *args])
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    assert len([l for l in proc.stderr.splitlines() if l.strip()]) == 1, proc.stderr
    assert not out.exists()
