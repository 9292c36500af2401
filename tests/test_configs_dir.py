"""Every shipped config in configs/ loads and validates, so none goes stale."""
import glob
import os

import pytest

from megapix.config import PAPER_PARAMS, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_configs_exist():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.global_batch > 0
    n = cfg.model.num_parameters()
    for preset, paper in PAPER_PARAMS.items():
        if preset in os.path.basename(path).replace("_", "-"):
            assert abs(n - paper) / paper < 0.01


def test_resolution_sizes_the_position_table():
    """The paper's higher-resolution runs: the position table follows the resolution (igpt-l at 48x48: 2304 rows)."""
    import torch

    from megapix.model import ImageGPT

    cfg = load_config(os.path.join(ROOT, "configs", "igpt_l_imagenet_48.yaml"))
    assert (cfg.model.resolution, cfg.model.n_positions) == (48, 2304)
    with torch.device("meta"):
        assert ImageGPT(cfg.model).wpe.weight.shape == (2304, 1536)


@pytest.mark.parametrize("name,preset,side", [("igpt_l_imagenet_48.yaml", "igpt-l", 48),
                                              ("igpt_xl_imagenet_128.yaml", "igpt-xl", 128)])
def test_resolution_configs_are_the_planners_choice(name, preset, side):
    """The higher-resolution recipes are `megapix plan --model PRESET --resolution SIDE --nodes 8 --gpus-per-node 8
    --gpu h100`'s first row at the paper's batch, SP and CP included."""
    from megapix.plan import DEVICES, PAPER_BATCH, search

    cfg = load_config(os.path.join(ROOT, "configs", name))
    t = cfg.train
    assert (cfg.model.resolution, t.global_batch) == (side, PAPER_BATCH[preset])
    best = search(preset, 8, 8, 80, DEVICES["h100"], PAPER_BATCH[preset], resolution=side)[0].layout
    assert (t.tensor_parallel, t.sequence_parallel, t.pipeline_parallel, t.context_parallel, t.zero_stage,
            t.micro_batch, t.activation_checkpointing) == \
        (best.tp, best.sp, best.pp, best.cp, best.zero_stage, best.micro_batch, best.checkpointing)
