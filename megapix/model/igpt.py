"""The iGPT network (Chen et al. 2020) as a plain nn.Module, read top to bottom.

Matches the original TensorFlow code and Hugging Face's ImageGPT weights exactly:
pre-LN blocks with the uncentred, bias-free norm; a quick_gelu MLP of width 4d; learned positions;
an untied 512-way head; and the SOS shift inside the model, so that `model(tokens)[:, t]` predicts
`tokens[:, t]` from `tokens[:, :t]`.

Nothing here knows about ranks: tensor/pipeline parallelism split or wrap this module from
megapix/parallel/, and kernels are chosen through `config.kernels`.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from megapix.config import VOCAB_SIZE, ModelConfig
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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.head_dim = config.head_dim
        self.causal = config.objective == "ar"
        self.kernels = config.kernels
        self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)  # [q | k | v], heads contiguous within each
        self.c_proj = nn.Linear(d, d, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.c_attn(x)
        # The head count comes from the projection's width so a tensor-parallel shard (fewer heads) just works.
        n_head = qkv.shape[-1] // (3 * self.head_dim)
        q, k, v = qkv.view(B, T, 3, n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
        y = ops.attention(q, k, v, causal=self.causal, backend=self.kernels)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, n_head * self.head_dim))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x = x + attn(norm_1(x)); x = x + mlp(norm_2(x)), with the first residual add fused into norm_2.
        h, x = self.norm_2(self.attn(self.norm_1(x)), residual=x)
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

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings: [SOS, tok_0 .. tok_{T-2}] for AR; masked tokens zeroed for BERT. Plus positions."""
        B, T = tokens.shape
        if T > self.wpe.num_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds the model's {self.wpe.num_embeddings} positions")
        h = self.wte(tokens)
        if self.config.objective == "ar":
            h = torch.cat([self.sos.view(1, 1, -1).expand(B, 1, -1).to(h.dtype), h[:, :-1]], dim=1)
        elif mask is not None:
            h = h * (~mask).unsqueeze(-1).to(h.dtype)
        return h + self.wpe.weight[:T]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: palette ids [B, T] (no SOS). Returns logits [B, T, 512]."""
        h = self.embed(tokens, mask)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm_f(h))

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
    std = init_std(name, config)
    if std is None:
        param.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        return
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def init_parameters(model: nn.Module, config: ModelConfig, seed: int, prefix: str = "") -> None:
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        init_parameter(prefix + name, p, config, seed)
