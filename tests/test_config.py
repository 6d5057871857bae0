"""LongRoPEConfig: validation, defaults, mscale, the short/long switch, the method
constructors (checked against transformers' own formulas where it has them), JSON and
Hugging Face round trips."""

import dataclasses
import json
import math

import pytest
import torch

from longrope_triton import LongRoPEConfig
from longrope_triton import reference
from longrope_triton.config import critical_dimension, ntk_factors

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf  # also run with the oldest supported transformers
from transformers import LlamaConfig, Phi3Config  # noqa: E402
from transformers.modeling_rope_utils import (  # noqa: E402
    _compute_llama3_parameters,
    _compute_yarn_parameters,
)

FIELDS = ("head_dim", "rotary_dim", "base", "original_max_position_embeddings", "max_position_embeddings",
          "short_factor", "long_factor", "start_token", "attention_factor", "interleaved", "short_mscale",
          "long_mscale")

# Tiny model sizes for Hugging Face configs (only the rope-related fields matter).
HF_TINY = dict(num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1, intermediate_size=16,
               vocab_size=16, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def base_kwargs(**changes):
    kw = dict(head_dim=32, original_max_position_embeddings=128, max_position_embeddings=512)
    kw.update(changes)
    return kw


# ---------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("changes, exc, match", [
    pytest.param(dict(short_factor=[1.0] * 15), ValueError, r"short_factor has length 15.*16", id="short-len15-vs-16"),
    pytest.param(dict(long_factor=[1.0] * 17), ValueError, r"long_factor has length 17.*16", id="long-len17-vs-16"),
    pytest.param(dict(rotary_dim=16, long_factor=[1.0] * 16), ValueError, r"long_factor has length 16.*8",
                 id="partial-r16-len16"),
    pytest.param(dict(rotary_dim=15), ValueError, r"rotary_dim must be even", id="odd-rotary_dim"),
    pytest.param(dict(head_dim=33), ValueError, r"rotary_dim must be even", id="odd-head_dim-no-rotary"),
    pytest.param(dict(rotary_dim=34), ValueError, r"rotary_dim \(34\) must not exceed head_dim \(32\)",
                 id="rotary_dim-gt-head_dim"),
    pytest.param(dict(long_factor=[1.0] * 15 + [float("nan")]), ValueError, r"long_factor must be finite and positive",
                 id="nan-factor"),
    pytest.param(dict(short_factor=[float("inf")] + [1.0] * 15), ValueError,
                 r"short_factor must be finite and positive", id="inf-factor"),
    pytest.param(dict(long_factor=[0.0] * 16), ValueError, r"long_factor must be finite and positive", id="zero-factor"),
    pytest.param(dict(long_factor=[-2.0] * 16), ValueError, r"long_factor must be finite and positive",
                 id="negative-factor"),
    pytest.param(dict(start_token=-1), ValueError, r"start_token must be >= 0", id="start_token-negative"),
    pytest.param(dict(max_position_embeddings=64), ValueError,
                 r"max_position_embeddings \(64\) must be >= original_max_position_embeddings \(128\)",
                 id="max-lt-original"),
    pytest.param(dict(attention_factor=0.0), ValueError, r"attention_factor must be finite and positive",
                 id="attention_factor-zero"),
    pytest.param(dict(attention_factor=-1.0), ValueError, r"attention_factor must be finite and positive",
                 id="attention_factor-negative"),
    pytest.param(dict(attention_factor=float("nan")), ValueError, r"attention_factor must be finite and positive",
                 id="attention_factor-nan"),
    pytest.param(dict(attention_factor="1.2"), TypeError, r"attention_factor must be a float", id="attention_factor-str"),
    pytest.param(dict(short_mscale=0.0), ValueError, r"short_mscale must be finite and positive",
                 id="short_mscale-zero"),
    pytest.param(dict(long_mscale=-1.2), ValueError, r"long_mscale must be finite and positive",
                 id="long_mscale-negative"),
    pytest.param(dict(long_mscale=float("inf")), ValueError, r"long_mscale must be finite and positive",
                 id="long_mscale-inf"),
    pytest.param(dict(short_mscale=float("nan")), ValueError, r"short_mscale must be finite and positive",
                 id="short_mscale-nan"),
    pytest.param(dict(short_mscale="1.1"), TypeError, r"short_mscale must be a float", id="short_mscale-str"),
    pytest.param(dict(long_mscale=True), TypeError, r"long_mscale must be a float", id="long_mscale-bool"),
    pytest.param(dict(base=1.0), ValueError, r"base must be > 1", id="base-1"),
    pytest.param(dict(base=float("inf")), ValueError, r"base must be finite and positive", id="base-inf"),
    pytest.param(dict(head_dim=32.0), TypeError, r"head_dim must be an int", id="head_dim-float"),
    pytest.param(dict(head_dim=True), TypeError, r"head_dim must be an int", id="head_dim-bool"),
    pytest.param(dict(rotary_dim="16"), TypeError, r"rotary_dim must be an int", id="rotary_dim-str"),
    pytest.param(dict(original_max_position_embeddings=128.0), TypeError,
                 r"original_max_position_embeddings must be an int", id="original_max-float"),
    pytest.param(dict(max_position_embeddings="512"), TypeError, r"max_position_embeddings must be an int",
                 id="max-str"),
    pytest.param(dict(start_token=1.5), TypeError, r"start_token must be an int", id="start_token-float"),
    pytest.param(dict(long_factor="1.0"), TypeError, r"long_factor must be a sequence", id="factor-str"),
    pytest.param(dict(long_factor=2.0), TypeError, r"long_factor must be a sequence", id="factor-scalar"),
    pytest.param(dict(long_factor=["2.0"] * 16), TypeError, r"long_factor must contain numbers", id="factor-item-str"),
    pytest.param(dict(interleaved="yes"), TypeError, r"interleaved must be a bool", id="interleaved-str"),
])
def test_validation_errors(changes, exc, match):
    with pytest.raises(exc, match=match):
        LongRoPEConfig(**base_kwargs(**changes))


