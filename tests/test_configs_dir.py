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
