"""Split-KV decoding (Sq <= 16 against a rotated cache) vs the float64 reference.

fused_rope_attention takes the decode kernels by itself for Sq <= 16; these tests drive it the
way a generation step does (keys rotated once into a cache, k_is_rotated=True) and check the
split machinery directly: any split count gives the same result. Tolerances as in
tests/test_attention.py (fp32 2e-5 of float64; fp16 within 2x PyTorch's own fp16 error).
"""

import pytest
import torch

from longrope_triton import apply_rotary, fused_rope_attention
from longrope_triton.decode import DECODE_MAX_QUERIES, decode_forward, split_plan
from longrope_triton.reference import fused_rope_attention_reference
from test_attention import assert_close_to_reference, make_cfg, make_qkv, run_with_grads

CASES = [
    pytest.param(1, 32, 8, 1, 4099, 128, False, id="B1-H32/8-Sq1-Sk4099-D128"),
    pytest.param(2, 9, 3, 2, 1000, 96, False, id="B2-H9/3-Sq2-Sk1000-D96"),
    pytest.param(1, 4, 1, 7, 17, 64, False, id="B1-H4/1-Sq7-Sk17-D64-MQA"),
    pytest.param(1, 9, 3, 16, 1000, 64, True, id="B1-H9/3-Sq16-Sk1000-D64-near-2^21"),
    pytest.param(2, 4, 2, 1, 1, 64, False, id="B2-H4/2-Sq1-Sk1-D64"),
    pytest.param(1, 8, 2, 16, 17, 128, True, id="B1-H8/2-Sq16-Sk17-D128-near-2^21"),
]


def cache_step(cfg, q, k, v, near_end):
    """Positions of a generation step (the last Sq of Sk tokens), the keys rotated into a cache as
    apply_rotary gives them, and the regime length the step uses."""
    sq, sk = q.shape[2], k.shape[2]
    top = cfg.max_position_embeddings if near_end else sk
    k_pos, q_pos = torch.arange(top - sk, top), torch.arange(top - sq, top)
    k_rot = apply_rotary(k[:, :0], k, cfg, position_ids=k_pos, seq_len=top)[1]
    return k_rot, dict(position_ids=q_pos, kv_position_ids=k_pos, seq_len=top)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,hq,hk,sq,sk,d,near_end", CASES)
def test_decode_step_matches_reference(path, dtype, b, hq, hk, sq, sk, d, near_end):
    cfg = make_cfg(d, original=64, maximum=(1 << 21) if near_end else 8192)
    q, k, v = (t.detach() for t in make_qkv(b, hq, hk, sq, sk, d, dtype, bshd=True))
    k_rot, kwargs = cache_step(cfg, q, k, v, near_end)
    ours_fn = lambda q_, v_: fused_rope_attention(q_, k_rot, v_, cfg, k_is_rotated=True, **kwargs)  # noqa: E731
    ref_fn = lambda q_, v_, dt=torch.float64: fused_rope_attention_reference(  # noqa: E731
        q_, k.to(q_.dtype), v_, cfg, dtype=dt, **kwargs)
    if sk > 1000:  # the longest cache: forward only (the backward is the prefill one, tested elsewhere)
        ours, reference = [ours_fn(q, v)], [ref_fn(q.double(), v.double())]
        eager = [ref_fn(q, v, dtype)] if dtype != torch.float32 else reference
    else:  # the split-KV forward's LSE feeds the backward kernels: check the gradients too
        grad_out = torch.randn(b, hq, sq, d, dtype=dtype)
        ours = run_with_grads(ours_fn, (q, v), grad_out)
        reference = run_with_grads(ref_fn, [q.double(), v.double()], grad_out.double())
        eager = run_with_grads(lambda q_, v_: ref_fn(q_, v_, dtype), (q, v), grad_out) \
            if dtype != torch.float32 else reference
    assert ours[0].dtype == dtype
    assert_close_to_reference(ours, reference, eager, dtype, names=("out", "dq", "dv"))


def test_the_decode_path_is_taken_for_few_queries(path, monkeypatch):
    import longrope_triton.attention as attention

    if path == "torch":
        pytest.skip("the PyTorch path has no separate decode kernel")
    calls = []
    monkeypatch.setattr(attention, "decode_forward", lambda *a, **kw: calls.append(1) or decode_forward(*a, **kw))
    cfg = make_cfg()
    for sq in (1, DECODE_MAX_QUERIES, DECODE_MAX_QUERIES + 1):
        q, k, v = (t.detach() for t in make_qkv(1, 4, 2, sq, 40, 64, torch.float32))
        fused_rope_attention(q, k, v, cfg)
    assert len(calls) == 2, "Sq <= 16 takes the split-KV kernels, Sq = 17 the prefill kernel"


