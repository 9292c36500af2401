"""The plain ImageGPT: logits equal Hugging Face's ImageGPT both ways, the architecture's details (norm,
activation, init, SOS shift, BERT objective), and parameter counts of the presets."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megapix.config import PAPER_PARAMS, PRESETS, ModelConfig, model_preset
from megapix.model.igpt import ImageGPT, IGPTNorm, lm_loss

transformers = pytest.importorskip("transformers")

SMALL = dict(n_layer=2, d_model=64, n_head=4, resolution=8)


def randomise_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Every parameter random (norm gains around 1, so nothing is the default and every tensor matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if ("ln_" in name or "norm" in name) else noise)


def tokens_for(config, batch=3, seed=1):
    return torch.randint(0, 512, (batch, config.n_ctx), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_model, tokens):
    sos = torch.full((tokens.shape[0], 1), 512, dtype=tokens.dtype)
    with torch.no_grad():
        return hf_model(torch.cat([sos, tokens[:, :-1]], 1)).logits


# ---------------------------------------------------------------------------------------------------------
# HF equivalence
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_export_loads_in_hf_with_equal_logits(tmp_path, bias):
    config = ModelConfig(**SMALL, bias=bias)
    model = ImageGPT(config).eval()
    randomise_(model)
    model.save_pretrained(str(tmp_path / "export"))
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(str(tmp_path / "export")).eval()
    tokens = tokens_for(config)
    with torch.no_grad():
        ours = model(tokens)
    theirs = hf_logits(hf, tokens)
    assert theirs.shape == ours.shape == (3, 64, 512)
    assert ours.abs().max() > 0.1  # a real comparison, not of zeros
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_hf_random_model_loads_with_equal_logits(tmp_path, safe):
    cfg = transformers.ImageGPTConfig(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=513,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.ImageGPTForCausalImageModeling(cfg).eval()
    randomise_(hf, seed=3)
    assert all(p.abs().max() > 0 for n, p in hf.named_parameters() if n.endswith("bias"))
    if safe:
        hf.save_pretrained(str(tmp_path / "hf"))
    else:  # transformers 5 always writes safetensors; write the legacy layout (older HF's default) by hand
        hf.config.save_pretrained(str(tmp_path / "hf"))
        torch.save(hf.state_dict(), str(tmp_path / "hf" / "pytorch_model.bin"))
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert ("model.safetensors" in files) == safe and ("pytorch_model.bin" in files) == (not safe)

    model = ImageGPT.from_pretrained(str(tmp_path / "hf")).eval()
    assert model.config.bias and model.config.n_layer == 2 and model.config.resolution == 8
    tokens = tokens_for(model.config)
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# architecture
# ---------------------------------------------------------------------------------------------------------
def test_norm_is_uncentred_without_bias():
    norm = IGPTNorm(8)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(4, 8) + 3.0  # a large mean: centring would change the result
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)
    centred = F.layer_norm(x, (8,), norm.weight, None, 1e-5)
    assert (norm(x) - centred).abs().max() > 0.1


def test_mlp_uses_quick_gelu():
    config = ModelConfig(**SMALL)
    mlp = ImageGPT(config).blocks[0].mlp
    randomise_(mlp)
    x = torch.randn(2, 5, 64)
    h = mlp.c_fc(x)
    expected = mlp.c_proj(h * torch.sigmoid(1.702 * h))
    torch.testing.assert_close(mlp(x), expected)
    assert (mlp(x) - mlp.c_proj(F.gelu(h))).abs().max() > 1e-4  # not the erf GELU


def test_init_stds_follow_the_original():
    config = ModelConfig(n_layer=4, d_model=256, n_head=8, resolution=16, bias=True)
    model = ImageGPT(config, seed=5)
    d, L = config.d_model, config.n_layer
    expected = {"attn.c_attn.weight": 1 / math.sqrt(d), "attn.c_proj.weight": 1 / math.sqrt(d * L),
                "mlp.c_fc.weight": 0.02, "mlp.c_proj.weight": 0.02}
    for name, p in model.named_parameters():
        if name.endswith("bias") or name == "head.weight":
            assert torch.count_nonzero(p) == 0, name
            continue
        if "norm" in name:
            assert torch.all(p == 1), name
            continue
        suffix = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        std = expected.get(suffix) or {"wte.weight": 0.02, "sos": 0.02, "wpe.weight": 0.01}[name]
        tol = 0.15 if p.numel() < 1000 else 0.03  # sos has only d entries
        assert abs(p.std().item() / std - 1) < tol, (name, p.std().item(), std)
        assert abs(p.mean().item()) < 4 * std / math.sqrt(p.numel()), name
    assert model.head.weight.shape == (512, d) and model.head.bias is None
    assert torch.count_nonzero(model(tokens_for(config, 1))) == 0  # zero head: uniform predictions at init
    # Deterministic in the seed, and different across seeds.
    assert torch.equal(ImageGPT(config, seed=5).wte.weight, model.wte.weight)
    assert not torch.equal(ImageGPT(config, seed=6).wte.weight, model.wte.weight)


def test_sos_shift_is_causal():
    config = ModelConfig(**SMALL)
    model = ImageGPT(config).eval()
    randomise_(model)
    tokens = tokens_for(config, 2)
    with torch.no_grad():
        base = model(tokens)
        for t in (0, 1, 17, 63):
            changed = tokens.clone()
            changed[:, t:] = (changed[:, t:] + 1 + torch.arange(64 - t)) % 512
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
            if t + 1 < 64:  # the next position does see token t
                assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-3
    # logits[:, 0] come from SOS alone: identical for every image.
    torch.testing.assert_close(base[0, 0], base[1, 0])


def test_ar_loss_is_mean_cross_entropy_over_all_positions():
    config = ModelConfig(**SMALL)
    model = ImageGPT(config)
    randomise_(model)
    tokens = tokens_for(config, 2)
    logits = model(tokens)
    expected = F.cross_entropy(logits.reshape(-1, 512), tokens.reshape(-1))
    torch.testing.assert_close(model.loss(tokens), expected)
    torch.testing.assert_close(ImageGPT(config).loss(tokens), torch.tensor(math.log(512)))  # zero head


def test_bert_objective():
    config = ModelConfig(**SMALL, objective="bert")
    model = ImageGPT(config).eval()
    randomise_(model)
    tokens = tokens_for(config, 2)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, [3, 10, 40, 41]] = True
    with torch.no_grad():
        base = model(tokens, mask)
        # No causal mask: the logits at position 0 depend on a later (unmasked) token.
        later = tokens.clone()
        later[:, 50] = (later[:, 50] + 7) % 512
        assert (model(later, mask)[:, 0] - base[:, 0]).abs().max() > 1e-3
        # Masked inputs are zeroed: changing a masked token changes nothing.
        hidden = tokens.clone()
        hidden[mask] = (hidden[mask] + 123) % 512
        torch.testing.assert_close(model(hidden, mask), base, atol=0, rtol=0)
        emb = model.embed(tokens, mask)
        torch.testing.assert_close(emb[mask], model.wpe.weight[:64].expand(2, -1, -1)[mask])
        unmasked = ~mask
        # No SOS shift for BERT: position t's input is token t.
        torch.testing.assert_close(emb[unmasked], (model.wte(tokens) + model.wpe.weight[:64])[unmasked])
    # The loss averages cross-entropy over the masked positions only.
    logits = model(tokens, mask)
    ce = F.cross_entropy(logits.reshape(-1, 512), tokens.reshape(-1), reduction="none").reshape(2, 64)
    torch.testing.assert_close(model.loss(tokens, mask), ce[mask].mean())
    assert not torch.isclose(ce[mask].mean(), ce.mean())
    noisy = logits.detach().clone()
    noisy[~mask] += torch.randn_like(noisy[~mask]) * 10
    torch.testing.assert_close(lm_loss(noisy, tokens, mask), lm_loss(logits.detach(), tokens, mask))
    # Gradients reach only masked positions' logits.
    logits_leaf = logits.detach().requires_grad_()
    lm_loss(logits_leaf, tokens, mask).backward()
    assert torch.count_nonzero(logits_leaf.grad[~mask]) == 0 and torch.count_nonzero(logits_leaf.grad[mask]) > 0


# ---------------------------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_preset_parameter_counts_match_the_paper(name):
    n = model_preset(name).num_parameters()
    assert abs(n / PAPER_PARAMS[name] - 1) < 0.01, (name, n, PAPER_PARAMS[name])


def test_xl_count_with_a_1024_row_position_table_is_the_papers():
    n = model_preset("igpt-xl", n_positions=4096).num_parameters() - 3072 * 3072  # 1024 rows instead of 4096
    assert round(n / 1e6) == 6801


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,bias", [("tiny", False), ("small", False), ("tiny", True)])
def test_num_parameters_equals_the_instantiated_model(name, bias):
    config = model_preset(name, bias=bias)
    assert config.num_parameters() == count(ImageGPT(config))


def test_num_parameters_of_igpt_s_on_meta():
    config = model_preset("igpt-s")
    with torch.device("meta"):
        model = ImageGPT(config)
    assert next(model.parameters()).is_meta
    assert config.num_parameters() == count(model)
    assert abs(count(model) / 76e6 - 1) < 0.01


def test_presets_are_consistent():
    for name, fields in PRESETS.items():
        c = model_preset(name)
        assert c.d_model % c.n_head == 0 and c.n_ctx == fields["resolution"] ** 2, name


# ---------------------------------------------------------------------------------------------------------
# the Python API refuses bad tokens with one line naming the problem and the fix
# ---------------------------------------------------------------------------------------------------------
BAD_TOKENS = [
    (torch.full((2, 64), 512), "token id 512 is outside [0, 512)", "Palette.encode"),
    (torch.full((2, 64), 7).index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(-1)),
     "token id -1 is outside [0, 512)", "Palette.encode"),
    (torch.rand(2, 64) * 10, "integer palette ids, got dtype torch.float32", ".long()"),
    (torch.zeros(2, 64, dtype=torch.bool), "integer palette ids, got dtype torch.bool", ".long()"),
    (torch.zeros(64, dtype=torch.long), "[batch, positions], got shape (64,)", "tokens[None]"),
    (torch.zeros(1, 2, 64, dtype=torch.long), "[batch, positions], got shape (1, 2, 64)", "tokens[None]"),
    (torch.zeros(2, 65, dtype=torch.long), "65 tokens per row exceed the model's 64 positions", "at most 64"),
]


@pytest.mark.parametrize("objective", ["ar", "bert"])
@pytest.mark.parametrize("tokens,problem,fix", BAD_TOKENS)
def test_forward_and_embed_refuse_bad_tokens(tokens, problem, fix, objective):
    from megapix.config import ConfigError

    model = ImageGPT(ModelConfig(**SMALL, objective=objective))
    for call in (model, model.embed, model.loss):
        with pytest.raises(ConfigError) as e:
            call(tokens)
        msg = str(e.value)
        assert isinstance(e.value, ValueError) and "\n" not in msg
        assert problem in msg and fix in msg, msg
    # the edges of the valid range pass; a uint8 array is as good as int64
    ok = torch.tensor([[0, 511] * 32])
    assert model(ok).shape == (1, 64, 512) and torch.equal(model(ok.to(torch.uint8)), model(ok))
