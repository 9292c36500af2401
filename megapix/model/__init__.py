from megapix.model.igpt import ImageGPT, IGPTNorm, KVCache, check_tokens, init_parameter, init_parameters, lm_loss

__all__ = ["ImageGPT", "IGPTNorm", "KVCache", "check_tokens", "init_parameter", "init_parameters", "lm_loss"]
