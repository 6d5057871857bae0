"""Per-regime attention factors: LongRoPEConfig.short_mscale / long_mscale.

Some LongRoPE checkpoints carry one attention factor per factor set (Phi-3-small style, PhiMoE:
rope dict keys short_mscale / long_mscale) instead of one attention_factor. Checked here: how
the fields resolve, JSON and to_hf, and that the split-position tables, the float64 reference,
apply_rotary and fused_rope_attention (kernel and PyTorch paths) apply each regime's own
factor. Patched vs stock transformers models with these keys (PhiMoE applies them, every other
model ignores them): tests/test_hf.py.

The two factors (SHORT_M 1.1, LONG_M 1.6) differ from each other and from the default
(sqrt 2 here), so a swap, or a fall-back to the single factor, changes the rotated values by
13 % or more.
"""

import json
import math

import pytest
import torch

from conftest import assert_parity
from longrope_triton import LongRoPEConfig, apply_rotary, fused_rope_attention
from longrope_triton import reference
from longrope_triton.rotary import rope_tables
from longrope_triton.tables import LO_ROWS, SET_LONG, SET_SHORT, SET_UNSCALED
from test_attention import assert_close_to_reference, make_qkv, run_with_grads

ORIG, MAX_POS, HEAD_DIM, ROTARY = 64, 4096, 32, 24
SHORT_M, LONG_M = 1.1, 1.6
DEFAULT_M = math.sqrt(1 + math.log(MAX_POS / ORIG) / math.log(ORIG))


def make_cfg(**changes) -> LongRoPEConfig:
    """Partial rotary, n_hat 2, factors that differ per dimension and between regimes, two mscales."""
    half = ROTARY // 2
    kw = dict(head_dim=HEAD_DIM, rotary_dim=ROTARY, original_max_position_embeddings=ORIG,
              max_position_embeddings=MAX_POS, short_factor=[1.0 + 0.05 * i for i in range(half)],
              long_factor=[1.0 + 0.7 * i for i in range(half)], start_token=2, short_mscale=SHORT_M,
              long_mscale=LONG_M)
    kw.update(changes)
    return LongRoPEConfig(**kw)


# (positions, seq_len, regime): positions 0 and 1 (< n_hat) are in every case
REGIMES = [
    pytest.param(torch.arange(40), None, "short", id="short-pos0-39"),
    pytest.param(torch.arange(40), ORIG + 1, "long", id="long-by-seq_len"),
    pytest.param(torch.cat([torch.arange(2), torch.arange(1000, 1038)]), None, "long", id="long-pos-to-1037"),
]


# ---------------------------------------------------------------------------- the fields
@pytest.mark.parametrize("attention_factor, short, long, expected", [
    pytest.param(None, None, None, (DEFAULT_M, DEFAULT_M), id="none-default"),
    pytest.param(1.3, None, None, (1.3, 1.3), id="attention_factor-both"),
    pytest.param(None, 1.1, None, (1.1, DEFAULT_M), id="short-only"),
    pytest.param(None, None, 1.6, (DEFAULT_M, 1.6), id="long-only"),
    pytest.param(1.3, None, 1.6, (1.3, 1.6), id="attention_factor-and-long"),
    pytest.param(1.3, 1.1, 1.6, (1.1, 1.6), id="all-three-per-regime-wins"),
])
def test_regime_mscale_resolution(attention_factor, short, long, expected):
    cfg = make_cfg(attention_factor=attention_factor, short_mscale=short, long_mscale=long)
    assert (cfg.regime_mscale(False), cfg.regime_mscale(True)) == pytest.approx(expected, rel=1e-15)
    assert cfg.mscale == pytest.approx(DEFAULT_M if attention_factor is None else attention_factor, rel=1e-15)


def test_constructor_contract_is_unchanged():
    """DESIGN §8's arguments, positionally and by name; the new fields come after and default to None."""
    positional = LongRoPEConfig(64, None, 10000.0, 4096, 131072, None, None, 0, None, False)
    assert positional == LongRoPEConfig(head_dim=64, rotary_dim=None, base=10000.0,
                                        original_max_position_embeddings=4096, max_position_embeddings=131072,
                                        short_factor=None, long_factor=None, start_token=0, attention_factor=None,
                                        interleaved=False)
    assert positional.short_mscale is None and positional.long_mscale is None
    assert positional.regime_mscale(False) == positional.regime_mscale(True) == positional.mscale


def test_json_without_the_new_fields_still_loads():
    """Factor files written before short_mscale / long_mscale existed load unchanged."""
    cfg = make_cfg(short_mscale=None, long_mscale=None, attention_factor=1.2)
    data = json.loads(cfg.to_json())
    del data["short_mscale"], data["long_mscale"]
    assert LongRoPEConfig.from_json(json.dumps(data)) == cfg


@pytest.mark.parametrize("short, long, attention", [
    pytest.param(SHORT_M, LONG_M, DEFAULT_M, id="distinct-attention_factor-is-mscale"),
    pytest.param(1.3, 1.3, 1.3, id="equal-attention_factor-is-the-shared-one"),
    pytest.param(None, LONG_M, DEFAULT_M, id="long-only"),
])
def test_to_hf_writes_resolved_per_regime_factors(short, long, attention):
    hf = make_cfg(short_mscale=short, long_mscale=long).to_hf()
    expected_short = DEFAULT_M if short is None else short
    assert (hf["short_mscale"], hf["long_mscale"]) == pytest.approx((expected_short, long), rel=1e-15)
    assert hf["attention_factor"] == pytest.approx(attention, rel=1e-15)
    assert "short_mscale" not in make_cfg(short_mscale=None, long_mscale=None).to_hf()


