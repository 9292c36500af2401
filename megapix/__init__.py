"""megapix: a DeepSpeed trainer for image GPTs (iGPT)."""
from megapix.config import Config, ConfigError, ModelConfig, model_preset

__all__ = ["Config", "ConfigError", "ImageGPT", "ModelConfig", "Palette", "model_preset"]
__version__ = "0.1.0"


def __getattr__(name):
    """`import megapix` (and so `megapix --help`) loads only the config module: the model (torch) and the data
    code (numpy) load on first use of megapix.ImageGPT / megapix.Palette."""
    if name == "ImageGPT":
        from megapix.model import ImageGPT

        return ImageGPT
    if name == "Palette":
        from megapix.data.palette import Palette

        return Palette
    raise AttributeError(name)
