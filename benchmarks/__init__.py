"""Benchmarks of longrope_triton against eager PyTorch / Hugging Face LongRoPE.

- ``registry.py``: every operation, provider, sweep and target, declared once.
- ``providers.py``: how each provider runs one case (ours, eager HF-style, SDPA backends,
  torch.compile, Liger-Kernel, flash-attn).
- ``measure.py``: timing (``triton.testing.do_bench``), peak memory, provenance.
- ``e2e.py``: model prefill (stock transformers vs ``longrope_triton.hf.patch_model``).
- ``run.py``: ``python -m benchmarks.run [--quick | --cpu-smoke] [--out DIR]``.
- ``report.py``: Markdown tables and PNG plots from any results JSON; ``--readme``.

See docs/benchmarks.md.
"""