# ---------------------------------------------------------------------------- the math
@pytest.mark.parametrize("positions, seq_len, regime", REGIMES)
def test_reference_scales_each_regime_by_its_own_factor(positions, seq_len, regime):
    """mscale * cos / sin with the regime's own factor from n_hat on, 1 below (explicit numbers:
    this test fails if the two factors were swapped or replaced by attention_factor)."""
    cfg = make_cfg()
    long = cfg.use_long(int(positions.max()) + 1 if seq_len is None else seq_len)
    assert cfg.regime(ORIG + 1 if long else ORIG) == regime
    cos, sin = reference.rope_cos_sin(cfg, positions, long)
    radius = torch.sqrt(cos ** 2 + sin ** 2)
    expected = torch.full(positions.shape, LONG_M if long else SHORT_M, dtype=torch.float64)
    expected[positions < cfg.start_token] = 1.0
    torch.testing.assert_close(radius, expected[:, None].expand_as(radius), rtol=1e-14, atol=0)


def test_tables_fold_each_set_its_own_factor():
    """Split-position tables: p_hi rows carry the set's mscale (unscaled set: 1), p_lo rows none;
    combined (the kernel's complex multiply) they equal the reference in each regime."""
    cfg = make_cfg()
    tables = rope_tables(cfg, "cpu").double()
    rows_hi = tables.shape[2] - LO_ROWS
    for table_set, m in ((SET_UNSCALED, 1.0), (SET_SHORT, SHORT_M), (SET_LONG, LONG_M)):
        assert torch.allclose(tables[table_set, 0, 0], torch.full_like(tables[table_set, 0, 0], m), atol=1e-7)
        assert torch.allclose(tables[table_set, 0, rows_hi], torch.ones_like(tables[table_set, 0, 0]), atol=1e-7)
    positions = torch.cat([torch.arange(cfg.start_token, 3000, 7), torch.tensor([MAX_POS - 1])])
    hi, lo = positions // LO_ROWS, rows_hi + positions % LO_ROWS
    for table_set, long in ((SET_SHORT, False), (SET_LONG, True)):
        cos_t, sin_t = tables[table_set]
        cos = cos_t[hi] * cos_t[lo] - sin_t[hi] * sin_t[lo]
        sin = sin_t[hi] * cos_t[lo] + cos_t[hi] * sin_t[lo]
        ref_cos, ref_sin = reference.rope_cos_sin(cfg, positions, long)
        m = cfg.regime_mscale(long)
        assert (cos - ref_cos).abs().max() <= 1e-6 * m and (sin - ref_sin).abs().max() <= 1e-6 * m


@pytest.mark.parametrize("positions, seq_len, regime", REGIMES)
def test_apply_rotary_matches_reference_per_regime(path, positions, seq_len, regime):
    cfg = make_cfg()
    q = torch.randn(2, 3, len(positions), HEAD_DIM)
    k = torch.randn(2, 1, len(positions), HEAD_DIM)
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=positions, seq_len=seq_len)
    q_ref, k_ref = reference.apply_rotary_reference(q, k, cfg, position_ids=positions, seq_len=seq_len)
    assert_parity(q_rot, q_ref, name="q_rot")
    assert_parity(k_rot, k_ref, name="k_rot")
    # independent of the reference: rotated pairs grow by exactly the regime's factor (1 below n_hat)
    m = LONG_M if regime == "long" else SHORT_M
    ratio = q_rot[..., :ROTARY].norm(dim=-1) / q[..., :ROTARY].norm(dim=-1)
    expected = torch.where(positions < cfg.start_token, 1.0, m).expand_as(ratio)
    torch.testing.assert_close(ratio, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(q_rot[..., ROTARY:], q[..., ROTARY:], rtol=0, atol=0)


@pytest.mark.parametrize("positions, seq_len, regime", REGIMES)
def test_fused_attention_matches_reference_per_regime(path, positions, seq_len, regime):
    """Forward and all three gradients (the backward's conjugate rotation uses the same tables)."""
    cfg = make_cfg()
    q, k, v = make_qkv(1, 4, 2, len(positions), len(positions), HEAD_DIM, torch.float32, bshd=True)
    grad_out = torch.randn(1, 4, len(positions), HEAD_DIM)
    kwargs = dict(position_ids=positions, kv_position_ids=positions, seq_len=seq_len)
    ours = run_with_grads(lambda *x: fused_rope_attention(*x, cfg, **kwargs), (q, k, v), grad_out)
    ref = run_with_grads(lambda *x: reference.fused_rope_attention_reference(*x, cfg, **kwargs),
                         [t.double() for t in (q, k, v)], grad_out.double())
    assert_close_to_reference(ours, ref, ref, torch.float32)


@pytest.mark.parametrize("positions, seq_len, regime", REGIMES)
def test_fused_attention_uses_the_regime_factor_not_the_other(path, positions, seq_len, regime):
    """Independent of the reference: the output equals that of a single attention_factor set to this
    regime's factor, and not that of the other regime's (a swap fails here)."""
    cfg = make_cfg()
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, len(positions), len(positions), HEAD_DIM, torch.float32))
    kwargs = dict(position_ids=positions, kv_position_ids=positions, seq_len=seq_len)
    mine, other = (LONG_M, SHORT_M) if regime == "long" else (SHORT_M, LONG_M)

    def single(m):
        return fused_rope_attention(q, k, v, cfg.replace(short_mscale=None, long_mscale=None, attention_factor=m),
                                    **kwargs)

    out = fused_rope_attention(q, k, v, cfg, **kwargs)
    assert (out - single(mine)).abs().max() <= 1e-5
    assert (out - single(other)).abs().max() > 1e-2
