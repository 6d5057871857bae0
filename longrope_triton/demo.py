"""``longrope-triton demo``: context extension of SmolLM2-135M (trained context 8K) to 16K on a CPU.

Quick mode (the default, ~6-10 minutes on 2 CPU cores, no GPU, no network): on a window of
``length`` (16K) tokens of a held-out Jane Austen novel, the perplexity of its last
``score_tokens`` tokens

1. with only the model's trained 8K of context before them (its native window: the baseline a
   context extension has to beat by using the extra context),
2. with all 16K tokens under plain RoPE (positions the model never saw: it breaks down),
3. with all 16K tokens under the LongRoPE factors shipped in ``longrope_triton/factors/``,

then a passkey retrieval at 16K under the LongRoPE factors. Each row prints when it finishes;
a PNG plot and a JSON file are written at the end.

``--full``: every method (plain, PI, NTK, YaRN, LongRoPE, LongRoPE2) at 4K/8K/16K/32K and a
passkey grid -- hours on a CPU, minutes on a GPU. Factor sets only cover the length they were
searched for; longer lengths are skipped for them.
"""

from __future__ import annotations

import json
import pathlib
import time

FACTORS = "smollm2-135m-16k"
FACTORS2 = "smollm2-135m-16k-longrope2"


def _say(text: str):
    print(text, flush=True)


def run_demo(full: bool = False, length: int = 16384, score_tokens: int = 2048, novel: str = "emma",
             out_dir: str = "longrope-demo", backend: str = "auto") -> dict:
    """Run the demo; returns the results dict (also written to ``<out_dir>/demo.json``)."""
    if full:
        return run_full(out_dir=out_dir, novel=novel, backend=backend)
    from . import data
    from .eval.common import load_model, model_base_config
    from .eval.methods import factors_path, method_config
    from .eval.passkey import passkey_retrieval
    from .eval.perplexity import PerplexityResult, tokenize_documents, window_nll
    from .eval.plots import plot_bars
    from .eval.rope import use_rope
    from .eval.runner import provenance

    if novel not in data.HELDOUT_NOVELS:
        raise ValueError(f"--novel must be a held-out novel ({', '.join(data.HELDOUT_NOVELS)}); the search used "
                         f"{', '.join(data.SEARCH_NOVELS)}")
    factors = method_config("longrope", _dummy_base(), length, str(factors_path(FACTORS)))
    if length > factors.max_position_embeddings:
        raise ValueError(f"length {length} exceeds the shipped factors' max_position_embeddings "
                         f"{factors.max_position_embeddings}")
    if not 0 < score_tokens < length // 2:
        raise ValueError(f"--score-tokens must be in (0, {length // 2})")
    out = pathlib.Path(out_dir)
    t0 = time.perf_counter()
    _say(f"longrope-triton demo: SmolLM2-135M, trained context 8K, extended to {length} tokens (CPU)")
    _say("loading SmolLM2-135M-Instruct (offline GGUF) ...")
    model, tok = load_model("smollm2")
    base = model_base_config(model)
    orig = base.original_max_position_embeddings
    text = data.austen_novels()[novel]
    (ids,) = tokenize_documents(tok, [text])
    start = max(0, (len(ids) - length) // 2)  # a window from the middle of the novel
    window = ids[start: start + length]
    if len(window) < length:
        raise ValueError(f"{novel} has only {len(ids)} tokens, fewer than {length}")
    _say(f"held-out text: {novel} ({len(ids)} tokens); scoring its tokens {start + length - score_tokens}-"
         f"{start + length - 1} (the last {score_tokens} of a {length}-token window)\n")
    _say(f"{'setting':<44} {'context':>8} {'perplexity':>11} {'time':>7}")

    rows = []

    def row(name, context, cfg):
        t = time.perf_counter()
        ctx = use_rope(model, cfg, backend)
        with ctx:
            nll, n = window_nll(model, window[-context:], score_tokens)
        seconds = time.perf_counter() - t
        res = PerplexityResult(context, _exp(nll / n), nll / n, n, 1)
        rows.append({"setting": name, "context": context, "perplexity": res.perplexity, "nll": res.nll,
                     "tokens": n, "seconds": round(seconds, 1)})
        _say(f"{name:<44} {context:>8} {res.perplexity:>11.3f} {seconds:>6.0f}s")
        return res

    plain = method_config("plain", base, length)
    row(f"native {orig // 1024}K window (no extension)", orig, plain)
    row("plain RoPE, 16K window", length, plain)
    row(f"LongRoPE ({FACTORS}.json), 16K window", length, factors)

    native, plain_16k, longrope_16k = (r["perplexity"] for r in rows)
    _say(f"\n-> at {length} tokens plain RoPE is {plain_16k / native:.1f}x worse than the native window; LongRoPE is "
         f"{plain_16k / longrope_16k:.1f}x better than plain RoPE and {100 * (longrope_16k / native - 1):+.1f}% vs the "
         "native 8K window on the same tokens")

    trials = passkey_retrieval(model, tok, [length], depths=[0.5], trials=1, cfg=factors, seed=1, backend=backend)
    t = trials[0]
    _say(f"\npasskey at {length} tokens (key in the middle), LongRoPE factors: key {t.key}, model answers "
         f"{t.answer!r} -> {'retrieved' if t.correct else 'missed'}")

    ppl = {r["setting"].split(",")[0].split(" (")[0]: r["perplexity"] for r in rows}
    png = plot_bars(ppl, out / "demo.png",
                    title=f"SmolLM2-135M on {novel}: last {score_tokens} tokens\n(trained on 8K; 16K windows)")
    record = {"novel": novel, "window_start": start, "length": length, "score_tokens": score_tokens, "rows": rows,
              "passkey": t.__dict__, "factors": factors.to_dict(), "seconds": round(time.perf_counter() - t0, 1),
              "provenance": provenance()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _say(f"\nplot: {png}\nresults: {out / 'demo.json'}  (total {record['seconds']:.0f} s)")
    return record


def run_full(out_dir: str = "longrope-demo", novel: str = "emma", backend: str = "auto") -> dict:
    """Every method at 4K/8K/16K/32K and a passkey grid (slow on a CPU)."""
    from .eval.methods import shipped_factor_sets
    from .eval.runner import run_eval, run_passkey

    out = pathlib.Path(out_dir)
    methods = ["plain", "pi", "ntk", "yarn", "longrope"]
    if FACTORS2 in shipped_factor_sets():
        methods.append("longrope2")
    lengths = [4096, 8192, 16384, 32768]
    record = run_eval(text=f"austen:{novel}", methods=methods, lengths=lengths, factors=FACTORS, factors2=FACTORS2,
                      score_tokens=2048, windows=1, out=str(out / "full-perplexity"), backend=backend,
                      skip_too_long=True)
    passkeys = {}
    for method in [m for m in methods if m != "plain"]:
        passkeys[method] = run_passkey(method=method, lengths=[8192, 16384], depths=[0.1, 0.3, 0.5, 0.7, 0.9],
                                       trials=2, out=str(out / f"full-passkey-{method}"), backend=backend)
    return {"perplexity": record, "passkey": passkeys}


def _dummy_base():
    from .config import LongRoPEConfig
    return LongRoPEConfig()


def _exp(x: float) -> float:
    import math
    return math.exp(x) if x < 700 else math.inf
