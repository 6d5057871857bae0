"""transformers' continuous batching on patched models: every request in its own regime.

Tiny random-weight longrope models (2 layers, hidden 64, 4 query / 2 key-value heads, head_dim 16;
a Llama, and a Phi-3 that rotates half of each head), fp32 on CPU, greedy, no downloads, with
original_max_position_embeddings = 64 and factors far apart, so the short and long regimes give
different tokens. The reference of every request is the same request run alone through the patched
``generate()`` (batch 1, re-prefilled once when it crosses the switch): tokens equal, and the
logprobs continuous batching returns (``return_logprobs``) within 1e-4 of the log-softmax of
generate()'s scores. The steps each request shared are recorded from transformers' own batch
preparation (:func:`steps`), so the tests prove that the requests ran together.

Most tests run the PyTorch path (the integration logic is the same on both; the Triton interpreter
is slow); ``test_kernel_path`` runs the kernels under TRITON_INTERPRET=1. The last tests show stock
continuous batching mixing regimes, which is what the others guard against.
"""

import inspect
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.hf,  # also run with the oldest supported transformers
              pytest.mark.usefixtures("torch_path_quiet")]

from conftest import INTERPRETED  # noqa: E402
from benchmarks.serving import ORIG, tiny_longrope_llama  # noqa: E402 - the benchmark's tiny Llama
from transformers.generation.continuous_batching import input_outputs  # noqa: E402

import longrope_triton.hf.continuous as continuous  # noqa: E402
from longrope_triton import patch_model, unpatch_model  # noqa: E402

MAX_POS, VOCAB = 256, 100  # original_max_position_embeddings: ORIG (64), the benchmark model's
TOL = 1e-4
NEW = 12
# (prompt length, seed): short all along; long from its prompt; crossing while decoding (58 + 12);
# the boundary pair original_max - 1 and original_max (both cross at their first decoded token).
MIX = [(20, 1), (100, 2), (58, 3), (ORIG - 1, 4), (ORIG, 5)]


def make_model(family, max_pos=MAX_POS):
    """A tiny longrope causal LM, eval mode, sdpa attention (what continuous batching runs), no EOS: the
    serving benchmark's Llama, or a Phi-3 with partial rotary."""
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    if family != "phi3":
        return tiny_longrope_llama(max_pos=max_pos, new_tokens=NEW)
    torch.manual_seed(0)
    half = 4  # rotary_dim 8 of head_dim 16
    rope = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                short_factor=[1.0] * half, long_factor=[1.0 + 4 * i for i in range(half)])
    model = Phi3ForCausalLM(Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                       max_position_embeddings=max_pos, bos_token_id=None, eos_token_id=None,
                                       pad_token_id=0, attn_implementation="sdpa", rope_parameters=rope,
                                       original_max_position_embeddings=ORIG, partial_rotary_factor=0.5,
                                       sliding_window=None, initializer_range=0.1))
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=NEW, eos_token_id=None,
                                               pad_token_id=0)
    return model.eval()


