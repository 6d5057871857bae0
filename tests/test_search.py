"""Tests of the LongRoPE / LongRoPE2 evolutionary search (longrope_triton.search).

Most use a cheap synthetic fitness (distance of the long factors to a hidden target), so the
whole search logic -- constraints, operators, seeding, dedup, early stop, the resumable log --
runs in milliseconds. One test runs a real PerplexityFitness on a tiny random Llama.
"""

import json
import math
import random

import pytest
import torch

from longrope_triton.config import LongRoPEConfig, critical_dimension, ntk_factors
from longrope_triton.search import (SearchLogError, SearchParams, SearchSpace, evolution_search, extension_template,
                                    longrope2_space)
from longrope_triton.search.run import build_space

SMALL = dict(population=8, iterations=4, parents=4, mutations=2, crossovers=2)


def template(head_dim=16, orig=64, target=256, base=10000.0):
    return extension_template(head_dim, base, orig, target)


class TargetFitness:
    """|long_factor - target| summed, plus a small n_hat preference; counts calls; can 'die'."""

    def __init__(self, target, die_after=None):
        self.target, self.calls, self.die_after, self.seen = target, 0, die_after, []

    def describe(self):
        return {"kind": "synthetic", "target": self.target}

    def __call__(self, cfg):
        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.seen.append((tuple(cfg.long_factor), cfg.start_token))
        return sum(abs(a - b) for a, b in zip(cfg.long_factor, self.target)) + 0.001 * cfg.start_token


def ramp(n, lo, hi):
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


# ---------------------------------------------------------------------------- operators
@pytest.mark.parametrize("seed", range(5))
def test_mutation_respects_bounds_grid_and_monotonicity(seed):
    space = SearchSpace(template())
    rng = random.Random(seed)
    cand = space.seeds()["ntk"]
    for _ in range(200):
        cand = space.mutate(cand, rng, probability=0.3)
        assert space.is_valid(cand), cand
        assert all(space.lower <= x <= space.upper for x in cand.factors)
        assert all(a <= b for a, b in zip(cand.factors, cand.factors[1:]))
        assert cand.start_token in space.start_token_choices


def test_mutation_moves_on_the_step_grid():
    space = SearchSpace(template(), start_token_choices=(0,))
    parent = space.candidate([2.0] * space.n_dims)
    rng = random.Random(0)
    for _ in range(50):
        child = space.mutate(parent, rng, probability=1.0)
        for x in child.factors:  # from 2.0 by whole steps of 0.01
            assert abs((x - 2.0) / 0.01 - round((x - 2.0) / 0.01)) < 1e-6


def test_mutation_probability_zero_and_one():
    space = SearchSpace(template())
    parent = space.seeds()["pi"]
    rng = random.Random(0)
    assert space.mutate(parent, rng, probability=0.0) == parent
    changed = [space.mutate(parent, rng, probability=1.0) != parent for _ in range(20)]
    assert all(changed)


def test_crossover_takes_genes_from_both_parents_and_stays_valid():
    space = SearchSpace(template(), start_token_choices=(0, 4))
    a = space.candidate([1.0] * space.n_dims, 0)
    b = space.candidate([5.0] * space.n_dims, 4)
    rng = random.Random(1)
    children = [space.crossover(a, b, rng, probability=0.15) for _ in range(200)]
    assert all(space.is_valid(c) for c in children)
    from_b = sum(c.factors.count(5.0) for c in children) / (200 * space.n_dims)
    # running-max repair means a b-gene lifts everything after it: at least the 15% rate
    assert 0.15 <= from_b < 1.0
    assert any(c.start_token == 4 for c in children) and any(c.start_token == 0 for c in children)
    assert space.crossover(a, b, rng, probability=0.0) == a


def test_seeds_are_pi_ntk_yarn_inside_the_space():
    t = template()
    space = SearchSpace(t)
    seeds = space.seeds()
    assert set(seeds) == {"pi", "ntk", "yarn"}
    assert seeds["pi"].factors == (t.scale,) * space.n_dims
    assert list(seeds["ntk"].factors) == pytest.approx(ntk_factors(t.rotary_dim, t.scale), abs=1e-6)
    assert all(space.is_valid(c) for c in seeds.values())
    assert space.lower == 1.0 and space.upper == pytest.approx(1.25 * t.scale)


