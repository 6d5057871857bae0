"""How each provider runs one case: ``build(provider, case, device) -> Runnable``.

The eager baseline restates what transformers runs for ``rope_type="longrope"``
(``LlamaRotaryEmbedding`` with ``dynamic_rope_update`` + ``apply_rotary_pos_emb``, and
``sdpa_attention_forward`` with ``enable_gqa``) in a few lines, so that the benchmark does not
import transformers and compares the same function: same factors, same mscale, same regime rule.
Its angles are fp32 ``inv_freq @ positions`` (ours are exact, DESIGN §2): a precision
difference, not a speed one.

A provider that cannot run here (package missing, SDPA backend rejected) raises
``Unavailable`` with the reason; ``run.py`` records it and moves on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from longrope_triton import LongRoPEConfig, apply_rotary, fused_rope_attention
from longrope_triton.attention import _attention_op
from longrope_triton.rotary import rope_args

from .registry import PROVIDERS, Case, bench_config

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError)


class Unavailable(Exception):
    """The provider cannot run on this machine; the message says why."""


@dataclasses.dataclass
class Runnable:
    fn: Callable[[], object]  # one iteration (forward, or forward + backward)
    grad_to_none: list  # leaves whose .grad is reset between iterations
    notes: list = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------- eager HF-style LongRoPE
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (cos/sin (B, S, D) unsqueezed on the head dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = None if k is None else (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def hf_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, scaling: float, dtype: torch.dtype):
    """LlamaRotaryEmbedding.forward: fp32 inv_freq @ positions, cat, cos/sin * attention_scaling, cast."""
    inv = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    pos = position_ids[:, None, :].float()
    freqs = (inv @ pos).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


class HFLongRoPE:
    """The two inv_freq buffers of a transformers longrope rotary module and its regime switch."""

    def __init__(self, cfg: LongRoPEConfig, device):
        if cfg.rotary_dim != cfg.head_dim or cfg.start_token or cfg.interleaved:
            raise ValueError("the eager baseline covers full-dim, half-pair rotary without n_hat")
        if cfg.regime_mscale(False) != cfg.regime_mscale(True):
            raise ValueError("the eager baseline (transformers' longrope) has one attention factor for both regimes")
        dim = cfg.rotary_dim
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        self.short_inv_freq = 1.0 / (torch.tensor(cfg.short_factor, dtype=torch.float32, device=device)
                                     * cfg.base ** exponent)
        self.long_inv_freq = 1.0 / (torch.tensor(cfg.long_factor, dtype=torch.float32, device=device)
                                    * cfg.base ** exponent)
        self.original_max = cfg.original_max_position_embeddings
        self.scaling = cfg.mscale

    def inv_freq(self, *position_ids: torch.Tensor) -> torch.Tensor:
        # transformers' longrope_frequency_update: one host sync on max(position_ids) + 1.
        seq_len = max(torch.max(p) for p in position_ids) + 1
        return self.long_inv_freq if seq_len > self.original_max else self.short_inv_freq


def _hf_rotary_math(q, k, inv_freq, position_ids, scaling: float):
    cos, sin = hf_cos_sin(inv_freq, position_ids, scaling, q.dtype)
    return apply_rotary_pos_emb(q, k, cos, sin)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _eager_attention_math(q, k, v, inv_freq, q_pos, k_pos, scaling: float, causal: bool, scale: float,
                          rotate_k: bool, gqa: str):
    """Eager rotation + SDPA (whatever backend the caller's sdpa_kernel context allows)."""
    cos, sin = hf_cos_sin(inv_freq, q_pos, scaling, q.dtype)
    if rotate_k:
        if k_pos is q_pos:  # prefill: one cos/sin for q and k, as transformers computes it
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        else:
            q, _ = apply_rotary_pos_emb(q, None, cos, sin)
            kc, ks = hf_cos_sin(inv_freq, k_pos, scaling, k.dtype)
            k, _ = apply_rotary_pos_emb(k, None, kc, ks)
    else:
        q, _ = apply_rotary_pos_emb(q, None, cos, sin)
    n_rep = q.shape[1] // k.shape[1]
    if gqa == "repeat_kv":
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=(gqa == "enable_gqa" and n_rep > 1))


# ---------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Inputs:
    cfg: LongRoPEConfig
    q: torch.Tensor
    k: torch.Tensor
    v: Optional[torch.Tensor]
    q_pos: torch.Tensor  # (1, Sq) int64
    k_pos: torch.Tensor  # (1, Sk) int64 (the same tensor as q_pos when Sq == Sk)

    @property
    def leaves(self):
        return [t for t in (self.q, self.k, self.v) if t is not None and t.requires_grad]


