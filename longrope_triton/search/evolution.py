"""LongRoPE evolutionary search with a crash-safe, resumable JSON-lines log.

Algorithm (LongRoPE paper, Alg. 1; defaults of DESIGN §5)::

    P = seeds (PI, NTK, YaRN) + mutations of them             (population candidates)
    repeat iterations times:
        parents  = the best ``parents`` of P
        children = ``mutations`` mutants + ``crossovers`` crossovers of random parents
        P        = parents + children
    stop early when the best fitness moved < ``tolerance`` for ``patience`` iterations

Lower fitness is better (perplexity). Candidates already evaluated (or already generated in the
same generation) are skipped: a duplicate is redrawn up to ``max_redraws`` times, then dropped.

Ranks (``torchrun``, see :mod:`longrope_triton.parallel`): each generation's candidates that
are not in the log are split over the ranks (round-robin, in rounds of one candidate per rank)
and their fitness values gathered, so every rank holds the same population; rank 0 alone reads
the log (the others receive its records) and writes it, in the order one process would. A log
is the same, and resumes the same, whatever the number of ranks.

Resumability: every evaluation is appended to the log as one JSON line and flushed + fsynced
before the next one starts. Generation g draws its candidates from ``random.Random`` seeded by
``(seed, g)`` alone, and the population it breeds from is a deterministic function of the
evaluated fitnesses, so rerunning the search with the same log replays every generation
exactly: candidates found in the log are not evaluated again, and the search continues from the
first missing one. The log's header records the model/data (``fitness.describe()``), the search
space and the hyper-parameters; resuming with different ones raises :class:`SearchLogError`
(except the stopping parameters -- iterations, patience, tolerance -- which do not change which
candidates are drawn: a finished search can be extended by rerunning it with more iterations).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import random
import time
from typing import Callable, Optional

from .. import parallel
from ..config import LongRoPEConfig
from .space import Candidate, SearchSpace, finite_or_inf

LOG_FORMAT = "longrope_triton.search/1"


class SearchLogError(ValueError):
    """A search log that cannot be resumed: corrupt, or written by a different search."""


@dataclasses.dataclass
class SearchParams:
    """Evolution hyper-parameters (DESIGN §5 defaults: LongRoPE). ``longrope2()`` gives LongRoPE2's."""

    population: int = 64
    iterations: int = 40
    parents: int = 32
    mutations: int = 16
    crossovers: int = 16
    mutation_probability: float = 0.3
    crossover_probability: float = 0.15
    max_relative_move: float = 0.1
    tolerance: float = 1e-3
    patience: int = 20
    seed: int = 0
    max_redraws: int = 100

    def __post_init__(self):
        for name in ("population", "parents"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("iterations", "mutations", "crossovers", "patience", "max_redraws"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.parents > self.population:
            raise ValueError(f"parents ({self.parents}) must not exceed population ({self.population})")
        for name in ("mutation_probability", "crossover_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def longrope2(cls, **kw) -> "SearchParams":
        """LongRoPE2 defaults: population 128, 60 iterations (64 parents, 32 + 32 children)."""
        defaults = dict(population=128, iterations=60, parents=64, mutations=32, crossovers=32)
        defaults.update(kw)
        return cls(**defaults)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Evaluation:
    generation: int
    index: int
    candidate: Candidate
    fitness: float
    seconds: float = 0.0
    origin: str = ""


@dataclasses.dataclass
class SearchResult:
    """Outcome of a search: the best candidate, its config and every evaluation."""

    best: Evaluation
    config: LongRoPEConfig
    evaluations: list
    generations: int
    stopped_early: bool
    resumed: int  # evaluations read back from the log instead of being computed

    @property
    def fitness(self) -> float:
        return self.best.fitness

    def seed_fitness(self) -> dict:
        """Fitness of each named seed (e.g. {'pi': ..., 'ntk': ..., 'yarn': ...})."""
        return {e.origin.split(":", 1)[1]: e.fitness for e in self.evaluations if e.origin.startswith("seed:")}


# ---------------------------------------------------------------------------- log
def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# Parameters that only decide when the search stops: the candidates of generation g do not depend
# on them, so a log may be resumed with other values (e.g. more iterations to extend a search).
_STOPPING_PARAMS = ("iterations", "patience", "tolerance")


def _comparable(header: dict) -> dict:
    params = {k: v for k, v in (header.get("params") or {}).items() if k not in _STOPPING_PARAMS}
    return {**header, "params": params}


class SearchLog:
    """Append-only JSON-lines log: a header line, then one line per evaluated candidate.

    ``path=None`` keeps everything in memory (no resume)."""

    def __init__(self, path, header: dict):
        self.path = pathlib.Path(path) if path is not None else None
        self.header = header
        self.records: dict = {}  # (generation, index) -> record
        if self.path is not None:
            if self.path.exists() and self.path.stat().st_size > 0:
                self._load()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._append({"type": "header", **header})

    @classmethod
    def validate(cls, path) -> None:
        """Raise SearchLogError if an existing log at ``path`` is corrupt (cheap; no header check)."""
        path = pathlib.Path(path)
        if path.exists() and path.stat().st_size > 0:
            log = cls.__new__(cls)
            log.path, log.records = path, {}
            log._parse(truncate=False)

    def _load(self):
        head = self._parse(truncate=True)
        mine = _comparable(self.header)
        if _canonical(head) != _canonical(mine):
            diff = sorted(k for k in set(head) | set(mine)
                          if k != "params" and _canonical(head.get(k)) != _canonical(mine.get(k)))
            diff += [f"params.{k}" for k in sorted(set(head.get("params") or {}) | set(mine.get("params") or {}))
                     if _canonical((head.get("params") or {}).get(k)) != _canonical(mine["params"].get(k))]
            raise SearchLogError(
                f"{self.path}: the log was written by a different search (differs in: {', '.join(diff)}); "
                "use the same model, data, target and hyper-parameters, or another --log path")

    def _parse(self, truncate: bool) -> dict:
        """Read the records; returns the (comparable) header."""
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            # The last line has no newline: the process died while writing it. It was never
            # complete, so it holds no finished evaluation; drop it and carry on.
            partial = lines.pop()
            if truncate:
                with open(self.path, "r+b") as f:
                    f.truncate(len(raw) - len(partial))
        if not lines:
            raise SearchLogError(f"{self.path}: empty search log (delete it to start over)")
        parsed = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                raise SearchLogError(f"{self.path}:{number}: corrupt search log line ({exc})") from None
            parsed.append(record)
        head = parsed[0]
        if head.get("type") != "header":
            raise SearchLogError(f"{self.path}:1: not a longrope_triton search log (no header line)")
        head = _comparable({k: v for k, v in head.items() if k != "type"})
        for number, record in enumerate(parsed[1:], start=2):
            try:
                key = (int(record["generation"]), int(record["index"]))
                Candidate.from_record(record)
                float(record["fitness"])
            except (KeyError, TypeError, ValueError):
                raise SearchLogError(f"{self.path}:{number}: corrupt search log record") from None
            if key in self.records:
                raise SearchLogError(f"{self.path}:{number}: duplicate record for generation {key[0]} "
                                     f"index {key[1]}")
            self.records[key] = record
        return head

    def _append(self, record: dict):
        line = json.dumps(record) + "\n"  # Infinity for failed (non-finite) fitness
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def lookup(self, generation: int, index: int, cand: Candidate) -> Optional[dict]:
        record = self.records.get((generation, index))
        if record is None:
            return None
        if Candidate.from_record(record).key() != cand.key():
            raise SearchLogError(
                f"{self.path}: generation {generation} candidate {index} in the log differs from the one "
                "this search draws (log written by another version or seed); use another --log path")
        return record

    def add(self, ev: Evaluation):
        record = {"type": "eval", "generation": ev.generation, "index": ev.index, "origin": ev.origin,
                  **ev.candidate.to_record(), "fitness": ev.fitness, "seconds": round(ev.seconds, 3)}
        self.records[(ev.generation, ev.index)] = record
        if self.path is not None:
            self._append(record)


# ---------------------------------------------------------------------------- search
def _generation_rng(seed: int, generation: int) -> random.Random:
    digest = hashlib.sha256(f"longrope-search:{seed}:{generation}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _describe(fitness) -> dict:
    describe = getattr(fitness, "describe", None)
    return describe() if callable(describe) else {"name": getattr(fitness, "__name__", type(fitness).__name__)}


def evolution_search(fitness: Callable[[LongRoPEConfig], float], space: SearchSpace,
                     params: Optional[SearchParams] = None, log_path=None, method: str = "longrope",
                     progress: bool = False, on_evaluation: Optional[Callable[[Evaluation], None]] = None
                     ) -> SearchResult:
    """Run (or resume) the evolutionary search; lower fitness is better.

    Args:
        fitness: maps a LongRoPEConfig to a float (e.g. perplexity). Its ``describe()`` dict, if
            any, goes into the log header so a log is never resumed with other data or model.
        space: the search space (bounds, constraints, template config).
        params: hyper-parameters (default: DESIGN §5 LongRoPE values).
        log_path: JSON-lines log; an existing log is resumed (see the module docstring).
        method: recorded in the header ("longrope", "longrope2", ...).
        progress: show a tqdm bar over evaluations.
        on_evaluation: called after every evaluation (computed or read back from the log).

    Returns:
        SearchResult with the best candidate and its config.

    Example:
        >>> from longrope_triton.search import SearchSpace, SearchParams, evolution_search
        >>> from longrope_triton.search.space import extension_template
        >>> space = SearchSpace(extension_template(64, 10000.0, 4096, 16384), start_token_choices=(0, 4))
        >>> res = evolution_search(lambda c: sum(abs(x - 3.0) for x in c.long_factor), space,
        ...                        SearchParams(population=8, iterations=3, parents=4, mutations=2, crossovers=2))
        >>> res.fitness < 200
        True
    """
    params = params or SearchParams()
    header = {"format": LOG_FORMAT, "method": method, "fitness": _describe(fitness),
              "space": space.describe(), "params": params.to_dict()}
    # rank 0 alone reads, repairs and appends to the file; the other ranks hold a copy of its records
    log = parallel.from_main(lambda: SearchLog(log_path, header))
    if not parallel.is_main():
        log.path = None
    history: set = set()
    evaluations: list = []
    resumed = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        total = params.population + params.iterations * (params.mutations + params.crossovers)
        bar = tqdm(total=total, desc=f"{method} search", unit="cand", dynamic_ncols=True)

    def score(cand: Candidate) -> tuple:
        start = time.perf_counter()
        return finite_or_inf(fitness(space.to_config(cand))), time.perf_counter() - start

    def evaluate(generation: int, batch: list) -> list:
        nonlocal resumed
        known = [log.lookup(generation, index, cand) for index, (cand, _) in enumerate(batch)]
        # the candidates missing from the log, split over the ranks; results come back in order
        computed = parallel.imap(score, [cand for (cand, _), record in zip(batch, known) if record is None])
        out = []
        for index, ((cand, origin), record) in enumerate(zip(batch, known)):
            if record is not None:
                ev = Evaluation(generation, index, cand, float(record["fitness"]), float(record.get("seconds", 0)),
                                origin)
                resumed += 1
            else:
                value, seconds = next(computed)
                ev = Evaluation(generation, index, cand, value, seconds, origin)
                log.add(ev)
            out.append(ev)
            evaluations.append(ev)
            if bar is not None:
                bar.update(1)
                best = min(evaluations, key=_rank)
                bar.set_postfix(best=f"{best.fitness:.4g}", last=f"{ev.fitness:.4g}")
            if on_evaluation is not None:
                on_evaluation(ev)
        return out

    try:
        # generation 0: the seeds, then mutations of them up to the population size
        rng = _generation_rng(params.seed, 0)
        batch = []
        for name, cand in space.seeds().items():
            if len(batch) < params.population and cand.key() not in history:
                history.add(cand.key())
                batch.append((cand, f"seed:{name}"))
        seeds = [c for c, _ in batch] or [space.candidate([space.lower] * space.n_dims)]
        while len(batch) < params.population:
            child = _draw(lambda: space.mutate(rng.choice(seeds), rng, params.mutation_probability,
                                               params.max_relative_move), history, params.max_redraws)
            if child is None:
                break
            batch.append((child, "init"))
        population = evaluate(0, batch)

        best_trace = [min(population, key=_rank).fitness]
        stopped_early = False
        generation = 0
        for generation in range(1, params.iterations + 1):
            rng = _generation_rng(params.seed, generation)
            parents = sorted(population, key=_rank)[: params.parents]
            batch = []
            for _ in range(params.mutations):
                child = _draw(lambda: space.mutate(rng.choice(parents).candidate, rng, params.mutation_probability,
                                                   params.max_relative_move), history, params.max_redraws)
                if child is not None:
                    batch.append((child, "mutation"))
            for _ in range(params.crossovers):
                child = _draw(lambda: _cross(space, parents, rng, params.crossover_probability), history,
                              params.max_redraws)
                if child is not None:
                    batch.append((child, "crossover"))
            population = parents + evaluate(generation, batch)
            best_trace.append(min(population, key=_rank).fitness)
            if _stalled(best_trace, params.tolerance, params.patience):
                stopped_early = True
                break
    finally:
        if bar is not None:
            bar.close()

    best = min(evaluations, key=_rank)
    return SearchResult(best, space.to_config(best.candidate), evaluations, generation, stopped_early, resumed)


def _rank(ev: Evaluation):
    # ties broken by evaluation order, so the ranking never depends on anything but the log
    return (ev.fitness if not math.isnan(ev.fitness) else math.inf, ev.generation, ev.index)


def _draw(make: Callable[[], Candidate], history: set, max_redraws: int) -> Optional[Candidate]:
    """A candidate not seen before (redrawn up to max_redraws times), registered in history."""
    for _ in range(max_redraws + 1):
        cand = make()
        if cand.key() not in history:
            history.add(cand.key())
            return cand
    return None


def _cross(space: SearchSpace, parents: list, rng: random.Random, probability: float) -> Candidate:
    if len(parents) < 2:
        return parents[0].candidate
    a, b = rng.sample(parents, 2)
    return space.crossover(a.candidate, b.candidate, rng, probability)


def _stalled(trace: list, tolerance: float, patience: int) -> bool:
    """True when the best fitness moved less than ``tolerance`` over the last ``patience`` iterations."""
    if patience <= 0 or len(trace) <= patience:
        return False
    window = trace[-(patience + 1):]
    return abs(window[0] - window[-1]) < tolerance
