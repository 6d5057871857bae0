"""LongRoPEConfig.from_hf / to_hf against transformers' own rotary embedding modules.

For each RoPE type transformers knows (default, linear, YaRN, Llama-3.1, longrope) a
tiny Hugging Face config builds the model's rotary module; its cos/sin must equal our
float64 reference laid out the Hugging Face way (cat([cos, cos]), mscale folded in),
and apply_rotary must equal transformers' apply_rotary_pos_emb on the same q/k.

Tolerance: transformers computes angles in fp32, so its angle is off by up to
~1.5 ulp of the largest angle p_max * w_0 = p_max; we allow
mscale * (2 * p_max * 2^-23 + 1e-6) on cos/sin, and 2 max|x| times that on rotated
vectors. Positions stay below ~300 so this is ~7e-5: a wrong factor, regime or
attention factor is off by far more.
"""

import math

import pytest
import torch

from longrope_triton import LongRoPEConfig, apply_rotary
from longrope_triton import reference

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf  # also run with the oldest supported transformers
from transformers import LlamaConfig, Phi3Config  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.phi3 import modeling_phi3  # noqa: E402

HF_TINY = dict(num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1, intermediate_size=16,
               vocab_size=16, pad_token_id=0, bos_token_id=0, eos_token_id=0)
