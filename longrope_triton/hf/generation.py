"""generate() on a patched model: the cache policy at the short/long switch (DESIGN §4).

The regime is picked by the Hugging Face rule (long iff max(position_ids) + 1 >
original_max_position_embeddings). When a generation crosses that length, the cached keys and
values are stale in every layer, so the patched ``prepare_inputs_for_generation`` drops the
cache and runs one prefill of the whole sequence under the long factors (Phi-3's policy,
model-agnostic), then continues with the cache.

This is the one host decision of a generation step, and it lives here, in the generation loop,
outside the model forward (which reads nothing on the host and so compiles whole). It is taken
from host-known lengths: the regime each forward writes into the cache is recorded on the cache
object (``_longrope_long``), and a device value is read only around the switch (the largest
position, once the sequence is longer than the switch; the filled length of a cache nobody
recorded). Whether the attention mask is all ones is read once per generation (generate()
extends it with ones).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

_LONG_ATTR = "_longrope_long"  # on a cache: the regime its contents were written with (None: empty or unknown)
_UNPADDED_ATTR = "_longrope_unpadded"  # on a cache: whether this generation's attention mask is all ones


@functools.lru_cache(maxsize=None)
def cache_argument() -> str:
    """The keyword under which the installed transformers passes the KV cache to ``generate``,
    ``prepare_inputs_for_generation`` and model forwards: ``"cache"`` (transformers >= 5.25,
    which deprecates the old name) or ``"past_key_values"``."""
    import inspect

    from transformers import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def _set(cache, attr: str, value) -> None:
    try:
        setattr(cache, attr, value)
    except AttributeError:  # a cache class with __slots__: no bookkeeping
        pass


def _step_long(input_ids, kwargs, original_max: int) -> bool:
    """Whether the forward about to run is in the long regime (max(position) + 1 of the sequence
    generate() is extending > original_max). Host-known below the switch: generate()'s positions
    never exceed a token's index (arange, or the cumulative sum of the mask), so a sequence no
    longer than the switch is short without a read; past it, one read of the largest position
    (a padded batch's may be smaller than the length)."""
    source = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if source.shape[1] <= original_max:
        return False
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.numel():
        return int(position_ids.max()) + 1 > original_max
    return True


def _holds_short(cache, original_max: int) -> bool:
    """A cache nobody recorded (filled outside generate() by a compiled forward): short-regime
    contents when it holds no more than original_max tokens (one read for a static cache)."""
    past = int(cache.get_seq_length())
    return 0 < past <= original_max


def _emptied(cache):
    """The cache to re-prefill into: a static cache reset in place, else None (the model makes a new one)."""
    layers = getattr(cache, "layers", None) or []
    if layers and all(getattr(layer, "is_compileable", False) for layer in layers):
        cache.reset()
        _set(cache, _LONG_ATTR, None)
        return cache
    return None


def _unpadded(mask, cache, first: bool) -> bool:
    """True when the attention mask is absent or all ones: read once per generation and kept on
    the cache, since generate() only ever appends ones to it."""
    if mask is None:
        return True
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return False
    verdict = None if first or cache is None else getattr(cache, _UNPADDED_ATTR, None)
    if verdict is None:
        verdict = bool(mask.bool().all())
        if cache is not None:
            _set(cache, _UNPADDED_ATTR, verdict)
    return verdict


def patched_prepare_inputs(state, original):
    """prepare_inputs_for_generation with the §4 cache policy and all-ones masks dropped."""

    @functools.wraps(original)
    def prepare(input_ids, *args, **kwargs):
        cache_key = cache_argument()
        cache = kwargs.get(cache_key)
        original_max = state.cfg.original_max_position_embeddings
        tracked = cache is not None and not isinstance(cache, (tuple, list))
        if state.regime == "auto" and tracked:
            filled: Optional[bool] = getattr(cache, _LONG_ATTR, None)
            long = True if filled else _step_long(input_ids, kwargs, original_max)
            if long and not filled and (filled is False or _holds_short(cache, original_max)):
                cache = kwargs[cache_key] = _emptied(cache)
                kwargs["next_sequence_length"] = None  # feed the whole sequence once
            if cache is not None:
                _set(cache, _LONG_ATTR, long)
        elif tracked:
            _set(cache, _LONG_ATTR, True)
        unpadded = _unpadded(kwargs.get("attention_mask"), cache, bool(kwargs.get("is_first_iteration")))
        inputs = original(input_ids, *args, **kwargs)
        if unpadded:
            # No padding: drop the mask (a compileable cache gets a prepared 4-D one here), so the
            # model sees none and the fused path stays on; the model still masks a static cache.
            inputs.pop("attention_mask", None)
        return inputs

    return prepare