def test_longrope2_space_critical_dimension_constraint():
    t = extension_template(64, 1e5, 8192, 16384)
    space = longrope2_space(t)
    d_cd = critical_dimension(64, 1e5, 8192)
    assert space.first_dim == d_cd and space.n_dims == 32 - d_cd
    assert space.lower == t.scale and space.start_token_choices == (0,)
    rng = random.Random(0)
    cand = space.seeds()["pi"]
    for _ in range(100):
        cand = space.mutate(cand, rng)
        cfg = space.to_config(cand)
        assert cfg.long_factor[:d_cd] == pytest.approx(ntk_factors(64, t.scale)[:d_cd])  # NTK below d_cd
        upper = cfg.long_factor[d_cd:]
        assert min(upper) >= t.scale and upper == sorted(upper)  # searched part >= s, non-decreasing
        assert cfg.start_token == 0


def test_progressive_extension_multiplies_previous_factors():
    base = LongRoPEConfig(head_dim=16, base=10000.0, original_max_position_embeddings=64,
                          max_position_embeddings=64)
    previous = LongRoPEConfig.longrope(16, 64, 256, long_factor=ramp(8, 1.0, 4.0), start_token=4)
    space = build_space(base, 1024, previous=previous)
    assert space.scale == pytest.approx(4.0)  # 1024 / 256: the new stage's ratio
    cand = space.candidate([2.0] * 8)
    cfg = space.to_config(cand)
    assert cfg.long_factor == pytest.approx([2.0 * x for x in previous.long_factor])
    assert cfg.original_max_position_embeddings == 64 and cfg.max_position_embeddings == 1024


def test_short_readjustment_searches_the_short_factors():
    previous = LongRoPEConfig.longrope(16, 64, 256, long_factor=ramp(8, 1.0, 4.0), start_token=12)
    space = build_space(previous, 256, previous=previous, short=True)
    assert space.regime == "short" and space.scale == 1.0 and space.upper == pytest.approx(1.25)
    cfg = space.to_config(space.candidate([1.1] * 8))
    assert cfg.short_factor == pytest.approx([1.1] * 8) and cfg.long_factor == previous.long_factor
    # n_hat belongs to both regimes: seeds, mutants and crossovers of the short search keep the long one's
    rng = random.Random(0)
    seeds = list(space.seeds().values())
    children = [space.mutate(seeds[0], rng, probability=1.0) for _ in range(20)]
    children += [space.crossover(children[i], children[i + 1], rng, probability=0.5) for i in range(10)]
    assert {c.start_token for c in seeds + children} == {12}
    assert {space.to_config(c).start_token for c in children} == {12}


# ---------------------------------------------------------------------------- search
def test_search_improves_on_the_seeds_and_is_reproducible():
    space = SearchSpace(template())
    target = ramp(8, 1.0, 4.5)
    r1 = evolution_search(TargetFitness(target), space, SearchParams(**SMALL, seed=3))
    r2 = evolution_search(TargetFitness(target), space, SearchParams(**SMALL, seed=3))
    r3 = evolution_search(TargetFitness(target), space, SearchParams(**SMALL, seed=4))
    assert r1.fitness < min(r1.seed_fitness().values())
    assert [e.candidate for e in r1.evaluations] == [e.candidate for e in r2.evaluations]
    assert [e.candidate for e in r1.evaluations] != [e.candidate for e in r3.evaluations]
    assert r1.config == space.to_config(r1.best.candidate)


def test_no_candidate_is_evaluated_twice():
    space = SearchSpace(template(), start_token_choices=(0,))
    fit = TargetFitness(ramp(8, 1.0, 4.5))
    evolution_search(fit, space, SearchParams(population=16, iterations=10, parents=8, mutations=4, crossovers=4))
    assert len(fit.seen) == len(set(fit.seen))


def test_tiny_space_runs_out_of_new_candidates_without_looping():
    # 3 dims in [1, 1.02]: a few dozen non-decreasing candidates reachable (grid of 0.01 from the
    # seeds' values), fewer than the 50 draws asked for
    t = extension_template(6, 10000.0, 64, 65)
    space = SearchSpace(t, upper=1.02, start_token_choices=(0,))
    fit = TargetFitness([1.01] * 3)
    res = evolution_search(fit, space, SearchParams(population=20, iterations=3, parents=5, mutations=5, crossovers=5,
                                                    max_redraws=20))
    assert len(fit.seen) == len(set(fit.seen)) < 20 + 3 * 10
    assert res.fitness == pytest.approx(0.0)


def test_early_stop():
    space = SearchSpace(template())
    constant = lambda cfg: 1.0  # noqa: E731 - nothing ever improves
    res = evolution_search(constant, space, SearchParams(**{**SMALL, "iterations": 50}, patience=3))
    assert res.stopped_early and res.generations == 3  # 3 iterations without improvement
    res = evolution_search(constant, space, SearchParams(**{**SMALL, "iterations": 5}, patience=20))
    assert not res.stopped_early and res.generations == 5


