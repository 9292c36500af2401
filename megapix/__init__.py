"""megapix: a DeepSpeed trainer for image GPTs (iGPT)."""
from megapix.config import Config, ConfigError, ModelConfig, model_preset
from megapix.model import ImageGPT

__all__ = ["Config", "ConfigError", "ImageGPT", "ModelConfig", "Palette", "model_preset"]
__version__ = "0.1.0"


def __getattr__(name):  # keep `import megapix` light: numpy-heavy data code loads on first use
    if name == "Palette":
        from megapix.data.palette import Palette

        return Palette
    raise AttributeError(name)