def test_replace_validates_again():
    cfg = LongRoPEConfig(**base_kwargs())
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        cfg.replace(rotary_dim=7, short_factor=None, long_factor=None)


# ---------------------------------------------------------------------------------------- defaults
def test_defaults():
    cfg = LongRoPEConfig(head_dim=48, original_max_position_embeddings=100, max_position_embeddings=400)
    assert cfg.rotary_dim == 48
    assert cfg.short_factor == [1.0] * 24 and cfg.long_factor == [1.0] * 24
    assert cfg.start_token == 0 and cfg.attention_factor is None and cfg.interleaved is False
    assert cfg.base == 10000.0
    # the documented defaults of DESIGN §8
    d = LongRoPEConfig()
    assert (d.head_dim, d.rotary_dim, d.original_max_position_embeddings, d.max_position_embeddings) == \
        (64, 64, 4096, 131072)


def test_attributes_equal_constructor_args():
    args = dict(head_dim=80, rotary_dim=48, base=50000.0, original_max_position_embeddings=2048,
                max_position_embeddings=32768, short_factor=[1.0 + 0.01 * i for i in range(24)],
                long_factor=[2.0 + 0.5 * i for i in range(24)], start_token=4, attention_factor=1.25,
                interleaved=True)
    cfg = LongRoPEConfig(**args)
    for name, value in args.items():
        assert getattr(cfg, name) == value, name
    assert isinstance(cfg.short_factor, list) and all(type(v) is float for v in cfg.long_factor)


def test_factor_sequences_are_normalised_to_float_lists():
    cfg = LongRoPEConfig(**base_kwargs(short_factor=torch.linspace(1, 2, 16), long_factor=tuple(range(1, 17))))
    assert cfg.short_factor == pytest.approx(torch.linspace(1, 2, 16).tolist())
    assert cfg.long_factor == [float(i) for i in range(1, 17)]
    assert all(type(v) is float for v in cfg.short_factor + cfg.long_factor)


