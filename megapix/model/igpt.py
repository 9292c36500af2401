"""The iGPT network (Chen et al. 2020) as a plain nn.Module, read top to bottom.

Matches the original TensorFlow code and Hugging Face's ImageGPT weights exactly:
pre-LN blocks with the uncentred, bias-free norm; a quick_gelu MLP of width 4d; learned positions;
an untied 512-way head; and the SOS shift inside the model, so that `model(tokens)[:, t]` predicts
`tokens[:, t]` from `tokens[:, :t]`.

Every user of the network goes through its pieces: `embed`, `blocks`, `norm_f`, `head`; `hidden` (the head's
input: fine-tuning), `hidden_states` (each layer's normed input: probe features), a KV cache (sampling); the
pipeline stages are this class cut down (megapix/parallel/pipeline.py).

Nothing here knows about ranks: tensor/pipeline parallelism split or wrap this module from
megapix/parallel/, and kernels are chosen through `config.kernels`.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from megapix.config import VOCAB_SIZE, ConfigError, ModelConfig
from megapix.model import ops


class IGPTNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g: NOT mean-centred, no bias (the original code, whatever its docstring)."""

    def __init__(self, d: int, eps: float = 1e-5, kernels: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given a residual, (norm(x + residual), x + residual) in one fused pass."""
        if residual is None:
            return ops.norm(x, self.weight, self.eps, self.kernels)
        return ops.add_norm(x, residual, self.weight, self.eps, self.kernels)


class KVCache:
    """One layer's keys and values [B, H, t, Dh] of the positions already decoded (sampling).

    `ImageGPT.forward(tokens, cache=model.kv_cache())` fills one per block; the next call computes only the
    positions past the cached ones."""

    def __init__(self):
        self.k = self.v = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        """Append the new positions' keys and values; returns all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.head_dim = config.head_dim
        self.causal = config.objective == "ar"
        self.kernels = config.kernels
        self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)  # [q | k | v], heads contiguous within each
        self.c_proj = nn.Linear(d, d, bias=config.bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: [B, T, d]. With a cache, x holds the T positions after the cached ones, whose keys and values
        join the cache; ops.attention then treats the queries as the last T positions."""
        qkv = self.c_attn(x)
        # Shapes come from the projection's output so parallel layers just work: a tensor-parallel shard has fewer
        # heads, and under sequence parallelism x is a chunk of the positions that c_attn gathers to all of them.
        B, T = qkv.shape[:2]
        n_head = qkv.shape[-1] // (3 * self.head_dim)
        q, k, v = qkv.view(B, T, 3, n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
        if cache is not None:
            k, v = cache.extend(k, v)
        y = self.attend(q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, n_head * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(Dh)) v per head. The seam context parallelism fills from outside: it replaces this
        with ring attention over the ranks that hold the other parts of the sequence (megapix/parallel/context.py)."""
        return ops.attention(q, k, v, causal=self.causal, backend=self.kernels)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.c_fc = nn.Linear(d, 4 * d, bias=config.bias)
        self.c_proj = nn.Linear(4 * d, d, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        # "gelu2" = quick_gelu = h * sigmoid(1.702 h), written as silu(1.702 h) / 1.702: the same function, but
        # silu has a fused backward, which makes this ~25% faster than the product on CPU (benchmarks/bench_model.py).
        return self.c_proj(F.silu(1.702 * h) / 1.702)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = IGPTNorm(config.d_model, config.norm_eps, config.kernels)
        self.attn = Attention(config)
        self.norm_2 = IGPTNorm(config.d_model, config.norm_eps, config.kernels)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        # x = x + attn(norm_1(x)); x = x + mlp(norm_2(x)), with the first residual add fused into norm_2.
        h, x = self.norm_2(self.attn(self.norm_1(x), cache), residual=x)
        return x + self.mlp(h)


class ImageGPT(nn.Module):
    def __init__(self, config: ModelConfig, seed: int = 0):
        super().__init__()
        self.config = config
        d = config.d_model
        self.wte = nn.Embedding(VOCAB_SIZE, d)
        self.sos = nn.Parameter(torch.zeros(d))  # learned start-of-sequence input (HF: row 512 of wte)
        self.wpe = nn.Embedding(config.n_positions, d)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = IGPTNorm(d, config.norm_eps, config.kernels)
        self.head = nn.Linear(d, VOCAB_SIZE, bias=False)
        init_parameters(self, config, seed)

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """Input embeddings of positions start..T-1 (start > 0: those past a KV cache), plus positions:
        [SOS, tok_0 .. tok_{T-2}] for AR, so position t sees only tokens before t; masked tokens zeroed for BERT."""
        check_tokens(tokens, self.wpe.num_embeddings)
        B, T = tokens.shape
        if self.config.objective == "ar":
            h = self.wte(tokens[:, max(start - 1, 0):].long())[:, :-1]  # .long(): any integer dtype
            if start == 0:
                h = torch.cat([self.sos.view(1, 1, -1).expand(B, 1, -1).to(h.dtype), h], dim=1)
        else:
            h = self.wte(tokens[:, start:].long())
            if mask is not None:
                h = h * (~mask[:, start:]).unsqueeze(-1).to(h.dtype)
        return h + self.wpe.weight[start:T]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                cache: list[KVCache] | None = None) -> torch.Tensor:
        """tokens: palette ids [B, T] (no SOS). Returns logits [B, T, 512]; `model(tokens)[:, t]` predicts
        tokens[:, t]. With a cache (`kv_cache()`) holding c positions, only positions c..T-1 are computed."""
        return self.head(self.hidden(tokens, mask, cache))

    def hidden(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
               cache: list[KVCache] | None = None) -> torch.Tensor:
        """The head's input [B, T, d]: norm_f of the last block's output."""
        h = self.embed(tokens, mask, start=0 if cache is None else len(cache[0]))
        for i, block in enumerate(self.blocks):
            h = block(h) if cache is None else block(h, cache[i])  # (a checkpointed block takes h alone)
        return self.norm_f(h)

    def hidden_states(self, tokens: torch.Tensor, layers, mask: torch.Tensor | None = None):
        """Yield (l, normed input of layer l) for each l in `layers`, in layer order, as the blocks run:
        blocks[l].norm_1(input of block l), and for l = n_layer norm_f(last block's output). Blocks past
        max(layers) are never run, and only one layer's activations need be alive at a time."""
        want, last = set(layers), max(layers)
        h = self.embed(tokens, mask)
        for l, block in enumerate(self.blocks):
            if l in want:
                yield l, block.norm_1(h)
            if l == last:
                return
            h = block(h)
        yield len(self.blocks), self.norm_f(h)

    def kv_cache(self) -> list[KVCache]:
        if self.config.objective != "ar":
            raise ConfigError("a KV cache needs an autoregressive model; this one has the BERT objective")
        return [KVCache() for _ in self.blocks]

    def loss(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return lm_loss(self(tokens, mask), tokens, mask if self.config.objective == "bert" else None)

    # HF interop lives in megapix/model/hf.py; these are the public entry points.
    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "ImageGPT":
        from megapix.model.hf import load_pretrained

        return load_pretrained(path, **overrides)

    def save_pretrained(self, path: str) -> None:
        from megapix.model.hf import save_pretrained

        save_pretrained(self, path)


def check_tokens(tokens: torch.Tensor, n_positions: int) -> None:
    """Refuse what the embedding would index wrongly or fail on with an unclear message (one min/max per call)."""
    if not isinstance(tokens, torch.Tensor):
        raise ConfigError(f"tokens must be a torch tensor of palette ids, got {type(tokens).__name__}; "
                          "pass torch.as_tensor(ids)")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ConfigError(f"tokens must be integer palette ids, got dtype {tokens.dtype}; "
                          "encode images with Palette.encode (or cast ids with .long())")
    if tokens.dim() != 2:
        raise ConfigError(f"tokens must be [batch, positions], got shape {tuple(tokens.shape)}; "
                          "add the batch dimension with tokens[None]")
    if tokens.shape[1] > n_positions:
        raise ConfigError(f"{tokens.shape[1]} tokens per row exceed the model's {n_positions} positions; "
                          f"pass at most {n_positions} (the images' resolution must match the model's)")
    if tokens.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.stack(torch.aminmax(tokens)).tolist()
    if lo < 0 or hi >= VOCAB_SIZE:
        raise ConfigError(f"token id {lo if lo < 0 else hi} is outside [0, {VOCAB_SIZE}); tokens are palette "
                          "indices: encode images with the model's palette (Palette.encode)")


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy in nats per token: over all positions (AR) or over masked positions (BERT)."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
    if mask is None:
        return flat.mean()
    m = mask.reshape(-1).to(flat.dtype)
    return (flat * m).sum() / m.sum().clamp_min(1.0)


def init_std(name: str, config: ModelConfig) -> float | None:
    """The original code's initialisation, by parameter name; None means constant (ones for norms, zeros else)."""
    d, L = config.d_model, config.n_layer
    if name.endswith("bias") or name.startswith("head."):
        return None  # biases and the output head start at zero
    if "norm" in name:
        return None
    if name.endswith("attn.c_attn.weight"):
        return 1.0 / math.sqrt(d)
    if name.endswith("attn.c_proj.weight"):
        return 1.0 / math.sqrt(d * L)
    if ".mlp." in name:
        return 0.02
    if name.startswith("wpe"):
        return 0.01
    return 0.02  # wte, sos


@torch.no_grad()
def init_parameter(name: str, param: torch.Tensor, config: ModelConfig, seed: int) -> None:
    """Initialise one parameter from its name alone, so that any layout (a pipeline stage building only its
    layers, a tensor-parallel shard cut from the full tensor) reproduces the single-rank weights exactly."""
    if init_std(name, config) is None:
        param.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    else:
        param.copy_(draw_parameter(name, param.shape, config, seed))


@torch.no_grad()
def draw_parameter(name: str, shape, config: ModelConfig, seed: int) -> torch.Tensor:
    """The initial value of parameter `name` at its full (unsharded) `shape`, in fp32, drawn in place: one
    tensor of the parameter's size is the whole cost (construction materialises one parameter at a time)."""
    std = init_std(name, config)
    if std is None:
        return torch.full(shape, 1.0 if "norm" in name and name.endswith("weight") else 0.0, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)


def init_parameters(model: nn.Module, config: ModelConfig, seed: int, prefix: str = "") -> None:
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        init_parameter(prefix + name, p, config, seed)
