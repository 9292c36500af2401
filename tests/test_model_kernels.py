"""The model with the Triton kernels (run on CPU through Triton's interpreter) equals the reference model:
logits and every parameter gradient, for both objectives. Runs in a subprocess so TRITON_INTERPRET=1 is set
before triton is imported (see tests/test_kernels.py for why that matters)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from megapix import ImageGPT, ModelConfig
    torch.manual_seed(0)
    for objective in ("ar", "bert"):
        cfg = dict(n_layer=2, d_model=64, n_head=2, resolution=5, objective=objective)  # Dh 32, T 25 (odd)
        ref = ImageGPT(ModelConfig(**cfg, kernels="torch"), seed=3)
        fused = ImageGPT(ModelConfig(**cfg, kernels="triton"), seed=3)
        with torch.no_grad():  # non-trivial norms and head
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        fused.load_state_dict(ref.state_dict())
        tokens = torch.randint(0, 512, (3, 25))
        mask = torch.rand(3, 25) < 0.3 if objective == "bert" else None
        out = {}
        for name, m in (("ref", ref), ("fused", fused)):
            logits = m(tokens, mask)
            (logits.square().mean() + m.loss(tokens, mask)).backward()
            out[name] = (logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        (lr, gr), (lf, gf) = out["ref"], out["fused"]
        err = (lr - lf).abs().max().item() / lr.abs().max().item()
        assert err < 1e-5, f"{objective}: logits rel err {err}"
        assert gr.keys() == gf.keys()
        for n in gr:
            scale = gr[n].abs().max().item() + 1e-12
            e = (gr[n] - gf[n]).abs().max().item() / scale
            assert e < 1e-4, f"{objective}: grad {n} rel err {e}"
    print("KERNELS_MATCH")
""")


def test_model_with_triton_kernels_matches_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "KERNELS_MATCH" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


# ---- the planner's accounting on the Triton path (in this process: TRITON_INTERPRET=1 is set for this module) ----
def test_triton_path_saves_what_the_planner_counts_tiny_and_small():
    """The Triton kernels' autograd functions under the interpreter (fp32: its bf16 dot is not trusted on CPU; the
    same save_for_backward runs in bf16)."""
    from megapix.config import model_preset
    from megapix.plan import block_activation_bytes
    from test_activations import planned_model, saved_by_block, saved_by_model

    for name in ("tiny", "small"):
        m = model_preset(name, kernels="triton")
        assert saved_by_block(m, 2, torch.float32) == pytest.approx(block_activation_bytes(m, 2, 1, "triton", 4),
                                                                    rel=0.03)
        if name == "tiny":
            assert saved_by_model(m, 2, torch.float32) == pytest.approx(planned_model(m, 2, "triton", 4), rel=0.03)


def test_flop_counter_sees_the_triton_attention():
    """megapix's Triton custom ops get torch's SDPA formulas: the same count as the torch path (a 1-layer d=32
    model: the interpreter under FlopCounterMode's dispatch mode is slow)."""
    from megapix.config import ModelConfig
    from test_flops import model_flops_per_token

    m = ModelConfig(n_layer=1, d_model=32, n_head=2, resolution=4, kernels="triton")
    assert model_flops_per_token(m, 1, False) == pytest.approx(m.flops_per_token(executed=True), rel=0.01)
