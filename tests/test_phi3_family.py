"""Published Phi-3-family RoPE configs in tiny random Phi3ForCausalLM models.

The rope fields of microsoft/Phi-3-mini-128k-instruct, Phi-3.5-mini-instruct and
Phi-4-mini-instruct (the exact published short/long factor lists, 4K -> 128K, rope_theta,
head_dim 96, or 128 with partial_rotary_factor 0.75 -> 96 rotary dims) come from
tests/data/phi3_family_rope.json, which cites where each was found; nothing is downloaded.
The tiny models keep those fields and the real head_dim, with 2 layers, 2 query heads and a
vocabulary of 100 (initializer_range 0.1, so attention is peaked enough for a wrong angle to
show in the logits), and SDPA as the stock attention: the no-cache recomputes of ~4K-token
sequences are what these tests spend their time on.

Tolerance: stock transformers computes angles in float32, ~1e-4 rad off around position 4K
(DESIGN §2), which moves these logits (scale ~5) by up to ~1e-3 (measured); we allow
1e-3 x the logit scale. A wrong factor set or attention factor moves them by more than 1
(checked below, so the tolerance cannot hide one).
"""

import json
import math
import pathlib

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = [pytest.mark.hf,  # also run with the oldest supported transformers
              pytest.mark.usefixtures("torch_path_quiet")]
from transformers import Phi3Config, Phi3ForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import _compute_longrope_parameters  # noqa: E402

from longrope_triton import LongRoPEConfig, patch_model, unpatch_model  # noqa: E402
from test_hf import _generate, _recompute_logits, fused_calls  # noqa: E402,F401

PUBLISHED = json.loads((pathlib.Path(__file__).parent / "data" / "phi3_family_rope.json").read_text())["models"]
NAMES = sorted(PUBLISHED)
ORIG, TARGET = 4096, 131072
REL_TOL = 1e-3
# (query heads, key-value heads) of the tiny models: MHA like Phi-3/3.5-mini, GQA like Phi-4-mini
TINY_HEADS = {"Phi-3-mini-128k-instruct": (2, 2), "Phi-3.5-mini-instruct": (2, 2), "Phi-4-mini-instruct": (2, 1)}


def published(name: str) -> dict:
    return PUBLISHED[name]["config"]


def head_dim(name: str) -> int:
    return published(name)["hidden_size"] // published(name)["num_attention_heads"]


def tiny_config(name: str) -> Phi3Config:
    """The published config.json fields with a tiny body: same head_dim, rope dict and lengths."""
    heads, kv_heads = TINY_HEADS[name]
    tiny = dict(hidden_size=heads * head_dim(name), num_attention_heads=heads, num_key_value_heads=kv_heads,
                num_hidden_layers=2, intermediate_size=64, vocab_size=100, initializer_range=0.1, pad_token_id=0,
                bos_token_id=1, eos_token_id=None)  # no eos: greedy generation always runs every step
    return Phi3Config.from_dict({**published(name), **tiny}, attn_implementation="sdpa")


def tiny_model(name: str) -> Phi3ForCausalLM:
    return Phi3ForCausalLM(tiny_config(name)).eval()


def assert_logits_close(actual, expected, what=""):
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= REL_TOL * scale, f"{what}: max err {err:.3e} vs logit scale {scale:.2f}"


