"""The context-extension methods compared by ``eval`` and ``demo``, as LongRoPEConfigs.

``method_configs(base, target)`` builds plain RoPE, PI, NTK, YaRN and the factor sets shipped in
``longrope_triton/factors/`` for one model (``base``: its unextended config, e.g.
``LongRoPEConfig.from_hf(model.config)``) and one target length.
"""

from __future__ import annotations

import importlib.resources
import pathlib
from typing import Optional

from ..config import LongRoPEConfig

METHODS = ("plain", "pi", "ntk", "yarn", "longrope", "longrope2")


def factors_path(name: str) -> pathlib.Path:
    """Path of a factor set shipped with the package, e.g. ``factors_path('smollm2-135m-16k')``."""
    path = pathlib.Path(str(importlib.resources.files("longrope_triton") / "factors" / f"{name}.json"))
    if not path.is_file():
        raise FileNotFoundError(f"no shipped factor set {name!r} ({path})")
    return path


def load_factors(spec: str) -> LongRoPEConfig:
    """A LongRoPEConfig from a JSON file path or the name of a shipped factor set."""
    path = pathlib.Path(spec)
    if path.exists() or path.suffix == ".json" or "/" in str(spec):
        return LongRoPEConfig.from_json(str(path))
    return LongRoPEConfig.from_json(str(factors_path(spec)))


def shipped_factor_sets() -> list:
    root = pathlib.Path(str(importlib.resources.files("longrope_triton") / "factors"))
    return sorted(p.stem for p in root.glob("*.json") if not p.name.endswith(".hf.json"))


def plain_config(base: LongRoPEConfig, target: int) -> LongRoPEConfig:
    """Unscaled RoPE whose max_position_embeddings covers ``target`` (lambda = 1, mscale 1)."""
    return LongRoPEConfig(head_dim=base.head_dim, rotary_dim=base.rotary_dim, base=base.base,
                          original_max_position_embeddings=base.original_max_position_embeddings,
                          max_position_embeddings=max(target, base.original_max_position_embeddings),
                          attention_factor=1.0, interleaved=base.interleaved)


def method_config(method: str, base: LongRoPEConfig, target: int, factors: Optional[str] = None) -> LongRoPEConfig:
    """One method's config for extending ``base`` (its original length) to ``target`` tokens.

    ``factors``: a LongRoPEConfig JSON (path or shipped name) for 'longrope'/'longrope2'.
    """
    orig = base.original_max_position_embeddings
    common = dict(head_dim=base.head_dim, rotary_dim=base.rotary_dim, base=base.base,
                  interleaved=base.interleaved)
    if method == "plain":
        return plain_config(base, target)
    if target <= orig and method in ("pi", "ntk", "yarn"):
        return plain_config(base, target)
    if method == "pi":
        return LongRoPEConfig.pi(original_max_position_embeddings=orig, max_position_embeddings=target, **common)
    if method == "ntk":
        return LongRoPEConfig.ntk(original_max_position_embeddings=orig, max_position_embeddings=target, **common)
    if method == "yarn":
        return LongRoPEConfig.yarn(original_max_position_embeddings=orig, max_position_embeddings=target, **common)
    if method in ("longrope", "longrope2"):
        if factors is None:
            raise ValueError(f"method {method!r} needs a factor set (--factors)")
        cfg = load_factors(factors)
        if target > cfg.max_position_embeddings:
            raise ValueError(f"length {target} exceeds the {method} factor set's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        return cfg
    raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
