"""End-to-end prefill: a stock transformers model (attn_implementation="sdpa") vs the same model
patched by ``longrope_triton.hf.patch_model``; wall time and peak memory of one forward.

Models: ``llama-1b`` (Llama-3.2-1B shapes, random weights, LongRoPE rope_parameters, bf16),
``smollm2-135m`` (``longrope_triton.models.load_smollm2``, needs the offline asset), and
``llama-tiny`` for the CPU smoke. The forward is ``model(ids, use_cache=False, logits_to_keep=1)``
under no_grad: prefill cost without the vocabulary projection of every token.
"""

from __future__ import annotations

import time

import torch

from .measure import _summary
from .providers import TORCH_DTYPES, Unavailable
from .registry import Case, bench_config

_MODELS: dict = {}  # name -> model, kept while consecutive prefill cases use it


def _llama(name: str):
    from transformers import LlamaConfig

    if name == "llama-1b":
        rope = bench_config(64, original=8192, maximum=128 * 1024).replace(base=500000.0)
        shape = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    else:
        rope = bench_config(16, original=64, maximum=1024)
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return LlamaConfig(max_position_embeddings=rope.max_position_embeddings, rope_parameters=rope.to_hf(),
                       attn_implementation="sdpa", **shape)


def get_model(name: str, device, dtype: torch.dtype):
    if name in _MODELS:
        return _MODELS[name]
    release_models()
    if name == "smollm2-135m":
        try:
            from longrope_triton.models import load_smollm2

            model, _ = load_smollm2(dtype=dtype, attn_implementation="sdpa")
        except (ImportError, FileNotFoundError, OSError) as exc:
            raise Unavailable(f"load_smollm2 failed: {str(exc).splitlines()[0]}") from None
        model = model.to(device)
    elif name in ("llama-1b", "llama-tiny"):
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(_llama(name)).to(dtype)
    else:
        raise ValueError(f"unknown model {name!r}")
    model.eval()
    model._bench_patched = False
    _MODELS[name] = model
    return model


def release_models():
    _MODELS.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _hf_api():
    """(patch_model, unpatch_model) from longrope_triton.hf, imported lazily."""
    try:
        from longrope_triton import hf
    except ImportError as exc:
        raise Unavailable(f"longrope_triton.hf is not available ({exc})") from None
    patch, unpatch = getattr(hf, "patch_model", None), getattr(hf, "unpatch_model", None)
    if patch is None or unpatch is None:
        raise Unavailable("longrope_triton.hf has no patch_model / unpatch_model yet")
    return patch, unpatch


def set_patched(model, patched: bool):
    if model._bench_patched == patched:
        return
    patch, unpatch = _hf_api()
    (patch if patched else unpatch)(model)
    model._bench_patched = patched


def build(provider: str, case: Case, device):
    """(fn, notes) running one prefill of ``case`` with ``provider`` ('hf_sdpa' or 'hf_patched')."""
    if provider == "hf_patched":
        _hf_api()  # unavailable before loading a 1B model for nothing
    model = get_model(case.model, device, TORCH_DTYPES[case.dtype])
    set_patched(model, provider == "hf_patched")
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (case.batch, case.seq_q), device=device, generator=gen)
    n_params = sum(p.numel() for p in model.parameters())

    def fn():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1)

    return fn, [f"{case.model}: {n_params / 1e6:.0f}M parameters, {model.config.num_hidden_layers} layers, "
                f"random weights" if case.model.startswith("llama") else f"{case.model}: {n_params / 1e6:.0f}M"]


def build_step(provider: str, case: Case, device):
    """(fn, notes) running one decode step of the patched model ``case.model`` against a StaticCache of
    ``case.seq_k`` slots filled with ``case.seq_k - 1`` tokens: 'patched_eager', 'patched_compiled'
    (model.forward compiled with fullgraph=True) or 'patched_cudagraph' (the step captured once in a
    CUDA graph and replayed). Every call writes the last slot and rewinds the cache by one token
    (StaticCache.crop: an in-place decrement of its device-side length, inside the graph for the
    CUDA-graph provider), so all repetitions time the same step. A decode step reads no tensor value
    on the host, which is what lets it be compiled whole and captured (docs/compile.md)."""
    from transformers import StaticCache

    from longrope_triton.hf import cache_argument

    if provider == "patched_cudagraph" and torch.device(device).type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA device")
    model = get_model(case.model, device, TORCH_DTYPES[case.dtype])
    set_patched(model, True)
    key = cache_argument()
    filled = case.seq_k - 1
    gen = torch.Generator(device=device).manual_seed(0)
    cache = StaticCache(config=model.config, max_cache_len=case.seq_k)
    prompt = torch.randint(0, model.config.vocab_size, (case.batch, filled), device=device, generator=gen)
    with torch.no_grad():
        model(input_ids=prompt, position_ids=torch.arange(filled, device=device).expand(case.batch, -1),
              **{key: cache}, logits_to_keep=1)
    ids = torch.randint(0, model.config.vocab_size, (case.batch, 1), device=device, generator=gen)
    position = torch.full((case.batch, 1), filled, device=device)
    forward = model.forward
    if provider == "patched_compiled":
        from .providers import _compiled

        forward = _compiled(model.forward, device)  # fullgraph is checked by tests/test_compile.py

    def step():
        with torch.no_grad():
            out = forward(input_ids=ids, position_ids=position, **{key: cache}, logits_to_keep=1).logits
            cache.crop(-1)
        return out

    notes = [f"{case.model}: {model.config.num_hidden_layers} layers, StaticCache of {case.seq_k} slots, "
             f"batch {case.batch}, one token per step"]
    if provider != "patched_cudagraph":
        return step, notes
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture: autotuning, table upload
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay, notes + ["captured once, replayed"]


def time_fixed(fn, device, reps: int) -> dict:
    """A few repetitions of a long call: CUDA events (or perf_counter on CPU), no L2 flush."""
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    timer = "cuda events" if torch.device(device).type == "cuda" else "time.perf_counter (CPU)"
    return _summary(times, f"{timer}, {reps} reps")
