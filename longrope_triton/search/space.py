"""The search space of LongRoPE / LongRoPE2: which factors are searched, their bounds, and the
genetic operators (seeding, mutation, crossover) that stay inside it.

A candidate is a :class:`Candidate`: the searched rescale factors (one per searched frequency
dimension) and the start-token count n_hat. :class:`SearchSpace` turns a candidate into a
:class:`~longrope_triton.config.LongRoPEConfig` and keeps every operator inside the constraints:

* every searched factor lies in ``[lower, upper]`` (default ``[1, 1.25 s]``) and moves on a grid
  of ``step`` (default 0.01) away from its parent's value;
* factors are non-decreasing across dimensions (higher dims rotate slower and need at least as
  much interpolation);
* LongRoPE2 (``critical_dim`` set): dims below the critical dimension d_cd are fixed to the
  template's NTK-style factors and only dims >= d_cd are searched, each >= s;
* progressive extension: the config's factors are ``searched * base_factors`` (elementwise), so
  a search from an already-extended model multiplies into its factors;
* short-context readjustment (``regime="short"``): the searched list is the *short* factor set,
  the long set comes unchanged from the template.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Optional, Sequence

from ..config import LongRoPEConfig, critical_dimension, ntk_factors, yarn_factors

#: The n_hat values LongRoPE searches (start tokens kept unscaled).
START_TOKEN_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 48, 64, 128, 256)

_DECIMALS = 6  # factors are rounded to this many decimals: exact dedup keys, exact JSON round-trip


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the search space: searched factors (tuple of floats) and n_hat."""

    factors: tuple
    start_token: int = 0

    def key(self) -> tuple:
        """Identity used for deduplication (factors are already rounded)."""
        return (self.factors, self.start_token)

    def to_record(self) -> dict:
        return {"factors": list(self.factors), "start_token": self.start_token}

    @classmethod
    def from_record(cls, record: dict) -> "Candidate":
        return cls(tuple(_round(float(x)) for x in record["factors"]), int(record["start_token"]))


def _round(x: float) -> float:
    return round(x, _DECIMALS)


