"""Megatron sequence parallelism (Korthikanti et al. 2022) on top of tensor parallelism, applied from outside.

Under plain TP every TP rank holds the whole sequence at the norms, the residual stream and the inputs of the
column-parallel linears: 4 tensors of [B, T, d] per block, identical on every rank. With SP each TP rank keeps
only its T/t positions there (the model's tensors are batch-first, so the split is along dim 1):

    chunk --norm_1--> chunk --all-gather--> c_attn (column) -> attention (local heads, all T) -> c_proj (row)
          --reduce-scatter--> chunk (+ residual) --norm_2--> chunk --all-gather--> c_fc -> c_proj --reduce-scatter

The TP all-reduce after each row-parallel linear becomes a reduce-scatter, and the identity before each
column-parallel one an all-gather: the same volume. A column-parallel linear saves only its input chunk for
backward and all-gathers it again there (Megatron's ColumnParallelLinear does the same), so the saved
activations of the replicated part shrink by t.

The edges: the embedding runs on the whole sequence (it is replicated, and cheap) and block 0's input is cut to
this rank's chunk (`scatter_to_sp`: backward all-gathers the gradient, so the embedding's gradients are whole
on every rank); norm_f works on the chunk; the vocab-parallel head all-gathers it like any column-parallel
linear, so the logits and the loss are exactly those of TP without SP.

Parameters that now see only this rank's positions (the norm weights and the row-parallel biases) get partial
gradients: a gradient hook all-reduces them over the TP group (Megatron's `sequence_parallel` parameters,
whose gradients it all-reduces after backward), which keeps them identical on every TP rank as TP requires.

This module holds the communication; which linear gathers and which scatters is read from
megapix.parallel.tensor's TP_SPLIT (column/qkv/vocab: gather before, row: reduce-scatter after), and
tensor.apply_sequence_parallel switches the layers that apply_tensor_parallel made into that mode.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

SEQ_DIM = 1  # [B, T, d]


def _world(group) -> int:
    return dist.get_world_size(group=group)


def _rank(group) -> int:
    return dist.get_rank(group=group)


def _chunk(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's contiguous T/t positions of x."""
    return x.chunk(_world(group), dim=SEQ_DIM)[_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """[B, T/t, ...] on each rank -> [B, T, ...] (ranks' chunks in rank order)."""
    parts = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """[B, T, ...] partial sums on each rank -> this rank's chunk of their sum. NCCL reduce-scatters; gloo has no
    reduce_scatter, so there it is an all-reduce and a slice (the same result, t times the volume)."""
    if dist.get_backend(group) == "nccl":
        t = _world(group)
        moved = x.movedim(SEQ_DIM, 0).contiguous()  # reduce_scatter_tensor splits dim 0
        out = torch.empty((moved.shape[0] // t, *moved.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, moved, group=group)
        return out.movedim(0, SEQ_DIM).contiguous()
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return _chunk(x, group)


class _ScatterToSP(torch.autograd.Function):
    """Forward: this rank's chunk of a replicated tensor; backward: all-gather of the chunks' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _chunk(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group), None


class _ReduceScatterFromSP(torch.autograd.Function):
    """After a row-parallel linear. Forward: reduce-scatter of the partial sums; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group), None


class _GatheredLinear(torch.autograd.Function):
    """A column-parallel linear on a sequence chunk: y = all_gather(x) W^T + b over all T positions. Saves the
    chunk, not the gathered input, and gathers it again in backward; the input's gradient is reduce-scattered
    (each rank's partial sum over its output features, cut to this rank's positions)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(_all_gather(x, group), weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        full = _all_gather(x, ctx.group)
        grad_x = _reduce_scatter(g.matmul(weight), ctx.group)
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = g2.t().matmul(full.reshape(-1, full.shape[-1]))
        grad_b = g2.sum(dim=0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def scatter_to_sp(x, group):
    return _ScatterToSP.apply(x, group)


def reduce_scatter_from_sp(x, group):
    return _ReduceScatterFromSP.apply(x, group)


def gathered_linear(x, weight, bias, group):
    return _GatheredLinear.apply(x, weight, bias, group)


def all_reduce_grad(group):
    def hook(g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=group)
        return g

    return hook
