"""Everything about ranks. The model never imports this package: parallelism is applied from outside."""
from __future__ import annotations

from megapix.config import Config
from megapix.parallel.layout import Layout


def build_module(cfg: Config, layout: Layout):
    """The module DeepSpeed wraps for this layout, and whether it is a PipelineModule."""
    from megapix.engine import LossModel
    from megapix.model import ImageGPT, lm_loss

    if layout.pp > 1 or layout.tp > 1:
        raise ValueError("tensor/pipeline parallel layouts are built in megapix.parallel.tensor/pipeline")
    model = ImageGPT(cfg.model, seed=cfg.train.seed)
    return LossModel(model, lm_loss), False
