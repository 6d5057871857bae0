"""Every benchmarked operation, provider, sweep and target, declared once.

An *item* of a plan is one case (operation, shape, dtype, mode) and the providers to run on
it; ``run.py`` turns each (case, provider) pair into one result row of the JSON. Nothing here
touches a device: the plans are data, so ``--list`` and the tests can read them anywhere.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

from longrope_triton import LongRoPEConfig

K = 1024
DTYPES = ("bf16", "fp16")
MODES = ("fwd", "fwd+bwd")
BACKWARD_FLOP_FACTOR = 2.5  # backward = 2.5x the forward FLOPs (FlashAttention convention)


# ---------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration. Tensors are (batch, heads, seq, head_dim) views of
    (batch, seq, heads, head_dim) storage, the layout a transformers attention module passes."""

    op: str  # "rotary" | "attention" | "decode" | "prefill" | "decode_step"
    mode: str  # "fwd" | "fwd+bwd"
    dtype: str  # "bf16" | "fp16"
    batch: int
    q_heads: int = 0
    kv_heads: int = 0
    seq_q: int = 0
    seq_k: int = 0
    head_dim: int = 0
    causal: bool = True
    model: str = ""  # prefill and decode_step only

    @property
    def id(self) -> str:
        if self.op == "prefill":
            return f"prefill-{self.mode}-{self.dtype}-{self.model}-B{self.batch}-S{self.seq_q}"
        if self.op == "decode_step":
            return f"decode_step-{self.dtype}-{self.model}-B{self.batch}-K{self.seq_k}"
        seq = f"S{self.seq_q}" if self.seq_q == self.seq_k else f"S{self.seq_q}x{self.seq_k}"
        mask = "causal" if self.causal else "full"
        return (f"{self.op}-{self.mode}-{self.dtype}-B{self.batch}-H{self.q_heads}/{self.kv_heads}-{seq}"
                f"-D{self.head_dim}" + (f"-{mask}" if self.op != "rotary" else ""))

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_q

    def shape(self) -> dict:
        return {"batch": self.batch, "q_heads": self.q_heads, "kv_heads": self.kv_heads, "seq_q": self.seq_q,
                "seq_k": self.seq_k, "head_dim": self.head_dim, "causal": self.causal, "model": self.model}


def flops(case: Case) -> Optional[float]:
    """Analytic attention FLOPs: 4 B Hq Sq Sk D, halved when causal (Sq == Sk), backward 2.5x."""
    if case.op not in ("attention", "decode"):
        return None
    f = 4.0 * case.batch * case.q_heads * case.seq_q * case.seq_k * case.head_dim
    if case.causal and case.seq_q == case.seq_k:
        f /= 2
    return f * (1 + BACKWARD_FLOP_FACTOR) if case.mode == "fwd+bwd" else f


def bytes_moved(case: Case) -> Optional[float]:
    """Rotary: read q and k, write q_rot and k_rot (the backward moves the same again).
    Decode: the K and V cache read once (what bounds a decode step)."""
    elem = 2  # fp16 / bf16
    if case.op == "decode":
        return 2.0 * case.batch * case.kv_heads * case.seq_k * case.head_dim * elem
    if case.op != "rotary":
        return None
    once = 2.0 * case.batch * case.seq_q * (case.q_heads + case.kv_heads) * case.head_dim * elem
    return 2 * once if case.mode == "fwd+bwd" else once


def bench_config(head_dim: int, original: int = 4096, maximum: int = 256 * K) -> LongRoPEConfig:
    """A LongRoPE config with searched-looking factors: non-uniform, increasing, distinct per regime.

    No n_hat (start_token 0): transformers has none, and the eager baseline must compute the same
    function. Sequences longer than ``original`` take the long factors in every provider.
    """
    half = head_dim // 2
    s = maximum / original
    long_factor = [1.0 + (s - 1.0) * (i / (half - 1)) ** 1.5 for i in range(half)]
    short_factor = [1.0 + 0.25 * i / (half - 1) for i in range(half)]
    return LongRoPEConfig(head_dim=head_dim, base=10000.0, original_max_position_embeddings=original,
                          max_position_embeddings=maximum, short_factor=short_factor, long_factor=long_factor)