# ---------------------------------------------------------------------------------------- mscale
@pytest.mark.parametrize("orig, target", [
    pytest.param(4096, 131072, id="4k-128k"),
    pytest.param(8192, 16384, id="8k-16k"),
    pytest.param(2048, 2097152, id="2k-2M"),
    pytest.param(100, 150, id="s1.5"),
])
def test_mscale_default_formula(orig, target):
    cfg = LongRoPEConfig(head_dim=16, original_max_position_embeddings=orig, max_position_embeddings=target)
    s = target / orig
    assert cfg.scale == pytest.approx(s, rel=1e-15)
    assert cfg.mscale == pytest.approx(math.sqrt(1 + math.log(s) / math.log(orig)), rel=1e-15)
    assert cfg.mscale > 1.0


def test_mscale_is_one_without_extension():
    cfg = LongRoPEConfig(head_dim=16, original_max_position_embeddings=4096, max_position_embeddings=4096)
    assert cfg.scale == 1.0 and cfg.mscale == 1.0


def test_explicit_attention_factor_wins():
    cfg = LongRoPEConfig(**base_kwargs(attention_factor=0.75))
    assert cfg.mscale == 0.75


# ---------------------------------------------------------------------------------------- regime switch
@pytest.mark.parametrize("orig", [pytest.param(128, id="orig128"), pytest.param(4096, id="orig4096")])
def test_regime_switch_exactly_at_original_max(orig):
    cfg = LongRoPEConfig(head_dim=8, original_max_position_embeddings=orig, max_position_embeddings=4 * orig,
                         short_factor=[1.0, 1.5, 2.0, 2.5], long_factor=[3.0, 4.0, 5.0, 6.0])
    assert cfg.regime(orig) == "short" and not cfg.use_long(orig)
    assert cfg.factors(orig) == [1.0, 1.5, 2.0, 2.5]
    assert cfg.regime(orig + 1) == "long" and cfg.use_long(orig + 1)
    assert cfg.factors(orig + 1) == [3.0, 4.0, 5.0, 6.0]
    assert cfg.regime(1) == "short" and cfg.regime(4 * orig) == "long"


# ---------------------------------------------------------------------------------------- constructors
@pytest.mark.parametrize("head_dim, rotary_dim", [pytest.param(64, None, id="D64"),
                                                  pytest.param(80, 48, id="D80-r48")])
