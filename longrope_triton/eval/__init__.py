"""Evaluation of context extension: sliding-window perplexity, passkey retrieval, LongRoPE2
needle samples, method configs (plain, PI, NTK, YaRN, shipped LongRoPE factors), tables and plots.

>>> from longrope_triton.eval import perplexity, passkey_retrieval, method_config, use_rope
"""

from .methods import METHODS, factors_path, load_factors, method_config, plain_config, shipped_factor_sets
from .passkey import accuracy_table, passkey_prompt, passkey_retrieval
from .perplexity import (PerplexityResult, PerplexityRun, aligned_windows, perplexities, perplexity, sliding_windows,
                         tokenize_documents, window_nll)
from .rope import use_rope

__all__ = ["METHODS", "PerplexityResult", "PerplexityRun", "accuracy_table", "aligned_windows", "factors_path",
           "load_factors", "method_config", "passkey_prompt", "passkey_retrieval", "perplexities", "perplexity",
           "plain_config", "shipped_factor_sets", "sliding_windows", "tokenize_documents", "use_rope", "window_nll"]