def test_defaults_match_the_papers():
    p = SearchParams()
    assert (p.population, p.iterations, p.parents, p.mutations, p.crossovers) == (64, 40, 32, 16, 16)
    assert (p.mutation_probability, p.crossover_probability, p.tolerance, p.patience) == (0.3, 0.15, 1e-3, 20)
    p2 = SearchParams.longrope2()
    assert (p2.population, p2.iterations) == (128, 60)
    space = SearchSpace(template())
    assert space.step == 0.01
    assert space.start_token_choices == (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 48, 64, 128, 256)


# ---------------------------------------------------------------------------- log and resume
def test_log_has_one_line_per_evaluation(tmp_path):
    log = tmp_path / "search.jsonl"
    fit = TargetFitness(ramp(8, 1.0, 4.5))
    res = evolution_search(fit, SearchSpace(template()), SearchParams(**SMALL), log_path=log)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["fitness"] == fit.describe()
    assert len(lines) - 1 == fit.calls == len(res.evaluations)
    assert {r["origin"] for r in lines[1:4]} == {"seed:pi", "seed:ntk", "seed:yarn"}


@pytest.mark.parametrize("die_after", [1, 5, 9, 13])
def test_resume_after_kill_gives_identical_result_without_reevaluation(tmp_path, die_after):
    space, params = SearchSpace(template()), SearchParams(**SMALL, seed=7)
    target = ramp(8, 1.0, 4.5)
    reference = evolution_search(TargetFitness(target), space, params)

    log = tmp_path / "search.jsonl"
    dying = TargetFitness(target, die_after=die_after)
    with pytest.raises(KeyboardInterrupt):
        evolution_search(dying, space, params, log_path=log)
    assert len(log.read_text().splitlines()) == 1 + die_after  # every finished evaluation is on disk

    resumed_fit = TargetFitness(target)
    resumed = evolution_search(resumed_fit, space, params, log_path=log)
    assert resumed.resumed == die_after
    assert resumed_fit.calls == len(reference.evaluations) - die_after  # nothing evaluated twice
    assert set(dying.seen).isdisjoint(resumed_fit.seen)
    assert [(e.candidate, e.fitness) for e in resumed.evaluations] == \
        [(e.candidate, e.fitness) for e in reference.evaluations]
    assert resumed.config == reference.config


def test_resume_of_finished_log_evaluates_nothing_and_can_extend(tmp_path):
    space, log = SearchSpace(template()), tmp_path / "s.jsonl"
    target = ramp(8, 1.0, 4.5)
    first = evolution_search(TargetFitness(target), space, SearchParams(**SMALL), log_path=log)
    again = TargetFitness(target)
    second = evolution_search(again, space, SearchParams(**SMALL), log_path=log)
    assert again.calls == 0 and second.config == first.config
    more = TargetFitness(target)  # more iterations: the stopping parameters may change on resume
    longer = evolution_search(more, space, SearchParams(**{**SMALL, "iterations": 6}), log_path=log)
    assert more.calls == 2 * (SMALL["mutations"] + SMALL["crossovers"])
    assert longer.fitness <= first.fitness


def test_truncated_last_line_is_dropped(tmp_path):
    space, params, log = SearchSpace(template()), SearchParams(**SMALL), tmp_path / "s.jsonl"
    target = ramp(8, 1.0, 4.5)
    with pytest.raises(KeyboardInterrupt):
        evolution_search(TargetFitness(target, die_after=4), space, params, log_path=log)
    text = log.read_text()
    log.write_text(text + '{"type": "eval", "generation": 0, "ind')  # killed mid-write
    fit = TargetFitness(target)
    res = evolution_search(fit, space, params, log_path=log)
    assert res.resumed == 4
    assert all(json.loads(x) for x in log.read_text().splitlines())


def test_corrupt_log_is_a_clear_error(tmp_path):
    space, params, log = SearchSpace(template()), SearchParams(**SMALL), tmp_path / "s.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evolution_search(TargetFitness([2.0] * 8, die_after=3), space, params, log_path=log)
    lines = log.read_text().splitlines()
    lines[2] = "this is not json"
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(SearchLogError, match=r"s.jsonl:3: corrupt"):
        evolution_search(TargetFitness([2.0] * 8), space, params, log_path=log)

    log.write_text('{"hello": 1}\n')
    with pytest.raises(SearchLogError, match="no header"):
        evolution_search(TargetFitness([2.0] * 8), space, params, log_path=log)


