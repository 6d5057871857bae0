"""Which models patch_model supports, decided from what their attention modules compute.

One table (``_FAMILIES``) lists the families whose layout is known (attention class, projection
layout, where each reads its RoPE config and its sliding window); any other model whose attention
follows the Llama pattern is detected from its attention module: the Llama layout (q/k/v/o
projections, ``head_dim``, ``scaling``, ``layer_idx``, no other parameters) and, run on a small
probe, the same output as Llama attention (decided by what the module computes, so an upstream
rewording of its source changes nothing). Anything else raises a ValueError rather than being
patched approximately.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch

from ..config import LongRoPEConfig


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
