"""Megatron-style tensor parallelism, applied to the plain ImageGPT (or a pipeline stage) from outside.

Split (Shoeybi et al. 2019): qkv (attn.c_attn) and fc1 (mlp.c_fc) are column-parallel, the attention
out-projection (attn.c_proj) and fc2 (mlp.c_proj) row-parallel, and the 512-way head is vocab-parallel with
its cross-entropy computed without ever gathering the logits. Heads are divided across TP ranks: c_attn's
output is [q | k | v] with heads contiguous inside each, so rank r keeps q_r | k_r | v_r and the model's
Attention infers its local head count from the shard's width.

Parameters keep their canonical names ("blocks.3.attn.c_attn.weight"); sharded ones carry Megatron's
attributes (tensor_model_parallel, partition_dim, partition_stride), which DeepSpeed's gradient clipping and
ZeRO read through `is_model_parallel_parameter`. Norm weights, embeddings, sos and row-parallel biases are
replicated: their gradients are computed identically on every TP rank because every column-parallel input
passes through `copy_to_tp` (all-reduce of the input gradient in backward).

With sequence parallelism (`apply_sequence_parallel`, the communication in megapix/parallel/sequence.py) the
same layers all-gather a sequence chunk instead of copying a replicated input, and reduce-scatter instead of
all-reducing their output.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megapix.parallel.sequence import all_reduce_grad, gathered_linear, reduce_scatter_from_sp, scatter_to_sp


# THE table of the split: (canonical module name suffix, how its weight is split). Biases follow their weight,
# except a row-parallel layer's bias, which is replicated. Sharding, merging, apply_tensor_parallel and the
# universal-checkpoint patterns (megapix.checkpoint.universal) are all derived from it.
TP_SPLIT = (
    ("attn.c_attn", "qkv"),  # column-parallel, [q | k | v] each sliced by heads
    ("mlp.c_fc", "column"),
    ("attn.c_proj", "row"),
    ("mlp.c_proj", "row"),
    ("head", "vocab"),  # the top-level head only: column-parallel over the 512 outputs
)


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient over the TP group backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group)


def _mark(p: nn.Parameter, dim: int) -> None:
    p.tensor_model_parallel = True
    p.model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r: this rank's slice of the output features; the input is replicated."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.group = group
        # clone: a row slice is a contiguous view, and .contiguous() would keep the whole unsharded tensor alive
        self.weight = nn.Parameter(weight.clone(memory_format=torch.contiguous_format))
        self.bias = nn.Parameter(bias.clone(memory_format=torch.contiguous_format)) if bias is not None else None
        _mark(self.weight, 0)
        if self.bias is not None:
            _mark(self.bias, 0)

    sequence_parallel = False  # set by apply_sequence_parallel: x is this rank's chunk of the positions

    def forward(self, x):
        if self.sequence_parallel:
            return gathered_linear(x, self.weight, self.bias, self.group)
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b: the input arrives split along features; the bias is replicated."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight.contiguous())
        self.bias = nn.Parameter(bias.contiguous()) if bias is not None else None
        _mark(self.weight, 1)

    sequence_parallel = False  # set by apply_sequence_parallel: the output is reduce-scattered over positions

    def forward(self, x):
        y = F.linear(x, self.weight)
        y = reduce_scatter_from_sp(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y


def shard_rows(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    n = t.shape[0] // tp
    return t[rank * n:(rank + 1) * n]


def shard_qkv(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """[q | k | v] (dim 0) -> q_r | k_r | v_r."""
    return torch.cat([shard_rows(part, tp, rank) for part in t.chunk(3, dim=0)], dim=0)


def unshard_qkv(shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of shard_qkv over all ranks' shards (in TP rank order)."""
    parts = [s.chunk(3, dim=0) for s in shards]
    return torch.cat([torch.cat([p[i] for p in parts], dim=0) for i in range(3)], dim=0)


def module_kind(module: str) -> str | None:
    """The TP_SPLIT kind of a canonical module name ("blocks.3.mlp.c_fc"), or None when it is not split."""
    for suffix, kind in TP_SPLIT:
        if module == suffix if kind == "vocab" else module.endswith("." + suffix) or module == suffix:
            return kind
    return None


def kind_of(name: str) -> str:
    """'qkv', 'column', 'row', 'vocab' or 'replicated' for a canonical parameter name."""
    module, _, leaf = name.rpartition(".")
    kind = module_kind(module)
    if kind is None or (kind == "row" and leaf != "weight"):
        return "replicated"
    return kind


