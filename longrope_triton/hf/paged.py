"""The patched attention forward under transformers' continuous batching (a paged KV cache).

Continuous batching packs every scheduled request into one row: hidden states (1, T, H), positions
(1, T) restarting per request, ``cu_seq_lens_q`` bounding each request's new tokens, and a
``PagedAttentionCache`` that writes the new keys and values into its pages and reads each request's
whole sequence back. Stock transformers rotates the packed row with one regime, the one of its
largest position (a short request scheduled with a long one runs the long factors); here each
packed sequence runs the regime of its own request.

That regime is request metadata, decided by the scheduler (:mod:`.continuous`) when the request is
admitted, and handed to every attention call through a small device buffer owned by the cache
(:func:`regime_buffer`): entry i is True when the i-th scheduled request runs the long factors. The
scheduler writes it before each step, in the same thread and stream as transformers' own batch
tensors; the buffer is allocated once, so a CUDA graph that reads it replays correctly. Nothing here
reads a device value on the host.

Paths (both exact up to float rounding):

- **fused**: the new keys are rotated once (per token, the regime of their request) and written into
  the cache, and :func:`fused_rope_attention` runs the packed queries against the keys the cache
  hands back (``cu_seqlens`` / ``cu_seqlens_k``, ``use_long`` per sequence, ``k_is_rotated``);
- **fallback**: q and k rotated the same way, then the model's own attention function with the
  batching kwargs (its mask, its flash block table): for a sliding window in reach (the cache reads a
  rolling buffer there), a flash decode step that writes the cache itself, or attention weights.

The cache's API changed with transformers 5.25 (``update(k, v, layer, kwargs=...)``, which selects
the layer's ``cu_seq_lens_k``, against ``update(k, v, layer, read_index=, write_index=)`` returning
(keys, heads, dim), which transformers <= 5.17 calls from its ``paged|`` attention functions):
:func:`_update_takes_kwargs` tells which by the method's signature.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch

from ..attention import fused_rope_attention
from ..rotary import apply_rotary

# On a PagedAttentionCache: the regime of each scheduled request, in batch order (bool, one entry per
# sequence the batch can hold, plus one for the trailing padding sequence of _closed).
REGIME_ATTR = "_longrope_request_long"


# ---------------------------------------------------------------------------- the regime buffer
def attach_regime_buffer(cache, sequences: int) -> torch.Tensor:
    """Allocate (once) the cache's regime buffer for ``sequences`` packed sequences and return it."""
    buffer = getattr(cache, REGIME_ATTR, None)
    if buffer is None or buffer.shape[0] < sequences + 1:
        buffer = torch.zeros(sequences + 1, dtype=torch.bool, device=cache.device)
        setattr(cache, REGIME_ATTR, buffer)
    return buffer


def write_regimes(cache, long: list) -> None:
    """The scheduled requests' regimes, in batch order, into the cache's buffer (in place: its address
    never changes). Entries past them are stale and harmless: they belong to empty padding sequences."""
    buffer = getattr(cache, REGIME_ATTR)
    if len(long) >= buffer.shape[0]:
        raise ValueError(f"a batch of {len(long)} requests does not fit the regime buffer of {buffer.shape[0] - 1}")
    buffer[:len(long)].copy_(torch.tensor(long, dtype=torch.bool))


def regime_buffer(cache, sequences: int) -> torch.Tensor:
    """bool (sequences,): the regime of each packed sequence of this step, a view of the cache's buffer."""
    buffer = getattr(cache, REGIME_ATTR, None)
    if buffer is None:
        raise RuntimeError(
            "longrope_triton: a patched model ran a continuous-batching step whose paged cache carries no per-request "
            "regimes. Start continuous batching through the patched model (model.generate_batch, "
            "model.init_continuous_batching, transformers serve via `longrope-triton serve`): patch_model installs the "
            "scheduler that decides each request's regime.")
    return buffer[:sequences]


# ---------------------------------------------------------------------------- detection and layout
def is_paged(cache, kwargs: dict) -> bool:
    """A continuous-batching call: packed sequences (``cu_seq_lens_q``) and a cache that holds many
    requests, so it has no single sequence length (``get_seq_length``), unlike every per-batch cache."""
    return cache is not None and "cu_seq_lens_q" in kwargs and not hasattr(cache, "get_seq_length")


