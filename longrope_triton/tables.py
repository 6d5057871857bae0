"""Split-position cos/sin tables: exact angles at 2M tokens for ~1.5 MB.

A position p < 2^21 is split as p = p_hi * 2^11 + p_lo. For each frequency w the
kernel combines two table rows built in float64,

    cos(p w) = cos(p_hi 2^11 w) cos(p_lo w) - sin(p_hi 2^11 w) sin(p_lo w)
    sin(p w) = sin(p_hi 2^11 w) cos(p_lo w) + cos(p_hi 2^11 w) sin(p_lo w)

with one complex multiply in fp32: |error| ~2e-7 for every position, where a plain
fp32 ``p * w`` is ~6e-2 rad off at 1M. Rows are O(sqrt(S)), so the tables stay
L2-resident and nothing of size O(seq x dim) is materialized.

Layout: float32 (3, 2, rows, r/2) = (set, cos|sin, row, frequency) with
set 0 = unscaled (lambda = 1, mscale 1: the n_hat bypass), 1 = short, 2 = long;
rows [0, rows_hi) are the p_hi rows (each set's own mscale folded in), rows
[rows_hi, rows_hi + 2^11) the p_lo rows.
"""

from __future__ import annotations

import collections
import math
from typing import Optional

import torch

LO_BITS = 11
LO_ROWS = 1 << LO_BITS
SET_UNSCALED, SET_SHORT, SET_LONG = 0, 1, 2

_CACHE: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()
_CACHE_SIZE = 32


def _factor_set_rows(inv_freq: torch.Tensor, mscale: float, rows_hi: int) -> torch.Tensor:
    """(2, rows_hi + LO_ROWS, r/2) cos/sin rows for one factor set, built in float64."""
    hi = torch.arange(rows_hi, dtype=torch.float64)[:, None] * float(LO_ROWS) * inv_freq
    lo = torch.arange(LO_ROWS, dtype=torch.float64)[:, None] * inv_freq
    cos = torch.cat([mscale * torch.cos(hi), torch.cos(lo)])
    sin = torch.cat([mscale * torch.sin(hi), torch.sin(lo)])
    return torch.stack([cos, sin])


def build_tables(base: float, rotary_dim: int, max_positions: int, short_factor, long_factor,
                 short_mscale: float, long_mscale: Optional[float] = None) -> torch.Tensor:
    """The (3, 2, rows, r/2) float32 tables on the CPU (see the module docstring). The short and
    long sets carry their own attention factor; long_mscale None -> short_mscale (one for both)."""
    rows_hi = max(1, math.ceil(max_positions / LO_ROWS))
    theta = base ** (-2.0 * torch.arange(rotary_dim // 2, dtype=torch.float64) / rotary_dim)
    sets = [
        _factor_set_rows(theta, 1.0, rows_hi),
        _factor_set_rows(theta / torch.tensor(short_factor, dtype=torch.float64), short_mscale, rows_hi),
        _factor_set_rows(theta / torch.tensor(long_factor, dtype=torch.float64),
                         short_mscale if long_mscale is None else long_mscale, rows_hi),
    ]
    return torch.stack(sets).to(torch.float32).contiguous()


def cached_tables(base: float, rotary_dim: int, max_positions: int, short_factor, long_factor,
                  short_mscale: float, long_mscale: float, device) -> torch.Tensor:
    """build_tables, moved to ``device`` and kept in a small LRU cache (search makes many configs)."""
    key = (base, rotary_dim, max_positions, tuple(short_factor), tuple(long_factor), short_mscale, long_mscale,
           str(device))
    tables = _CACHE.get(key)
    if tables is None:
        tables = build_tables(base, rotary_dim, max_positions, short_factor, long_factor, short_mscale,
                              long_mscale).to(device)
        _CACHE[key] = tables
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return tables
