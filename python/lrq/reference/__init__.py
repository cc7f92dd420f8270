"""The torch reference executor (the project's oracle) and llama-perplexity's method.

    from lrq.model_file import open_model
    from lrq.reference import Reference
    ref = Reference(open_model(path), dtype=torch.float64)
    ref.logits(tokens); ref.perplexity(tokens, n_ctx=512, n_chunks=40)
"""

from .executor import STREAM_BLOCKS, Block, BlockCache, KVCache, Reference, ReferenceError
from .ops import Linear, act_clip_quant, apply_rope, attention, rms_norm, rope_angles
from .perplexity import PerplexityResult, perplexity, token_nll

__all__ = ["Reference", "ReferenceError", "KVCache", "Block", "BlockCache", "STREAM_BLOCKS", "Linear", "PerplexityResult",
           "perplexity", "token_nll", "act_clip_quant", "apply_rope", "attention", "rms_norm",
           "rope_angles"]
