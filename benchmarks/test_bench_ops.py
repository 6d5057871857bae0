"""pytest-benchmark entries for the registry's operations at small sizes.

    pytest benchmarks/ --benchmark-only                # CUDA if present, else tiny CPU shapes
    pytest benchmarks/ --benchmark-only -k "attention and ours"

Every provider of ``registry.PROVIDERS`` on rotary, attention and decode, forward and
forward+backward; a provider that cannot run here is skipped with its reason. On a CPU these
are PyTorch paths at tiny sizes: a harness check, not kernel performance. The full sweeps, the
targets and the JSON are ``python -m benchmarks.run``.
"""

import pytest
import torch

from benchmarks import providers, registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (batch, seq, q heads, kv heads, head_dim)
SMALL = (2, 1024, 16, 4, 128) if DEVICE == "cuda" else (1, 64, 4, 2, 64)
DTYPES = registry.DTYPES if DEVICE == "cuda" else ("bf16",)


def _params():
    b, s, hq, hk, d = SMALL
    for dtype in DTYPES:
        for mode in registry.MODES:
            cases = [registry.Case("rotary", mode, dtype, b, hq, hk, s, s, d),
                     registry.Case("attention", mode, dtype, b, hq, hk, s, s, d, causal=True)]
            if mode == "fwd":
                cases.append(registry.Case("decode", mode, dtype, b, hq, hk, 1, 4 * s, d, causal=False))
            for case in cases:
                for name, provider in registry.PROVIDERS.items():
                    if case.op in provider.ops:
                        yield pytest.param(case, name, id=f"{case.op}-{mode}-{dtype}-{name}")


@pytest.mark.parametrize(("case", "provider"), list(_params()))
def test_op(benchmark, case, provider):
    try:
        runnable = providers.build(provider, case, DEVICE)
    except providers.Unavailable as exc:
        pytest.skip(str(exc))
    runnable.fn()  # warm-up: autotuning, torch.compile

    def step():
        for t in runnable.grad_to_none:
            t.grad = None
        runnable.fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(case=case.id, provider=provider, device=DEVICE,
                                cpu_timing=DEVICE == "cpu", flops=registry.flops(case),
                                bytes=registry.bytes_moved(case))
    benchmark(step)
