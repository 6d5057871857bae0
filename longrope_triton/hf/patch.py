"""patch_model, unpatch_model, set_rope: the patch itself and its state on the model instance.

patch_model replaces the ``forward`` of every attention module of an existing model instance
(forward.py) and of its rotary embeddings (whose cos/sin tables nothing reads any more), hooks
the base model to share per-forward decisions with its layers, and wraps
``prepare_inputs_for_generation`` with the cache policy at the short/long switch
(generation.py). Everything is undone by unpatch_model.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Optional

import torch

from ..config import _REGIME_MSCALE_KEYS, _REGIME_MSCALE_MODELS, LongRoPEConfig, _hf_rope_dict
from . import continuous
from .families import _Family, _check_cfg, _model_rope, _resolve_family
from .forward import CALL_KWARG, _Call, patched_forward
from .generation import patched_prepare_inputs

_STATE_ATTR = "_longrope_patch"
_REGIMES = ("auto", "long")


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
    batching: Optional[object] = None  # undoes continuous.install (per-request regimes under continuous batching)


_MISSING = object()


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module that receives the 2-D attention mask and calls the decoder layers."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def _pre_hook(state: "_PatchState", module, args, kwargs):
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    kwargs[CALL_KWARG] = _Call.from_mask(mask, weights=bool(kwargs.get("output_attentions")))
    if state.process_group is not None:
        _shard_inputs(state.process_group, args, kwargs)
    return args, kwargs


def _shard_inputs(group, args, kwargs) -> None:
    """Context parallel: the base model's inputs are this rank's zigzag shard of each sequence.

    Checks that position_ids, when given, are the shard's global positions (else fills them in:
    the model's default arange would be the shard's local positions), and turns the KV cache off
    (a sharded sequence is trained or scored whole; there is no sharded cache to extend)."""
    from ..distributed import zigzag_positions

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


def _no_position_tables(self, x, position_ids, *args, **kwargs):
    """A patched model's rotary embedding forward: empty (batch, seq, 0) cos/sin. The patched attention
    rotates q and k from its LongRoPEConfig and never reads these tables."""
    empty = x.new_empty((*position_ids.shape, 0))
    return empty, empty


def _skip_rotary_embeddings(model: torch.nn.Module, state: "_PatchState", attention: list) -> None:
    """Stop the rotary embeddings that feed the patched ``attention`` modules from computing cos/sin.

    Stock, they build an O(seq x rotary_dim) float32 table pair on every forward (2 GB at 2M
    tokens and head_dim 128) and, for longrope, branch on the sequence length on the host
    (PhiMoE's per-regime attention factor is a graph break), or write the model config on their
    first call (the lazily computed long inverse frequencies), which dynamo cannot trace.
    Which embeddings: those built from the same config object as the patched attention modules
    (transformers gives a decoder stack's rotary embedding and its attention modules one config),
    so another tower's rotary embedding (a vision encoder's) keeps running.
    unpatch_model restores them; set_rope rebuilds them and calls this again."""
    configs = {id(module.config) for _, module in attention if getattr(module, "config", None) is not None}
    for module in model.modules():
        if (not type(module).__name__.endswith("RotaryEmbedding") or "_longrope_state" in module.__dict__
                or id(getattr(module, "config", None)) not in configs):
            continue
        attr = "_old_forward" if "_old_forward" in module.__dict__ else "forward"  # accelerate's hooks
        state.modules.append((module, attr, module.__dict__.get(attr, _MISSING)))
        module._longrope_state = state
        setattr(module, attr, types.MethodType(_no_position_tables, module))


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
        setattr(module, attr, types.MethodType(patched_forward, module))
    _skip_rotary_embeddings(model, state, modules)
    base = _base_model(model)
    state.hooks.append(base.register_forward_pre_hook(functools.partial(_pre_hook, state), with_kwargs=True))
    if callable(getattr(model, "prepare_inputs_for_generation", None)):
        state.prepare = (model.__dict__.get("prepare_inputs_for_generation", _MISSING),)
        original = model.prepare_inputs_for_generation
        if family.own_switch:
            from transformers import GenerationMixin

            original = types.MethodType(GenerationMixin.prepare_inputs_for_generation, model)
        model.prepare_inputs_for_generation = patched_prepare_inputs(state, original)
    state.batching = continuous.install(model, state)
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
    if state.batching is not None:
        state.batching()
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
        live = set(map(id, model.modules()))
        state.modules = [entry for entry in state.modules if id(entry[0]) in live]  # drop the replaced embeddings
        _skip_rotary_embeddings(model, state, modules)
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
