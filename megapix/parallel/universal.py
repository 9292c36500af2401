"""The `universal_checkpoint_info` client state that DeepSpeed's universal-checkpoint conversion
(deepspeed/checkpoint/ds_to_universal.py) reads to merge TP shards, as Megatron-DeepSpeed publishes it.

Patterns are regexes over parameter names, applied with re.match (anchored at the start of the name, so each
begins with ".*"); they match both the non-pipeline names ("model.blocks.3.attn...")
and the pipeline layer names ("4.attn..."). Note: megapix's own layout-changing resume (megapix.parallel.reshard)
does not depend on this; the info is published so DeepSpeed's tool can be used on megapix checkpoints.
"""
from __future__ import annotations

from megapix.config import VOCAB_SIZE, Config


def universal_checkpoint_info(cfg: Config) -> dict:
    from deepspeed.checkpoint import constants as C

    d = cfg.model.d_model
    # ds_to_universal refuses (strict mode) a pattern that matches no parameter: bias patterns only with biases.
    bias = cfg.model.bias
    info = {
        C.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.2,
        C.ORIGINAL_VOCAB_SIZE: VOCAB_SIZE,
        C.PADDED_VOCAB_SIZE: VOCAB_SIZE,
        C.TP_REPLICATED_PARAMETER_PATTERNS: [
            r".*norm_1\.weight$", r".*norm_2\.weight$", r".*norm_f\.weight$", r".*wte\.weight$",
            r".*wpe\.weight$", r"(.*\.)?sos$",
        ] + ([r".*attn\.c_proj\.bias$", r".*mlp\.c_proj\.bias$"] if bias else []),
        C.PARAMETER_TO_AVERAGE_PATTERNS: [],
        C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [r".*attn\.c_proj\.weight$", r".*mlp\.c_proj\.weight$"],
        C.VOCABULARY_PARAMETER_PATTERNS: [r".*head\.weight$"],
        # c_attn is [q | k | v] along dim 0, each TP-sliced by heads: three sub-parameters of d rows.
        C.PARAMETER_WITH_SUB_PARAMS: [{"patterns": [r".*attn\.c_attn\.weight$"] + ([r".*attn\.c_attn\.bias$"] if bias else []),
                                       "shape": [(d, d, d), -1], "partition_dim": 0}],
    }
    return {C.UNIVERSAL_CHECKPOINT_INFO: info}

