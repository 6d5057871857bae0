"""End-to-end search on a real model: load, build the space and the fitness, search, write outputs.

Used by ``longrope-triton search``; callable from Python with the same arguments.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

from .. import parallel
from ..config import LongRoPEConfig
from .evolution import SearchParams, SearchResult, evolution_search
from .space import SearchSpace, extension_template, longrope2_space


def build_space(base: LongRoPEConfig, target: int, method: str = "longrope", previous: Optional[LongRoPEConfig] = None,
                short: bool = False, start_token_choices=None, lower=None, upper=None,
                step: float = 0.01) -> SearchSpace:
    """The search space for extending ``base`` to ``target`` tokens.

    * method "longrope": every dim searched in [1, 1.25 s], n_hat searched;
    * method "longrope2": critical-dimension constraint, n_hat = 0;
    * ``previous``: progressive extension from an already extended config (its long factors
      multiply the searched ones; s is target / previous target);
    * ``short``: short-context readjustment: search the short factors of ``previous`` (or of
      ``base``) at the original length.
    """
    kw = dict(lower=lower, upper=upper, step=step)
    if start_token_choices is not None:
        kw["start_token_choices"] = tuple(start_token_choices)
    if short:
        template = previous or base
        # n_hat is shared by both regimes: the short search must not move the long regime's.
        kw.setdefault("start_token_choices", (template.start_token,))
        return SearchSpace(template, regime="short", **kw)
    orig = base.original_max_position_embeddings
    if previous is not None:
        orig = previous.max_position_embeddings
    if target <= orig:
        raise ValueError(f"target length {target} must exceed the length already reached ({orig})")
    kw["stage_scale"] = target / orig
    template = extension_template(base.head_dim, base.base, base.original_max_position_embeddings, target,
                                  base.rotary_dim)
    if previous is not None:
        # lambda_final = lambda_search * lambda_previous (short factors kept from the previous stage)
        template = template.replace(short_factor=previous.short_factor)
        kw["base_factors"] = list(previous.long_factor)
    if method == "longrope2":
        space = longrope2_space(template, **kw)
    elif method == "longrope":
        space = SearchSpace(template, **kw)
    else:
        raise ValueError(f"method must be 'longrope' or 'longrope2', got {method!r}")
    return space


def write_outputs(result: SearchResult, output, extra: Optional[dict] = None) -> dict:
    """Write the best config (``cfg.to_json()``) to ``output`` and its HF rope_parameters dict to
    ``<output stem>.hf.json``; returns {'config': path, 'hf': path}."""
    out = pathlib.Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.config.to_json() + "\n", encoding="utf-8")
    hf = out.with_name(out.stem + ".hf.json")
    hf_dict = {"max_position_embeddings": result.config.max_position_embeddings,
               "rope_parameters": result.config.to_hf()}
    if extra:
        hf_dict["search"] = extra
    hf.write_text(json.dumps(hf_dict, indent=2) + "\n", encoding="utf-8")
    return {"config": str(out), "hf": str(hf)}


def run_search(model: str = "smollm2", text: str = "austen:search", target: int = 16384, method: str = "longrope",
               length: Optional[int] = None, score_tokens: int = 4096, windows: int = 1, needle_samples: int = 2,
               previous: Optional[str] = None, short: bool = False, params: Optional[SearchParams] = None,
               log: Optional[str] = None, output: Optional[str] = None, backend: str = "auto",
               start_token_choices=None, upper: Optional[float] = None, progress: bool = True,
               print_fn=print) -> SearchResult:
    """Search factors for ``model`` extended to ``target`` tokens and write them to ``output``.

    The fitness is perplexity of the last ``score_tokens`` tokens of ``windows`` windows of
    ``length`` (default: target) tokens of ``text`` (LongRoPE), or needle-driven perplexity on
    ``needle_samples`` samples (LongRoPE2). Under ``torchrun`` each rank runs this on its own
    device and the candidates are split over the ranks (:func:`evolution_search`).
    """
    from ..eval.common import load_model, load_texts, model_base_config
    from ..eval.perplexity import tokenize_documents
    from .evolution import SearchLog
    from .fitness import NeedleFitness, PerplexityFitness

    # under torchrun only rank 0 prints, shows progress and writes files (see longrope_triton.parallel)
    print_fn, progress = parallel.main_only(print_fn), progress and parallel.is_main()
    # cheap checks first: a bad log, text or factors file fails before the model is loaded
    if log:
        parallel.from_main(lambda: SearchLog.validate(log))
    texts = load_texts(text)
    prev_cfg = LongRoPEConfig.from_json(previous) if previous else None
    mdl, tok = load_model(model, device=parallel.device())
    base = model_base_config(mdl)
    space = build_space(base, target, method, prev_cfg, short, start_token_choices, upper=upper)
    eval_length = length or (base.original_max_position_embeddings if short else target)
    if eval_length > space.template.max_position_embeddings:
        raise ValueError(f"length {eval_length} exceeds the searched config's max_position_embeddings "
                         f"{space.template.max_position_embeddings}")
    docs = tokenize_documents(tok, list(texts.values()))
    model_id = f"{model} ({type(mdl).__name__})"
    if method == "longrope2":
        fitness = NeedleFitness(mdl, tok, docs, eval_length, samples=needle_samples, backend=backend, model_id=model_id)
    else:
        fitness = PerplexityFitness(mdl, docs, eval_length, score_tokens, windows, backend=backend, model_id=model_id)
    if params is None:
        params = SearchParams.longrope2() if method == "longrope2" else SearchParams()

    def report(ev):
        if progress:
            from tqdm.auto import tqdm
            tqdm.write(f"gen {ev.generation:>2} #{ev.index:<3} {ev.origin:<12} n_hat={ev.candidate.start_token:<3} "
                       f"fitness={ev.fitness:.4f} ({ev.seconds:.0f} s)")

    result = evolution_search(fitness, space, params, log_path=log, method=method, progress=progress,
                              on_evaluation=report)
    summary = {"method": method, "target": target, "fitness": result.fitness, "seeds": result.seed_fitness(),
               "evaluations": len(result.evaluations), "resumed": result.resumed, "generations": result.generations,
               "stopped_early": result.stopped_early, "log": log}
    if output and parallel.is_main():
        summary.update(write_outputs(result, output, {k: v for k, v in summary.items() if k != "log"}))
    print_fn(json.dumps(summary, indent=2))
    return result