def prompt(length, seed):
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, ids, new=NEW):
    """(tokens, logprobs) of the request run alone through generate(), greedy, batch 1."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    tokens = out.sequences[0, len(ids):].tolist()
    return tokens, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]


def cb_config(**overrides):
    """A small paged cache (1,024 tokens), logprobs on; the page size under its name in this release."""
    from transformers import ContinuousBatchingConfig

    fields = set(inspect.signature(ContinuousBatchingConfig).parameters)
    values = dict(num_blocks=64, max_batch_tokens=256, return_logprobs=True,
                  **{"page_size" if "page_size" in fields else "block_size": 16})
    values.update(overrides)
    return ContinuousBatchingConfig(**values)


@pytest.fixture
def steps(monkeypatch):
    """The batches continuous batching ran, as transformers prepared them: per step, a list of
    (request id, query tokens, long regime or None when no regime scheduler ran)."""
    record = []
    prepare = input_outputs.ContinuousBatchingIOs.prepare_batch_tensors

    def spy(self, requests_in_batch, *args, **kwargs):
        record.append([(f.state.request_id, getattr(f, "query_length", None) or len(f.state.tokens_to_process),
                        getattr(f.state, continuous._LONG_ATTR, None)) for f in requests_in_batch])
        return prepare(self, requests_in_batch, *args, **kwargs)

    monkeypatch.setattr(input_outputs.ContinuousBatchingIOs, "prepare_batch_tensors", spy)
    return record


def assert_equal_alone(output, reference, what):
    tokens, logprobs = reference
    assert output.error is None, f"{what}: {output.error}"
    assert output.generated_tokens == tokens, f"{what}: {output.generated_tokens} != alone {tokens}"
    worst = max(abs(a - b) for a, b in zip(output.logprobs, logprobs))
    assert len(output.logprobs) == len(logprobs) and worst <= TOL, f"{what}: logprobs {worst:.2e} from alone"


def first_steps(steps):
    """request id -> (query tokens, long) of its first step, and of every step that (re)prefilled it."""
    first, prefills = {}, {}
    for batch in steps:
        for rid, query, long in batch:
            first.setdefault(rid, (query, long))
            if query > 1:
                prefills.setdefault(rid, []).append((query, long))
    return first, prefills


def collect(manager, ids, timeout=120):
    """The final outputs of ``ids`` from a running manager."""
    outputs, start = {}, time.time()
    while len(outputs) < len(ids) and time.time() - start < timeout:
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            outputs[result.request_id] = result
    return outputs


# ---------------------------------------------------------------------------- generate_batch
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_mixed_regimes_equal_alone(family, steps):
    """Short, long, crossing and boundary requests batched together: each equals its run alone, and
    the batch provably mixed regimes in shared forwards, the crossings re-prefilled while others decoded."""
    model = patch_model(make_model(family))
    prompts = [prompt(n, seed) for n, seed in MIX]
    references = [alone(model, p) for p in prompts]
    outputs = list(model.generate_batch(prompts, continuous_batching_config=cb_config(), progress_bar=False).values())
    assert len(outputs) == len(prompts)
    for (n, _), output, reference in zip(MIX, outputs, references):
        assert_equal_alone(output, reference, f"{family} prompt {n}")

    ids = [o.request_id for o in outputs]
    assert any({long for *_, long in batch} == {True, False} for batch in steps), "no step mixed the two regimes"
    assert any(len(batch) == len(ids) for batch in steps), "the requests never shared a forward"
    first, prefills = first_steps(steps)
    assert [first[i][1] for i in ids] == [False, True, False, False, False]  # the regime of each prompt
    # The crossing requests (58 + 12, 63, 64) are re-prefilled once, long, over original_max + 1 tokens,
    # in a step where another request decodes; the others are never re-prefilled.
    for rid, (n, _) in zip(ids, MIX):
        long_prefills = [p for p in prefills[rid] if p[1]]
        assert long_prefills == ([(ORIG + 1, True)] if rid in ids[2:] else [(n, True)] if n > ORIG else []), prefills
    for rid in ids[2:]:
        step = next(b for b in steps if (rid, ORIG + 1, True) in b)
        assert any(q == 1 for r, q, _ in step if r != rid), f"the re-prefill of {rid} ran alone: {step}"


@pytest.mark.parametrize("window, path", [pytest.param(262144, "fused", id="window-out-of-reach-fused"),
                                          pytest.param(40, "fallback", id="window-in-reach-model-attention")])
def test_sliding_window_layers(window, path, monkeypatch):
    """Phi-3 with a sliding window (its long-context releases set 262144): the cache's sliding layers
    run the fused kernel while no key sequence reaches the window, else the model's own attention
    (transformers' masks over its rolling buffer), each request in its regime either way."""
    if path == "fallback" and tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 17):
        pytest.skip("transformers 5.5's own continuous batching differs from its generate() once a window is reached")
    import longrope_triton.hf.forward as forward

    paths = []
    paged_attention = forward.paged_attention

    def spy(*args, interface=None, **kwargs):
        paths.append("fused" if interface is None else "fallback")
        return paged_attention(*args, interface=interface, **kwargs)

    monkeypatch.setattr(forward, "paged_attention", spy)
    model = make_model("phi3")
    model.config.sliding_window = window
    model = patch_model(model)
    prompts = [prompt(n, seed) for n, seed in MIX]
    references = [alone(model, p) for p in prompts]
    paths.clear()
    outputs = list(model.generate_batch(prompts, continuous_batching_config=cb_config(), progress_bar=False).values())
    for (n, _), output, reference in zip(MIX, outputs, references):
        assert_equal_alone(output, reference, f"prompt {n}, window {window}")
    assert set(paths) == {path}, set(paths)


