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
    assert (cfg.model.resolution, cfg.model.n_positions, cfg.train.sequence_parallel) == (48, 2304, True)
    with torch.device("meta"):
        assert ImageGPT(cfg.model).wpe.weight.shape == (2304, 1536)