@pytest.mark.parametrize("sq,sk", [(1, 1), (2, 17), (7, 1000), (16, 4099)])
def test_every_split_count_gives_the_same_result(path, sq, sk):
    if path == "torch":
        pytest.skip("the split count is a kernel parameter")
    q, k, v = (t.detach() for t in make_qkv(1, 6, 2, sq, sk, 64, torch.float32))
    base_out, base_lse = decode_forward(q, k, v, True, 0.125, num_splits=1)
    ref = torch.softmax((q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2) * 0.125).masked_fill(
        torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + (sk - sq), float("-inf")), -1)
    assert (base_out.double() - ref @ v.double().repeat_interleave(3, 1)).abs().max() < 2e-5
    for splits in (2, 3, 7, 64, 1000):
        out, lse = decode_forward(q, k, v, True, 0.125, num_splits=splits)
        assert (out - base_out).abs().max() < 1e-6, f"{splits} splits"
        assert (lse - base_lse).abs().max() < 1e-5, f"{splits} splits"


@pytest.mark.parametrize("block_n", [32, 64])
def test_split_plan_covers_the_cache(block_n):
    for seq_k in (1, 63, 64, 65, 4099, 131072):
        for wanted in (None, 1, 5, 10**6):
            n, length = split_plan(8, seq_k, torch.device("cpu"), block_n, wanted)
            assert 1 <= n and (n - 1) * length < seq_k <= n * length and length % block_n == 0


def test_a_cache_shorter_than_the_queries_is_rejected():
    cfg = make_cfg()
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 8, 5, 64, torch.float32))
    with pytest.raises(ValueError, match="cache"):
        fused_rope_attention(q, k, v, cfg, k_is_rotated=True)
    with pytest.raises(ValueError, match="heads"):
        fused_rope_attention(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1), cfg, k_is_rotated=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sq,sk", [(1, 32768), (4, 131072)])
def test_decode_bf16_on_gpu(sq, sk):
    """bf16 (which the interpreter cannot run) on the compiled kernels, long caches, 32/8 heads."""
    torch.manual_seed(0)
    cfg = make_cfg(128, original=4096, maximum=1 << 18)
    q, k, v = (torch.randn(1, h, s, 128, device="cuda", dtype=torch.bfloat16) for h, s in ((32, sq), (8, sk), (8, sk)))
    k_rot, kwargs = cache_step(cfg, q, k, v, near_end=False)
    out = fused_rope_attention(q, k_rot, v, cfg, k_is_rotated=True, **kwargs)
    ref = fused_rope_attention_reference(q.double(), k.double(), v.double(), cfg, **kwargs)
    eager = fused_rope_attention_reference(q, k, v, cfg, dtype=torch.bfloat16, **kwargs)  # PyTorch in bf16
    assert (out.double() - ref).abs().max() <= 2 * (eager.double() - ref).abs().max() + 1e-4


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_patched_generation_decodes_with_the_split_kernels(path, cache_kind, monkeypatch):
    """A patched model's generation steps (DynamicCache and StaticCache) take the split-KV kernels,
    and the tokens and per-step logits equal a recompute of the whole sequence without a cache."""
    import longrope_triton.attention as attention
    from longrope_triton import patch_model, unpatch_model
    from test_hf import TOL, _generate, _ids, _recompute_logits, make_model
    from transformers import StaticCache

    if path == "torch":
        pytest.skip("the PyTorch path has no separate decode kernel")
    calls = []
    monkeypatch.setattr(attention, "decode_forward", lambda *a, **kw: calls.append(a[0].shape[2]) or
                        decode_forward(*a, **kw))
    model = make_model("llama")
    cache = StaticCache(config=model.config, max_cache_len=64) if cache_kind == "static" else None
    patch_model(model)
    sequences, logits = _generate(model, _ids(1, 36), 4, cache)
    reference = _recompute_logits(unpatch_model(model), sequences, 36)
    assert calls and set(calls) == {1}, "every one-token step runs the split-KV kernels"
    assert (logits - reference).abs().max() <= TOL