def make_inputs(case: Case, device) -> Inputs:
    """Random (B, H, S, D) views of (B, S, H, D) storage; grads on in fwd+bwd mode."""
    dtype = TORCH_DTYPES[case.dtype]
    grad = case.mode == "fwd+bwd"
    gen = torch.Generator(device=device).manual_seed(0)

    def bshd(heads, seq):
        t = torch.randn(case.batch, seq, heads, case.head_dim, device=device, dtype=dtype, generator=gen)
        return t.transpose(1, 2).requires_grad_(grad)

    k_pos = torch.arange(case.seq_k, device=device)[None]
    q_pos = k_pos if case.seq_q == case.seq_k else k_pos[:, case.seq_k - case.seq_q:]
    v = bshd(case.kv_heads, case.seq_k) if case.op != "rotary" else None
    return Inputs(bench_config(case.head_dim), bshd(case.q_heads, case.seq_q), bshd(case.kv_heads, case.seq_k), v,
                  q_pos, k_pos)


def _iteration(forward: Callable, case: Case, inputs: Inputs) -> Callable:
    """forward, or forward + one backward with fixed random output gradients."""
    if case.mode == "fwd":
        return forward
    grads: list = []

    def step():
        outs = forward()
        outs = tuple(o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None)
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, grads)

    return step


# ---------------------------------------------------------------------------- compile
def compile_settings(device) -> dict:
    """Inductor on CUDA. On CPU (harness smoke only) aot_eager: it traces the same graphs, forward
    and backward, without minutes of C++ compilation."""
    backend = "inductor" if torch.device(device).type == "cuda" else "aot_eager"
    return {"backend": backend, "dynamic": False}


def _compiled(fn, device):
    import torch._dynamo

    torch._dynamo.reset()  # one case's graphs never count against another case's recompile limit
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    return torch.compile(fn, **compile_settings(device))


# ---------------------------------------------------------------------------- providers
# What SDPA raises when the allowed backends reject the inputs (dtype, GQA, layout, device).
_NO_KERNEL = ("No available kernel", "No viable backend")
_SDPA_BACKENDS = {"eager_sdpa_flash": "FLASH_ATTENTION", "eager_sdpa_efficient": "EFFICIENT_ATTENTION",
                  "eager_sdpa_cudnn": "CUDNN_ATTENTION"}


def _plain_rope_tables(cfg: LongRoPEConfig, seq: int, device, dtype):
    """Plain-RoPE cos/sin (S, r/2) for the table-based kernels (no LongRoPE factors)."""
    inv = 1.0 / (cfg.base ** (torch.arange(0, cfg.rotary_dim, 2, device=device).float() / cfg.rotary_dim))
    freqs = torch.arange(seq, device=device).float()[:, None] * inv[None]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _rotary(provider: str, case: Case, x: Inputs, device) -> Runnable:
    cfg, q, k, pos = x.cfg, x.q, x.k, x.q_pos
    notes = []
    if provider == "ours":
        forward = lambda: apply_rotary(q, k, cfg, position_ids=pos)  # noqa: E731
    elif provider in ("eager_hf", "compile_hf"):
        hf = HFLongRoPE(cfg, device)
        math_fn = _hf_rotary_math if provider == "eager_hf" else _compiled(_hf_rotary_math, device)
        forward = lambda: math_fn(q, k, hf.inv_freq(pos), pos, hf.scaling)  # noqa: E731
        if provider == "compile_hf":
            notes.append("torch.compile({backend}, dynamic={dynamic})".format(**compile_settings(device)))
    elif provider == "eager_hf_apply":
        hf = HFLongRoPE(cfg, device)
        cos, sin = hf_cos_sin(hf.inv_freq(pos), pos, hf.scaling, q.dtype)
        forward = lambda: apply_rotary_pos_emb(q, k, cos, sin)  # noqa: E731
    elif provider == "liger":
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        notes.append("Liger rotates (B, S, H, D)-contiguous inputs in place")
        cos, sin = _plain_rope_tables(cfg, case.seq_q, device, q.dtype)
        cos, sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]
        forward = lambda: liger_rotary_pos_emb(q, k, cos, sin)  # noqa: E731
    elif provider == "flash_attn":
        from flash_attn.layers.rotary import apply_rotary_emb

        cos, sin = _plain_rope_tables(cfg, case.seq_q, device, q.dtype)
        forward = lambda: (apply_rotary_emb(q.transpose(1, 2), cos, sin),  # noqa: E731
                           apply_rotary_emb(k.transpose(1, 2), cos, sin))
    else:
        raise ValueError(f"provider {provider!r} does not run rotary")
    return Runnable(_iteration(forward, case, x), x.leaves, notes)


