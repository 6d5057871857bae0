"""The forward of a patched attention module: raw q/k into the fused kernel.

Paths (all exact up to float rounding):

- **fused**: no padding mask (2-D mask absent, or all ones), no sliding window in reach, no
  attention dropout, ``output_attentions`` off.

  - Without a cache and without a mask, the documents of each row are read from position_ids
    on the device (a new document wherever a position is not its predecessor's + 1, the
    transformers packing convention), and the rows are flattened into packed sequences for the
    varlen kernel: each document of a packed row picks its own regime, a plain batch (no
    restart) keeps the batch rule of DESIGN §1 (long iff max(position_ids) + 1 over the batch >
    original_max_position_embeddings). Both are decided on the device.
  - With an all-ones mask (or positions the model made): one sequence per row.
  - With a cache: the new keys are rotated once (apply_rotary) and stored; q attends to the
    cached keys (``k_is_rotated``). A static cache hands back its whole buffer and its filled
    length as a device tensor: the kernel reads it (``seqused_k``), nothing is sliced on the host.

- **fallback**: anything else (a padded batch, a custom 4-D mask, a sliding window in reach,
  dropout, output_attentions): the same rotation by apply_rotary, then the model's own
  attention function with its mask.

- **paged**: a continuous-batching step (paged.py): every packed request in the regime its
  scheduler decided (continuous.py), fused or through the model's own attention function.

No path reads a tensor value on the host, so a patched model compiles with
``torch.compile(fullgraph=True)``, exports with ``torch.export`` and can be captured in a CUDA
graph. What eager mode may learn by reading (``_validation.host_reads_allowed``: eager value
checks on) it still uses: an all-ones 2-D mask takes the fused path, and a forward that mixes
regimes in one cache warns. Under tracing, or with ``LONGROPE_TRITON_EAGER_CHECKS=0``, a 2-D mask
takes the (exact) fallback and nothing warns.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch

from .._validation import host_reads_allowed
from ..attention import fused_rope_attention
from ..rotary import apply_rotary
from .families import _Family
from .paged import is_paged, keys_in_reach, layer_type, paged_attention

# kwarg the patched base model passes down to every patched attention module (through the
# decoder layers' **kwargs, so gradient-checkpoint recomputation sees the same decisions)
CALL_KWARG = "longrope_call"


# ---------------------------------------------------------------------------- per-forward decisions
class _Call:
    """What the patched attention modules of one model forward share: the kind of 2-D mask the
    model received ("none", "ones", "padded", "unknown": a 2-D mask not looked at, "custom"),
    whether attention weights were asked for, and, in eager mode only, the host facts of the
    stale-cache warning (read once per forward, not once per layer)."""

    def __init__(self, mask: str, weights: bool = False):
        self.mask, self.weights = mask, weights
        self._pos, self._note = None, None

    @classmethod
    def from_mask(cls, attention_mask, weights: bool = False) -> "_Call":
        if attention_mask is None:
            return cls("none", weights)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            if not host_reads_allowed(attention_mask):
                return cls("unknown", weights)  # maybe all ones: the fallback is exact for any mask
            return cls("ones" if bool(attention_mask.bool().all()) else "padded", weights)
        return cls("custom", weights)

    def cache_note(self, pos: torch.Tensor, past, cfg, forced: Optional[int]) -> tuple[bool, int]:
        """(long regime?, cached tokens before this forward) on the host: eager mode only."""
        if self._pos is not pos:
            end = forced if forced is not None else int(pos.max()) + 1
            self._pos, self._note = pos, (cfg.use_long(end), int(past))
        return self._note


# ---------------------------------------------------------------------------- helpers
def _project(module, family: _Family, hidden_states: torch.Tensor):
    """q (B, Hq, S, D), k and v (B, Hkv, S, D) as the original module projects them: views, no copies."""
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    if family.projection == "fused":
        qkv = module.qkv_proj(hidden_states)
        q_size = module.config.num_attention_heads * module.head_dim
        kv_size = module.config.num_key_value_heads * module.head_dim
        q, k, v = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
    else:
        q, k, v = module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)
    return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)


def _sliding_window(module, family: _Family) -> Optional[int]:
    if family.sliding_window == "module":
        return getattr(module, "sliding_window", None)
    if family.sliding_window == "config":
        return getattr(module.config, "sliding_window", None)
    if family.sliding_window == "auto":
        return getattr(module, "sliding_window", getattr(module.config, "sliding_window", None))
    return None


def _attention_interface(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)


def _host_int(x) -> bool:
    """A length known on the host (a Python int, or a symbolic one under torch.compile)."""
    return isinstance(x, (int, torch.SymInt))


def note_cache_regime(cache, long: bool, past: int) -> None:
    """Remember the regime the cached keys were rotated with; warn when a forward mixes regimes.
    Host bookkeeping: generate() keeps it in prepare_inputs_for_generation (generation.py), an
    eager forward here too."""
    previous = getattr(cache, "_longrope_long", None)
    if past > 0 and previous is not None and previous != long:
        warnings.warn(
            "longrope_triton: this forward uses the "
            f"{'long' if long else 'short'} factors but the KV cache was filled under the "
            f"{'long' if previous else 'short'} ones: its keys and values are stale. generate() on a patched "
            "model re-prefills at the switch; a hand-written decoding loop must do the same "
            "(or use patch_model(..., regime='long')).", RuntimeWarning, stacklevel=4)
    try:
        cache._longrope_long = long
    except AttributeError:  # a cache class with __slots__: no bookkeeping, no warning
        pass


def documents(position_ids: torch.Tensor, cfg, forced: Optional[int]):
    """The documents of rows (B, S) marked by their positions, as packed sequences over the B * S
    flattened tokens: (cu_seqlens int64 (B * S + 1,), use_long bool (B * S,) or None when the regime
    is forced). A document starts at each row start and wherever a position is not its
    predecessor's + 1. The number of documents is not known on the host, so there are B * S
    sequences, the unused ones empty at the end. Regime: per document when some row packs several
    (LongRoPE2's mixed window), else the batch rule (max(position_ids) + 1 over the batch, the
    stock model's). All on the device."""
    batch, seq = position_ids.shape
    total = batch * seq
    # Each token against its predecessor (padded, not sliced: no tensor of length seq - 1, whose
    # size-1 case would specialize an exported program's seq >= 3).
    previous = torch.nn.functional.pad(position_ids, (1, 0))[:, :seq]
    first = torch.arange(seq, device=position_ids.device) == 0
    starts = ((position_ids != previous + 1) | first).reshape(-1)
    doc = torch.cumsum(starts, 0) - 1
    tokens = torch.arange(total, device=position_ids.device)
    cu = torch.full((total + 1,), total, dtype=torch.int64, device=position_ids.device)
    cu = cu.scatter_reduce(0, doc, tokens, reduce="amin")
    if forced is not None:
        return cu, None
    flat = position_ids.reshape(-1).to(torch.int64)
    doc_end = torch.zeros(total, dtype=torch.int64, device=flat.device).scatter_reduce(0, doc, flat + 1,
                                                                                       reduce="amax")
    packed = starts.sum() > batch  # some row starts a document after its first token
    end = torch.where(packed, doc_end, flat.amax() + 1)
    return cu, end > cfg.original_max_position_embeddings


def _packed_attention(module, q, k, v, cfg, position_ids: torch.Tensor, forced: Optional[int]) -> torch.Tensor:
    """Rows flattened into the packed sequences of their documents (views: the projections are
    (B, S, H, D) underneath), one varlen call, output (B, S, Hq * D)."""
    batch, seq = position_ids.shape
    cu, use_long = documents(position_ids, cfg, forced)

    def flat(t):
        return t.transpose(1, 2).reshape(1, batch * seq, t.shape[1], t.shape[3]).transpose(1, 2)

    pos = position_ids.reshape(1, batch * seq)
    out = fused_rope_attention(flat(q), flat(k), flat(v), cfg, position_ids=pos, kv_position_ids=pos, causal=True,
                               softmax_scale=module.scaling, seq_len=forced, cu_seqlens=cu, use_long=use_long)
    return out.transpose(1, 2).reshape(batch, seq, -1)


# ---------------------------------------------------------------------------- patched attention
def patched_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                    cache=None, **kwargs):
    """Attention forward of a patched module: raw q/k into the fused kernel (see the module docstring)."""
    state = self._longrope_state
    cfg, family = state.cfg, state.family
    legacy = kwargs.pop("past_key_values", None)  # the cache's name before transformers 5.25
    cache = cache if cache is not None else legacy
    call = kwargs.pop(CALL_KWARG, None) or _Call.from_mask(attention_mask)
    if state.process_group is not None:
        return _context_parallel_forward(self, state, hidden_states, call, kwargs), None
    batch, seq = hidden_states.shape[:2]
    q, k, v = _project(self, family, hidden_states)
    if is_paged(cache, kwargs):
        return _paged_forward(self, q, k, v, cfg, family, cache, attention_mask, call, kwargs)
    # regime "long": a length past the switch (a host constant); "auto": decided on the device
    forced = cfg.original_max_position_embeddings + 1 if state.regime == "long" else None

    # Cached tokens: a host int for a dynamic cache, a device tensor for a static one (never read).
    past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        pos = (torch.arange(seq, device=hidden_states.device) + past).reshape(1, seq)
    else:
        pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    window = _sliding_window(self, family)
    dropout = getattr(self, "attention_dropout", 0.0) if self.training else 0.0
    within_window = window is None or (_host_int(past) and past + seq <= window)
    fused = (call.mask in ("none", "ones") and not call.weights and not kwargs.get("output_attentions", False)
             and not dropout and within_window)
    eager = host_reads_allowed(hidden_states)

    if fused and cache is None:
        if call.mask == "none" and position_ids is not None:
            out = _packed_attention(self, q, k, v, cfg, pos.expand(batch, seq), forced)
        else:
            out = fused_rope_attention(q, k, v, cfg, position_ids=pos, kv_position_ids=pos, causal=True,
                                       softmax_scale=self.scaling, seq_len=forced)
            out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.o_proj(out), None

    if fused:
        _, k_rot = apply_rotary(q[:, :0], k, cfg, position_ids=pos, seq_len=forced)
        if eager:
            note_cache_regime(cache, *call.cache_note(pos, past, cfg, forced))
        keys, values = cache.update(k_rot, v, self.layer_idx)
        used = cache.get_seq_length(self.layer_idx)
        seqused_k = None
        if isinstance(used, torch.Tensor):  # a static cache: its whole buffer, the filled length on the device
            seqused_k = used.reshape(-1)[:1].expand(batch).to(torch.int32)
        elif keys.shape[2] > used:
            keys, values = keys[:, :, :used], values[:, :, :used]
        out = fused_rope_attention(q, keys, values, cfg, position_ids=pos, causal=True, softmax_scale=self.scaling,
                                   seq_len=forced, seqused_k=seqused_k, k_is_rotated=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), None

    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=pos, seq_len=forced)
    if cache is not None:
        if eager:
            note_cache_regime(cache, *call.cache_note(pos, past, cfg, forced))
        k_rot, v = cache.update(k_rot, v, self.layer_idx)
    out, weights = _attention_interface(self)(
        self, q_rot, k_rot, v, attention_mask, dropout=dropout, scaling=self.scaling,
        sliding_window=window, **kwargs)
    out = out.reshape(batch, seq, -1).contiguous()
    return self.o_proj(out), weights


