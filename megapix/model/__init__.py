from megapix.model.igpt import ImageGPT, IGPTNorm, init_parameter, init_parameters, lm_loss

__all__ = ["ImageGPT", "IGPTNorm", "init_parameter", "init_parameters", "lm_loss"]