HEAD_DIM = 32
ORIG, MAX_POS = 128, 1024
SHORT = [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)]
LONG = [2.0 + 0.4 * i for i in range(HEAD_DIM // 2)]


def llama(rope, max_pos=MAX_POS, head_dim=HEAD_DIM):
    return LlamaConfig(hidden_size=2 * head_dim, head_dim=head_dim, max_position_embeddings=max_pos,
                       rope_parameters=dict(rope), **HF_TINY)


def phi3(rope, partial=1.0, orig=ORIG, max_pos=MAX_POS, head_dim=HEAD_DIM):
    # Phi-3 keeps original_max_position_embeddings at the top level of its config
    return Phi3Config(hidden_size=2 * head_dim, max_position_embeddings=max_pos, original_max_position_embeddings=orig,
                      partial_rotary_factor=partial, rope_parameters=dict(rope), **HF_TINY)


def rotary_module(hf_config):
    if isinstance(hf_config, Phi3Config):
        return modeling_phi3.Phi3RotaryEmbedding(hf_config), modeling_phi3.apply_rotary_pos_emb
    return modeling_llama.LlamaRotaryEmbedding(hf_config), modeling_llama.apply_rotary_pos_emb


def our_hf_layout_cos_sin(cfg, pos):
    """Reference mscale * cos/sin (float64), regime from max(position) + 1, as cat([cos, cos])."""
    cos, sin = reference.rope_cos_sin(cfg, pos, cfg.use_long(int(pos.max()) + 1))
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def angle_tol(cfg, pos):
    return cfg.mscale * (2 * int(pos.max()) * 2.0 ** -23 + 1e-6)


def rows(*ranges):
    return torch.stack([torch.arange(a, b) for a, b in ranges])


# (hf config factory, position_ids (B, S), expected rotary_dim, expected regime)
CASES = [
    pytest.param(lambda: phi3({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}),
                 rows((0, ORIG)), HEAD_DIM, "short", id="phi3-longrope-short-max127"),
    pytest.param(lambda: phi3({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}),
                 rows((0, ORIG + 1)), HEAD_DIM, "long", id="phi3-longrope-long-max128"),
    pytest.param(lambda: phi3({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}),
                 rows((40, 100), (ORIG - 59, ORIG + 1)), HEAD_DIM, "long", id="phi3-longrope-B2-one-row-long"),
    pytest.param(lambda: phi3({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                               "attention_factor": 1.25}),
                 rows((100, 200)), HEAD_DIM, "long", id="phi3-longrope-attention_factor1.25"),
    pytest.param(lambda: phi3({"rope_type": "longrope", "short_factor": SHORT[:8], "long_factor": LONG[:8]},
                              partial=0.5),
                 rows((0, ORIG)), HEAD_DIM // 2, "short", id="phi3-longrope-partial0.5-short"),
    pytest.param(lambda: phi3({"rope_type": "longrope", "short_factor": SHORT[:8], "long_factor": LONG[:8]},
                              partial=0.5),
                 rows((60, ORIG + 60)), HEAD_DIM // 2, "long", id="phi3-longrope-partial0.5-long"),
    pytest.param(lambda: phi3({"rope_type": "default"}, partial=0.5), rows((0, 200)), HEAD_DIM // 2, "short",
                 id="phi3-default-partial0.5"),
    pytest.param(lambda: llama({"rope_type": "default", "rope_theta": 10000.0}), rows((0, 300)), HEAD_DIM, None,
                 id="llama-default"),
    pytest.param(lambda: llama({"rope_type": "default", "rope_theta": 500000.0}), rows((0, 50), (250, 300)), HEAD_DIM,
                 None, id="llama-default-theta5e5-B2"),
    pytest.param(lambda: llama({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}), rows((0, 300)),
                 HEAD_DIM, None, id="llama-linear4"),
    pytest.param(lambda: llama({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": ORIG, "rope_theta": 500000.0}),
                 rows((0, 300)), HEAD_DIM, None, id="llama-llama3-factor8"),
    pytest.param(lambda: llama({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                                "original_max_position_embeddings": 64, "rope_theta": 10000.0}, max_pos=256),
                 rows((0, 256)), HEAD_DIM, None, id="llama-llama3-factor4-low2-high8"),
    pytest.param(lambda: llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG,
                                "rope_theta": 10000.0}, max_pos=4 * ORIG),
                 rows((0, 300)), HEAD_DIM, None, id="llama-yarn4"),
    pytest.param(lambda: llama({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                                "rope_theta": 10000.0, "beta_fast": 16.0, "beta_slow": 2.0,
                                "attention_factor": 1.1}, max_pos=512),
                 rows((0, 300)), HEAD_DIM, None, id="llama-yarn8-beta16/2-attention_factor1.1"),
    pytest.param(lambda: llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG,
                                "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, max_pos=4 * ORIG),
                 rows((0, 300)), HEAD_DIM // 2, None, id="llama-yarn4-partial0.5"),
    pytest.param(lambda: llama({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                "original_max_position_embeddings": ORIG, "rope_theta": 10000.0}),
                 rows((0, ORIG)), HEAD_DIM, "short", id="llama-longrope-short"),
    pytest.param(lambda: llama({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                "original_max_position_embeddings": ORIG, "rope_theta": 10000.0}),
                 rows((1, ORIG + 1)), HEAD_DIM, "long", id="llama-longrope-long"),
]


@pytest.mark.parametrize("make_config, pos, rotary_dim, regime", CASES)
def test_cos_sin_match_hf_module(make_config, pos, rotary_dim, regime):
    hf_config = make_config()
    cfg = LongRoPEConfig.from_hf(hf_config)
    assert cfg.rotary_dim == rotary_dim
    if regime is not None:
        assert cfg.regime(int(pos.max()) + 1) == regime
    module, _ = rotary_module(hf_config)
    cos_hf, sin_hf = module(torch.zeros(1, dtype=torch.float32), pos)
    cos_ref, sin_ref = our_hf_layout_cos_sin(cfg, pos)
    assert cos_hf.shape == cos_ref.shape, (cos_hf.shape, cos_ref.shape)
    assert cfg.mscale == pytest.approx(module.attention_scaling, rel=1e-12)
    tol = angle_tol(cfg, pos)
    err = max(float((cos_hf.double() - cos_ref).abs().max()), float((sin_hf.double() - sin_ref).abs().max()))
    assert err <= tol, f"cos/sin differ from transformers by {err:.3e} (tolerance {tol:.3e})"


@pytest.mark.parametrize("make_config, pos, rotary_dim, regime", [
    c for c in CASES if "default-theta5e5" not in c.id and "yarn4-partial" not in c.id])
def test_apply_rotary_matches_hf_apply_rotary_pos_emb(make_config, pos, rotary_dim, regime):
    """The whole rotation: apply_rotary(q, k, from_hf(cfg)) vs transformers on the same fp32 q/k.

    (Llama's apply_rotary_pos_emb has no partial rotary: YaRN-partial is covered by the cos/sin test.)
    """
    hf_config = make_config()
    cfg = LongRoPEConfig.from_hf(hf_config)
    module, hf_apply = rotary_module(hf_config)
    batch, seq = pos.shape
    q = torch.randn(batch, 2, seq, HEAD_DIM)
    k = torch.randn(batch, 1, seq, HEAD_DIM)
    cos, sin = module(q, pos)
    q_hf, k_hf = hf_apply(q, k, cos, sin)
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=pos)
    for ours, theirs, x, name in ((q_rot, q_hf, q, "q"), (k_rot, k_hf, k, "k")):
        tol = 2 * float(x.abs().max()) * angle_tol(cfg, pos)
        err = float((ours.double() - theirs.double()).abs().max())
        assert err <= tol, f"{name}: apply_rotary differs from transformers by {err:.3e} (tolerance {tol:.3e})"


def test_phi3_switch_at_original_max():
    """Phi-3 and we switch at the same place: max(position) + 1 == L_orig is short, L_orig + 1 is long."""
    hf_config = phi3({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG})
    cfg = LongRoPEConfig.from_hf(hf_config)
    module, _ = rotary_module(hf_config)
    x = torch.zeros(1)
    short_pos, long_pos = rows((ORIG - 40, ORIG)), rows((ORIG - 39, ORIG + 1))
    cos_short, _ = module(x, short_pos)
    cos_long, _ = module(x, long_pos)
    short_ref, _ = our_hf_layout_cos_sin(cfg, short_pos)
    long_ref, _ = our_hf_layout_cos_sin(cfg, long_pos)
    torch.testing.assert_close(cos_short.double(), short_ref, rtol=0, atol=angle_tol(cfg, short_pos))
    torch.testing.assert_close(cos_long.double(), long_ref, rtol=0, atol=angle_tol(cfg, long_pos))
    # the factor sets really differ at the shared positions (ORIG - 39 .. ORIG - 1)
    assert float((cos_short[:, 1:] - cos_long[:, :-1]).abs().max()) > 1e-2


@pytest.mark.parametrize("cfg", [
    pytest.param(LongRoPEConfig(head_dim=HEAD_DIM, base=50000.0, original_max_position_embeddings=ORIG,
                                max_position_embeddings=MAX_POS, short_factor=SHORT, long_factor=LONG),
                 id="longrope-D32"),
    pytest.param(LongRoPEConfig.yarn(HEAD_DIM, ORIG, 8 * ORIG), id="yarn-as-longrope-D32"),
    pytest.param(LongRoPEConfig.pi(HEAD_DIM, ORIG, 4 * ORIG), id="pi-as-longrope-D32"),
])
@pytest.mark.parametrize("seq_range", [pytest.param((0, ORIG), id="short"), pytest.param((50, 250), id="long")])
def test_to_hf_runs_the_same_numbers_in_stock_transformers(cfg, seq_range):
    """cfg.to_hf() in a stock LlamaConfig: transformers' rotary module reproduces our rotation."""
    hf_config = llama(cfg.to_hf(), max_pos=cfg.max_position_embeddings)
    module, hf_apply = rotary_module(hf_config)
    pos = rows(seq_range)
    q = torch.randn(1, 2, pos.shape[1], HEAD_DIM)
    k = torch.randn(1, 1, pos.shape[1], HEAD_DIM)
    q_hf, k_hf = hf_apply(q, k, *module(q, pos))
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=pos)
    for ours, theirs, x in ((q_rot, q_hf, q), (k_rot, k_hf, k)):
        tol = 2 * float(x.abs().max()) * angle_tol(cfg, pos)
        assert float((ours.double() - theirs.double()).abs().max()) <= tol


def test_to_hf_partial_runs_the_same_numbers_in_stock_phi3():
    cfg = LongRoPEConfig(head_dim=HEAD_DIM, rotary_dim=HEAD_DIM // 2, original_max_position_embeddings=ORIG,
                         max_position_embeddings=MAX_POS, short_factor=SHORT[:8], long_factor=LONG[:8])
    rope = {key: v for key, v in cfg.to_hf().items() if key not in ("original_max_position_embeddings",)}
    hf_config = phi3(rope, partial=0.5)
    module, hf_apply = rotary_module(hf_config)
    pos = rows((0, 200))
    q, k = torch.randn(1, 2, 200, HEAD_DIM), torch.randn(1, 1, 200, HEAD_DIM)
    q_hf, k_hf = hf_apply(q, k, *module(q, pos))
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=pos)
    tol = 2 * float(max(q.abs().max(), k.abs().max())) * angle_tol(cfg, pos)
    assert float((q_rot - q_hf).abs().max()) <= tol and float((k_rot - k_hf).abs().max()) <= tol
    assert math.isclose(module.attention_scaling, cfg.mscale, rel_tol=1e-12)
