"""longrope_triton: LongRoPE rotary embeddings fused into FlashAttention-style Triton attention."""

from .config import LongRoPEConfig
from .rotary import apply_rotary
from .attention import fused_rope_attention
from .hf import patch_model, set_rope, unpatch_model

__all__ = ["LongRoPEConfig", "apply_rotary", "fused_rope_attention", "patch_model", "set_rope", "unpatch_model"]
__version__ = "0.1.0"