def layer_type(config, layer_idx: int) -> str:
    """'full_attention' or 'sliding_attention': the cache group of a layer, by transformers' rule
    (the config's layer_types, else every layer sliding iff the config has a sliding window)."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[layer_idx]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


def _for_layer(value, kind: str):
    """A batching kwarg that holds one entry per cache group (a dict) or one for all (a tensor or int)."""
    return value[kind] if isinstance(value, dict) else value


def keys_in_reach(kwargs: dict, kind: str, window: Optional[int]) -> bool:
    """Whether every request of the step attends all its keys with no window truncating them: a full
    attention layer, or a sliding one whose longest key sequence (a host int the batching computed)
    is shorter than the window (its cache then reads the keys in position order, no rolling buffer).
    Any other kind of layer (chunked attention, ...) takes the model's own attention."""
    if kind != "sliding_attention":
        return kind == "full_attention"
    longest = kwargs.get("max_length_k", kwargs.get("max_seqlen_k"))  # 5.25 / <= 5.17 name
    return window is not None and longest is not None and _for_layer(longest, kind) < window


def _closed(cu: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens with one more sequence ending at ``total``: the padding rows a CUDA-graph step appends
    after the last request (whose bounds then stay exact) instead of belonging to it."""
    return torch.cat([cu, cu.new_full((1,), total)])


def _token_regimes(cu: torch.Tensor, sequence_long: torch.Tensor, total: int) -> torch.Tensor:
    """bool (1, total): each packed token's regime, its sequence's."""
    tokens = torch.arange(total, device=cu.device, dtype=cu.dtype)
    return sequence_long[torch.searchsorted(cu[1:], tokens, right=True)][None]


@functools.lru_cache(maxsize=None)
def _update_takes_kwargs(cache_class: type) -> bool:
    """transformers >= 5.25: ``cache.update(k, v, layer_idx, kwargs)``; before: read/write indices."""
    return "kwargs" in inspect.signature(cache_class.update).parameters


def _updated_cache(cache, k_rot, v, layer_idx: int, kwargs: dict, kind: str):
    """Write the step's rotated keys and values into the paged cache; return every scheduled request's
    keys and values (1, Hkv, Sk, D), packed like the queries, and their cu_seqlens."""
    if _update_takes_kwargs(type(cache)):
        keys, values = cache.update(k_rot, v, layer_idx, kwargs=kwargs)  # also selects the layer's cu_seq_lens_k
        return keys, values, kwargs["cu_seq_lens_k"]
    keys, values = cache.update(key_states=k_rot, value_states=v, layer_idx=layer_idx,
                                read_index=kwargs["read_index"], write_index=kwargs["write_index"])
    cu_k = _for_layer(kwargs["cu_seq_lens_k"], kind)
    return keys.transpose(0, 1)[None], values.transpose(0, 1)[None], cu_k


# ---------------------------------------------------------------------------- the forward
def paged_attention(module, q, k, v, cfg, cache, attention_mask, kwargs: dict,
                    interface: Optional[Callable] = None, window: Optional[int] = None):
    """Attention of one patched module in a continuous-batching step: (output (1, T, Hq * D), weights).

    q (1, Hq, T, D), k and v (1, Hkv, T, D): the module's raw projections of the packed row.
    ``interface``: None for the fused path, else the model's attention function (fallback)."""
    total = q.shape[2]
    position_ids = kwargs["position_ids"]
    cu_q = _closed(kwargs["cu_seq_lens_q"], total)
    sequence_long = regime_buffer(cache, cu_q.shape[0] - 1)
    token_long = _token_regimes(cu_q, sequence_long, total)
    kind = layer_type(module.config, module.layer_idx)
    if interface is None:
        _, k_rot = apply_rotary(q[:, :0], k, cfg, position_ids=position_ids, use_long=token_long)
        keys, values, cu_k = _updated_cache(cache, k_rot, v, module.layer_idx, kwargs, kind)
        out = fused_rope_attention(q, keys, values, cfg, position_ids=position_ids, causal=True,
                                   softmax_scale=module.scaling, cu_seqlens=cu_q,
                                   cu_seqlens_k=_closed(cu_k, keys.shape[2]), use_long=sequence_long,
                                   k_is_rotated=True)
        return out.transpose(1, 2).reshape(1, total, -1), None
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=position_ids, use_long=token_long)
    if _update_takes_kwargs(type(cache)):
        k_rot, v = cache.update(k_rot, v, module.layer_idx, kwargs=kwargs)
    else:
        kwargs["cache"] = cache  # transformers <= 5.17: the paged attention function updates the cache itself
    out, weights = interface(module, q_rot, k_rot, v, attention_mask, dropout=0.0, scaling=module.scaling,
                             sliding_window=window, **kwargs)
    return out.reshape(1, total, -1), weights