def test_chunked_prefill_keeps_the_admission_regime(steps):
    """A 100-token prompt split in chunks of at most 40 tokens: its first chunk ends below the switch,
    yet runs the long factors, as the whole prompt does alone."""
    model = patch_model(make_model("llama"))
    prompts = [prompt(100, 7), prompt(12, 8)]
    references = [alone(model, p) for p in prompts]
    outputs = list(model.generate_batch(prompts, continuous_batching_config=cb_config(max_batch_tokens=40),
                                        progress_bar=False).values())
    for output, reference, what in zip(outputs, references, ("long, chunked", "short")):
        assert_equal_alone(output, reference, what)
    chunks = [(q, long) for batch in steps for rid, q, long in batch if rid == outputs[0].request_id and q > 1]
    assert len(chunks) >= 3 and all(long for _, long in chunks), chunks
    assert sum(q for q, _ in chunks) == 100


# ---------------------------------------------------------------------------- the manager API
def test_manager_requests_added_while_others_decode(steps):
    """A decodes alone for a few tokens; then a long request B and a request C that crosses the switch
    join: each equals its run alone, and the streamed outputs of A and C (across its re-prefill) only
    ever extend."""
    model = patch_model(make_model("llama"))
    plan = [(prompt(20, 11), 40), (prompt(90, 12), 6), (prompt(50, 13), 20)]
    references = [alone(model, p, n) for p, n in plan]
    manager = model.init_continuous_batching(continuous_batching_config=cb_config())
    manager.start()
    try:
        first = manager.add_request(plan[0][0], max_new_tokens=plan[0][1], streaming=True)
        streamed, deadline = {first: []}, time.time() + 120
        while len(streamed[first]) < 3:
            assert time.time() < deadline and manager.is_running(), "A never streamed its first tokens"
            result = manager.get_result(request_id=first, timeout=5)
            if result is not None:
                streamed[first].append(result.generated_tokens[:])
        later = [manager.add_request(plan[1][0], max_new_tokens=plan[1][1]),
                 manager.add_request(plan[2][0], max_new_tokens=plan[2][1], streaming=True)]
        ids = [first, *later]
        streamed[later[1]] = []
        outputs = {}
        while len(outputs) < 3:
            result = manager.get_result(timeout=5)
            assert result is not None, "a request never finished"
            if result.request_id in streamed:
                streamed[result.request_id].append(result.generated_tokens[:])
            if result.is_finished():
                outputs[result.request_id] = result
    finally:
        manager.stop(block=True)
    for rid, reference, what in zip(ids, references, ("A (streamed)", "long, added later", "crossing, added later")):
        assert_equal_alone(outputs[rid], reference, what)
    for rid, stream in streamed.items():
        assert len(stream) == plan[ids.index(rid)][1] and all(b[:len(a)] == a and len(b) == len(a) + 1
                                                                for a, b in zip(stream, stream[1:])), stream
    assert any({rid for rid, *_ in batch} == set(ids) for batch in steps), "A, B and C never shared a step"
    _, prefills = first_steps(steps)
    assert prefills[later[1]][1:] == [(ORIG + 1, True)]  # C: 50 + 14 generated, re-prefilled at 65, long
    step = next(b for b in steps if (later[1], ORIG + 1, True) in b)
    assert (first, 1, False) in step, f"A did not decode beside C's re-prefill: {step}"


# ---------------------------------------------------------------------------- block sharing
@pytest.mark.parametrize("keyed", [pytest.param(True, id="keyed-by-regime"),
                                   pytest.param(False, id="unkeyed-differs")])
