"""Hugging Face transformers integration: attention modules that run ``fused_rope_attention``.

In transformers, an attention module rotates q and k with the cos/sin its model computed,
writes the rotated k into the cache, then calls an attention function. To fuse the rotation
into the attention kernel, :func:`patch_model` replaces the ``forward`` of every attention
module of an existing model instance: raw q/k go into :func:`fused_rope_attention`, and the
keys stored in the KV cache are the rotated ones (rotated once, O(N d)). The model's own
rotary embedding still runs (it is cheap) but its cos/sin are ignored.

Which families are supported, and where each reads its RoPE config, is one table
(``_FAMILIES``); any other model whose attention follows the Llama pattern is detected from
its attention module: the Llama layout (q/k/v/o projections, ``head_dim``, ``scaling``,
``layer_idx``, no other parameters) and, run on a small probe, the same output as Llama
attention (decided by what the module computes, so an upstream rewording of its source changes
nothing). Anything else raises a ValueError rather than being patched approximately.

Paths inside a patched attention forward (all exact up to float rounding):

- fused: no padding mask (2-D mask absent or all ones), no sliding window in reach, no
  attention dropout, ``output_attentions`` off. Packed sequences (batch 1, position_ids that
  restart inside the row, no cache and no mask -- the transformers packing convention) use
  the varlen kernel, each document with its own short/long regime (LongRoPE2 mixed window).
- fallback: anything else (a padded batch, a custom 4-D mask, a sliding window in reach,
  dropout, output_attentions): the same rotation by :func:`apply_rotary`, then the model's
  own attention function with its mask.

Cache policy (DESIGN.md §4): the regime is picked by the Hugging Face rule (long iff
max(position_ids) + 1 > original_max_position_embeddings). When a generation crosses that
length, the cached keys and values are stale in every layer, so the patched
``prepare_inputs_for_generation`` drops the cache and runs one prefill of the whole
sequence under the long factors (Phi-3's policy, model-agnostic), then continues with the
cache. ``patch_model(model, regime="long")`` instead uses the long factors from the first
token: no re-prefill, but a different model in the short range.

transformers is imported lazily (inside functions): importing this module has no side effects.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
import types
import warnings
from typing import Optional

import torch

from .attention import fused_rope_attention
from .config import _REGIME_MSCALE_KEYS, _REGIME_MSCALE_MODELS, LongRoPEConfig, _hf_rope_dict
from .rotary import apply_rotary

__all__ = ["patch_model", "set_rope", "unpatch_model", "is_patched", "supported_families"]

_STATE_ATTR = "_longrope_patch"
# kwarg the patched base model passes down to every patched attention module (through the
# decoder layers' **kwargs, so gradient-checkpoint recomputation sees the same decisions)
_CALL_KWARG = "longrope_call"
_REGIMES = ("auto", "long")


# ---------------------------------------------------------------------------- supported families
@dataclasses.dataclass(frozen=True)
class _Family:
    """How one model family's attention module is laid out and where it reads its RoPE config.

    attention: attention class name. projection: "separate" (q_proj, k_proj, v_proj) or
    "fused" (one qkv_proj, Phi-3). original_max_top_level: the model reads
    original_max_position_embeddings from the top level of its config (Phi-3), not from
    inside rope_parameters. sliding_window: where the module reads its window ("module":
    ``self.sliding_window``, "config": ``config.sliding_window``, "auto": the module's if it
    has one, else the config's (conservative: a window only sends a forward to the fallback),
    None: no window).
    own_switch: the model class overrides prepare_inputs_for_generation only to drop the cache
    at the short/long switch (Phi-3); the patch replaces that with its own policy and calls
    the generic GenerationMixin method (so a static cache stays static).
    """

    attention: str
    projection: str = "separate"
    original_max_top_level: bool = False
    sliding_window: Optional[str] = None
    own_switch: bool = False


_FAMILIES = {
    "llama": _Family("LlamaAttention"),
    "mistral": _Family("MistralAttention", sliding_window="config"),
    "qwen2": _Family("Qwen2Attention", sliding_window="module"),
    "phi3": _Family("Phi3Attention", projection="fused", original_max_top_level=True, sliding_window="config",
                    own_switch=True),
}
# Any other model_type is patched when its attention module has the Llama layout (these
# attributes; parameters only in the four projections) and computes Llama attention on a probe.
_LLAMA_PATTERN = _Family("<llama pattern>", sliding_window="auto")
_PATTERN_ATTRS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx",
                  "num_key_value_groups", "config")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Relative error allowed between the module and the Llama computation on the probe (both in
# float32): rounding, as when the attention function runs another kernel, not a missing step.
_PROBE_TOL = 1e-4
# (tokens, rms of the projections): unit scale checks rotation, scaling, causal mask and GQA;
# scores of std ~16 show what bends large scores (a soft cap); one token at ~30 shows what bends
# large values (a clip or a norm: with one key the softmax is 1 whatever the scores).
_PROBES = ((6, 1.0), (6, 4.0), (1, 30.0))


def supported_families() -> dict:
    """model_type -> attention class name for the families in the table (others: Llama-pattern detection)."""
    return {name: fam.attention for name, fam in _FAMILIES.items()}


def _has_llama_layout(module: torch.nn.Module) -> bool:
    """q/k/v/o projections as nn.Linear, the Llama attributes, and no parameter outside the
    projections (a q/k norm, a gate or a bias table would be a step the fused path lacks)."""
    return (all(hasattr(module, a) for a in _PATTERN_ATTRS)
            and all(isinstance(getattr(module, p), torch.nn.Linear) for p in _PROJECTIONS)
            and all(name.split(".")[0] in _PROJECTIONS for name, _ in module.named_parameters()))


def _probe_rotation(rotary_dim: int, seq: int, dtype, device):
    """cos, sin (1, seq, rotary_dim) as transformers' rotary modules return them (frequencies
    repeated over the two halves), at positions that do not start at 0."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = (torch.arange(3, 3 + seq, dtype=torch.float64)[:, None] * inv_freq).repeat(1, 2)[None]
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def _llama_attention(module: torch.nn.Module, x: torch.Tensor, cos, sin, mask) -> torch.Tensor:
    """What a Llama-pattern attention computes: projections, rotate_half rotation of the first
    rotary_dim dims, scaled softmax attention (GQA) under ``mask``, output projection."""
    batch, seq, _ = x.shape
    q, k, v = (getattr(module, p)(x).view(batch, seq, -1, module.head_dim).transpose(1, 2) for p in _PROJECTIONS[:3])
    half = cos.shape[-1] // 2

    def rotate(t):
        t1, t2, rest = t[..., :half], t[..., half:2 * half], t[..., 2 * half:]
        return torch.cat((t1 * cos[:, None, :, :half] - t2 * sin[:, None, :, half:],
                          t2 * cos[:, None, :, half:] + t1 * sin[:, None, :, :half], rest), -1)

    group = q.shape[1] // k.shape[1]
    q, k, v = rotate(q), rotate(k).repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * module.scaling
    if mask is not None:
        scores = scores + mask
    return module.o_proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, seq, -1))


