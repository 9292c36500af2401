"""ModelConfig.flops_per_token, the one FLOP count the planner, the metrics' MFU and the GPU check use, against
torch.utils.flop_counter.FlopCounterMode over one forward + backward of the real model."""
from __future__ import annotations

import pytest
import torch

from megapix.config import VOCAB_SIZE, model_preset
from megapix.plan.checks import count_flops
from megapix.model import ImageGPT
from megapix.model.igpt import Block
from megapix.parallel import checkpoint_blocks

TOLERANCE = 0.01


def model_flops_per_token(m, b, checkpointing):
    model = ImageGPT(m)
    if checkpointing:
        checkpoint_blocks(model)
    tokens = torch.randint(0, VOCAB_SIZE, (b, m.n_ctx))
    return count_flops(lambda: model.loss(tokens).backward()) / (b * m.n_ctx)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", ["tiny", "small"])
def test_flop_counter_equals_the_planners_count(name, checkpointing):
    m = model_preset(name, kernels="torch")
    measured = model_flops_per_token(m, 2, checkpointing)
    assert measured == pytest.approx(m.flops_per_token(recompute=checkpointing, executed=True), rel=TOLERANCE)
    # MFU's model FLOPs are the executed ones less the stated extras: the flash-style backward's recomputed scores
    # (2 L T d) and, with checkpointing, the blocks' second forward
    L, T, d = m.n_layer, m.n_ctx, m.d_model
    extras = 2 * L * T * d + (2 * L * 12 * d * d + 4 * L * T * d if checkpointing else 0)
    assert m.flops_per_token() == m.flops_per_token(recompute=checkpointing, executed=True) - extras


def test_flop_counter_equals_the_planners_count_for_an_igpt_s_block():
    m = model_preset("igpt-s", kernels="torch")
    block = Block(m)
    x = torch.randn(1, m.n_ctx, m.d_model, requires_grad=True)
    measured = count_flops(lambda: block(x).sum().backward()) / m.n_ctx
    head = 6 * VOCAB_SIZE * m.d_model
    assert measured == pytest.approx((m.flops_per_token(executed=True) - head) / m.n_layer, rel=TOLERANCE)