# ---------------------------------------------------------------------------- providers
@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    ops: tuple
    description: str
    rope: str = "LongRoPE"
    requires: tuple = ()  # importable modules; missing -> "unavailable" with the reason


_LONGROPE_EAGER = ("Hugging Face LongRoPE as transformers runs it: pick short/long inv_freq from "
                   "max(position_ids)+1, cos/sin from fp32 inv_freq @ positions, rotate_half, multiply-add")
PROVIDERS = {p.name: p for p in [
    # rotary alone
    Provider("ours", ("rotary", "attention", "decode"),
             "longrope_triton: apply_rotary (rotary) / fused_rope_attention with the rotation fused in "
             "(attention; decode with k_is_rotated=True)"),
    Provider("eager_hf", ("rotary",), _LONGROPE_EAGER + " (cos/sin built in every call)"),
    Provider("eager_hf_apply", ("rotary",),
             "the same eager rotation with cos/sin precomputed outside the timed region (a model builds "
             "them once per forward and reuses them in every layer)"),
    Provider("compile_hf", ("rotary",), "torch.compile of eager_hf's math (regime picked outside the graph)"),
    Provider("liger", ("rotary",), "Liger-Kernel liger_rotary_pos_emb, cos/sin tables precomputed",
             rope="plain RoPE (Liger has no LongRoPE, no position_ids)", requires=("liger_kernel",)),
    Provider("flash_attn", ("rotary",), "flash-attn Triton rotary (flash_attn.layers.rotary.apply_rotary_emb), "
             "cos/sin tables precomputed", rope="plain RoPE (flash-attn has no LongRoPE)", requires=("flash_attn",)),
    # attention
    Provider("sdpa_flash_norope", ("attention",),
             "scaled_dot_product_attention, SDPBackend.FLASH_ATTENTION, on q and k without any rotation: "
             "PyTorch's attention floor", rope="none"),
    Provider("ours_prefill_kernel", ("decode",),
             "longrope_triton's prefill kernel on the same decode step (the path before split-KV decoding: "
             "a BLOCK_M-row tile per query head, one program walking the whole cache)"),
    Provider("ours_norope", ("attention", "decode"),
             "longrope_triton attention kernel with rotation disabled (rotate_q=rotate_k=False): the cost "
             "floor that the fused rotation is measured against", rope="none"),
    Provider("eager_sdpa_flash", ("attention", "decode"),
             "eager HF LongRoPE + scaled_dot_product_attention, SDPBackend.FLASH_ATTENTION (the baseline)"),
    Provider("eager_sdpa_efficient", ("attention", "decode"),
             "eager HF LongRoPE + scaled_dot_product_attention, SDPBackend.EFFICIENT_ATTENTION"),
    Provider("eager_sdpa_cudnn", ("attention", "decode"),
             "eager HF LongRoPE + scaled_dot_product_attention, SDPBackend.CUDNN_ATTENTION"),
    Provider("compile_sdpa", ("attention", "decode"),
             "torch.compile of eager HF LongRoPE + scaled_dot_product_attention (default SDPA dispatch)"),
    # model prefill
    Provider("hf_sdpa", ("prefill",), "stock transformers model, attn_implementation='sdpa'"),
    Provider("hf_patched", ("prefill",), "the same model after longrope_triton.hf.patch_model"),
    # model decode step (a patched model, one token against a StaticCache)
    Provider("patched_eager", ("decode_step",), "patched model, one decode step against a StaticCache, eager"),
    Provider("patched_compiled", ("decode_step",),
             "the same step with model.forward = torch.compile(fullgraph=True) (inductor on CUDA)"),
    Provider("patched_cudagraph", ("decode_step",),
             "the same step captured once in a torch.cuda.CUDAGraph and replayed (CUDA only)"),
]}
BASELINE = {"rotary": "eager_hf", "attention": "eager_sdpa_flash", "decode": "eager_sdpa_flash",
            "prefill": "hf_sdpa", "decode_step": "patched_eager"}