@contextlib.contextmanager
def _prefill_kernel_only():
    """fused_rope_attention with the split-KV decode path switched off (the comparison point)."""
    from longrope_triton import attention

    saved, attention.DECODE_MAX_QUERIES = attention.DECODE_MAX_QUERIES, 0
    try:
        yield
    finally:
        attention.DECODE_MAX_QUERIES = saved


def _attention(provider: str, case: Case, x: Inputs, device) -> Runnable:
    cfg, q, k, v = x.cfg, x.q, x.k, x.v
    scale = case.head_dim ** -0.5
    decode = case.op == "decode"  # k, v are a rotated cache: rotate q only
    notes = []
    if provider == "ours":
        forward = lambda: fused_rope_attention(q, k, v, cfg, position_ids=x.q_pos, causal=case.causal,  # noqa
                                               k_is_rotated=decode)
    elif provider == "ours_prefill_kernel":
        def forward():
            with _prefill_kernel_only():
                return fused_rope_attention(q, k, v, cfg, position_ids=x.q_pos, causal=case.causal, k_is_rotated=True)
    elif provider == "sdpa_flash_norope":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def forward():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, scale=scale,
                                                      enable_gqa=case.q_heads != case.kv_heads)
    elif provider == "ours_norope":
        args = rope_args(cfg)
        forward = lambda: _attention_op(q, k, v, None, None, None, None, case.causal, scale, None,  # noqa
                                        False, False, **args)[0]
    elif provider in _SDPA_BACKENDS or provider == "compile_sdpa":
        return _sdpa(provider, case, x, device)
    else:
        raise ValueError(f"provider {provider!r} does not run attention")
    return Runnable(_iteration(forward, case, x), x.leaves, notes)


def _sdpa(provider: str, case: Case, x: Inputs, device) -> Runnable:
    """Eager (or compiled) LongRoPE + SDPA. GQA as transformers does it on CUDA without a mask
    (enable_gqa=True); a backend that rejects enable_gqa gets repeat_kv instead (noted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hf = HFLongRoPE(x.cfg, device)
    scale = case.head_dim ** -0.5
    rotate_k = case.op != "decode"
    compiled = provider == "compile_sdpa"
    math_fn = _compiled(_eager_attention_math, device) if compiled else _eager_attention_math
    backend = None if compiled else getattr(SDPBackend, _SDPA_BACKENDS[provider])

    def make(gqa):
        def forward():
            inv = hf.inv_freq(x.q_pos, x.k_pos)
            if backend is None:
                return math_fn(x.q, x.k, x.v, inv, x.q_pos, x.k_pos, hf.scaling, case.causal, scale, rotate_k, gqa)
            with sdpa_kernel([backend]):
                return math_fn(x.q, x.k, x.v, inv, x.q_pos, x.k_pos, hf.scaling, case.causal, scale, rotate_k, gqa)
        return _iteration(forward, case, x)

    modes = ["enable_gqa", "repeat_kv"] if case.q_heads != case.kv_heads else ["enable_gqa"]
    reasons = []
    for gqa in modes:
        step = make(gqa)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                step()  # probe (also the first warm-up call)
            except OOM_ERRORS:
                raise
            except RuntimeError as exc:
                if not any(m in str(exc) for m in _NO_KERNEL):
                    raise  # a real failure of an available backend: an "error" row, not "unavailable"
                why = [str(w.message).splitlines()[0] for w in caught if "kernel" in str(w.message).lower()
                       or "attention" in str(w.message).lower()]
                reasons.append(f"{gqa}: {str(exc).strip().splitlines()[0]}" + (f" ({'; '.join(why[:3])})" if why
                                                                                 else ""))
                continue
        for t in x.leaves:
            t.grad = None
        notes = [] if gqa == "enable_gqa" else ["GQA by repeat_kv: the backend rejected enable_gqa"]
        if compiled:
            notes.append("torch.compile({backend}, dynamic={dynamic})".format(**compile_settings(device)))
        return Runnable(step, x.leaves, notes)
    messages = [r.split(": ", 1)[1] for r in reasons]
    raise Unavailable(messages[0] if len(set(messages)) == 1 else "; ".join(reasons))


def available(provider: str) -> Optional[str]:
    """None if the provider's packages import here, else the reason."""
    for module in PROVIDERS[provider].requires:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def build(provider: str, case: Case, device) -> Runnable:
    """A runnable iteration of ``provider`` on ``case`` (inputs allocated on ``device``)."""
    reason = available(provider)
    if reason:
        raise Unavailable(reason)
    if case.op not in PROVIDERS[provider].ops:
        raise ValueError(f"provider {provider!r} does not run {case.op}")
    x = make_inputs(case, device)
    if case.op == "rotary":
        return _rotary(provider, case, x, device)
    return _attention(provider, case, x, device)
