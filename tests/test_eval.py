"""Tests of evaluation (perplexity windows, passkey prompts and scoring, plots) and of the
mixed-window fine-tuning loop, on tiny random-weight Llama models (2 layers, hidden 64)."""

import math
import random

import pytest
import torch

from longrope_triton.config import LongRoPEConfig
from longrope_triton.eval import passkey as pk
from longrope_triton.eval.methods import METHODS, method_config, plain_config
from longrope_triton.eval.perplexity import perplexity, sliding_windows, window_nll
from longrope_triton.eval.rope import use_rope


def tiny_llama(max_pos=32, vocab=96):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      rope_theta=10000.0)
    return LlamaForCausalLM(cfg).eval()


class DigitTokenizer:
    """A character-level stand-in for a HF tokenizer (ids = byte values, vocab 128)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(ord(c), 127) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


# ---------------------------------------------------------------------------- perplexity
def test_sliding_windows_cover_each_scored_token_once():
    windows = sliding_windows([100, 30, 75], length=40, score_tokens=10)
    assert all(w.doc != 1 for w in windows)  # too short
    scored = {(w.doc, t) for w in windows for t in range(w.start + w.length - w.score_tokens, w.start + w.length)}
    assert len(scored) == sum(w.score_tokens for w in windows)  # no token scored twice
    assert sliding_windows([100], 40, 10, max_windows=2)[0].start == 0
    with pytest.raises(ValueError, match="longer than"):
        sliding_windows([10], 40, 10)


def test_window_nll_matches_full_logits():
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 48))
    nll, n = window_nll(model, ids, 16)
    with torch.no_grad():
        logits = model(ids).logits[0, -17:-1]
    ref = torch.nn.functional.cross_entropy(logits, ids[0, -16:], reduction="sum")
    assert n == 16 and nll == pytest.approx(float(ref), rel=1e-5)


def test_perplexity_is_finite_and_config_is_applied_and_restored():
    model = tiny_llama(max_pos=32)
    docs = [torch.randint(0, 96, (120,))]
    base = LongRoPEConfig.from_hf(model.config)
    plain = perplexity(model, docs, 64, plain_config(base, 64), score_tokens=16, backend="stock")
    pi = perplexity(model, docs, 64, method_config("pi", base, 64), score_tokens=16, backend="stock")
    assert math.isfinite(plain.perplexity) and math.isfinite(pi.perplexity)
    assert plain.perplexity != pi.perplexity and plain.tokens == 16 * plain.windows
    before = model(docs[0][None, :24]).logits
    with use_rope(model, method_config("pi", base, 64), "stock"):
        pass
    assert torch.equal(model(docs[0][None, :24]).logits, before)
    with pytest.raises(ValueError, match="exceeds"):
        perplexity(model, docs, 100, method_config("pi", base, 64), score_tokens=16)


def test_method_configs():
    base = LongRoPEConfig(head_dim=64, base=1e5, original_max_position_embeddings=8192, max_position_embeddings=8192)
    cfgs = {m: method_config(m, base, 16384) for m in ("plain", "pi", "ntk", "yarn")}
    assert cfgs["plain"].long_factor == [1.0] * 32 and cfgs["plain"].max_position_embeddings == 16384
    assert cfgs["plain"].mscale == 1.0
    assert cfgs["pi"].long_factor == [2.0] * 32
    lr = method_config("longrope", base, 16384, "smollm2-135m-16k")
    assert lr.max_position_embeddings >= 16384 and lr.head_dim == 64
    assert "longrope" in METHODS
    with pytest.raises(ValueError, match="unknown method"):
        method_config("rope", base, 16384)


# ---------------------------------------------------------------------------- passkey
def test_passkey_prompt_construction():
    tok = DigitTokenizer()
    prompt = pk.passkey_prompt(tok, 600, 0.5, "12345")
    text = tok.decode(prompt.input_ids.tolist())
    assert text.startswith(pk.PASSKEY_PREFIX) and text.endswith(pk.PASSKEY_QUESTION)
    assert "The pass key is 12345. Remember it. 12345 is the pass key." in text
    assert pk.PASSKEY_FILLER.strip() in text
    assert 600 - len(pk.PASSKEY_FILLER) < prompt.length <= 600
    assert tok.decode(prompt.answer_ids.tolist()) == " 12345"
    first = pk.passkey_prompt(tok, 600, 0.0, "12345").key_position
    last = pk.passkey_prompt(tok, 600, 1.0, "12345").key_position
    assert first == len(pk.PASSKEY_PREFIX) < prompt.key_position < last
    with pytest.raises(ValueError, match="too short"):
        pk.passkey_prompt(tok, 50, 0.5, "12345")


def test_needle_sample_and_answer_parsing():
    tok = DigitTokenizer()
    hay = torch.randint(97, 123, (500,))
    s = pk.needle_sample(tok, hay, 300, 0.25, random.Random(0))
    assert s.length == 300 and len(s.key) == 7
    assert f"The special magic number is: {s.key}." in tok.decode(s.input_ids.tolist())
    assert pk.parse_answer(" 48213. Remember") == "48213"
    assert pk.parse_answer("no digits") is None


def test_passkey_retrieval_on_tiny_llama():
    model = tiny_llama(max_pos=256, vocab=128)
    tok = DigitTokenizer()
    cfg = LongRoPEConfig.pi(16, 256, 512)
    seen = []
    trials = pk.passkey_retrieval(model, tok, [400], depths=[0.2, 0.8], trials=1, cfg=cfg, backend="stock",
                                  on_trial=seen.append)
    assert len(trials) == 2 == len(seen)
    assert all(len(t.key) == 5 and isinstance(t.correct, bool) and math.isfinite(t.answer_nll) for t in trials)
    table = pk.accuracy_table(trials)
    assert set(table) == {(400, 0.2), (400, 0.8)} and all(0.0 <= a <= 1.0 for a in table.values())


def test_passkey_scoring_detects_a_retrieved_key():
    class Oracle(torch.nn.Module):
        """Predicts the next token of the key by looking it up in the prompt (a perfect retriever)."""

        def __init__(self, key_ids):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.key_ids = key_ids

        def forward(self, input_ids, logits_to_keep, use_cache=False):
            logits = torch.zeros(1, logits_to_keep, 128)
            for i, t in enumerate(self.key_ids):
                logits[0, i, t] = 30.0
            return type("Out", (), {"logits": logits})()

    tok = DigitTokenizer()
    prompt = pk.passkey_prompt(tok, 400, 0.5, "54321")
    answer, correct, nll = pk.score_prompt(Oracle(prompt.answer_ids.tolist()), prompt, tok)
    assert correct and answer == "54321" and nll < 1e-3
    answer, correct, _ = pk.score_prompt(Oracle([ord(c) for c in " 54329"]), prompt, tok)
    assert not correct and answer == "54329"
    # a wrong separator (":" instead of the space) is not judged: the digits are what counts
    answer, correct, _ = pk.score_prompt(Oracle([ord(c) for c in ":54321"]), prompt, tok)
    assert correct and answer == "54321"


# ---------------------------------------------------------------------------- plots and tables
def test_plots_and_tables(tmp_path):
    from longrope_triton.eval.plots import perplexity_table, plot_passkey_heatmap, plot_perplexity
    results = {"plain": {4096: 20.0, 16384: 300.0}, "yarn": {4096: 20.5, 16384: 25.0}}
    table = perplexity_table(results)
    assert "plain" in table and "300.000" in table
    png = plot_perplexity(results, tmp_path / "ppl.png", trained_length=8192)
    heat = plot_passkey_heatmap({(8192, 0.1): 1.0, (16384, 0.1): 0.5, (16384, 0.9): 0.0}, tmp_path / "pk.png")
    for p in (png, heat):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- fine-tuning
def test_pack_documents_positions_and_labels():
    from longrope_triton.train.finetune import pack_documents
    row = pack_documents([torch.arange(5), torch.arange(10, 13)])
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert row.labels.tolist() == [[-100, 1, 2, 3, 4, -100, 11, 12]]


def test_mixed_window_sampler():
    from longrope_triton.train.finetune import MixedWindowSampler
    cfg = LongRoPEConfig.pi(16, 32, 96)
    docs = [torch.randint(0, 96, (300,))]
    sampler = MixedWindowSampler(docs, cfg, long_tokens=64, short_tokens=16, shorts_per_row=2, seed=1)
    row = sampler.row(3)
    assert row.input_ids.shape == (1, 96) and sorted(row.doc_lengths) == [16, 16, 64]
    assert torch.equal(sampler.row(3).input_ids, row.input_ids)  # depends only on (seed, step)
    assert not torch.equal(sampler.row(4).input_ids, row.input_ids)
    with pytest.raises(ValueError, match="long_tokens"):
        MixedWindowSampler(docs, cfg, long_tokens=32)  # not beyond L_orig: would not train the long regime


@pytest.fixture
def torch_path(monkeypatch):
    """Run the patched attention on its PyTorch path even in CI's interpreter mode: the varlen
    kernels' forward and backward are tested in test_attention.py; here only the training loop is
    under test, and the interpreter would make each step ~10 s."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_finetune_loss_decreases_and_resume_is_identical(tmp_path, torch_path):
    from longrope_triton.train.finetune import finetune
    cfg = LongRoPEConfig.longrope(16, 32, 64, long_factor=[1.0 + 0.1 * i for i in range(8)], start_token=2)
    docs = [torch.arange(400) % 7]  # a learnable periodic sequence

    def fresh():
        torch.manual_seed(0)
        return tiny_llama(max_pos=32, vocab=16)

    # rows: one long document (40 > L_orig = 32: long factors) + one short (8: original RoPE)
    kw = dict(long_tokens=40, short_tokens=8, shorts_per_row=1, lr=1e-2, seed=0, save_every=1)
    full = finetune(fresh(), cfg, docs, steps=3, **kw)
    assert full.losses[-1] < full.losses[0] * 0.9
    ckpt = tmp_path / "ckpt"
    model = fresh()
    part = finetune(model, cfg, docs, steps=3, checkpoint_dir=ckpt, stop_after=1, **kw)
    assert part.step == 1 and (ckpt / "checkpoint.pt").is_file()
    assert not hasattr(model, "_longrope_patch")  # unpatched after training
    rest = finetune(fresh(), cfg, docs, steps=3, checkpoint_dir=ckpt, **kw)
    assert rest.resumed_from == 1 and rest.step == 3
    assert part.losses + rest.losses == pytest.approx(full.losses, rel=1e-4, abs=1e-5)