def _computes_llama_attention(module: torch.nn.Module, rotary_dim: int) -> bool:
    """Run the module's own forward on small probes (:data:`_PROBES`) and compare it with
    :func:`_llama_attention`, in float32 (a half-precision module is probed on a float32 copy).

    Decided from what the module computes, not from how its source is worded: an upstream
    rewording changes nothing, while an extra step (q/k/v clipping, a norm, a soft cap) shows."""
    probe = module
    if module.q_proj.weight.dtype not in (torch.float32, torch.float64):
        probe = copy.deepcopy(module).float()
    device = probe.q_proj.weight.device
    gen = torch.Generator().manual_seed(0)
    training = probe.training
    probe.eval()
    try:
        with torch.no_grad():
            for seq, rms in _PROBES:
                x = torch.randn(1, seq, probe.q_proj.in_features, generator=gen).to(device)
                x = x * (rms / probe.q_proj(x).pow(2).mean().sqrt().clamp_min(1e-6))
                cos, sin = _probe_rotation(rotary_dim, seq, torch.float32, device)
                # eager and sdpa take an additive mask; other implementations (flash) are causal without one
                mask = None
                if getattr(probe.config, "_attn_implementation", None) in (None, "eager", "sdpa"):
                    mask = torch.full((seq, seq), torch.finfo(torch.float32).min, device=device).triu(1)[None, None]
                stock = probe(x, position_embeddings=(cos, sin), attention_mask=mask)[0]
                ref = _llama_attention(probe, x, cos, sin, mask)
                if not bool((stock - ref).abs().max() <= _PROBE_TOL * ref.abs().max().clamp_min(1e-6)):
                    return False
    except Exception:  # noqa: BLE001 - a forward that cannot run as a Llama attention is not one
        return False
    finally:
        probe.train(training)
    return True