COMPILE_PROVIDERS = ("compile_hf", "compile_sdpa")
ROTARY_PROVIDERS = tuple(n for n, p in PROVIDERS.items() if "rotary" in p.ops)
ATTENTION_PROVIDERS = tuple(n for n, p in PROVIDERS.items() if "attention" in p.ops)
DECODE_PROVIDERS = tuple(n for n, p in PROVIDERS.items() if "decode" in p.ops)
PREFILL_PROVIDERS = ("hf_sdpa", "hf_patched")
STEP_PROVIDERS = ("patched_eager", "patched_compiled", "patched_cudagraph")


# ---------------------------------------------------------------------------- plans
@dataclasses.dataclass(frozen=True)
class Item:
    case: Case
    providers: tuple
    families: tuple  # sweeps the case belongs to (a plot per family)


def _rotary(mode, dtype, b, s, hq, hk, d):
    return Case("rotary", mode, dtype, b, hq, hk, s, s, d)


def _attn(mode, dtype, b, s, hq=32, hk=8, d=128, causal=True):
    return Case("attention", mode, dtype, b, hq, hk, s, s, d, causal)


def _decode(dtype, b, sk, hq=32, hk=8, d=128):
    return Case("decode", "fwd", dtype, b, hq, hk, 1, sk, d, causal=False)


def _prefill(model, s, dtype="bf16"):
    return Case("prefill", "fwd", dtype, 1, seq_q=s, seq_k=s, model=model)


def _step(model, cache, b=1, dtype="bf16"):
    """One decode step of a patched model whose StaticCache holds ``cache`` slots (the step writes the last)."""
    return Case("decode_step", "fwd", dtype, b, seq_q=1, seq_k=cache, model=model)


# The target shapes (H100, bf16).
TARGET_ROTARY = dict(b=1, s=16 * K, hq=32, hk=32, d=128)
TARGET_ATTN_SHAPES = ((4, 4 * K), (1, 16 * K))
TARGET_MEMORY_SHAPE = (1, 32 * K)
SEQ_SWEEP = ((16, 1 * K), (8, 2 * K), (4, 4 * K), (2, 8 * K), (1, 16 * K), (1, 32 * K), (1, 64 * K), (1, 128 * K))
DECODE_CACHE = (8 * K, 32 * K, 128 * K)
PREFILL_TOKENS = (8 * K, 16 * K, 32 * K)
STEP_CACHE = (8 * K, 32 * K)
# torch.compile costs tens of seconds of compilation per shape and mode: a few sweep points only.
COMPILE_SEQS = (1 * K, 4 * K, 16 * K, 32 * K)


def _no_compile(providers):
    return tuple(p for p in providers if p not in COMPILE_PROVIDERS)


