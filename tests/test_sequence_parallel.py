"""Sequence parallelism (megapix/parallel/sequence.py): refusals, the model-level equivalence with one rank, and
the saved-activation bytes it cuts. The training-curve equivalence of SP layouts is in test_parallel.py."""
from __future__ import annotations

import subprocess
import sys

import pytest

from megapix.config import ConfigError, ModelConfig, TrainConfig
from megapix.parallel.layout import check_layout
from test_parallel_helpers import ROOT, env, free_port


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
from megapix.model import ImageGPT, lm_loss
from megapix.parallel.tensor import (apply_sequence_parallel, apply_tensor_parallel, VocabParallelLoss, kind_of,
                                     merge_shards)
dist.init_process_group("gloo")
rank, tp = dist.get_rank(), dist.get_world_size()
group = dist.new_group(list(range(tp)))
B, T, D = 3, 64, 48  # T != D, so a saved tensor's last dim tells width d from positions

def build(cfg, sp):
    ref = ImageGPT(cfg, seed=5)
    with torch.no_grad():  # non-zero biases and head so every path is exercised
        for n, p in ref.named_parameters():
            if n.endswith("bias") or n.startswith("head"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    par = ImageGPT(cfg, seed=5)
    par.load_state_dict(ref.state_dict())
    apply_tensor_parallel(par, group, tp, rank)
    if sp:
        apply_sequence_parallel(par, group)
    return ref, par

for objective in ("ar", "bert"):
    cfg = ModelConfig(n_layer=2, d_model=D, n_head=4, resolution=8, kernels="torch", objective=objective, bias=True)
    tokens = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(2)) < 0.3) if objective == "bert" else None
    ref, par = build(cfg, sp=True)
    loss_ref = lm_loss(ref(tokens, mask), tokens, mask)
    loss_ref.backward()
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
        if kind_of(n) == "replicated":  # identical on every TP rank, bit for bit (norms: all-reduced hooks)
            assert all(torch.equal(g, gathered[0]) for g in gathered), n
            assert getattr(p, "sequence_parallel", False) == (".norm_" in "." + n or n.endswith("c_proj.bias")), n
        full = merge_shards(n, gathered)
        assert torch.allclose(full, ref_grads[n], atol=2e-5, rtol=1e-4), (n, (full - ref_grads[n]).abs().max())

# Saved activations of one block (block 1: its input is already a chunk under SP), counted with
# saved_tensors_hooks, parameters left out. The replicated part is what has the full width d: the norms' inputs
# and the column-parallel linears' inputs (Megatron's 4 x sbh; torch's CPU rms_norm also keeps x * rstd, so 6
# tensors here), plus the norms' rstd. Under TP it holds all T positions, under SP this rank's T / tp.
cfg = ModelConfig(n_layer=2, d_model=D, n_head=4, resolution=8, kernels="torch", bias=True)
tokens = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1))
saved = {}
for sp in (False, True):
    _, par = build(cfg, sp)
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
assert replicated == 6 * B * T * D * 4 + 2 * B * T * 4, saved  # fp32
assert saved[True]["per_position"] * tp == replicated, saved
assert saved[False]["all"] - saved[True]["all"] == replicated - replicated // tp, saved  # nothing else grew
dist.barrier()
if rank == 0:
    print("SP-OK", saved)
dist.destroy_process_group()
'''


def test_sequence_parallel_matches_single_rank_and_cuts_saved_activations(tmp_path):
    """TP 2 + SP on gloo without DeepSpeed: loss and every gradient equal the plain model's; replicated parameters
    stay bit-identical over the TP ranks; one block's saved full-width activations (norm and column-parallel inputs) drop by t = 2 (Korthikanti et al.'s
    8 sbh -> 8 sbh / t in bf16 bytes), and nothing else saved grows."""
    script = tmp_path / "sp_worker.py"
    script.write_text(SP_WORKER)
    e = env()
    e["MEGAPIX_ROOT"] = ROOT
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], env=e, capture_output=True, text=True, timeout=300)
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