@pytest.mark.parametrize("change", ["target", "fitness", "params", "seed"])
def test_mismatched_log_is_a_clear_error(tmp_path, change):
    space, params, log = SearchSpace(template()), SearchParams(**SMALL), tmp_path / "s.jsonl"
    evolution_search(TargetFitness([2.0] * 8, die_after=None), space, params, log_path=log)
    fit = TargetFitness([2.0] * 8)
    if change == "target":
        space = SearchSpace(template(target=512))
    elif change == "fitness":
        fit = TargetFitness([3.0] * 8)
    elif change == "params":
        params = SearchParams(**{**SMALL, "population": 10})
    else:
        params = SearchParams(**SMALL, seed=1)
    with pytest.raises(SearchLogError, match="different search"):
        evolution_search(fit, space, params, log_path=log)
    assert fit.calls == 0


def test_non_finite_fitness_is_logged_and_ranked_last(tmp_path):
    space, log = SearchSpace(template()), tmp_path / "s.jsonl"

    def fitness(cfg):
        return math.nan if cfg.long_factor[0] > 1.5 else float(sum(cfg.long_factor))

    res = evolution_search(fitness, space, SearchParams(**SMALL), log_path=log)
    assert math.isfinite(res.fitness)
    assert "Infinity" in log.read_text()

    def fitness(cfg):  # noqa: F811 - same name, so the log header matches
        pytest.fail("re-evaluated")

    again = evolution_search(fitness, space, SearchParams(**SMALL), log_path=log)
    assert again.config == res.config


# ---------------------------------------------------------------------------- real fitness on a tiny model
def tiny_llama(max_pos=128):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      rope_theta=10000.0)
    return LlamaForCausalLM(cfg).eval()


def test_perplexity_fitness_search_on_tiny_llama(tmp_path):
    from longrope_triton.search.fitness import PerplexityFitness
    model = tiny_llama(max_pos=32)
    docs = [torch.randint(0, 96, (200,)), torch.randint(0, 96, (150,))]
    fit = PerplexityFitness(model, docs, length=64, score_tokens=16, windows=2, backend="stock")
    assert len(fit.describe()["windows"]) == 2
    space = SearchSpace(extension_template(16, 10000.0, 32, 64), start_token_choices=(0, 2))
    params = SearchParams(population=4, iterations=1, parents=2, mutations=2, crossovers=0)
    res = evolution_search(fit, space, params, log_path=tmp_path / "s.jsonl")
    assert math.isfinite(res.fitness) and 1.0 < res.fitness < 1000
    assert res.config.max_position_embeddings == 64 and len(res.evaluations) == 6
    # another model (same data) cannot resume this log
    other = PerplexityFitness(tiny_llama(max_pos=32).float(), docs, 64, 16, 2, backend="stock", model_id="other")
    with pytest.raises(SearchLogError, match="fitness"):
        evolution_search(other, space, params, log_path=tmp_path / "s.jsonl")


def test_fused_and_stock_backends_agree_on_tiny_llama():
    from longrope_triton.search.fitness import PerplexityFitness
    model = tiny_llama(max_pos=32)
    docs = [torch.randint(0, 96, (80,))]
    cfg = LongRoPEConfig.longrope(16, 32, 64, long_factor=ramp(8, 1.0, 2.5), start_token=4, base=10000.0)
    stock = PerplexityFitness(model, docs, 64, 16, 1, backend="stock")(cfg)
    fused = PerplexityFitness(model, docs, 64, 16, 1, backend="fused")(cfg)
    assert fused == pytest.approx(stock, rel=1e-4)


def test_needle_fitness_longrope2_search_on_tiny_llama(tmp_path):
    from longrope_triton.search.fitness import NeedleFitness

    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [min(ord(c), 95) for c in text]}

    model = tiny_llama(max_pos=64)
    docs = [torch.randint(32, 95, (400,))]
    fit = NeedleFitness(model, CharTokenizer(), docs, length=160, samples=2, depths=(0.2, 0.8), backend="stock")
    assert [len(s.input_ids) + len(s.answer_ids) - 1 for s in fit.samples] == [160, 160]
    t = extension_template(16, 10000.0, 64, 160)
    space = longrope2_space(t)
    res = evolution_search(fit, space, SearchParams(population=3, iterations=1, parents=2, mutations=1, crossovers=1),
                           log_path=tmp_path / "n.jsonl", method="longrope2")
    assert math.isfinite(res.fitness) and res.fitness > 1.0
    d_cd = space.first_dim
    assert min(res.config.long_factor[d_cd:]) >= t.scale and res.config.start_token == 0