@dataclasses.dataclass
class SearchSpace:
    """Where and how factors are searched.

    Args:
        template: the config a candidate is written into (head_dim, base, original and target
            lengths, attention factor, the factor set that is not searched).
        lower, upper: bounds of every searched factor (None -> 1.0 and 1.25 * s; LongRoPE2's
            lower bound is s).
        step: grid step of mutations.
        start_token_choices: n_hat values to search; ``(0,)`` fixes n_hat = 0.
        critical_dim: LongRoPE2 d_cd: dims below it keep the template's factors and are not
            searched. None for LongRoPE (every dim searched).
        base_factors: progressive extension: the config's factors are ``searched * base_factors``.
        regime: "long" (search the long factors) or "short" (search the short factors, for the
            short-context readjustment at L_orig).
        stage_scale: progressive extension: the ratio this stage extends by (target / previous
            target); bounds and seeds use it instead of the template's overall ratio.
    """

    template: LongRoPEConfig
    lower: Optional[float] = None
    upper: Optional[float] = None
    step: float = 0.01
    start_token_choices: Sequence[int] = START_TOKEN_CHOICES
    critical_dim: Optional[int] = None
    base_factors: Optional[Sequence[float]] = None
    regime: str = "long"
    stage_scale: Optional[float] = None

    def __post_init__(self):
        if self.regime not in ("long", "short"):
            raise ValueError(f"regime must be 'long' or 'short', got {self.regime!r}")
        half = self.template.rotary_dim // 2
        s = self.scale
        if self.lower is None:
            self.lower = s if self.critical_dim is not None else 1.0
        if self.upper is None:
            self.upper = max(1.25 * s, self.lower)
        self.lower, self.upper = float(self.lower), float(self.upper)
        if not 0 < self.lower <= self.upper:
            raise ValueError(f"need 0 < lower <= upper, got lower={self.lower}, upper={self.upper}")
        if not self.step > 0:
            raise ValueError(f"step must be > 0, got {self.step}")
        self.start_token_choices = tuple(sorted(set(int(n) for n in self.start_token_choices)))
        if not self.start_token_choices or self.start_token_choices[0] < 0:
            raise ValueError("start_token_choices must be non-empty and >= 0")
        if self.critical_dim is not None and not 0 <= self.critical_dim < half:
            raise ValueError(f"critical_dim must be in [0, {half}), got {self.critical_dim}")
        if self.base_factors is not None:
            self.base_factors = [float(x) for x in self.base_factors]
            if len(self.base_factors) != half:
                raise ValueError(f"base_factors has length {len(self.base_factors)}, expected {half}")

    # ------------------------------------------------------------------ shape
    @property
    def scale(self) -> float:
        """The extension ratio this search covers (1 for a short-regime search)."""
        if self.regime == "short":
            return 1.0
        return self.stage_scale if self.stage_scale is not None else self.template.scale

    @property
    def first_dim(self) -> int:
        """Index of the first searched frequency dimension."""
        return self.critical_dim or 0

    @property
    def n_dims(self) -> int:
        return self.template.rotary_dim // 2 - self.first_dim

    def describe(self) -> dict:
        """Everything that defines the space (recorded in the search log header)."""
        return {
            "template": self.template.to_dict(),
            "lower": self.lower, "upper": self.upper, "step": self.step,
            "start_token_choices": list(self.start_token_choices),
            "critical_dim": self.critical_dim,
            "base_factors": self.base_factors,
            "regime": self.regime,
            "stage_scale": self.stage_scale,
        }

    # ------------------------------------------------------------------ candidates <-> configs
    def candidate(self, factors: Sequence[float], start_token: int = 0) -> Candidate:
        """A valid candidate from searched factors: clipped to the bounds, made non-decreasing,
        n_hat snapped to the nearest allowed choice."""
        if len(factors) != self.n_dims:
            raise ValueError(f"expected {self.n_dims} searched factors, got {len(factors)}")
        n_hat = min(self.start_token_choices, key=lambda c: (abs(c - start_token), c))
        return Candidate(self._repair([float(x) for x in factors]), n_hat)

    def _repair(self, factors: list) -> tuple:
        """Clip to [lower, upper] and enforce non-decreasing (a running maximum)."""
        out, running = [], self.lower
        for x in factors:
            x = min(max(x, self.lower, running), self.upper)
            running = x
            out.append(_round(x))
        return tuple(out)

    def is_valid(self, cand: Candidate) -> bool:
        f = cand.factors
        return (len(f) == self.n_dims and all(self.lower - 1e-9 <= x <= self.upper + 1e-9 for x in f)
                and all(a <= b for a, b in zip(f, f[1:])) and cand.start_token in self.start_token_choices)

    def to_config(self, cand: Candidate) -> LongRoPEConfig:
        """The LongRoPEConfig a candidate stands for."""
        current = self.template.short_factor if self.regime == "short" else self.template.long_factor
        full = list(current[: self.first_dim]) + list(cand.factors)
        if self.base_factors is not None:  # progressive extension: lambda_final = lambda_search * lambda_prev
            full = [x * b for x, b in zip(full, self.base_factors)]
        field = "short_factor" if self.regime == "short" else "long_factor"
        return self.template.replace(**{field: full, "start_token": cand.start_token})

    # ------------------------------------------------------------------ seeds
    def seeds(self) -> dict:
        """Named seed candidates: PI, NTK and YaRN (each clipped into the space) for LongRoPE;
        the pure-interpolation upper part (all s) plus NTK/YaRN upper parts for LongRoPE2."""
        t = self.template
        r, s = t.rotary_dim, self.scale
        orig = max(1, round(t.max_position_embeddings / s))  # the length this stage starts from
        named = {
            "pi": [s] * (r // 2),
            "ntk": ntk_factors(r, s),
            "yarn": yarn_factors(r, t.base, s, orig),
        }
        out = {}
        for name, full in named.items():
            cand = self.candidate(full[self.first_dim:], 0)
            if cand.key() not in {c.key() for c in out.values()}:
                out[name] = cand
        return out

    # ------------------------------------------------------------------ genetic operators
    def mutate(self, parent: Candidate, rng: random.Random, probability: float = 0.3,
               max_relative_move: float = 0.1) -> Candidate:
        """Each dim changes with ``probability`` by a whole number of grid steps (up to
        ``max_relative_move`` of its value, at least one step), within its neighbours' range so the
        list stays non-decreasing: the lower neighbour is the already-mutated previous dim, and a
        rise above the next dim lifts the following dims (running maximum). n_hat moves to a random
        allowed choice with the same probability."""
        factors = list(parent.factors)
        for i, x in enumerate(factors):
            if rng.random() >= probability:
                continue
            max_steps = max(1, int(max_relative_move * x / self.step))
            k = rng.randint(1, max_steps) * rng.choice((-1, 1))
            floor = factors[i - 1] if i else self.lower
            factors[i] = min(max(x + k * self.step, floor, self.lower), self.upper)
        n_hat = parent.start_token
        if len(self.start_token_choices) > 1 and rng.random() < probability:
            n_hat = rng.choice(self.start_token_choices)
        return Candidate(self._repair(factors), n_hat)

    def crossover(self, a: Candidate, b: Candidate, rng: random.Random, probability: float = 0.15) -> Candidate:
        """Child of ``a`` taking each gene (every factor and n_hat) from ``b`` with ``probability``;
        the result is made non-decreasing again (running maximum)."""
        factors = [fb if rng.random() < probability else fa for fa, fb in zip(a.factors, b.factors)]
        n_hat = b.start_token if rng.random() < probability else a.start_token
        return Candidate(self._repair(factors), n_hat)


def longrope2_space(template: LongRoPEConfig, **kw) -> SearchSpace:
    """LongRoPE2 space: NTK-style factors below d_cd (fixed), searched factors >= s from d_cd on,
    n_hat fixed to 0."""
    d_cd = critical_dimension(template.rotary_dim, template.base, template.original_max_position_embeddings)
    s = kw.get("stage_scale") or template.scale
    ntk = ntk_factors(template.rotary_dim, s)
    template = template.replace(long_factor=ntk[:d_cd] + [max(s, x) for x in ntk[d_cd:]])
    kw.setdefault("start_token_choices", (0,))
    return SearchSpace(template, critical_dim=d_cd, **kw)


def extension_template(head_dim: int, base: float, original_max_position_embeddings: int,
                       max_position_embeddings: int, rotary_dim: Optional[int] = None,
                       attention_factor: Optional[float] = None) -> LongRoPEConfig:
    """The config a LongRoPE search writes its candidates into (default mscale unless given)."""
    if max_position_embeddings <= original_max_position_embeddings:
        raise ValueError(f"target length {max_position_embeddings} must exceed the original "
                         f"{original_max_position_embeddings}")
    return LongRoPEConfig(head_dim=head_dim, rotary_dim=rotary_dim, base=base,
                          original_max_position_embeddings=original_max_position_embeddings,
                          max_position_embeddings=max_position_embeddings, attention_factor=attention_factor)


def finite_or_inf(x: float) -> float:
    """A fitness value as a float; NaN (a diverged evaluation) ranks like +inf."""
    x = float(x)
    return x if math.isfinite(x) else math.inf
