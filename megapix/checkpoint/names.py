"""Parameter names: the canonical ImageGPT name of each parameter of the module DeepSpeed wraps, and back.
LossModel (no pipeline) names it "model.<canonical>"; a PipelineModule "<layer index>.<name within the layer>"."""
from __future__ import annotations

from megapix.parallel.pipeline import canonical_prefix


def canonical_name(module_name: str, is_pipeline: bool, n_layer: int) -> str:
    """The canonical ImageGPT name of a parameter of the module DeepSpeed wraps."""
    if not is_pipeline:
        return module_name.removeprefix("model.")
    idx, rest = module_name.split(".", 1)
    return canonical_prefix(int(idx), n_layer) + rest


def module_name(canonical: str, is_pipeline: bool, n_layer: int) -> str:
    """Inverse of canonical_name: the name of a canonical ImageGPT parameter in the module DeepSpeed wraps
    (LossModel: "model.<name>"; PipelineModule: "<layer index>.<name within the layer>")."""
    if not is_pipeline:
        return "model." + canonical
    if canonical.startswith("blocks."):
        _, index, rest = canonical.split(".", 2)
        return f"{int(index) + 1}.{rest}"
    first = canonical.split(".", 1)[0]
    return f"0.{canonical}" if first in ("wte", "wpe", "sos") else f"{n_layer + 1}.{canonical}"
