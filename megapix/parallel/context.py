"""Context parallelism: ring attention over a group of ranks that each hold a part of every sequence.

The CP group is its own axis: ranks that share a pipeline stage, a TP rank and a data-parallel shard of the
batch, and differ in which positions they hold (megapix/parallel/layout.py builds it). DeepSpeed sees the CP
ranks as data-parallel replicas (its data axis is DP x CP, as Megatron's gradient reduction and ZeRO span
"DP with CP"): they hold the same parameters, and their gradients, each from its own positions, are
averaged with the rest.

Which positions (causal load balancing, as torchtitan and Megatron-Core do): the sequence is cut into 2 x cp
chunks of T / (2 cp) and rank r holds chunks r and 2cp - 1 - r, a head and a tail, so every rank has the same
share of the causal triangle. The BERT objective does not need the balancing (every query sees every key);
it uses the same split, which is exact all the same.

How the model is split (it stays plain):
- the embedding runs on the whole sequence (replicated, cheap: the SOS shift and the position table are
  exactly one rank's), and block 0's input is cut to this rank's positions;
- every Attention's `attend` (the model's seam for this, megapix/model/igpt.py) is replaced by
  `ring_attention`: the key/value chunks travel around the CP ring (cp - 1 passes of one send and one
  receive), each partial result over one chunk comes from the kernel's chunked case
  (megapix.kernels.flash_attention_chunk: offset causal mask + log-sum-exp), and the partials merge exactly
  (merge_attention). Pairs of chunks that lie entirely in the future are skipped. The ring pass is an
  autograd function (backward: the gradient goes the other way round), so the backward is exact; it keeps
  each received chunk for backward (the K/V of the whole sequence per rank, as an all-gather would; the rest
  of the block's activations are split by cp);
- norm_f and the head run on this rank's positions, and `ContextParallelLoss` takes this rank's targets and
  weighs its mean by its share of the micro-batch's tokens (x cp, undone by the DP x CP gradient average),
  so the loss and its gradient are the single-rank ones (token-weighted; BERT's masked tokens differ per
  chunk).

Ulysses (DeepSpeed's DistributedAttention, an all-to-all from sequence- to head-sharded q/k/v) is not used: it
needs the heads per TP rank divisible by the CP degree (iGPT-S/M have 8 heads: at TP 8 one head is left),
while the ring has no head constraint and reuses the kernel exactly.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

SEQ_DIM = 1  # [B, T, d]


def chunk_starts(n_positions: int, cp: int, rank: int) -> tuple[int, int]:
    """Global start positions of the two chunks (head, tail) that CP rank `rank` holds; each is
    n_positions / (2 cp) long."""
    c = n_positions // (2 * cp)
    return rank * c, (2 * cp - 1 - rank) * c


def local_positions(n_positions: int, cp: int, rank: int) -> torch.Tensor:
    """The global positions this CP rank holds, in the order it holds them."""
    c = n_positions // (2 * cp)
    return torch.cat([torch.arange(s, s + c) for s in chunk_starts(n_positions, cp, rank)])


class _RingPass(torch.autograd.Function):
    """Forward: send x to the next CP rank, receive the previous one's; backward: the gradient goes back."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _shift(x, group, +1)

    @staticmethod
    def backward(ctx, g):
        return _shift(g, ctx.group, -1), None