def full_plan() -> list[Item]:
    """Everything: both dtypes, both modes, every sweep of the issue."""
    items: list[Item] = []
    for dtype in DTYPES:
        for mode in MODES:
            for _, s in SEQ_SWEEP:  # batch 1: the rotary cost follows the token count
                providers = ROTARY_PROVIDERS if s in COMPILE_SEQS else _no_compile(ROTARY_PROVIDERS)
                items.append(Item(_rotary(mode, dtype, 1, s, 32, 32, 128), providers, ("rotary_seq",)))
            items.append(Item(_rotary(mode, dtype, 1, 16 * K, 32, 8, 128), _no_compile(ROTARY_PROVIDERS),
                              ("rotary_gqa",)))
            items.append(Item(_rotary(mode, dtype, 1, 16 * K, 32, 32, 64), _no_compile(ROTARY_PROVIDERS),
                              ("rotary_headdim",)))
    for dtype in DTYPES:
        for mode in MODES:
            for b, s in SEQ_SWEEP:
                providers = ATTENTION_PROVIDERS if s in COMPILE_SEQS else _no_compile(ATTENTION_PROVIDERS)
                items.append(Item(_attn(mode, dtype, b, s), providers, ("attn_seq",)))
            for b, s in TARGET_ATTN_SHAPES:
                items.append(Item(_attn(mode, dtype, b, s, d=64), _no_compile(ATTENTION_PROVIDERS), ("attn_headdim",)))
                for hk in (32, 4):  # GQA ratios 1 and 8 (4 is the seq sweep)
                    items.append(Item(_attn(mode, dtype, b, s, hk=hk), _no_compile(ATTENTION_PROVIDERS),
                                      ("attn_gqa",)))
                items.append(Item(_attn(mode, dtype, b, s, causal=False), _no_compile(ATTENTION_PROVIDERS),
                                  ("attn_noncausal",)))
        for b, sk in itertools.product((1, 16), DECODE_CACHE):
            items.append(Item(_decode(dtype, b, sk), DECODE_PROVIDERS, ("decode",)))
    for s in PREFILL_TOKENS:
        items.append(Item(_prefill("llama-1b", s), PREFILL_PROVIDERS, ("prefill",)))
    items.append(Item(_prefill("smollm2-135m", 8 * K), PREFILL_PROVIDERS, ("prefill",)))
    for b, cache in itertools.product((1, 8), STEP_CACHE):
        items.append(Item(_step("llama-1b", cache, b), STEP_PROVIDERS, ("decode_step",)))
    return _targets_first(items)


def quick_plan() -> list[Item]:
    """~6 minutes on an H100 including autotuning and compilation, most informative first:
    the target cases (bf16), then torch.compile on them, then a few sweep points."""
    dtype = "bf16"
    main = ("ours", "ours_norope", "eager_sdpa_flash")
    items = []
    for mode in MODES:
        items.append(Item(_rotary(mode, dtype, **TARGET_ROTARY), _no_compile(ROTARY_PROVIDERS), ("rotary_seq",)))
    for mode in MODES:
        for b, s in TARGET_ATTN_SHAPES:
            items.append(Item(_attn(mode, dtype, b, s), _no_compile(ATTENTION_PROVIDERS), ("attn_seq",)))
    items.append(Item(_attn("fwd+bwd", dtype, *TARGET_MEMORY_SHAPE),
                      ("ours", "ours_norope", "eager_sdpa_flash", "eager_sdpa_cudnn"), ("attn_seq",)))
    for b in (1, 16):
        for sk in (8 * K, 32 * K, 128 * K):
            items.append(Item(_decode(dtype, b, sk), ("ours", "ours_prefill_kernel", "eager_sdpa_flash"),
                              ("decode",)))
    for mode in MODES:
        items.append(Item(_rotary(mode, dtype, **TARGET_ROTARY), ("compile_hf",), ("rotary_seq",)))
        for b, s in TARGET_ATTN_SHAPES:
            items.append(Item(_attn(mode, dtype, b, s), ("compile_sdpa",), ("attn_seq",)))
    for b, s in ((16, 1 * K), (1, 64 * K)):
        for mode in MODES:
            items.append(Item(_attn(mode, dtype, b, s), main, ("attn_seq",)))
    items.append(Item(_attn("fwd", dtype, *TARGET_MEMORY_SHAPE), main, ("attn_seq",)))
    items.append(Item(_prefill("llama-1b", 16 * K), PREFILL_PROVIDERS, ("prefill",)))
    items.append(Item(_step("llama-1b", 8 * K), STEP_PROVIDERS, ("decode_step",)))
    return items


