"""LongRoPEConfig: one model of every RoPE context-extension method.

Every RoPE variant used for context extension is a per-frequency rescale factor
lambda_i, a start-token count n_hat and an attention factor (mscale)::

    theta_i    = base ** (-2 i / r)            i = 0 .. r/2 - 1, r = rotary_dim
    inv_freq_i = theta_i / lambda_i
    phi_i(p)   = p * inv_freq_i                 (positions p < n_hat use lambda_i = 1, mscale 1)

Two factor sets are kept: ``short_factor`` applies while the sequence length is at
most ``original_max_position_embeddings``, ``long_factor`` beyond it (the Hugging
Face rule, with seq_len = max(position_ids) + 1 by default). PI, NTK, YaRN,
Llama-3.1, LongRoPE and LongRoPE2 are constructors of this one class.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any, Optional, Sequence

# Hugging Face rope types whose factors do not depend on the sequence length and
# therefore apply in both regimes (short_factor == long_factor).
_HF_STATIC_TYPES = ("default", "linear", "yarn", "llama3")
# Model types whose default (unscaled) rotary embedding rotates the full head_dim even
# when the config carries a partial_rotary_factor (their compute_default_rope_parameters).
_FULL_DIM_DEFAULT_MODELS = ("llama", "mistral", "qwen2")


def _as_factor_list(name: str, values, length: int) -> list[float]:
    """Validate a factor sequence and return it as a list of Python floats."""
    if values is None:
        return [1.0] * length
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a sequence of {length} floats, got {type(values).__name__}")
    if hasattr(values, "tolist"):  # torch tensors and numpy arrays
        values = values.tolist()
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must contain numbers, got {type(v).__name__} ({v!r})")
        out.append(float(v))
    if len(out) != length:
        raise ValueError(f"{name} has length {len(out)}, expected rotary_dim // 2 = {length}")
    bad = [v for v in out if not math.isfinite(v) or v <= 0.0]
    if bad:
        raise ValueError(f"{name} must be finite and positive, got {bad[0]!r}")
    return out


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and positive, got {value!r}")
    return float(value)


def default_mscale(scale: float, original_max_position_embeddings: int) -> float:
    """LongRoPE / Phi-3 ("su") attention factor: sqrt(1 + ln s / ln L_orig) for s > 1, else 1."""
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_max_position_embeddings))


def yarn_mscale(scale: float) -> float:
    """YaRN attention factor: 0.1 ln s + 1 for s > 1, else 1."""
    return 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0


def critical_dimension(rotary_dim: int, base: float, original_max_position_embeddings: int) -> int:
    """LongRoPE2 critical dimension d_cd = ceil(r/2 * log_base(L_orig / 2 pi)) - 1.

    The period 2 pi base^(2i/r) of frequency i reaches the pre-training length at
    i* = r/2 log_base(L_orig / 2 pi): dimensions from ceil(i*) on never completed a
    rotation during training and need searched (larger) factors. As in the paper, the
    searched region starts one dimension earlier, at d_cd = ceil(i*) - 1; dimensions
    below it are interpolated NTK-style.
    """
    half = rotary_dim // 2
    d = math.ceil(half * math.log(original_max_position_embeddings / (2 * math.pi)) / math.log(base)) - 1
    return min(max(d, 0), half)


@dataclasses.dataclass
class LongRoPEConfig:
    """Rotary embedding with per-frequency rescale factors, start-token bypass and a short/long switch.

    Args:
        head_dim: size of each attention head.
        rotary_dim: number of leading dims that rotate (None -> head_dim); the rest pass through.
        base: RoPE base (rope_theta).
        original_max_position_embeddings: pre-training context length L_orig; long factors
            apply iff seq_len > L_orig.
        max_position_embeddings: target context length; positions must stay below it.
        short_factor, long_factor: rotary_dim // 2 positive floats each (None -> all 1.0).
        start_token: n_hat; positions < n_hat are rotated without rescaling and without mscale.
        attention_factor: mscale multiplying cos and sin (None -> sqrt(1 + ln s / ln L_orig)).
        interleaved: rotate pairs (2i, 2i+1) (GPT-J) instead of (i, i + r/2) (Llama/NeoX).
        short_mscale, long_mscale: per-regime attention factors (Phi-3-small / PhiMoE style); each one
            given replaces attention_factor in its regime, None keeps it (see ``regime_mscale``).

    Example:
        >>> cfg = LongRoPEConfig(head_dim=64, original_max_position_embeddings=4096,
        ...                      max_position_embeddings=16384, long_factor=[4.0] * 32)
        >>> cfg.regime(8192)
        'long'
    """

    head_dim: int = 64
    rotary_dim: Optional[int] = None
    base: float = 10000.0
    original_max_position_embeddings: int = 4096
    max_position_embeddings: int = 131072
    short_factor: Optional[Sequence[float]] = None
    long_factor: Optional[Sequence[float]] = None
    start_token: int = 0
    attention_factor: Optional[float] = None
    interleaved: bool = False
    short_mscale: Optional[float] = None
    long_mscale: Optional[float] = None

    def __post_init__(self):
        self.head_dim = _check_int("head_dim", self.head_dim, 2)
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        self.rotary_dim = _check_int("rotary_dim", self.rotary_dim, 2)
        if self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {self.rotary_dim}")
        if self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim ({self.rotary_dim}) must not exceed head_dim ({self.head_dim})")
        self.base = _check_positive_float("base", self.base)
        if self.base <= 1.0:
            raise ValueError(f"base must be > 1, got {self.base}")
        self.original_max_position_embeddings = _check_int(
            "original_max_position_embeddings", self.original_max_position_embeddings, 1)
        self.max_position_embeddings = _check_int("max_position_embeddings", self.max_position_embeddings, 1)
        if self.max_position_embeddings < self.original_max_position_embeddings:
            raise ValueError(
                f"max_position_embeddings ({self.max_position_embeddings}) must be >= "
                f"original_max_position_embeddings ({self.original_max_position_embeddings})")
        half = self.rotary_dim // 2
        self.short_factor = _as_factor_list("short_factor", self.short_factor, half)
        self.long_factor = _as_factor_list("long_factor", self.long_factor, half)
        self.start_token = _check_int("start_token", self.start_token, 0)
        for name in ("attention_factor", "short_mscale", "long_mscale"):
            if getattr(self, name) is not None:
                setattr(self, name, _check_positive_float(name, getattr(self, name)))
        if not isinstance(self.interleaved, bool):
            raise TypeError(f"interleaved must be a bool, got {type(self.interleaved).__name__}")

    # ------------------------------------------------------------------ derived values
    @property
    def scale(self) -> float:
        """s = max_position_embeddings / original_max_position_embeddings."""
        return self.max_position_embeddings / self.original_max_position_embeddings

    @property
    def mscale(self) -> float:
        """The single attention factor: attention_factor, else the default. It multiplies cos and sin
        at positions >= n_hat in every regime that has no factor of its own (``regime_mscale``)."""
        if self.attention_factor is not None:
            return self.attention_factor
        return default_mscale(self.scale, self.original_max_position_embeddings)

    def regime_mscale(self, long: bool) -> float:
        """The attention factor applied with the long (True) or short (False) factor set: long_mscale /
        short_mscale when given (they win over attention_factor, as in transformers' PhiMoE), else mscale."""
        own = self.long_mscale if long else self.short_mscale
        return self.mscale if own is None else own

    def use_long(self, seq_len: int) -> bool:
        """True iff the long factors apply to a sequence of this length (seq_len > L_orig)."""
        return int(seq_len) > self.original_max_position_embeddings

    def regime(self, seq_len: int) -> str:
        """'long' or 'short': the factor set used for a sequence of this length."""
        return "long" if self.use_long(seq_len) else "short"

    def factors(self, seq_len: int) -> list[float]:
        """The factor list used for a sequence of this length."""
        return self.long_factor if self.use_long(seq_len) else self.short_factor

    def replace(self, **changes) -> "LongRoPEConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def _extension(cls, long_factor, attention_factor, *, head_dim, rotary_dim, base,
                   original_max_position_embeddings, max_position_embeddings, **kw) -> "LongRoPEConfig":
        return cls(head_dim=head_dim, rotary_dim=rotary_dim, base=base,
                   original_max_position_embeddings=original_max_position_embeddings,
                   max_position_embeddings=max_position_embeddings,
                   long_factor=long_factor, attention_factor=attention_factor, **kw)

    @classmethod
    def pi(cls, head_dim: int, original_max_position_embeddings: int, max_position_embeddings: int,
           base: float = 10000.0, rotary_dim: Optional[int] = None, **kw) -> "LongRoPEConfig":
        """Position interpolation: lambda_i = s for every dimension (long regime), mscale 1."""
        r = rotary_dim or head_dim
        s = max_position_embeddings / original_max_position_embeddings
        kw.setdefault("attention_factor", 1.0)
        return cls._extension([s] * (r // 2), head_dim=head_dim, rotary_dim=rotary_dim, base=base,
                              original_max_position_embeddings=original_max_position_embeddings,
                              max_position_embeddings=max_position_embeddings, **kw)

    @classmethod
    def ntk(cls, head_dim: int, original_max_position_embeddings: int, max_position_embeddings: int,
            base: float = 10000.0, rotary_dim: Optional[int] = None, **kw) -> "LongRoPEConfig":
        """NTK-aware scaling: lambda_i = s ** (2i / (r - 2)) (a base change), mscale 1."""
        r = rotary_dim or head_dim
        s = max_position_embeddings / original_max_position_embeddings
        kw.setdefault("attention_factor", 1.0)
        return cls._extension(ntk_factors(r, s), head_dim=head_dim, rotary_dim=rotary_dim, base=base,
                              original_max_position_embeddings=original_max_position_embeddings,
                              max_position_embeddings=max_position_embeddings, **kw)

    @classmethod
    def yarn(cls, head_dim: int, original_max_position_embeddings: int, max_position_embeddings: int,
             base: float = 10000.0, rotary_dim: Optional[int] = None, beta_fast: float = 32.0,
             beta_slow: float = 1.0, **kw) -> "LongRoPEConfig":
        """YaRN: a linear ramp between extrapolation (fast dims) and interpolation (slow dims),
        mscale 0.1 ln s + 1 (the Hugging Face formula, truncated correction range)."""
        r = rotary_dim or head_dim
        s = max_position_embeddings / original_max_position_embeddings
        kw.setdefault("attention_factor", yarn_mscale(s))
        return cls._extension(
            yarn_factors(r, base, s, original_max_position_embeddings, beta_fast, beta_slow),
            head_dim=head_dim, rotary_dim=rotary_dim, base=base,
            original_max_position_embeddings=original_max_position_embeddings,
            max_position_embeddings=max_position_embeddings, **kw)

    @classmethod
    def llama3(cls, head_dim: int, original_max_position_embeddings: int = 8192,
               max_position_embeddings: int = 131072, base: float = 500000.0,
               rotary_dim: Optional[int] = None, factor: float = 8.0, low_freq_factor: float = 1.0,
               high_freq_factor: float = 4.0, **kw) -> "LongRoPEConfig":
        """Llama-3.1 scaling (applies at every length, like Hugging Face's 'llama3' type)."""
        r = rotary_dim or head_dim
        lam = llama3_factors(r, base, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
        kw.setdefault("attention_factor", 1.0)
        return cls(head_dim=head_dim, rotary_dim=rotary_dim, base=base,
                   original_max_position_embeddings=original_max_position_embeddings,
                   max_position_embeddings=max_position_embeddings, short_factor=lam, long_factor=lam, **kw)

    @classmethod
    def longrope(cls, head_dim: int, original_max_position_embeddings: int, max_position_embeddings: int,
                 long_factor: Sequence[float], short_factor: Optional[Sequence[float]] = None,
                 start_token: int = 0, base: float = 10000.0, rotary_dim: Optional[int] = None,
                 **kw) -> "LongRoPEConfig":
        """LongRoPE: searched factor lists and start-token count n_hat; default mscale."""
        return cls(head_dim=head_dim, rotary_dim=rotary_dim, base=base,
                   original_max_position_embeddings=original_max_position_embeddings,
                   max_position_embeddings=max_position_embeddings, short_factor=short_factor,
                   long_factor=long_factor, start_token=start_token, **kw)

    @classmethod
    def longrope2(cls, head_dim: int, original_max_position_embeddings: int, max_position_embeddings: int,
                  upper_factors: Optional[Sequence[float]] = None, base: float = 10000.0,
                  rotary_dim: Optional[int] = None, **kw) -> "LongRoPEConfig":
        """LongRoPE2: NTK-style factors below the critical dimension d_cd, searched factors
        (>= s, non-decreasing) from d_cd on. ``upper_factors`` (length r/2 - d_cd) defaults to s."""
        r = rotary_dim or head_dim
        s = max_position_embeddings / original_max_position_embeddings
        d_cd = critical_dimension(r, base, original_max_position_embeddings)
        upper = [s] * (r // 2 - d_cd) if upper_factors is None else [float(x) for x in upper_factors]
        if len(upper) != r // 2 - d_cd:
            raise ValueError(f"upper_factors has length {len(upper)}, expected r/2 - d_cd = {r // 2 - d_cd}")
        if any(a > b for a, b in zip(upper, upper[1:])) or (upper and upper[0] < s):
            raise ValueError(f"upper_factors must be non-decreasing and >= s = {s}")
        return cls(head_dim=head_dim, rotary_dim=rotary_dim, base=base,
                   original_max_position_embeddings=original_max_position_embeddings,
                   max_position_embeddings=max_position_embeddings,
                   long_factor=ntk_factors(r, s)[:d_cd] + upper, **kw)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, hf_config) -> "LongRoPEConfig":
        """Build from a transformers ``PretrainedConfig`` (rope_parameters or the older rope_scaling).

        Supports the rope types 'default', 'linear', 'yarn', 'llama3' and 'longrope'. Phi-3
        keeps original_max_position_embeddings at the top level; Llama/Mistral/Qwen2 inside
        the rope dict — both are read. The rope dict's 'short_mscale' / 'long_mscale' are read
        for the model types whose transformers code applies them (PhiMoE); every other model
        applies attention_factor in both regimes and ignores them, and so does from_hf (with a
        warning), so that a patched model runs what the stock one runs.
        """
        params = dict(_hf_rope_dict(hf_config))
        rope_type = params.get("rope_type", params.get("type", "default"))
        n_heads = getattr(hf_config, "num_attention_heads")
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
        prf = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None)) or 1.0
        if rope_type == "default" and getattr(hf_config, "model_type", None) in _FULL_DIM_DEFAULT_MODELS:
            prf = 1.0  # these families' default rotary ignores partial_rotary_factor
        rotary_dim = int(head_dim * prf)
        base = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        max_pos = int(hf_config.max_position_embeddings)
        orig = getattr(hf_config, "original_max_position_embeddings", None) if rope_type == "longrope" else None
        orig = int(orig or params.get("original_max_position_embeddings") or max_pos)
        common = dict(head_dim=head_dim, rotary_dim=rotary_dim, base=base,
                      original_max_position_embeddings=orig,
                      max_position_embeddings=max(max_pos, orig),
                      start_token=int(params.get("longrope_start_token", 0)),
                      **_hf_regime_mscales(hf_config, params, rope_type))
        half = rotary_dim // 2
        if rope_type == "longrope":
            factor = params.get("factor")
            attn = params.get("attention_factor")
            if attn is None and factor is not None:
                attn = default_mscale(float(factor), orig)
            return cls(short_factor=params["short_factor"], long_factor=params["long_factor"],
                       attention_factor=attn, **common)
        if rope_type == "default":
            lam, attn = [1.0] * half, 1.0
        elif rope_type == "linear":
            lam, attn = [float(params["factor"])] * half, 1.0
        elif rope_type == "yarn":
            factor = params.get("factor") or max_pos / orig
            lam = yarn_factors(rotary_dim, base, float(factor), orig, params.get("beta_fast") or 32.0,
                               params.get("beta_slow") or 1.0, truncate=params.get("truncate", True))
            attn = params.get("attention_factor")
            if attn is None:
                mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
                attn = (yarn_mscale_scaled(factor, mscale) / yarn_mscale_scaled(factor, mscale_all)
                        if mscale and mscale_all else yarn_mscale(factor))
        elif rope_type == "llama3":
            lam = llama3_factors(rotary_dim, base, float(params["factor"]), float(params["low_freq_factor"]),
                                 float(params["high_freq_factor"]), orig)
            attn = 1.0
        else:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported (supported: {', '.join(_HF_STATIC_TYPES)}, longrope)")
        return cls(short_factor=lam, long_factor=lam, attention_factor=attn, **common)

    def to_hf(self) -> dict:
        """A ``rope_parameters`` dict (rope_type 'longrope') that stock transformers runs with the
        same numbers. n_hat > 0 has no Hugging Face equivalent: it is written as
        'longrope_start_token', which only this library reads.

        A config with short_mscale / long_mscale also gets those keys (resolved, as transformers'
        PhiMoE reads them); attention_factor is then the factor both regimes share, or ``mscale``
        when they differ: a model that applies one attention_factor in both regimes cannot run
        two (``set_rope`` refuses to write them into one)."""
        if self.interleaved:
            raise ValueError("interleaved pairs have no Hugging Face equivalent (HF rotates (i, i + r/2))")
        short_m, long_m = self.regime_mscale(False), self.regime_mscale(True)
        out: dict[str, Any] = {
            "rope_type": "longrope",
            "rope_theta": self.base,
            "short_factor": list(self.short_factor),
            "long_factor": list(self.long_factor),
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "attention_factor": short_m if short_m == long_m else self.mscale,
        }
        if self.short_mscale is not None or self.long_mscale is not None:
            out["short_mscale"], out["long_mscale"] = short_m, long_m
        if self.rotary_dim != self.head_dim:
            out["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        if self.start_token:
            out["longrope_start_token"] = self.start_token
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Every constructor field, by the same names."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, path_or_text) -> "LongRoPEConfig":
        """From a file path or from the JSON text itself."""
        text = str(path_or_text)
        if not text.lstrip().startswith(("{", "[")):
            if not os.path.exists(text):
                raise FileNotFoundError(f"LongRoPEConfig JSON: no such file {text!r}")
            with open(text, encoding="utf-8") as f:
                text = f.read()
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("LongRoPEConfig JSON must be an object")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LongRoPEConfig fields in JSON: {sorted(unknown)}")
        return cls(**data)


# Model types whose transformers code multiplies cos/sin by the rope dict's short_mscale or
# long_mscale, by regime (PhimoeRotaryEmbedding.forward: the key wins over attention_factor). Every
# other model (Phi-3 included: _compute_longrope_parameters) applies one attention_factor in both
# regimes and ignores those keys.
_REGIME_MSCALE_MODELS = ("phimoe",)
_REGIME_MSCALE_KEYS = ("short_mscale", "long_mscale")


def _hf_regime_mscales(hf_config, params: dict, rope_type: str) -> dict:
    """The rope dict's per-regime attention factors as LongRoPEConfig fields, where the model applies them."""
    given = {key: params[key] for key in _REGIME_MSCALE_KEYS if params.get(key) is not None}
    model_type = getattr(hf_config, "model_type", None)
    if not given or (model_type in _REGIME_MSCALE_MODELS and rope_type != "default"):
        return given
    warnings.warn(f"the rope dict has {', '.join(sorted(given))}, which transformers' {model_type!r} model "
                  f"ignores (it applies attention_factor in both regimes); LongRoPEConfig.from_hf ignores them "
                  f"too. Pass LongRoPEConfig(short_mscale=..., long_mscale=...) to run them.", UserWarning,
                  stacklevel=3)
    return {}


def _hf_rope_dict(hf_config) -> dict:
    """The rope dict of a transformers config: rope_parameters (v5) or rope_scaling (v4)."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        raise TypeError(f"unexpected rope_parameters type {type(params).__name__}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    return params


def ntk_factors(rotary_dim: int, scale: float) -> list[float]:
    """NTK-aware lambda_i = s ** (2i / (r - 2)): base' = base * s ** (r / (r - 2))."""
    half = rotary_dim // 2
    denom = max(rotary_dim - 2, 1)
    return [scale ** (2 * i / denom) for i in range(half)]


def yarn_factors(rotary_dim: int, base: float, scale: float, original_max_position_embeddings: int,
                 beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> list[float]:
    """YaRN's per-dimension factors lambda_i = theta_i / inv_freq_i (Hugging Face's formula)."""
    half = rotary_dim // 2

    def correction_dim(rotations):
        return rotary_dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i in range(half):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrapolation = 1.0 - ramp  # weight of the unscaled frequency
        out.append(1.0 / (extrapolation + (1.0 - extrapolation) / scale))
    return out


def yarn_mscale_scaled(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def llama3_factors(rotary_dim: int, base: float, factor: float, low_freq_factor: float,
                   high_freq_factor: float, original_max_position_embeddings: int) -> list[float]:
    """Llama-3.1 per-dimension factors (wavelength bands: keep, smooth ramp, divide by factor)."""
    half = rotary_dim // 2
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    out = []
    for i in range(half):
        theta = base ** (-2 * i / rotary_dim)
        wavelen = 2 * math.pi / theta
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out