def shard_tensor(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    kind = kind_of(name)
    if kind == "qkv":
        return shard_qkv(full, tp, rank)
    if kind in ("column", "vocab"):
        return shard_rows(full, tp, rank)
    if kind == "row":
        return full.chunk(tp, dim=1)[rank]
    return full


def merge_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    kind = kind_of(name)
    if kind == "qkv":
        return unshard_qkv(shards)
    if kind in ("column", "vocab"):
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    return shards[0]


@torch.no_grad()
def apply_tensor_parallel(module: nn.Module, group, tp: int, rank: int, prefix: str = "") -> nn.Module:
    """Replace the linears of `module` (whose parameter names are canonical after `prefix`) by their TP shards,
    cut from the already initialised full weights, so the result reproduces the single-rank model. On a module
    built on the meta device it gives the sharded structure only (shard-shaped meta parameters): that is how
    build_module and the pipeline layers construct (megapix/parallel/construct.py); fine-tuning cuts its
    pre-trained full weights with it."""
    if tp == 1:
        return module
    targets = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    for name, lin in targets:
        full = prefix + name
        kind = module_kind(full)
        if kind is None:
            continue
        w = shard_tensor(full + ".weight", lin.weight.data, tp, rank)
        if kind == "row":
            new = RowParallelLinear(w, lin.bias.data if lin.bias is not None else None, group)
        else:
            b = shard_tensor(full + ".bias", lin.bias.data, tp, rank) if lin.bias is not None else None
            new = ColumnParallelLinear(w, b, group)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, new)
    return module


def apply_sequence_parallel(module: nn.Module, group, prefix: str = "") -> nn.Module:
    """Switch the TP layers of `module` (after apply_tensor_parallel and materialisation: the gradient hooks go
    on the final parameters; canonical names after `prefix`) to sequence parallelism (megapix/parallel/
    sequence.py): column-parallel layers gather their input chunk, row-parallel ones reduce-scatter their output,
    block 0 cuts its input to this rank's chunk, and the parameters applied to a chunk (norm weights, row-parallel
    biases) all-reduce their gradients over the TP group."""
    for name, mod in module.named_modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            mod.sequence_parallel = True
        if (prefix + name).rstrip(".") == "blocks.0":
            mod.register_forward_pre_hook(lambda m, args: (scatter_to_sp(args[0], group), *args[1:]))
    for name, p in module.named_parameters():
        full = prefix + name
        module_name, _, leaf = full.rpartition(".")
        on_chunk = ".norm_" in "." + module_name or (module_kind(module_name) == "row" and leaf == "bias")
        if on_chunk and p.requires_grad:
            p.sequence_parallel = True  # Megatron's mark: its gradient is the TP sum of the chunks' gradients
            p.register_hook(all_reduce_grad(group))
    return module


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy from vocab-sharded logits [N, V/T]: max all-reduce, sum-exp all-reduce, and the
    target logit from the shard that owns it (zero elsewhere, summed)."""

    @staticmethod
    def forward(ctx, logits, target, group, rank):
        n_local = logits.shape[-1]
        lo = rank * n_local
        m = logits.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = logits - m.unsqueeze(-1)
        owned = (target >= lo) & (target < lo + n_local)
        local_t = (target - lo).clamp(0, n_local - 1)
        t_logit = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1) * owned.to(z.dtype)
        dist.all_reduce(t_logit, group=group)
        e = z.exp()
        s = e.sum(dim=-1)
        dist.all_reduce(s, group=group)
        e.div_(s.unsqueeze(-1))
        ctx.save_for_backward(e, owned, local_t)
        return s.log() - t_logit

    @staticmethod
    def backward(ctx, g):
        softmax, owned, local_t = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= owned.to(grad.dtype)
        return grad * g.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits, target, group, rank):
    return _VocabParallelCE.apply(logits, target, group, rank)


class VocabParallelLoss:
    """lm_loss for vocab-sharded logits: mean over positions (AR) or over masked positions (BERT)."""

    def __init__(self, group, rank: int, bert: bool):
        self.group, self.rank, self.bert = group, rank, bert

    def __call__(self, logits, tokens, mask=None):
        flat = vocab_parallel_cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                                            self.group, self.rank)
        if mask is None or not self.bert:
            return flat.mean()
        m = mask.reshape(-1).to(flat.dtype)
        return (flat * m).sum() / m.sum().clamp_min(1.0)