def cpu_smoke_plan() -> list[Item]:
    """Tiny shapes that prove the harness end to end on a CPU in seconds: every provider, op, dtype
    and mode at least once, two sequence lengths per plotted sweep, a tiny model prefill."""
    short_r, short_a = ("ours", "eager_hf", "eager_hf_apply"), ("ours", "ours_norope", "eager_sdpa_flash")
    return [
        Item(_rotary("fwd", "bf16", 1, 64, 4, 2, 64), short_r, ("rotary_seq",)),
        Item(_rotary("fwd", "bf16", 1, 128, 4, 2, 64), ROTARY_PROVIDERS, ("rotary_seq",)),
        Item(_rotary("fwd+bwd", "fp16", 1, 128, 4, 2, 64), short_r, ("rotary_seq",)),
        Item(_attn("fwd", "bf16", 2, 64, 4, 2, 64), short_a, ("attn_seq",)),
        Item(_attn("fwd", "bf16", 1, 128, 4, 2, 64), ATTENTION_PROVIDERS, ("attn_seq",)),
        Item(_attn("fwd+bwd", "fp16", 1, 128, 4, 2, 64), short_a + ("sdpa_flash_norope",), ("attn_seq",)),
        Item(_attn("fwd", "fp16", 1, 128, 4, 2, 64, causal=False), short_a, ("attn_noncausal",)),
        Item(_decode("bf16", 2, 128, 4, 2, 64), short_a, ("decode",)),
        Item(_decode("bf16", 2, 256, 4, 2, 64), short_a + ("ours_prefill_kernel",), ("decode",)),
        Item(_prefill("llama-tiny", 128), PREFILL_PROVIDERS, ("prefill",)),
        Item(_step("llama-tiny", 128), STEP_PROVIDERS, ("decode_step",)),
    ]


PLANS = {"full": full_plan, "quick": quick_plan, "cpu-smoke": cpu_smoke_plan}


# ---------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    """A claim checked against one measured case: ``metric`` of ``provider`` compared with
    ``threshold``. Metrics: copy_bw_fraction, speedup (vs the op's eager baseline),
    vs_norope (ours_norope time / ours time), peak_ratio (peak memory / the baseline's)."""

    name: str
    description: str
    case: Case
    provider: str
    metric: str
    threshold: float
    higher_is_better: bool = True


def targets() -> list[Target]:
    out = [
        Target("rotary_bandwidth", "rotary kernel >= 80 % of device copy bandwidth (16K tokens x 32 heads x 128)",
               _rotary("fwd", "bf16", **TARGET_ROTARY), "ours", "copy_bw_fraction", 0.80),
        Target("rotary_vs_eager", "rotary kernel >= 5x eager HF-style LongRoPE rotary (16K tokens x 32 heads x 128)",
               _rotary("fwd", "bf16", **TARGET_ROTARY), "ours", "speedup", 5.0),
    ]
    for b, s in TARGET_ATTN_SHAPES:
        tag = f"B{b}x{s // K}K"
        out += [
            Target(f"attn_fwd_vs_sdpa_{tag}", f"fused forward >= 1.3x eager rotation + SDPA-flash ({tag}, 32/8 heads, "
                   "D128, causal)", _attn("fwd", "bf16", b, s), "ours", "speedup", 1.3),
            Target(f"attn_fwdbwd_vs_sdpa_{tag}", f"fused forward+backward >= 1.2x eager rotation + SDPA-flash ({tag})",
                   _attn("fwd+bwd", "bf16", b, s), "ours", "speedup", 1.2),
            Target(f"attn_fwd_vs_norope_{tag}", f"fused forward at >= 95 % of the speed of our kernel without "
                   f"rotation ({tag})", _attn("fwd", "bf16", b, s), "ours", "vs_norope", 0.95),
        ]
    out.append(Target("attn_memory_32K", "peak memory of fused forward+backward <= 0.8x the eager path's "
                      "(B1x32K, torch.cuda.max_memory_allocated, inputs and gradients included)",
                      _attn("fwd+bwd", "bf16", *TARGET_MEMORY_SHAPE), "ours", "peak_ratio", 0.8,
                      higher_is_better=False))
    return out


def _targets_first(items: list[Item]) -> list[Item]:
    """Stable order with the target cases first, so a run cut short still answers the targets."""
    wanted = {t.case.id for t in targets()}
    return sorted(items, key=lambda it: it.case.id not in wanted)