def _shift(x: torch.Tensor, group, step: int) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    x = x.contiguous()
    out = torch.empty_like(x)
    c10d = dist.distributed_c10d  # the functions P2POp accepts (megapix.plan.comms may wrap dist.isend)
    ops = [dist.P2POp(c10d.isend, x, dist.get_global_rank(group, (r + step) % n), group),
           dist.P2POp(c10d.irecv, out, dist.get_global_rank(group, (r - step) % n), group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


@torch.compiler.disable  # --compile: the ring's sends and receives stay eager, the rest of the block compiles
def ring_attention(q, k, v, *, causal: bool, group, n_positions: int, backend: str = "auto"):
    """Attention of this rank's queries [B, H, L, Dh] (L = T / cp: its head and tail chunks) over the keys and
    values of the whole sequence, which the CP ring brings chunk pair by chunk pair. Exact: equals full
    attention at this rank's rows."""
    from megapix.kernels import flash_attention_chunk, merge_attention

    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    c = n_positions // (2 * cp)
    q_starts = chunk_starts(n_positions, cp, rank)
    parts: list = [None, None]  # per query chunk: (o, lse) merged so far
    kv = torch.stack([k, v])  # one message per ring step
    for step in range(cp):
        if step:
            kv = _RingPass.apply(kv, group)
        k_starts = chunk_starts(n_positions, cp, (rank - step) % cp)
        for qi, q0 in enumerate(q_starts):
            for ki, k0 in enumerate(k_starts):
                if causal and k0 > q0 + c - 1:
                    continue  # entirely in this query chunk's future
                diagonal = causal and k0 + c - 1 > q0  # some keys are past some queries: mask by position
                o, lse = flash_attention_chunk(q[:, :, qi * c:(qi + 1) * c], kv[0][:, :, ki * c:(ki + 1) * c],
                                               kv[1][:, :, ki * c:(ki + 1) * c], diagonal, q0, k0, backend=backend)
                parts[qi] = (o, lse) if parts[qi] is None else merge_attention(*parts[qi], o, lse)
    return torch.cat([parts[0][0], parts[1][0]], dim=2)


def apply_context_parallel(model: nn.Module, group, n_positions: int) -> nn.Module:
    """Split a plain ImageGPT (after tensor parallelism, if any) over the CP group: block 0 cuts its input to
    this rank's positions and every attention becomes ring attention."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    # Under --compile the ring is a graph break in each block, and the graph before it returns q, k, v: views of
    # the qkv projection. torch 2.13 pickles their view chain into AOTAutograd's cache with a dangling
    # `_unsafe_view` record (garbage sizes or SIGSEGV at the next save or load; pytorch#185630, fixed upstream by
    # pytorch#185861), so that cache is off in a CP process; inductor's own kernel cache still serves.
    torch._functorch.config.enable_autograd_cache = False
    idx = local_positions(n_positions, cp, rank)
    model.blocks[0].register_forward_pre_hook(
        lambda m, args: (args[0].index_select(SEQ_DIM, idx.to(args[0].device)), *args[1:]))
    for block in model.blocks:
        attn = block.attn
        attn.attend = functools.partial(ring_attention, causal=attn.causal, group=group, n_positions=n_positions,
                                        backend=attn.kernels)
    return model


class ContextParallelLoss:
    """The loss of this CP rank's positions, weighted so that the DP x CP gradient average gives the
    single-rank loss: mean over its tokens x its share of the micro-batch's tokens x cp."""

    def __init__(self, base, group, n_positions: int, bert: bool):
        self.base, self.bert = base, bert
        self.cp = dist.get_world_size(group)
        self.idx = local_positions(n_positions, self.cp, dist.get_rank(group))

    def __call__(self, logits, tokens, mask=None):
        idx = self.idx.to(tokens.device)
        local_tokens = tokens.index_select(1, idx)
        local_mask = mask.index_select(1, idx) if mask is not None else None
        mean = self.base(logits, local_tokens, local_mask)
        if self.bert and mask is not None:
            share = local_mask.sum().to(mean.dtype) / mask.sum().clamp_min(1).to(mean.dtype)
        else:
            share = local_tokens.numel() / tokens.numel()
        return mean * (share * self.cp)


@torch.no_grad()
def pooled_features(model: nn.Module, tokens: torch.Tensor, layers, group) -> torch.Tensor:
    """megapix.features' pooled features [B, len(layers) * d] of a context-parallel model (apply_context_parallel):
    each layer's mean over all positions, from this rank's positions' sums all-reduced over the CP group. Layer 0's
    normed input is the embedding, which is whole on every rank (the cut is at block 0), so it is pooled as is."""
    T = tokens.shape[1]
    pooled = {}
    for l, x in model.hidden_states(tokens, layers):
        total = x.float().sum(dim=1)
        if x.shape[1] != T:
            dist.all_reduce(total, group=group)
        pooled[l] = total / T
    return torch.cat([pooled[l] for l in layers], dim=1)