def _paged_forward(self, q, k, v, cfg, family: _Family, cache, attention_mask, call: _Call, kwargs: dict):
    """A continuous-batching step (paged.py): the fused path unless the layer's keys are not all in
    reach (a sliding window the step reaches), the batching's flash decode path writes the cache
    itself (``block_table``), or attention weights are asked for."""
    kind = layer_type(self.config, self.layer_idx)
    fused = (not call.weights and not kwargs.get("output_attentions", False) and kwargs.get("block_table") is None
             and keys_in_reach(kwargs, kind, getattr(self.config, "sliding_window", None)))
    out, weights = paged_attention(self, q, k, v, cfg, cache, attention_mask, kwargs,
                                   interface=None if fused else _attention_interface(self),
                                   window=_sliding_window(self, family))
    return self.o_proj(out), weights


def _context_parallel_forward(self, state, hidden_states: torch.Tensor, call: _Call, kwargs: dict) -> torch.Tensor:
    """Attention of a context-parallel patched module: ``hidden_states`` is this rank's zigzag shard.

    The base model's pre-hook has checked (or filled in) the global positions and turned the
    cache off, so the shard's q/k/v go straight into ``context_parallel_attention``, which
    rotates them at their global positions and picks the regime from the full length."""
    from ..distributed import context_parallel_attention

    group, cfg = state.process_group, state.cfg
    batch, seq = hidden_states.shape[:2]
    full = seq * torch.distributed.get_world_size(group)
    window = _sliding_window(self, state.family)
    dropout = getattr(self, "attention_dropout", 0.0) if self.training else 0.0
    unsupported = [what for what, present in (
        ("a padding or custom attention mask", call.mask not in ("none", "ones")),
        ("attention weights (output_attentions)", call.weights or kwargs.get("output_attentions", False)),
        ("attention dropout", bool(dropout)),
        (f"a sliding window of {window} tokens", window is not None and full > window)) if present]
    if unsupported:
        raise ValueError(f"the context-parallel patched model does not support {', '.join(unsupported)}")
    seq_len = full if state.regime == "auto" else max(full, cfg.original_max_position_embeddings + 1)
    q, k, v = _project(self, state.family, hidden_states)
    out = context_parallel_attention(q, k, v, cfg, group=group, causal=True, softmax_scale=self.scaling,
                                     seq_len=seq_len)
    return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
