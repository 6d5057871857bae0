"""Hugging Face transformers integration: attention modules that run ``fused_rope_attention``.

In transformers, an attention module rotates q and k with the cos/sin its model computed,
writes the rotated k into the cache, then calls an attention function. To fuse the rotation
into the attention kernel, :func:`patch_model` replaces the ``forward`` of every attention
module of an existing model instance: raw q/k go into :func:`fused_rope_attention`, and the
keys stored in the KV cache are the rotated ones (rotated once, O(N d)). The model's own
rotary embeddings return empty tables while it is patched: nothing reads their cos/sin.

One module per concern:

- :mod:`.families`: which models are supported (one table, plus Llama-pattern detection by
  what an attention module computes) and whether a config fits a model;
- :mod:`.forward`: the patched attention forward (fused and fallback paths), free of host
  reads, so a patched model compiles (``torch.compile(fullgraph=True)``, ``torch.export``)
  and its decode steps can be captured in CUDA graphs;
- :mod:`.generation`: generate()'s cache policy at the short/long switch (the re-prefill,
  the one host decision per step, in the generation loop);
- :mod:`.patch`: patch_model / unpatch_model / set_rope;
- :mod:`.paged`: the patched forward under transformers' continuous batching (a paged KV cache,
  each packed request in its own regime);
- :mod:`.continuous`: continuous batching of a patched model (regime per request at admission,
  the crossing, regime-keyed block sharing, admission check, failure isolation);
- :mod:`.serve`: ``longrope-triton serve`` (transformers serve with the model patched where it
  loads; imported only by that command).

docs/huggingface.md describes the behaviour, docs/compile.md compiling and exporting,
docs/serving.md continuous batching and serving.
transformers is imported lazily (inside functions): importing this package has no side effects.
"""

from .families import supported_families
from .generation import cache_argument
from .patch import is_patched, patch_model, set_rope, unpatch_model

__all__ = ["patch_model", "set_rope", "unpatch_model", "is_patched", "supported_families", "cache_argument"]