def test_block_sharing_never_crosses_regimes(keyed, steps, monkeypatch):
    """Four chats share a 40-token system prompt (two full 16-token pages): short, long, short, long,
    one after the other through one manager. Pages pass between requests of one regime, never across;
    with the keying switched off the long request reuses short pages and no longer equals alone."""
    if not keyed:
        monkeypatch.setattr(continuous, "_long_keys", lambda tokens: tokens)
    model = patch_model(make_model("llama"))
    system = prompt(40, 21)
    chats = [system + prompt(10, 22), system + prompt(60, 23), system + prompt(12, 24), system + prompt(70, 25)]
    references = [alone(model, c, 4) for c in chats]
    manager = model.init_continuous_batching(continuous_batching_config=cb_config())
    manager.start()
    try:
        outputs = []
        for chat in chats:  # one after the other: each finds the pages the previous ones left
            rid = manager.add_request(chat, max_new_tokens=4)
            outputs.append(collect(manager, [rid])[rid])
    finally:
        manager.stop(block=True)
    first, _ = first_steps(steps)
    processed = [first[o.request_id][0] for o in outputs]
    if not keyed:  # the long chat reuses the short one's pages: not what it computes alone
        assert processed[1] == len(chats[1]) - 32
        assert max(abs(a - b) for a, b in zip(outputs[1].logprobs, references[1][1])) > TOL
        return
    for output, reference, what in zip(outputs, references, ("short", "long", "short again", "long again")):
        assert_equal_alone(output, reference, what)
    assert processed[0] == len(chats[0]) and processed[1] == len(chats[1]), processed  # nothing shared across
    assert processed[2] == len(chats[2]) - 32 and processed[3] == len(chats[3]) - 32, processed  # same regime shares


# ---------------------------------------------------------------------------- bad input, failures
def test_too_long_request_rejected_at_admission_only():
    """prompt + max_new_tokens > max_position_embeddings: add_request raises a ValueError naming it;
    in generate_batch that request alone comes back failed, the others run."""
    model = patch_model(make_model("llama", max_pos=128))
    prompts = [prompt(20, 41), prompt(100, 42), prompt(80, 43)]
    references = {0: alone(model, prompts[0], 40), 2: alone(model, prompts[2], 40)}
    manager = model.init_continuous_batching(continuous_batching_config=cb_config())
    with pytest.raises(ValueError, match=r"prompt \(100 tokens\) plus max_new_tokens \(40\) exceed "
                                         r"max_position_embeddings \(128\)"):
        manager.add_request(prompts[1], max_new_tokens=40)
    outputs = list(model.generate_batch(prompts, max_new_tokens=40, continuous_batching_config=cb_config(),
                                        progress_bar=False).values())
    assert len(outputs) == 3
    assert outputs[1].error is not None and "max_position_embeddings (128)" in outputs[1].error
    assert outputs[1].generated_tokens == []
    for i in (0, 2):
        assert_equal_alone(outputs[i], references[i], f"request {i}")


POISON = (97, 5, 97)  # three tokens in a row: only ever in the culprit's prompt, never one decoded token


def test_step_failure_fails_only_the_culprit(steps):
    """A step that raises (here: any step holding the poison trigram) fails only the request that
    fails alone; the others are re-run, finish, and equal their runs alone."""
    prompts = [prompt(20, 31), prompt(70, 32), prompt(9, 33) + list(POISON) + prompt(9, 34), prompt(40, 35)]
    poison_ids = torch.tensor(POISON)

    def poisoned(ids):
        return ids.shape[-1] >= 3 and bool((ids.unfold(-1, 3, 1) == poison_ids).all(-1).any())

    assert [poisoned(torch.tensor(p)) for p in prompts] == [False, False, True, False]
    model = patch_model(make_model("llama"))
    references = {i: alone(model, prompts[i], 6) for i in (0, 1, 3)}

    def poison(module, args, kwargs):
        if kwargs.get("cu_seq_lens_q") is not None and poisoned(kwargs["input_ids"]):
            raise RuntimeError("injected failure: poison in this step")

    hook = model.register_forward_pre_hook(poison, with_kwargs=True)
    try:
        outputs = list(model.generate_batch(prompts, max_new_tokens=6, continuous_batching_config=cb_config(),
                                            progress_bar=False).values())
    finally:
        hook.remove()
    assert len(outputs) == 4
    assert outputs[2].error is not None and "injected failure" in outputs[2].error
    for i in (0, 1, 3):
        assert_equal_alone(outputs[i], references[i], f"request {i}")
    culprit = outputs[2].request_id
    assert [b for b in steps if any(r == culprit for r, *_ in b)][-1] == [(culprit, 21, False)]  # failed alone


