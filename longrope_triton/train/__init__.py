"""Fine-tuning with LongRoPE2's mixed context window (packed short + long documents, varlen attention).

>>> from longrope_triton.train import finetune, MixedWindowSampler
"""

from .finetune import FinetuneResult, MixedWindowSampler, finetune, load_checkpoint, pack_documents, save_checkpoint

__all__ = ["FinetuneResult", "MixedWindowSampler", "finetune", "load_checkpoint", "pack_documents",
           "save_checkpoint"]