# ---------------------------------------------------------------------------- the config itself
@pytest.mark.parametrize("name", NAMES)
def test_from_hf_reads_the_published_config(name):
    rope = published(name)["rope_scaling"]
    cfg = LongRoPEConfig.from_hf(tiny_config(name))
    assert cfg.head_dim == head_dim(name) and cfg.rotary_dim == 96 and len(cfg.long_factor) == 48
    assert cfg.short_factor == rope["short_factor"] and cfg.long_factor == rope["long_factor"]
    assert (cfg.base, cfg.original_max_position_embeddings, cfg.max_position_embeddings) == (10000.0, ORIG, TARGET)
    assert cfg.start_token == 0 and not cfg.interleaved
    # the default attention factor in both regimes (no attention_factor key): sqrt(1 + ln 32 / ln 4096)
    default = math.sqrt(1 + math.log(TARGET / ORIG) / math.log(ORIG))
    assert cfg.regime_mscale(False) == cfg.regime_mscale(True) == pytest.approx(default, rel=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers_longrope_parameters(name):
    """inv_freq and attention factor of both regimes as transformers' own longrope function computes
    them for the same config (fp32 there, so fp32 precision)."""
    hf_config = tiny_config(name)
    cfg = LongRoPEConfig.from_hf(hf_config)
    for seq_len, long in ((ORIG, False), (ORIG + 1, True)):
        inv_freq, attention = _compute_longrope_parameters(hf_config, seq_len=seq_len)
        theta = cfg.base ** (-torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float64) / cfg.rotary_dim)
        ours = theta / torch.tensor(cfg.long_factor if long else cfg.short_factor, dtype=torch.float64)
        torch.testing.assert_close(ours, inv_freq.double(), rtol=1e-6, atol=0)
        assert cfg.regime_mscale(long) == pytest.approx(attention, rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_round_trips(name):
    """from_hf -> to_hf -> a stock Phi3Config -> from_hf, and to_json -> from_json, keep every number."""
    cfg = LongRoPEConfig.from_hf(tiny_config(name))
    rope = {k: v for k, v in cfg.to_hf().items() if k != "original_max_position_embeddings"}
    heads, kv_heads = TINY_HEADS[name]
    rebuilt = Phi3Config(hidden_size=heads * cfg.head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=cfg.max_position_embeddings,
                         original_max_position_embeddings=cfg.original_max_position_embeddings,
                         rope_parameters=rope)
    back = LongRoPEConfig.from_hf(Phi3Config.from_dict(rebuilt.to_dict()))
    assert back.replace(attention_factor=None) == cfg  # the default mscale comes back as an explicit value
    assert back.mscale == cfg.mscale
    assert LongRoPEConfig.from_json(cfg.to_json()) == cfg


# ---------------------------------------------------------------------------- patched vs stock
POSITIONS = [
    pytest.param(None, "short", id="short-pos0"),
    pytest.param(ORIG - 24, "short", id="short-pos4072-4095"),
    pytest.param(5000, "long", id="long-pos5000"),
]


@pytest.mark.parametrize("start, regime", POSITIONS)
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_stock(name, start, regime, path):
    """24 tokens at positions start .. start + 23: both regimes, the switch read from max(position) + 1."""
    model = tiny_model(name)
    ids = torch.randint(3, 100, (2, 24))
    kwargs = {} if start is None else {"position_ids": torch.arange(start, start + 24).expand(2, -1)}
    assert LongRoPEConfig.from_hf(model.config).regime(24 if start is None else start + 24) == regime
    with torch.no_grad():
        stock = model(ids, use_cache=False, **kwargs).logits
        out = patch_model(model)(ids, use_cache=False, **kwargs).logits
    assert_logits_close(out, stock, f"{name} {regime}")


@pytest.mark.parametrize("name", NAMES)
def test_a_wrong_factor_set_or_mscale_is_far_outside_the_tolerance(name):
    """The tolerance above is ~1e-3 of the logits: running the long regime with the short factors, or
    without its attention factor, moves them by more than 10 %."""
    model = tiny_model(name)
    cfg = LongRoPEConfig.from_hf(model.config)
    ids, pos = torch.randint(3, 100, (1, 24)), torch.arange(5000, 5024)[None]
    with torch.no_grad():
        stock = model(ids, use_cache=False, position_ids=pos).logits
        scale = float(stock.abs().max())
        for wrong in (cfg.replace(long_factor=cfg.short_factor), cfg.replace(attention_factor=1.0)):
            out = patch_model(model, wrong)(ids, use_cache=False, position_ids=pos).logits
            unpatch_model(model)
            assert float((out - stock).abs().max()) > 0.1 * scale


@pytest.mark.parametrize("name", NAMES)
def test_generate_across_the_4k_switch_matches_recompute(name, fused_calls):
    """Greedy generation from 4,095 to 4,098 tokens crosses original_max_position_embeddings = 4096
    at its third step: the same tokens and per-step logits as recomputing the whole sequence without
    a cache, with exactly one extra prefill (of 4,097 tokens, under the long factors)."""
    model = tiny_model(name)
    prompt = torch.randint(3, 100, (1, ORIG - 1))
    patch_model(model)
    sequences, logits = _generate(model, prompt, 3)
    layers = model.config.num_hidden_layers
    assert [c[0] for c in fused_calls if c[0] > 1] == [ORIG - 1] * layers + [ORIG + 1] * layers
    reference = _recompute_logits(unpatch_model(model), sequences, ORIG - 1)
    assert_logits_close(logits, reference, f"{name} generation")
    assert torch.equal(reference.argmax(-1), sequences[:, ORIG - 1:])