# ---------------------------------------------------------------------------- kernels, configuration
@pytest.mark.skipif(not INTERPRETED, reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")
def test_kernel_path(monkeypatch):
    """The same semantics on the Triton kernels (interpreter): a short, a long and a crossing request."""
    model = patch_model(make_model("phi3"))
    prompts = [prompt(20, 51), prompt(70, 52), prompt(ORIG - 1, 53)]
    references = [alone(model, p, 4) for p in prompts]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    outputs = list(model.generate_batch(prompts, max_new_tokens=4, continuous_batching_config=cb_config(),
                                        progress_bar=False).values())
    for output, reference, what in zip(outputs, references, ("short", "long", "crossing")):
        assert_equal_alone(output, reference, what)


def test_configuration_errors_and_unpatch():
    model = patch_model(make_model("llama"))
    with pytest.raises(ValueError, match="batches synchronously"):
        model.init_continuous_batching(continuous_batching_config=cb_config(use_async_batching=True))
    with pytest.raises(ValueError, match="scheduler_type 'lifo'"):
        model.init_continuous_batching(continuous_batching_config=cb_config(scheduler_type="lifo"))
    unpatch_model(model)
    assert "init_continuous_batching" not in model.__dict__


@pytest.mark.parametrize("version, error", [("5.4.0", "needs transformers >= 5.5"), ("5.99.0", None)])
def test_transformers_versions_gated(version, error, monkeypatch):
    """Releases before the oldest tested are refused; newer ones run with a warning naming the tested ones."""
    monkeypatch.setattr("transformers.__version__", version)  # the module now imported under that name
    continuous._check_transformers.cache_clear()
    try:
        if error:
            with pytest.raises(RuntimeError, match=error):
                continuous._check_transformers()
        else:
            with pytest.warns(RuntimeWarning, match="tested with transformers 5.5, 5.17, 5.25"):
                continuous._check_transformers()
    finally:
        continuous._check_transformers.cache_clear()


# ---------------------------------------------------------------------------- stock continuous batching
def test_stock_batching_mixes_regimes(steps):
    """Unpatched, continuous batching picks one regime for the packed row: the 20-token request, short
    all along, runs the long factors beside a 100-token one and its tokens change, though it equals
    its run alone when batched alone (and the patched model's, above)."""
    model = make_model("llama")
    short, long = prompt(20, 1), prompt(100, 2)
    reference = alone(model, short)
    patched = alone(patch_model(make_model("llama")), short)
    assert patched[0] == reference[0] and patched[1] == pytest.approx(reference[1], abs=TOL)
    (by_itself,) = model.generate_batch([short], continuous_batching_config=cb_config(), progress_bar=False).values()
    assert_equal_alone(by_itself, reference, "short, batched alone")
    steps.clear()
    mixed, _ = model.generate_batch([short, long], continuous_batching_config=cb_config(),
                                    progress_bar=False).values()
    assert all(len(batch) == 2 for batch in steps), "the two requests did not share every step"
    assert mixed.generated_tokens != reference[0], "stock batching did not change the short request"


def test_stock_batching_differs_from_single_runs_on_the_mix(steps):
    """The mix of test_mixed_regimes_equal_alone through stock continuous batching: requests differ
    from the patched single runs (which the patched batching matches exactly)."""
    prompts = [prompt(n, seed) for n, seed in MIX]
    patched = patch_model(make_model("phi3"))
    references = [alone(patched, p) for p in prompts]
    outputs = list(make_model("phi3").generate_batch(prompts, continuous_batching_config=cb_config(),
                                                     progress_bar=False).values())
    differ = [o.generated_tokens != r[0] for o, r in zip(outputs, references)]
    assert differ[0], "the short request was not changed by its long neighbours"
    assert sum(differ) >= 2, differ
