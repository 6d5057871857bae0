"""Pure-PyTorch LongRoPE math in float64: the ground truth for tests and the CPU path.

Nothing here uses Triton. Angles are computed in float64 (an fp32 ``p * inv_freq``
is ~6e-2 rad off at p ~ 1M); rotation and attention follow DESIGN §1 exactly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import LongRoPEConfig


def base_inv_freq(cfg: LongRoPEConfig, device=None) -> torch.Tensor:
    """theta_i = base ** (-2i / r) in float64, shape (r/2,)."""
    i = torch.arange(cfg.rotary_dim // 2, dtype=torch.float64, device=device)
    return cfg.base ** (-2.0 * i / cfg.rotary_dim)


def scaled_inv_freq(cfg: LongRoPEConfig, long: bool, device=None) -> torch.Tensor:
    """theta_i / lambda_i for the short or long factor set, float64, shape (r/2,)."""
    factors = torch.tensor(cfg.long_factor if long else cfg.short_factor, dtype=torch.float64, device=device)
    return base_inv_freq(cfg, device) / factors


def rope_cos_sin(cfg: LongRoPEConfig, positions: torch.Tensor, long: bool):
    """mscale * cos(phi) and mscale * sin(phi) in float64, shape positions.shape + (r/2,), with the
    attention factor of the regime (``cfg.regime_mscale(long)``).

    Positions below n_hat (``cfg.start_token``) use the unscaled frequencies and mscale 1.
    """
    p = positions.to(torch.float64)[..., None]
    scaled = p * scaled_inv_freq(cfg, long, positions.device)
    plain = p * base_inv_freq(cfg, positions.device)
    bypass = (positions < cfg.start_token)[..., None]
    phi = torch.where(bypass, plain, scaled)
    m = torch.where(bypass, torch.ones((), dtype=torch.float64, device=positions.device),
                    torch.full((), cfg.regime_mscale(long), dtype=torch.float64, device=positions.device))
    return m * torch.cos(phi), m * torch.sin(phi)


def rotary_pairs(cfg: LongRoPEConfig):
    """Index tensors (first, second) of the rotated pairs within the head dimension."""
    half = cfg.rotary_dim // 2
    i = torch.arange(half)
    if cfg.interleaved:
        return 2 * i, 2 * i + 1
    return i, i + half


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: LongRoPEConfig,
           conjugate: bool = False) -> torch.Tensor:
    """Rotate pairs of x (..., S, D) by angles with cos/sin (..., S, r/2) broadcastable.

    (x_a, x_b) -> (x_a cos - x_b sin, x_b cos + x_a sin); the conjugate rotation uses -sin.
    Dims >= rotary_dim pass through. Computed in the dtype of ``cos``.
    """
    a_idx, b_idx = rotary_pairs(cfg)
    xf = x.to(cos.dtype)
    xa, xb = xf[..., a_idx.to(x.device)], xf[..., b_idx.to(x.device)]
    if conjugate:
        sin = -sin
    out = xf.clone()
    out[..., a_idx.to(x.device)] = xa * cos - xb * sin
    out[..., b_idx.to(x.device)] = xb * cos + xa * sin
    return out


def broadcast_positions(position_ids: Optional[torch.Tensor], batch: int, seq: int, device,
                        start: int = 0) -> torch.Tensor:
    """position_ids (S,), (1, S) or (B, S) -> int64 (B, S); None -> arange(start, start + S)."""
    if position_ids is None:
        return torch.arange(start, start + seq, device=device).expand(batch, seq)
    pos = position_ids.to(device=device, dtype=torch.int64)
    if pos.dim() == 1:
        pos = pos[None]
    return pos.expand(batch, seq)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cfg: LongRoPEConfig,
                           position_ids: Optional[torch.Tensor] = None, seq_len: Optional[int] = None,
                           dtype=torch.float64):
    """Rotate q (B, Hq, S, D) and k (B, Hk, S, D); returns both in ``dtype`` (float64 default)."""
    batch, _, seq, _ = q.shape
    pos = broadcast_positions(position_ids, batch, seq, q.device)
    if seq_len is None:
        seq_len = int(pos.max()) + 1
    cos, sin = rope_cos_sin(cfg, pos, cfg.use_long(seq_len))
    cos, sin = cos[:, None].to(dtype), sin[:, None].to(dtype)
    return rotate(q, cos, sin, cfg), rotate(k, cos, sin, cfg)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        softmax_scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with GQA (kv heads repeated) and bottom-right aligned causal mask.

    Computed in the dtype of q (pass float64 tensors for the ground truth).
    """
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        mask = causal_mask(sq, sk, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A query row that sees no key (Sq > Sk, causal) outputs zeros, as flash-attn does.
    probs = torch.nan_to_num(probs, nan=0.0)
    return torch.matmul(probs, v)


def causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """Bottom-right aligned causal mask (flash-attn): query i sees keys j <= i + sk - sq."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def fused_rope_attention_reference(q, k, v, cfg: LongRoPEConfig, position_ids=None, kv_position_ids=None,
                                   causal: bool = True, softmax_scale: Optional[float] = None,
                                   seq_len: Optional[int] = None, dtype=torch.float64) -> torch.Tensor:
    """Rotate q and k with LongRoPE, then attention, everything in ``dtype`` (float64 default)."""
    batch, _, sq, _ = q.shape
    sk = k.shape[2]
    q_pos = broadcast_positions(position_ids, batch, sq, q.device, start=sk - sq)
    k_pos = broadcast_positions(kv_position_ids, batch, sk, q.device)
    if seq_len is None:
        seq_len = int(max(q_pos.max(), k_pos.max())) + 1
    long = cfg.use_long(seq_len)
    qc, qs = rope_cos_sin(cfg, q_pos, long)
    kc, ks = rope_cos_sin(cfg, k_pos, long)
    q_rot = rotate(q, qc[:, None].to(dtype), qs[:, None].to(dtype), cfg)
    k_rot = rotate(k, kc[:, None].to(dtype), ks[:, None].to(dtype), cfg)
    return attention_reference(q_rot, k_rot, v.to(dtype), causal, softmax_scale)


def varlen_attention_reference(q, k, v, cfg: LongRoPEConfig, cu_seqlens_q, cu_seqlens_k, causal: bool = True,
                               softmax_scale: Optional[float] = None, dtype=torch.float64) -> torch.Tensor:
    """Packed sequences (1, H, total, D): each sequence b attends within itself, with its own
    positions (0 .. len-1) and its own short/long regime (chosen from its own length)."""
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=dtype, device=q.device)
    for b in range(len(cu_seqlens_q) - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if q1 == q0:
            continue
        out[:, :, q0:q1] = fused_rope_attention_reference(
            q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], cfg, causal=causal,
            softmax_scale=softmax_scale, dtype=dtype)
    return out