def _attention_modules(model: torch.nn.Module, family: Optional[_Family], rotary_dim: int):
    """[(name, module)] of the attention modules to patch: the family's class, or every module
    whose class is Llama-pattern attention (probed once per class)."""
    if family is not None and family is not _LLAMA_PATTERN:
        return [(n, m) for n, m in model.named_modules() if type(m).__name__ == family.attention]
    verdicts = {}
    for _, m in model.named_modules():
        cls = type(m)
        if cls not in verdicts:
            verdicts[cls] = _has_llama_layout(m) and _computes_llama_attention(m, rotary_dim)
    return [(n, m) for n, m in model.named_modules() if verdicts.get(type(m), False)]


def _resolve_family(model: torch.nn.Module):
    """(family, [(name, attention module)]) or a ValueError naming why the model cannot be patched."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"patch_model needs a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    if not _has_rope(config):
        raise ValueError(f"{type(model).__name__} (model_type {model_type!r}) has no rotary position "
                         f"embedding to fuse: patch_model needs a RoPE model")
    family = _FAMILIES.get(model_type)
    modules = _attention_modules(model, family or _LLAMA_PATTERN, _model_rope(config).rotary_dim)
    if not modules:
        raise ValueError(
            f"cannot patch {type(model).__name__} (model_type {model_type!r}): no attention module follows the "
            f"Llama pattern (q_proj/k_proj/v_proj/o_proj, head_dim, scaling, layer_idx, no other parameters, and "
            f"a forward that computes Llama attention on a probe). Supported families: {', '.join(sorted(_FAMILIES))}")
    return family or _LLAMA_PATTERN, modules


def _has_rope(config) -> bool:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return bool(params) or getattr(config, "rope_theta", None) is not None


# ---------------------------------------------------------------------------- config checks
def _model_rope(config) -> LongRoPEConfig:
    try:
        return LongRoPEConfig.from_hf(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot read the RoPE config of this model ({type(config).__name__}): {exc}") from exc


def _check_cfg(cfg, config, modules) -> LongRoPEConfig:
    """cfg fits the model: same head_dim and rotary dims, half-split pairs."""
    if not isinstance(cfg, LongRoPEConfig):
        raise TypeError(f"config must be a LongRoPEConfig or None, got {type(cfg).__name__}")
    head_dim = int(modules[0][1].head_dim)
    model_rotary = _model_rope(config).rotary_dim
    if cfg.head_dim != head_dim:
        raise ValueError(f"LongRoPEConfig.head_dim is {cfg.head_dim} but the model's attention head_dim is {head_dim}")
    if cfg.rotary_dim != model_rotary:
        raise ValueError(
            f"LongRoPEConfig factor lists have length {cfg.rotary_dim // 2} (rotary_dim {cfg.rotary_dim}), but this "
            f"model rotates {model_rotary} of its head_dim {head_dim} dims and needs {model_rotary // 2} factors")
    if cfg.interleaved:
        raise ValueError("interleaved=True (GPT-J pairs) does not match this model: its rotate_half pairs (i, i + r/2)")
    return cfg


# ---------------------------------------------------------------------------- per-forward decisions
class _Call:
    """What the patched attention modules of one model forward share: the kind of 2-D mask the
    model received ("none", "ones", "padded", "custom"), whether attention weights were asked
    for, and lazily, per position_ids tensor, the regime length and the packed-sequence
    boundaries (host syncs once per forward, not once per layer)."""

    __slots__ = ("mask", "weights", "_pos", "_seq_len", "_packed", "_cu")

    def __init__(self, mask: str, weights: bool = False):
        self.mask, self.weights = mask, weights
        self._pos = self._seq_len = self._packed = self._cu = None

    @classmethod
    def from_mask(cls, attention_mask, weights: bool = False) -> "_Call":
        if attention_mask is None:
            return cls("none", weights)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            return cls("ones" if bool(attention_mask.bool().all()) else "padded", weights)
        return cls("custom", weights)

    def _sync(self, pos: torch.Tensor):
        if self._pos is not pos:
            self._pos, self._seq_len, self._packed, self._cu = pos, int(pos.max()) + 1, None, None

    def seq_len(self, pos: torch.Tensor) -> int:
        """max(position_ids) + 1: the length the Hugging Face rule picks the regime from."""
        self._sync(pos)
        return self._seq_len

    def packed(self, pos: torch.Tensor) -> bool:
        """True when positions restart (or jump) inside a row: the transformers packing convention."""
        self._sync(pos)
        if self._packed is None:
            pos2 = pos if pos.dim() == 2 else pos[None]
            self._packed = bool((pos2[:, 1:] - pos2[:, :-1] != 1).any())
        return self._packed

    def cu_seqlens(self, pos: torch.Tensor) -> torch.Tensor:
        """int32 document starts of a packed single row (position_ids (1, S) or (S,))."""
        self._sync(pos)
        if self._cu is None:
            row = pos.reshape(-1)
            starts = torch.nonzero(row[1:] - row[:-1] != 1).flatten() + 1
            self._cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), row.numel())]).to(torch.int32)
        return self._cu


# ---------------------------------------------------------------------------- patched attention
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


def _note_cache_regime(cache, long: bool, past: int) -> None:
    """Remember the regime the cached keys were rotated with; warn when a forward mixes regimes."""
    previous = getattr(cache, "_longrope_long", None)
    if past > 0 and previous is not None and previous != long:
        warnings.warn(
            "longrope_triton: this forward uses the "
            f"{'long' if long else 'short'} factors but the KV cache was filled under the "
            f"{'long' if previous else 'short'} ones: its keys and values are stale. generate() on a patched "
            "model re-prefills at the switch; a hand-written decoding loop must do the same "
            "(or use patch_model(..., regime='long')).", RuntimeWarning, stacklevel=3)
    try:
        cache._longrope_long = long
    except AttributeError:  # a cache class with __slots__: no bookkeeping, no warning
        pass


def _patched_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                     cache=None, **kwargs):
    """Attention forward of a patched module: raw q/k into the fused kernel (see the module docstring)."""
    state: _PatchState = self._longrope_state
    cfg, family = state.cfg, state.family
    legacy = kwargs.pop("past_key_values", None)  # the cache's name before transformers 5.25
    cache = cache if cache is not None else legacy
    call = kwargs.pop(_CALL_KWARG, None) or _Call.from_mask(attention_mask)
    if state.process_group is not None:
        return _context_parallel_forward(self, state, hidden_states, call, kwargs), None
    batch, seq = hidden_states.shape[:2]
    q, k, v = _project(self, family, hidden_states)

    past = int(cache.get_seq_length(self.layer_idx)) if cache is not None else 0
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        pos, seq_len = torch.arange(past, past + seq, device=hidden_states.device)[None], past + seq
    else:
        pos, seq_len = position_ids, call.seq_len(position_ids)
    if state.regime == "long":
        seq_len = max(seq_len, cfg.original_max_position_embeddings + 1)
    window = _sliding_window(self, family)
    dropout = getattr(self, "attention_dropout", 0.0) if self.training else 0.0
    fused = (call.mask in ("none", "ones") and not call.weights and not kwargs.get("output_attentions", False)
             and not dropout and (window is None or past + seq <= window))
    cu = None
    if fused and cache is None and call.mask == "none" and position_ids is not None and call.packed(position_ids):
        if batch == 1:
            cu = call.cu_seqlens(position_ids)
        else:
            fused = False  # packed rows in a batch > 1: the model's block-diagonal mask

    if fused:
        if cache is None:
            out = fused_rope_attention(
                q, k, v, cfg, position_ids=pos, kv_position_ids=pos, causal=True, softmax_scale=self.scaling,
                seq_len=None if (cu is not None and state.regime == "auto") else seq_len, cu_seqlens=cu)
        else:
            _, k_rot = apply_rotary(q[:, :0], k, cfg, position_ids=pos, seq_len=seq_len)
            _note_cache_regime(cache, cfg.use_long(seq_len), past)
            keys, values = cache.update(k_rot, v, self.layer_idx)
            total = past + seq
            if keys.shape[2] > total:  # a static cache returns its whole buffer
                keys, values = keys[:, :, :total], values[:, :, :total]
            out = fused_rope_attention(q, keys, values, cfg, position_ids=pos, causal=True,
                                       softmax_scale=self.scaling, seq_len=seq_len, k_is_rotated=True)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.o_proj(out), None

    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=pos, seq_len=seq_len)
    if cache is not None:
        _note_cache_regime(cache, cfg.use_long(seq_len), past)
        k_rot, v = cache.update(k_rot, v, self.layer_idx)
    out, weights = _attention_interface(self)(
        self, q_rot, k_rot, v, attention_mask, dropout=dropout, scaling=self.scaling,
        sliding_window=window, **kwargs)
    out = out.reshape(batch, seq, -1).contiguous()
    return self.o_proj(out), weights


def _context_parallel_forward(self, state: "_PatchState", hidden_states: torch.Tensor, call: _Call,
                              kwargs: dict) -> torch.Tensor:
    """Attention of a context-parallel patched module: ``hidden_states`` is this rank's zigzag shard.

    The base model's pre-hook has checked (or filled in) the global positions and turned the
    cache off, so the shard's q/k/v go straight into ``context_parallel_attention``, which
    rotates them at their global positions and picks the regime from the full length."""
    from .distributed import context_parallel_attention

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


# ---------------------------------------------------------------------------- generation: the switch
def _step_end(input_ids, kwargs) -> int:
    """max(position) + 1 of the sequence generate() is about to extend (the HF regime rule)."""
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.numel():
        return int(position_ids.max()) + 1
    source = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    return int(source.shape[1])


@functools.lru_cache(maxsize=None)
def cache_argument() -> str:
    """The keyword under which the installed transformers passes the KV cache to ``generate``,
    ``prepare_inputs_for_generation`` and model forwards: ``"cache"`` (transformers >= 5.25,
    which deprecates the old name) or ``"past_key_values"``."""
    import inspect

    from transformers import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def _patched_prepare_inputs(state: "_PatchState", original):
    """prepare_inputs_for_generation with the §4 cache policy and all-ones masks dropped."""

    @functools.wraps(original)
    def prepare(input_ids, *args, **kwargs):
        cache_key = cache_argument()
        cache = kwargs.get(cache_key)
        if state.regime == "auto" and cache is not None and not isinstance(cache, (tuple, list)):
            past = int(cache.get_seq_length())
            if past > 0 and _step_end(input_ids, kwargs) > state.cfg.original_max_position_embeddings:
                filled_long = getattr(cache, "_longrope_long", None)
                if filled_long is False or (filled_long is None and past <= state.cfg.original_max_position_embeddings):
                    kwargs[cache_key] = _emptied(cache)
                    kwargs["next_sequence_length"] = None  # feed the whole sequence once
        mask = kwargs.get("attention_mask")
        unpadded = mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool(mask.bool().all()))
        inputs = original(input_ids, *args, **kwargs)
        if unpadded:
            # No padding: drop the mask (a compileable cache gets a prepared 4-D one here), so the
            # model sees none and the fused path stays on; the model still masks a static cache.
            inputs.pop("attention_mask", None)
        return inputs

    return prepare


def _emptied(cache):
    """The cache to re-prefill into: a static cache reset in place, else None (the model makes a new one)."""
    layers = getattr(cache, "layers", None) or []
    if layers and all(getattr(layer, "is_compileable", False) for layer in layers):
        cache.reset()
        cache._longrope_long = None
        return cache
    return None


# ---------------------------------------------------------------------------- patch state
@dataclasses.dataclass
class _PatchState:
    cfg: LongRoPEConfig
    family: _Family
    regime: str
    modules: list  # [(module, attribute name patched, previous instance value or None)]
    hooks: list
    prepare: Optional[tuple]  # (previous instance value or None,) when prepare_inputs_for_generation was wrapped
    process_group: Optional[object] = None  # context parallel: the ranks that share each sequence


_MISSING = object()


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module that receives the 2-D attention mask and calls the decoder layers."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def _pre_hook(state: "_PatchState", module, args, kwargs):
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    kwargs[_CALL_KWARG] = _Call.from_mask(mask, weights=bool(kwargs.get("output_attentions")))
    if state.process_group is not None:
        _shard_inputs(state.process_group, args, kwargs)
    return args, kwargs


def _shard_inputs(group, args, kwargs) -> None:
    """Context parallel: the base model's inputs are this rank's zigzag shard of each sequence.

    Checks that position_ids, when given, are the shard's global positions (else fills them in:
    the model's default arange would be the shard's local positions), and turns the KV cache off
    (a sharded sequence is trained or scored whole; there is no sharded cache to extend)."""
    from .distributed import zigzag_positions

    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("the context-parallel patched model runs without a KV cache (no generation, no "
                         "past_key_values): each forward is one whole sequence, sharded over the ranks")
    kwargs["use_cache"] = False
    source = kwargs.get("input_ids", args[0] if args else None)
    if source is None:
        source = kwargs.get("inputs_embeds")
    if source is None:
        return  # the model raises its own error
    batch, local = source.shape[:2]
    expected = zigzag_positions(local * torch.distributed.get_world_size(group), group, device=source.device)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        kwargs["position_ids"] = expected[None].expand(batch, -1)
    elif position_ids.shape[-1] != local or not bool((position_ids.reshape(-1, local) == expected).all()):
        raise ValueError("the context-parallel patched model needs position_ids = this rank's zigzag shard of "
                         "arange(S) (longrope_triton.distributed.zigzag_positions), or None; packed "
                         "sequences and offsets are not supported")


def is_patched(model: torch.nn.Module) -> bool:
    """True when patch_model has been applied to this model (and not undone)."""
    return getattr(model, _STATE_ATTR, None) is not None


def patch_model(model, config: Optional[LongRoPEConfig] = None, *, regime: str = "auto", process_group=None):
    """Make every attention module of ``model`` run :func:`fused_rope_attention` on raw q/k (in place).

    Args:
        model: a transformers model of a supported family (Llama, Mistral, Qwen2, Phi-3) or any
            model whose attention follows the Llama pattern; a ``*ForCausalLM`` or its base model.
        config: the LongRoPEConfig to run; None -> ``LongRoPEConfig.from_hf(model.config)``, the
            numbers the stock model uses. The model config is not changed (see :func:`set_rope`).
        regime: "auto" (default): short/long by the Hugging Face rule (max(position_ids) + 1 >
            original_max_position_embeddings), and generate() re-prefills once when it crosses
            the switch. "long": the long factors from the first token (no switch; a different
            model below the original context length).
        process_group: context parallel (None: off). A ``torch.distributed`` process group
            (``torch.distributed.group.WORLD`` for all ranks) whose ranks share each sequence:
            every rank passes its zigzag shard of the input ids (``shard_sequence(ids, dim=1)``),
            with position_ids None or the shard's global positions (``zigzag_positions``), and
            gets the logits of its shard; attention runs ``context_parallel_attention`` (global
            positions, regime of the full length). No KV cache, padding mask, sliding window in
            reach, attention dropout or packed sequences. A per-token loss on the shard needs
            its labels shifted on the full sequence, before sharding.

    Returns:
        The same model, patched. Undo with :func:`unpatch_model`.

    Raises:
        ValueError: the model is already patched, has no RoPE, cannot be patched, or the config
            does not fit it (head_dim, factor length, interleaved pairs). TypeError: a config that
            is not a LongRoPEConfig.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
        >>> model = patch_model(model)
        >>> logits = model(torch.randint(0, 100, (1, 16))).logits
    """
    if is_patched(model):
        raise ValueError("this model is already patched by longrope_triton; call unpatch_model(model) first, "
                         "or set_rope(model, cfg) to change its factors")
    if regime not in _REGIMES:
        raise ValueError(f"regime must be one of {_REGIMES}, got {regime!r}")
    if process_group is not None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("patch_model(process_group=...) needs an initialized torch.distributed process group")
    family, modules = _resolve_family(model)
    cfg = _check_cfg(_model_rope(model.config) if config is None else config, model.config, modules)
    state = _PatchState(cfg=cfg, family=family, regime=regime, modules=[], hooks=[], prepare=None,
                        process_group=process_group)
    for _, module in modules:
        # accelerate's hooks keep the real forward in _old_forward and call it from forward
        attr = "_old_forward" if "_old_forward" in module.__dict__ else "forward"
        state.modules.append((module, attr, module.__dict__.get(attr, _MISSING)))
        module._longrope_state = state
        setattr(module, attr, types.MethodType(_patched_forward, module))
    base = _base_model(model)
    state.hooks.append(base.register_forward_pre_hook(functools.partial(_pre_hook, state), with_kwargs=True))
    if callable(getattr(model, "prepare_inputs_for_generation", None)):
        state.prepare = (model.__dict__.get("prepare_inputs_for_generation", _MISSING),)
        original = model.prepare_inputs_for_generation
        if family.own_switch:
            from transformers import GenerationMixin

            original = types.MethodType(GenerationMixin.prepare_inputs_for_generation, model)
        model.prepare_inputs_for_generation = _patched_prepare_inputs(state, original)
    setattr(model, _STATE_ATTR, state)
    return model


def unpatch_model(model):
    """Undo :func:`patch_model`: the original attention forwards, no hooks. Returns the model.

    The model config keeps whatever :func:`set_rope` wrote into it. Raises ValueError when the
    model is not patched.
    """
    state: Optional[_PatchState] = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not patched by longrope_triton")
    for module, attr, previous in state.modules:
        if previous is _MISSING:
            module.__dict__.pop(attr, None)
        else:
            setattr(module, attr, previous)
        module.__dict__.pop("_longrope_state", None)
    for hook in state.hooks:
        hook.remove()
    if state.prepare is not None:
        if state.prepare[0] is _MISSING:
            model.__dict__.pop("prepare_inputs_for_generation", None)
        else:
            model.prepare_inputs_for_generation = state.prepare[0]
    delattr(model, _STATE_ATTR)
    return model


# ---------------------------------------------------------------------------- set_rope
def set_rope(model, cfg: LongRoPEConfig):
    """Write ``cfg`` into ``model.config`` so that stock transformers runs the same numbers.

    Sets ``rope_parameters`` (rope_type 'longrope', factors, attention_factor,
    original_max_position_embeddings inside it, as Llama/Mistral/Qwen2 read it), the top-level
    ``original_max_position_embeddings`` where the family reads it there (Phi-3), and
    ``max_position_embeddings``; rebuilds the model's rotary embedding modules from the new
    config (so the unpatched model runs it too), and updates a patched model's factors.
    ``model.save_pretrained`` then writes a config that stock transformers loads and runs with
    the same numbers (n_hat > 0 excepted: stored as 'longrope_start_token', read only here).
    Per-regime attention factors (short_mscale / long_mscale) are written for the model types
    that read them (PhiMoE); any other model applies one attention_factor in both regimes.

    Returns the model. Raises ValueError/TypeError when cfg does not fit the model, or when its
    two regimes' attention factors differ and the model applies one factor in both.
    """
    family, modules = _resolve_family(model)
    config = model.config
    cfg = _check_cfg(cfg, config, modules)
    params = _regime_mscale_params(cfg, getattr(config, "model_type", None))
    old = _hf_rope_dict(config)
    if "partial_rotary_factor" in old:  # Phi-3 indexes it unconditionally
        params.setdefault("partial_rotary_factor", old["partial_rotary_factor"])
    config.rope_parameters = params
    config.max_position_embeddings = cfg.max_position_embeddings
    if family.original_max_top_level or hasattr(config, "original_max_position_embeddings"):
        config.original_max_position_embeddings = cfg.original_max_position_embeddings
    _rebuild_rotary_embeddings(model)
    state: Optional[_PatchState] = getattr(model, _STATE_ATTR, None)
    if state is not None:
        state.cfg = cfg
    return model


def _regime_mscale_params(cfg: LongRoPEConfig, model_type: Optional[str]) -> dict:
    """cfg.to_hf() with the per-regime attention factors the model type reads: both keys where it
    reads (and requires) them, none where it applies attention_factor in both regimes."""
    params = cfg.to_hf()
    short_m, long_m = cfg.regime_mscale(False), cfg.regime_mscale(True)
    if model_type in _REGIME_MSCALE_MODELS:
        params.update(short_mscale=short_m, long_mscale=long_m)
        return params
    if short_m != long_m:
        raise ValueError(f"transformers' {model_type!r} model applies one attention_factor in both regimes, so "
                         f"short_mscale {short_m} and long_mscale {long_m} cannot be written into its config "
                         f"(patch_model(model, cfg) runs them)")
    for key in _REGIME_MSCALE_KEYS:
        params.pop(key, None)  # equal to attention_factor, and stock transformers warns about unknown keys
    return params


def _rebuild_rotary_embeddings(model) -> None:
    """Re-create every *RotaryEmbedding module from the (new) config, on its device."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding") and getattr(child, "config", None) is not None:
                buffer = getattr(child, "inv_freq", None)
                fresh = type(child)(config=child.config)
                if isinstance(buffer, torch.Tensor):
                    fresh = fresh.to(buffer.device)
                setattr(parent, name, fresh)
