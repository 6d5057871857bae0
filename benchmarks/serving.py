"""Continuous batching throughput: stock transformers vs the patched model (per-request regimes).

One workload, three providers, the same tiny longrope Llama (2 layers, hidden 64, head_dim 16,
original_max_position_embeddings 64, fp32, sdpa), greedy:

- ``stock``: ``model.generate_batch`` on the unpatched model (one regime per packed batch);
- ``patched``: the same after ``patch_model`` (each request in its own regime, the crossing
  re-prefills, regime-keyed block sharing), on the PyTorch path;
- ``patched_one_at_a_time``: the patched model's ``generate()``, one request after the other (what
  ``longrope-triton serve`` runs without ``--continuous-batching``): the baseline batching beats.

Workload: 16 requests with prompts of 20-120 tokens (6 past the switch, 6 crossing it while
decoding) and 32 new tokens each, all submitted at once. Reported per provider: wall time
(median of --reps runs after one warm-up run), generated tokens per second, forward steps, and how
many requests equal the same request run alone through the patched generate() (the semantics the
patched batching promises; stock batching mixes regimes).

On a CPU this measures the batching machinery and the PyTorch paths at a toy size, not kernels:
the per-step host work (scheduling, the paged cache's index tensors, the input checks) dominates.
``python -m benchmarks.serving [--reps N] [--threads N] [--out DIR]`` writes
``serving-<device>-<date>.json`` (docs/serving.md quotes it).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import os
import pathlib
import statistics
import time

import torch

from .measure import device_slug, provenance

ORIG, MAX_POS = 64, 512
PROMPTS = [20, 100, 40, 120, 60, 30, 90, 50] * 2
NEW_TOKENS = 32


def tiny_longrope_llama(max_pos: int = MAX_POS, new_tokens: int = NEW_TOKENS):
    """A tiny longrope Llama (head_dim 16, original_max 64), sdpa, no EOS, greedy; weights scaled so
    that the two regimes pick different tokens. tests/test_continuous_batching.py runs it too."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8,
                long_factor=[1.0 + 3 * i for i in range(8)], original_max_position_embeddings=ORIG)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                         max_position_embeddings=max_pos, rope_parameters=rope, bos_token_id=None,
                                         eos_token_id=None, pad_token_id=0, attn_implementation="sdpa"))
    with torch.no_grad():  # larger weights: the regimes then pick different tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None,
                                               pad_token_id=0)
    return model.eval()


def prompts() -> list:
    return [torch.randint(1, 100, (n,), generator=torch.Generator().manual_seed(100 + i)).tolist()
            for i, n in enumerate(PROMPTS)]


def cb_config():
    from transformers import ContinuousBatchingConfig

    fields = set(inspect.signature(ContinuousBatchingConfig).parameters)
    return ContinuousBatchingConfig(num_blocks=128, max_batch_tokens=512,
                                    **{"page_size" if "page_size" in fields else "block_size": 16})


def batched(model, requests: list) -> list:
    """Every request's generated tokens, through continuous batching."""
    outputs = model.generate_batch(requests, continuous_batching_config=cb_config(), progress_bar=False)
    return [o.generated_tokens for o in outputs.values()]


def one_at_a_time(model, requests: list) -> list:
    return [alone(model, ids) for ids in requests]


def alone(model, ids: list) -> list:
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(ids):].tolist()


def run(generate, model, requests: list, reps: int) -> dict:
    """Warm-up, then ``reps`` timed runs of ``generate(model, requests)``; the last run's tokens and
    forward count."""
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    times, tokens = [], None
    try:
        for rep in range(reps + 1):
            forwards.clear()
            start = time.perf_counter()
            tokens = generate(model, requests)
            if rep:
                times.append(time.perf_counter() - start)
    finally:
        hook.remove()
    generated = sum(len(t) for t in tokens)
    wall = statistics.median(times)
    return {"wall_s": round(wall, 4), "wall_s_all": [round(t, 4) for t in times], "generated_tokens": generated,
            "tokens_per_s": round(generated / wall, 1), "forward_steps": len(forwards), "tokens": tokens}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="timed runs per provider (after one warm-up run)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"), help="results directory")
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # the PyTorch path: the interpreter would time Python, not batching
    torch.set_num_threads(args.threads)
    from longrope_triton import patch_model

    requests = prompts()
    stock = tiny_longrope_llama()
    patched = patch_model(copy.deepcopy(stock))
    references = [alone(patched, ids) for ids in requests]
    results = {}
    for name, generate, model in (("stock", batched, stock), ("patched", batched, patched),
                                  ("patched_one_at_a_time", one_at_a_time, patched)):
        result = run(generate, model, requests, args.reps)
        result["equal_to_alone"] = sum(t == r for t, r in zip(result.pop("tokens"), references))
        results[name] = result
        print(f"{name:22s} {result['generated_tokens']} tokens in {result['wall_s']:.2f} s: "
              f"{result['tokens_per_s']:.0f} tok/s, {result['forward_steps']} steps, "
              f"{result['equal_to_alone']}/{len(requests)} requests equal their runs alone")
    meta = provenance("cpu")
    data = {"meta": meta, "what": "continuous batching (generate_batch) throughput, stock vs patched, tiny model",
            "workload": {"model": "tiny longrope Llama: 2 layers, hidden 64, 4/2 heads, head_dim 16, fp32, sdpa",
                         "original_max_position_embeddings": ORIG, "prompt_lengths": PROMPTS,
                         "new_tokens": NEW_TOKENS, "crossing_requests": sum(n <= ORIG < n + NEW_TOKENS
                                                                            for n in PROMPTS),
                         "long_prompts": sum(n > ORIG for n in PROMPTS), "threads": args.threads,
                         "paged_cache": "128 blocks of 16 tokens, 512 batch tokens"},
            "results": results,
            "patched_over_stock": round(results["patched"]["tokens_per_s"] / results["stock"]["tokens_per_s"], 3),
            "patched_over_one_at_a_time": round(results["patched"]["tokens_per_s"]
                                                / results["patched_one_at_a_time"]["tokens_per_s"], 3)}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serving-{device_slug(meta)}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