def test_pi(head_dim, rotary_dim):
    cfg = LongRoPEConfig.pi(head_dim, 4096, 32768, rotary_dim=rotary_dim)
    r = rotary_dim or head_dim
    assert cfg.rotary_dim == r
    assert cfg.long_factor == [8.0] * (r // 2)
    assert cfg.short_factor == [1.0] * (r // 2)
    assert cfg.mscale == 1.0


@pytest.mark.parametrize("head_dim, rotary_dim, base", [pytest.param(64, None, 10000.0, id="D64-b1e4"),
                                                        pytest.param(96, 64, 1e5, id="D96-r64-b1e5")])
def test_ntk(head_dim, rotary_dim, base):
    cfg = LongRoPEConfig.ntk(head_dim, 2048, 16384, base=base, rotary_dim=rotary_dim)
    r = rotary_dim or head_dim
    s = 8.0
    expected = [s ** (2 * i / (r - 2)) for i in range(r // 2)]
    assert cfg.long_factor == pytest.approx(expected, rel=1e-14)
    assert cfg.long_factor[0] == 1.0 and cfg.long_factor[-1] == pytest.approx(s, rel=1e-14)
    assert cfg.mscale == 1.0
    # NTK-aware scaling is a base change: theta_i / lambda_i == base' ** (-2i / r), base' = base s^(r/(r-2))
    new_base = base * s ** (r / (r - 2))
    got = reference.scaled_inv_freq(cfg, long=True)
    want = new_base ** (-2.0 * torch.arange(r // 2, dtype=torch.float64) / r)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def _hf_llama_config(head_dim, max_pos, rope_parameters):
    return LlamaConfig(hidden_size=2 * head_dim, head_dim=head_dim, max_position_embeddings=max_pos,
                       rope_parameters=dict(rope_parameters), **HF_TINY)


@pytest.mark.parametrize("head_dim, prf, base, orig, factor, betas", [
    pytest.param(64, 1.0, 10000.0, 4096, 8.0, (32, 1), id="D64-b1e4-4k-s8"),
    pytest.param(128, 1.0, 500000.0, 8192, 4.0, (32, 1), id="D128-b5e5-8k-s4"),
    pytest.param(64, 1.0, 1e5, 8192, 2.0, (16, 2), id="D64-b1e5-8k-s2-beta16/2"),
    pytest.param(80, 0.5, 10000.0, 2048, 16.0, (32, 1), id="D80-partial0.5-2k-s16"),
])
def test_yarn_matches_transformers(head_dim, prf, base, orig, factor, betas):
    rotary_dim = int(head_dim * prf)
    cfg = LongRoPEConfig.yarn(head_dim, orig, int(orig * factor), base=base,
                              rotary_dim=None if prf == 1.0 else rotary_dim, beta_fast=betas[0], beta_slow=betas[1])
    params = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig, "rope_theta": base,
              "beta_fast": betas[0], "beta_slow": betas[1]}
    if prf != 1.0:
        params["partial_rotary_factor"] = prf
    hf_inv_freq, hf_attention = _compute_yarn_parameters(_hf_llama_config(head_dim, int(orig * factor), params))
    ours = reference.scaled_inv_freq(cfg, long=True)
    assert ours.shape == hf_inv_freq.shape == (rotary_dim // 2,)
    # transformers computes these in fp32: compare to fp32 precision
    torch.testing.assert_close(ours, hf_inv_freq.double(), rtol=1e-6, atol=0)
    assert cfg.mscale == pytest.approx(hf_attention, rel=1e-12)
    assert cfg.mscale == pytest.approx(0.1 * math.log(factor) + 1, rel=1e-12)
    # YaRN interpolates the slowest dims fully and keeps the fastest: lambda from 1 up to s
    assert cfg.long_factor[0] == pytest.approx(1.0) and cfg.long_factor[-1] == pytest.approx(factor)


@pytest.mark.parametrize("head_dim, base, orig, factor, low, high", [
    pytest.param(128, 500000.0, 8192, 8.0, 1.0, 4.0, id="llama3.1-8B-D128"),
    pytest.param(64, 1e5, 8192, 2.0, 1.0, 4.0, id="D64-b1e5-8k-s2"),
    pytest.param(96, 10000.0, 1024, 4.0, 2.0, 8.0, id="D96-1k-s4-low2-high8"),
])
def test_llama3_matches_transformers(head_dim, base, orig, factor, low, high):
    cfg = LongRoPEConfig.llama3(head_dim, orig, int(orig * factor), base=base, factor=factor,
                                low_freq_factor=low, high_freq_factor=high)
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
              "original_max_position_embeddings": orig, "rope_theta": base}
    hf_inv_freq, hf_attention = _compute_llama3_parameters(_hf_llama_config(head_dim, int(orig * factor), params))
    for long in (False, True):  # Llama-3.1 scaling applies at every length
        torch.testing.assert_close(reference.scaled_inv_freq(cfg, long=long), hf_inv_freq.double(), rtol=1e-6, atol=0)
    assert cfg.mscale == hf_attention == 1.0
    assert cfg.short_factor == cfg.long_factor
    lam = cfg.long_factor
    assert lam[0] == 1.0 and lam[-1] == pytest.approx(factor)  # high frequencies kept, low ones divided
    assert all(a <= b + 1e-12 for a, b in zip(lam, lam[1:]))


def test_longrope_constructor_keeps_searched_lists():
    short = [1.0 + 0.02 * i for i in range(32)]
    long = [1.5 + 0.2 * i for i in range(32)]
    cfg = LongRoPEConfig.longrope(64, 4096, 131072, long_factor=long, short_factor=short, start_token=8)
    assert cfg.short_factor == short and cfg.long_factor == long and cfg.start_token == 8
    assert cfg.mscale == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))


@pytest.mark.parametrize("head_dim, base, orig, expected", [
    # d_cd = ceil(r/2 * log_base(L_orig / 2 pi)) - 1 (DESIGN §1)
    pytest.param(64, 1e5, 8192, math.ceil(32 * math.log(8192 / (2 * math.pi)) / math.log(1e5)) - 1, id="D64-b1e5-8k"),
    pytest.param(128, 500000.0, 8192, math.ceil(64 * math.log(8192 / (2 * math.pi)) / math.log(5e5)) - 1,
                 id="D128-b5e5-8k"),
    pytest.param(96, 10000.0, 4096, math.ceil(48 * math.log(4096 / (2 * math.pi)) / math.log(1e4)) - 1,
                 id="D96-b1e4-4k"),
])
def test_critical_dimension(head_dim, base, orig, expected):
    assert critical_dimension(head_dim, base, orig) == expected
    assert 0 < expected < head_dim // 2


def test_critical_dimension_known_value():
    # SmolLM2 (head_dim 64, base 1e5, 8K): 32 * ln(8192 / 2pi) / ln(1e5) = 19.94 -> 20 - 1
    assert critical_dimension(64, 1e5, 8192) == 19


@pytest.mark.parametrize("head_dim, base, orig, target", [
    pytest.param(64, 1e5, 8192, 16384, id="D64-b1e5-8k-16k"),
    pytest.param(128, 500000.0, 8192, 131072, id="D128-b5e5-8k-128k"),
])
def test_longrope2(head_dim, base, orig, target):
    s = target / orig
    d_cd = critical_dimension(head_dim, base, orig)
    n_upper = head_dim // 2 - d_cd
    upper = [s + 0.05 * i for i in range(n_upper)]
    cfg = LongRoPEConfig.longrope2(head_dim, orig, target, upper_factors=upper, base=base)
    ntk = ntk_factors(head_dim, s)
    assert cfg.long_factor[:d_cd] == pytest.approx(ntk[:d_cd], rel=1e-14)  # below d_cd: NTK-style
    assert cfg.long_factor[d_cd:] == pytest.approx(upper, rel=1e-14)        # from d_cd on: searched
    assert cfg.short_factor == [1.0] * (head_dim // 2)
    # default upper factors: s everywhere
    default = LongRoPEConfig.longrope2(head_dim, orig, target, base=base)
    assert default.long_factor[d_cd:] == [s] * n_upper
    assert default.long_factor[:d_cd] == pytest.approx(ntk[:d_cd], rel=1e-14)


@pytest.mark.parametrize("upper_fn, match", [
    pytest.param(lambda s, n: [s + 0.1 * (n - i) for i in range(n)], "non-decreasing", id="decreasing"),
    pytest.param(lambda s, n: [s - 0.5] + [s] * (n - 1), r">= s", id="below-s"),
    pytest.param(lambda s, n: [s] * (n + 1), "upper_factors has length", id="too-long"),
    pytest.param(lambda s, n: [s] * (n - 1), "upper_factors has length", id="too-short"),
])
def test_longrope2_bad_upper_raises(upper_fn, match):
    s, d_cd = 2.0, critical_dimension(64, 1e5, 8192)
    with pytest.raises(ValueError, match=match):
        LongRoPEConfig.longrope2(64, 8192, 16384, upper_factors=upper_fn(s, 32 - d_cd), base=1e5)


# ---------------------------------------------------------------------------------------- JSON
def _rich_config():
    return LongRoPEConfig(head_dim=80, rotary_dim=48, base=50000.0, original_max_position_embeddings=2048,
                          max_position_embeddings=65536, short_factor=[1.0 + 0.013 * i for i in range(24)],
                          long_factor=[2.0 + 0.37 * i for i in range(24)], start_token=4, attention_factor=1.1,
                          interleaved=True)


@pytest.mark.parametrize("cfg", [pytest.param(_rich_config(), id="rich"),
                                 pytest.param(LongRoPEConfig(), id="defaults"),
                                 pytest.param(_rich_config().replace(short_mscale=1.05, long_mscale=1.4),
                                              id="per-regime-mscale"),
                                 pytest.param(LongRoPEConfig.yarn(64, 4096, 32768), id="yarn")])
def test_json_round_trip_text(cfg):
    text = cfg.to_json()
    data = json.loads(text)
    assert set(data) == set(FIELDS) == {f.name for f in dataclasses.fields(LongRoPEConfig)}
    for name in FIELDS:
        assert data[name] == getattr(cfg, name), name
    back = LongRoPEConfig.from_json(text)
    assert back == cfg
    assert back.mscale == cfg.mscale
    assert back.regime_mscale(False) == cfg.regime_mscale(False) and back.regime_mscale(True) == cfg.regime_mscale(True)


def test_json_round_trip_file(tmp_path):
    cfg = _rich_config()
    path = tmp_path / "factors.json"
    path.write_text(cfg.to_json(), encoding="utf-8")
    assert LongRoPEConfig.from_json(str(path)) == cfg
    assert LongRoPEConfig.from_json(path) == cfg  # a pathlib.Path works too


def test_json_unknown_field_raises():
    data = json.loads(_rich_config().to_json())
    data["rope_scaling_typo"] = 1
    with pytest.raises(ValueError, match="unknown LongRoPEConfig fields.*rope_scaling_typo"):
        LongRoPEConfig.from_json(json.dumps(data))


def test_json_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        LongRoPEConfig.from_json(str(tmp_path / "missing.json"))


def test_json_invalid_values_are_validated():
    data = json.loads(_rich_config().to_json())
    data["long_factor"] = data["long_factor"][:-1]
    with pytest.raises(ValueError, match="long_factor has length 23"):
        LongRoPEConfig.from_json(json.dumps(data))


def test_json_not_an_object_raises(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2, 3]", encoding="utf-8")
    with pytest.raises(ValueError, match="must be an object"):
        LongRoPEConfig.from_json(str(path))


# ---------------------------------------------------------------------------------------- Hugging Face
def _llama_from(cfg):
    return LlamaConfig(hidden_size=2 * cfg.head_dim, head_dim=cfg.head_dim,
                       max_position_embeddings=cfg.max_position_embeddings, rope_parameters=cfg.to_hf(), **HF_TINY)


def _phi3_from(cfg):
    # Phi-3 reads original_max_position_embeddings from the top level of its config
    rope = {k: v for k, v in cfg.to_hf().items() if k != "original_max_position_embeddings"}
    return Phi3Config(hidden_size=2 * cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                      original_max_position_embeddings=cfg.original_max_position_embeddings, rope_parameters=rope,
                      **HF_TINY)


def _same_numbers(a: LongRoPEConfig, b: LongRoPEConfig):
    """Equal as a model: every field, with the attention factors compared as each regime's resolved one."""
    for name in FIELDS:
        if name not in ("attention_factor", "short_mscale", "long_mscale"):
            assert getattr(a, name) == getattr(b, name), name
    for long in (False, True):
        assert a.regime_mscale(long) == pytest.approx(b.regime_mscale(long), rel=1e-15)


HF_CASES = [
    pytest.param(LongRoPEConfig(head_dim=32, original_max_position_embeddings=128, max_position_embeddings=1024,
                                short_factor=[1.0 + 0.1 * i for i in range(16)],
                                long_factor=[2.0 + 0.5 * i for i in range(16)]), id="D32-longrope"),
    pytest.param(LongRoPEConfig(head_dim=32, rotary_dim=16, base=50000.0, original_max_position_embeddings=128,
                                max_position_embeddings=1024, short_factor=[1.0 + 0.1 * i for i in range(8)],
                                long_factor=[3.0 + 0.5 * i for i in range(8)], start_token=4), id="D32-r16-nhat4"),
    pytest.param(LongRoPEConfig.yarn(64, 4096, 16384, base=1e5), id="D64-yarn-as-longrope"),
    pytest.param(LongRoPEConfig(head_dim=48, original_max_position_embeddings=256, max_position_embeddings=256),
                 id="D48-no-extension"),
]


def test_to_hf_contents():
    cfg = HF_CASES[1].values[0]
    hf = cfg.to_hf()
    assert hf["rope_type"] == "longrope"
    assert hf["rope_theta"] == cfg.base
    assert hf["short_factor"] == cfg.short_factor and hf["long_factor"] == cfg.long_factor
    assert hf["original_max_position_embeddings"] == cfg.original_max_position_embeddings
    assert hf["attention_factor"] == cfg.mscale
    assert hf["partial_rotary_factor"] == 0.5
    assert hf["longrope_start_token"] == 4
    assert "partial_rotary_factor" not in HF_CASES[0].values[0].to_hf()


@pytest.mark.parametrize("cfg", HF_CASES)
def test_hf_round_trip_llama(cfg):
    hf_config = _llama_from(cfg)
    _same_numbers(LongRoPEConfig.from_hf(hf_config), cfg)
    # and through the serialized form a checkpoint would store
    _same_numbers(LongRoPEConfig.from_hf(LlamaConfig.from_dict(hf_config.to_dict())), cfg)


@pytest.mark.parametrize("cfg", HF_CASES)
def test_hf_round_trip_phi3(cfg):
    hf_config = _phi3_from(cfg)
    _same_numbers(LongRoPEConfig.from_hf(hf_config), cfg)
    _same_numbers(LongRoPEConfig.from_hf(Phi3Config.from_dict(hf_config.to_dict())), cfg)


def test_from_hf_phi3_reads_top_level_original_max():
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [4.0] * 16, "rope_theta": 10000.0}
    hf_config = Phi3Config(hidden_size=64, max_position_embeddings=16384, original_max_position_embeddings=4096,
                           rope_parameters=rope, **HF_TINY)
    cfg = LongRoPEConfig.from_hf(hf_config)
    assert cfg.original_max_position_embeddings == 4096 and cfg.max_position_embeddings == 16384
    assert cfg.mscale == pytest.approx(math.sqrt(1 + math.log(4) / math.log(4096)))
    assert cfg.regime(4096) == "short" and cfg.regime(4097) == "long"


def test_from_hf_llama_reads_original_max_inside_rope_parameters():
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [4.0] * 16, "rope_theta": 10000.0,
            "original_max_position_embeddings": 2048}
    hf_config = LlamaConfig(hidden_size=64, head_dim=32, max_position_embeddings=8192, rope_parameters=rope, **HF_TINY)
    cfg = LongRoPEConfig.from_hf(hf_config)
    assert cfg.original_max_position_embeddings == 2048 and cfg.max_position_embeddings == 8192
    assert cfg.regime(2048) == "short" and cfg.regime(2049) == "long"


@pytest.mark.parametrize("rope, lam, mscale", [
    pytest.param({"rope_type": "default"}, [1.0] * 16, 1.0, id="default"),
    pytest.param({"rope_type": "linear", "factor": 4.0}, [4.0] * 16, 1.0, id="linear-4"),
])
def test_from_hf_static_types(rope, lam, mscale):
    hf_config = LlamaConfig(hidden_size=64, head_dim=32, max_position_embeddings=1024,
                            rope_parameters=dict(rope, rope_theta=10000.0), **HF_TINY)
    cfg = LongRoPEConfig.from_hf(hf_config)
    assert cfg.short_factor == lam and cfg.long_factor == lam and cfg.mscale == mscale


def test_from_hf_unsupported_type_raises():
    hf_config = LlamaConfig(hidden_size=64, head_dim=32, max_position_embeddings=1024,
                            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, **HF_TINY)
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        LongRoPEConfig.from_hf(hf_config)


def test_to_hf_rejects_interleaved():
    """Hugging Face models rotate (i, i + r/2) pairs only: an interleaved config has no HF
    equivalent, and to_hf() must not silently turn it into a different model."""
    cfg = LongRoPEConfig(head_dim=32, original_max_position_embeddings=128, max_position_embeddings=512,
                         interleaved=True)
    with pytest.raises(ValueError, match="interleaved"):
        cfg.to_hf()
