"""One network: feature extraction, the fine-tuning classifier, sampling and the pipeline stage layers all run
ImageGPT's own pieces, so a change to Block reaches every one of them; sampling honours --kernels."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megapix.config import ModelConfig
from megapix.features import extract
from megapix.finetune import Classifier
from megapix.model.igpt import Block, ImageGPT, lm_loss
from megapix.parallel.pipeline import BlockLayer, EmbedLayer, HeadLayer, canonical_prefix
from megapix.sample import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ModelConfig(n_layer=3, d_model=32, n_head=2, resolution=4, bias=True)  # 16 positions
SHIFT = 0.5


def randomised(seed=0) -> ImageGPT:
    model = ImageGPT(CONFIG, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised head and biases would hide a difference
        for name, p in model.named_parameters():
            noise = 0.2 * torch.randn(p.shape, generator=gen)
            p.copy_(1 + noise if "norm" in name else noise)
    return model


def shifted_copy(model: ImageGPT) -> ImageGPT:
    """What the patched Block computes, written without the patch: out + SHIFT is a larger last bias."""
    ref = ImageGPT(CONFIG).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in ref.blocks:
            block.mlp.c_proj.bias += SHIFT
    return ref


def pipeline_layers(model: ImageGPT) -> list[torch.nn.Module]:
    """The pipeline's layers as build_pipeline makes them (one process, no DeepSpeed), holding model's weights."""
    L = CONFIG.n_layer
    layers = [EmbedLayer(CONFIG, 0)] + [BlockLayer(CONFIG, 0, i) for i in range(L)] + [HeadLayer(CONFIG, 0)]
    canonical = model.state_dict()
    for i, layer in enumerate(layers):
        prefix = canonical_prefix(i, L)
        layer.load_state_dict({n: canonical[prefix + n] for n in layer.state_dict()})
    return layers


def run_pipeline(layers, tokens):
    h = tokens
    for layer in layers:
        h = layer(h)
    return h


def every_user(model: ImageGPT, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    clf = Classifier(model, 3)
    with torch.no_grad():
        torch.nn.init.normal_(clf.clf.weight, generator=torch.Generator().manual_seed(0))
        _, l_gen, _, class_logits = clf(tokens, torch.tensor([0, 1, 2, 0]))
        pipe = run_pipeline(pipeline_layers(model), tokens)
    return {
        "features": extract(model, tokens, [0, 1, 3], batch_size=3),
        "classifier l_gen": l_gen,
        "classifier logits": class_logits,
        "greedy samples": generate(model, tokens[:, :5], top_k=1),
        "sampled tokens": generate(model, tokens[:, :5], generator=torch.Generator().manual_seed(1)),
        "pipeline logits": pipe,
    }


def test_a_change_to_block_reaches_every_user(monkeypatch):
    model = randomised()
    tokens = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(2))
    before = every_user(model, tokens)
    expected = every_user(shifted_copy(model), tokens)  # computed without the patch

    forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, x, *args: forward(self, x, *args) + SHIFT)
    after = every_user(model, tokens)

    d = CONFIG.d_model
    torch.testing.assert_close(after["features"][:, :d], before["features"][:, :d])  # layer 0: before any block
    assert not torch.allclose(after["features"][:, d:], before["features"][:, d:], atol=1e-3)
    with torch.no_grad():
        full = model(tokens)
    torch.testing.assert_close(after["pipeline logits"], full)  # the pipeline is the model, patched or not
    torch.testing.assert_close(after["classifier l_gen"], lm_loss(full, tokens))
    for name in before:
        if name.endswith("logits") or name == "features" or name.endswith("l_gen"):
            torch.testing.assert_close(after[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)
            assert not torch.allclose(after[name], before[name], atol=1e-3), f"{name} ignored the change to Block"
        else:
            assert torch.equal(after[name], expected[name]), name
            assert not torch.equal(after[name], before[name]), f"{name} ignored the change to Block"


def test_pipeline_layers_hold_the_models_own_pieces_under_their_names():
    model = ImageGPT(CONFIG, seed=5)
    canonical = model.state_dict()
    layers = [EmbedLayer(CONFIG, 5), BlockLayer(CONFIG, 5, 1), HeadLayer(CONFIG, 5)]
    assert sorted(layers[0].state_dict()) == ["sos", "wpe.weight", "wte.weight"]
    assert sorted(layers[2].state_dict()) == ["head.weight", "norm_f.weight"]
    for layer, prefix in zip(layers, ("", "blocks.1.", "")):
        for name, tensor in layer.state_dict().items():
            assert torch.equal(tensor, canonical[prefix + name]), prefix + name  # same name-keyed init
    assert all(p.device.type == "cpu" for layer in layers for p in layer.parameters())
    assert isinstance(layers[0], ImageGPT) and isinstance(layers[2], ImageGPT)  # not copies of its code


TRITON_SAMPLING = textwrap.dedent("""
    import importlib, importlib.util
    import torch
    from megapix.config import ModelConfig
    from megapix.model.igpt import ImageGPT
    from megapix.sample import generate

    name = "megapix.kernels" if importlib.util.find_spec("megapix.kernels") else "kernels"
    K = importlib.import_module(name)
    calls = {"flash_attention": 0, "add_norm": 0}
    for fn in calls:
        def counted(*a, _f=getattr(K, fn), _n=fn, **kw):
            calls[_n] += 1
            return _f(*a, **kw)
        setattr(K, fn, counted)

    cfg = dict(n_layer=2, d_model=32, n_head=2, resolution=4)  # 16 positions
    ref = ImageGPT(ModelConfig(**cfg, kernels="torch"), seed=1).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    fused = ImageGPT(ModelConfig(**cfg, kernels="triton"), seed=1).eval()
    fused.load_state_dict(ref.state_dict())
    prefix = torch.randint(0, 512, (2, 5))
    a = generate(ref, prefix, generator=torch.Generator().manual_seed(0))
    assert calls == {"flash_attention": 0, "add_norm": 0}, calls
    b = generate(fused, prefix, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b), (a, b)
    # the prompt pass (6 positions) runs the fused attention in each block; every one of the 11 calls runs
    # the fused norms (norm_1 and add+norm_2 per block, norm_f)
    assert calls == {"flash_attention": 2, "add_norm": 11 * 5}, calls
    with torch.no_grad():
        cache = fused.kv_cache()
        steps = torch.cat([fused(b[:, :6], cache=cache)] + [fused(b[:, :p + 1], cache=cache) for p in range(6, 16)], 1)
        torch.testing.assert_close(steps, ref(b), atol=1e-5, rtol=1e-5)
    print("TRITON_SAMPLING_OK", calls)
""")


@pytest.mark.slow
def test_sampling_with_triton_kernels_goes_through_them():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", TRITON_SAMPLING], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "TRITON_SAMPLING_OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
