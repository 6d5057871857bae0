"""LongRoPE / LongRoPE2 factor search: search space, evolution with a resumable log, fitness functions.

>>> from longrope_triton.search import SearchSpace, SearchParams, evolution_search, extension_template
"""

from .evolution import Evaluation, SearchLogError, SearchParams, SearchResult, evolution_search
from .space import START_TOKEN_CHOICES, Candidate, SearchSpace, extension_template, longrope2_space

__all__ = ["Candidate", "Evaluation", "SearchLogError", "SearchParams", "SearchResult", "SearchSpace",
           "START_TOKEN_CHOICES", "evolution_search", "extension_template", "longrope2_space"]
