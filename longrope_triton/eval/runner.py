"""The ``eval``, ``passkey`` and ``export`` commands: load, run, print rows as they finish, write
JSON results and PNG plots. Callable from Python with the CLI's arguments."""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import time
from typing import Optional, Sequence

from ..config import LongRoPEConfig
from .methods import METHODS, method_config


def provenance() -> dict:
    """Versions, host and time, recorded with every result file."""
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def config_for(method: str, base: LongRoPEConfig, length: int, target: Optional[int], factors: dict) -> LongRoPEConfig:
    """The config one method runs at one length: PI/NTK/YaRN extend to ``target`` (default: the
    length itself, s = length / L_orig); LongRoPE(2) use their factor set. ValueError when the
    length is beyond what the config allows."""
    cfg = method_config(method, base, target or length, factors.get(method))
    if length > cfg.max_position_embeddings:
        raise ValueError(f"{method}: length {length} exceeds the config's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    return cfg


def precheck(methods: Sequence[str], lengths: Sequence[int], factors: dict, skip_too_long: bool = False):
    """Validate methods and (for factor sets) lengths before a model is loaded: fast, clear errors.
    Returns {method: max length} for the factor-set methods."""
    limits = {}
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r} (choose from {', '.join(METHODS)})")
        if m in ("longrope", "longrope2"):
            cfg = method_config(m, LongRoPEConfig(), 1, factors.get(m))
            limits[m] = cfg.max_position_embeddings
            too_long = [n for n in lengths if n > cfg.max_position_embeddings]
            if too_long and not skip_too_long:
                raise ValueError(f"{m}: length {too_long[0]} exceeds the factor set's max_position_embeddings "
                                 f"{cfg.max_position_embeddings}")
    if any(n < 2 for n in lengths):
        raise ValueError("lengths must be >= 2 tokens")
    return limits


def run_eval(model: str = "smollm2", text: str = "austen:heldout", methods: Sequence[str] = ("plain", "yarn"),
             lengths: Sequence[int] = (8192, 16384), target: Optional[int] = None,
             factors: str = "smollm2-135m-16k", factors2: str = "smollm2-135m-16k-longrope2",
             score_tokens: int = 4096, windows: int = 1, out: str = "longrope-eval", backend: str = "auto",
             skip_too_long: bool = False, aligned: bool = True, print_fn=print) -> dict:
    """Perplexity of each method at each length; writes ``<out>.json`` and ``<out>.png``.

    ``aligned`` (default): every length scores the same tokens (the windows of the longest length,
    shortened from the left), so lengths compare how much the extra context helps. Identical
    configs (PI/NTK/YaRN are plain RoPE up to L_orig) are evaluated once. Under ``torchrun`` the
    windows of all (method, length) cells are split over the ranks; rank 0 prints and writes.
    """
    from .. import parallel
    from .common import load_model, load_texts, model_base_config
    from .perplexity import PerplexityRun, aligned_windows, perplexities, sliding_windows, tokenize_documents
    from .plots import perplexity_table, plot_perplexity

    print_fn = parallel.main_only(print_fn)
    sets = {"longrope": factors, "longrope2": factors2}
    limits = precheck(methods, lengths, sets, skip_too_long)
    texts = load_texts(text)
    mdl, tok = load_model(model, device=parallel.device())
    base = model_base_config(mdl)
    names, docs = list(texts), tokenize_documents(tok, list(texts.values()))
    doc_lengths = [len(d) for d in docs]
    plan = aligned_windows(doc_lengths, lengths, score_tokens, windows) if aligned else {}
    # cells: (method, length, index of its run or None when skipped); identical configs share a run
    cells, runs, run_index, configs = [], [], {}, {}
    for method in methods:
        for length in lengths:
            if length > limits.get(method, length):
                cells.append((method, length, None))
                continue
            cfg = config_for(method, base, length, target, sets)
            configs[f"{method}@{length}"] = cfg.to_dict()
            key = (cfg.to_json(), length)
            if key not in run_index:
                run_index[key] = len(runs)
                spans = plan.get(length) or sliding_windows(doc_lengths, length, score_tokens, windows)
                runs.append(PerplexityRun(length, spans, cfg))
            cells.append((method, length, run_index[key]))

    results, rows = {m: {} for m in methods}, []
    finished, clock = {}, [time.perf_counter()]  # run index -> (result, seconds it took)

    def show_ready_cells():
        """Print (and record) the cells, in order, up to the first one whose run is not finished."""
        while cells and (cells[0][2] is None or cells[0][2] in finished):
            method, length, i = cells.pop(0)
            if i is None:
                print_fn(f"{method:<10} {length:>7}  skipped (beyond the factor set's {limits[method]})", flush=True)
                continue
            res, seconds = finished[i]
            finished[i] = (res, 0.0)  # a cell sharing the run took no time of its own
            results[method][length] = res.perplexity
            rows.append({"method": method, **res.to_dict(), "seconds": round(seconds, 1)})
            print_fn(f"{method:<10} {length:>7}  ppl {res.perplexity:10.3f}  ({res.tokens} tokens, "
                     f"{res.windows} windows, {seconds:.0f} s)", flush=True)

    def on_result(i, res):
        now = time.perf_counter()
        finished[i], clock[0] = (res, now - clock[0]), now
        show_ready_cells()

    show_ready_cells()
    perplexities(mdl, docs, runs, backend, progress=parallel.is_main(), on_result=on_result)
    print_fn("\n" + perplexity_table(results))
    record = {"model": model, "text": text, "documents": names, "score_tokens": score_tokens, "windows": windows,
              "aligned": aligned, "window_spans": {n: [[names[w.doc], w.start, w.start + w.length] for w in ws]
                                                   for n, ws in plan.items()},
              "target": target, "factors": sets, "rows": rows, "configs": configs, "provenance": provenance()}
    if parallel.is_main():
        paths = _write(out, record)
        png = plot_perplexity(results, f"{out}.png", title=f"{model}: perplexity of the last {score_tokens} tokens",
                              trained_length=base.original_max_position_embeddings)
        print_fn(f"results: {paths}\nplot: {png}")
    return record


def run_passkey(model: str = "smollm2", method: str = "longrope", factors: Optional[str] = None,
                lengths: Sequence[int] = (16384,), target: Optional[int] = None,
                depths: Sequence[float] = (0.1, 0.5, 0.9), trials: int = 1, mode: str = "score", seed: int = 0,
                out: str = "longrope-passkey", backend: str = "auto", print_fn=print) -> dict:
    """Passkey accuracy of one method by length x depth; writes ``<out>.json`` and a heat-map PNG.
    Under ``torchrun`` the trials are split over the ranks; rank 0 prints and writes."""
    from .. import parallel
    from .common import load_model, model_base_config
    from .passkey import accuracy_table, passkey_retrieval
    from .plots import format_table, plot_passkey_heatmap

    print_fn = parallel.main_only(print_fn)
    default_sets = {"longrope": "smollm2-135m-16k", "longrope2": "smollm2-135m-16k-longrope2"}
    sets = {method: factors or default_sets.get(method)}
    precheck([method], lengths, sets)
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError("depths must be in [0, 1]")
    mdl, tok = load_model(model, device=parallel.device())
    base = model_base_config(mdl)
    trials_out = []
    for length in lengths:
        cfg = config_for(method, base, length, target, sets)

        def show(t):
            print_fn(f"{method:<10} {t.length:>7}  depth {t.depth:4.0%}  key {t.key}  got {t.answer!r:>9}  "
                     f"{'OK' if t.correct else 'miss'}", flush=True)
        trials_out += passkey_retrieval(mdl, tok, [length], depths, trials, cfg, seed=seed + length, mode=mode,
                                        backend=backend, progress=parallel.is_main(), on_trial=show)
    acc = accuracy_table(trials_out)
    print_fn("\n" + format_table(["length", "depth", "accuracy"], [[n, f"{d:.0%}", a] for (n, d), a in acc.items()]))
    record = {"model": model, "method": method, "factors": sets.get(method), "mode": mode, "trials": trials,
              "accuracy": [{"length": n, "depth": d, "accuracy": a} for (n, d), a in acc.items()],
              "results": [t.__dict__ for t in trials_out], "provenance": provenance()}
    if parallel.is_main():
        paths = _write(out, record)
        png = plot_passkey_heatmap(acc, f"{out}.png", title=f"{model} / {method}: passkey retrieval")
        print_fn(f"results: {paths}\nplot: {png}")
    return record


def run_export(factors: str, model_dir: Optional[str] = None, model: Optional[str] = None,
               output: Optional[str] = None, print_fn=print) -> pathlib.Path:
    """Write a factor set into a Hugging Face model's config (``set_rope``), then save it.

    ``model_dir`` alone: config.json is updated in place (weights untouched, nothing loaded but the
    config). ``model`` (a spec such as 'smollm2') or ``model_dir`` with ``output``: the model is
    loaded and ``save_pretrained`` writes a complete extended model (and tokenizer) to ``output``.
    """
    from ..hf import set_rope
    from .methods import load_factors

    cfg = load_factors(factors)
    if (model_dir is None) == (model is None):
        raise ValueError("give exactly one of --model-dir (a Hugging Face model directory) or --model")
    if model_dir is not None and not (pathlib.Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"model directory {model_dir!r} has no config.json")
    if model_dir is not None and output is None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"):  # only the config changes: no weights are read
            skeleton = AutoModelForCausalLM.from_config(config)
        set_rope(skeleton, cfg)
        skeleton.config.save_pretrained(model_dir)
        target = pathlib.Path(model_dir)
    else:
        if output is None:
            raise ValueError("--output is required with --model")
        from .common import load_model
        mdl, tok = load_model(model or model_dir)
        set_rope(mdl, cfg)
        mdl.save_pretrained(output)
        tok.save_pretrained(output)
        target = pathlib.Path(output)
    print_fn(f"wrote {target / 'config.json'}: rope_type longrope, max_position_embeddings "
             f"{cfg.max_position_embeddings}, original {cfg.original_max_position_embeddings}")
    return target


def _write(out: str, record: dict) -> str:
    path = pathlib.Path(f"{out}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return str(path)
