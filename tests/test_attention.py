"""fused_rope_attention vs the float64 reference: forward and backward, both execution paths.

The "kernel" path is the Triton kernel (the interpreter on CPU under TRITON_INTERPRET=1,
compiled on CUDA); the "torch" path is the PyTorch fallback. Tolerances: fp32 within
2e-5 of the float64 reference (relative to the output scale); fp16 within 2x the
error of PyTorch's own fp16 computation of the same thing (flash-attn's rule).
"""

import math

import pytest
import torch

from longrope_triton import LongRoPEConfig, apply_rotary, fused_rope_attention
from longrope_triton._dispatch import triton_interpret
from longrope_triton.reference import fused_rope_attention_reference, varlen_attention_reference

INTERPRETED = triton_interpret()


def make_cfg(head_dim=64, rotary_dim=None, original=64, maximum=4096, start_token=3, interleaved=False, seed=1):
    """A config whose factors differ per dimension and between regimes (a uniform factor hides index bugs)."""
    r = rotary_dim or head_dim
    g = torch.Generator().manual_seed(seed)
    long_factor = torch.sort(1 + 6 * torch.rand(r // 2, generator=g)).values.tolist()
    short_factor = (1 + 0.2 * torch.rand(r // 2, generator=g)).tolist()
    return LongRoPEConfig(head_dim=head_dim, rotary_dim=rotary_dim, base=10000.0,
                          original_max_position_embeddings=original, max_position_embeddings=maximum,
                          short_factor=short_factor, long_factor=long_factor, start_token=start_token,
                          interleaved=interleaved)


def make_qkv(b, hq, hk, sq, sk, d, dtype, bshd=False):
    """Random q, k, v; with bshd, (B, S, H, D) tensors passed as non-contiguous .transpose(1, 2) views."""
    def one(h, s):
        if bshd:
            return torch.randn(b, s, h, d, dtype=dtype).transpose(1, 2).requires_grad_()
        return torch.randn(b, h, s, d, dtype=dtype).requires_grad_()
    return one(hq, sq), one(hk, sk), one(hk, sk)


def run_with_grads(fn, tensors, grad_out):
    """Output and gradients of all tensors from one combined backward pass."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def assert_close_to_reference(ours, reference64, eager_same_dtype, dtype, names=("out", "dq", "dk", "dv")):
    for name, a, ref, pt in zip(names, ours, reference64, eager_same_dtype):
        err = (a.double() - ref).abs().max().item()
        scale = ref.abs().max().item() + 1e-12
        if dtype == torch.float32:
            bound = 2e-5 * max(1.0, scale)
        else:
            bound = 2 * (pt.double() - ref).abs().max().item() + 1e-4
        rms = ((a.double() - ref).pow(2).mean().sqrt() / ((pt.double() - ref).pow(2).mean().sqrt() + 1e-30)).item()
        assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (RMS ratio vs eager {rms:.2f})"


CASES = [
    pytest.param(1, 2, 2, 40, 40, 64, None, True, False, {}, id="B1-H2/2-S40-D64-causal"),
    pytest.param(2, 4, 2, 37, 71, 64, None, True, False, {}, id="B2-H4/2-Sq37-Sk71-D64-causal-chunk"),
    pytest.param(1, 3, 1, 70, 70, 80, 48, False, True, {}, id="B1-H3/1-S70-D80-r48-interleaved-MQA"),
    pytest.param(1, 2, 1, 1, 75, 64, None, True, False, {}, id="B1-H2/1-Sq1-Sk75-decode"),
    pytest.param(1, 9, 3, 131, 131, 64, None, True, False, {}, id="B1-H9/3-S131-D64-GQA"),
    pytest.param(1, 2, 2, 50, 33, 64, None, True, False, {}, id="B1-H2/2-Sq50-Sk33-empty-rows"),
    pytest.param(1, 2, 1, 33, 65, 96, None, False, False, {}, id="B1-H2/1-Sq33-Sk65-D96-noncausal"),
    pytest.param(1, 2, 2, 45, 45, 64, None, True, False, {"maximum": 1 << 21, "near_end": True},
                 id="B1-H2/2-S45-D64-positions-near-2^21"),
    pytest.param(1, 2, 2, 40, 40, 64, None, True, False, {"original": 4096}, id="B1-H2/2-S40-D64-short-regime"),
]


def check_case(dtype, b, hq, hk, sq, sk, d, r, causal, interleaved, extra):
    """Output and all gradients of one CASES entry against float64 (inputs unchanged)."""
    cfg = make_cfg(d, r, original=extra.get("original", 64), maximum=extra.get("maximum", 4096),
                   interleaved=interleaved)
    q, k, v = make_qkv(b, hq, hk, sq, sk, d, dtype, bshd=True)
    kwargs = {"causal": causal}
    if extra.get("near_end"):
        top = cfg.max_position_embeddings
        kwargs["position_ids"] = torch.arange(top - sq, top)
        kwargs["kv_position_ids"] = torch.arange(top - sk, top)
    grad_out = torch.randn(b, hq, sq, d, dtype=dtype)
    inputs_before = [t.detach().clone() for t in (q, k, v)]
    ours = run_with_grads(lambda *x: fused_rope_attention(*x, cfg, **kwargs), (q, k, v), grad_out)
    for before, after in zip(inputs_before, (q, k, v)):
        assert torch.equal(before, after), "fused_rope_attention modified its input"
    reference = run_with_grads(lambda *x: fused_rope_attention_reference(*x, cfg, **kwargs),
                               [t.double() for t in (q, k, v)], grad_out.double())
    eager = run_with_grads(lambda *x: fused_rope_attention_reference(*x, cfg, dtype=dtype, **kwargs),
                           (q, k, v), grad_out) if dtype != torch.float32 else reference
    assert ours[0].dtype == dtype and ours[1].shape == q.shape and ours[2].shape == k.shape
    assert_close_to_reference(ours, reference, eager, dtype)


@pytest.fixture(params=["tma", "pointers"])
def loads(request, monkeypatch):
    """The kernels' two load paths: TMA tensor descriptors where the layout allows them (what the
    interpreter runs by default, as sm_90 does) and pointer loads (LONGROPE_TRITON_TMA=0, and every
    layout TMA cannot describe). Kernel-path tests only."""
    if not INTERPRETED:
        pytest.skip("the Triton kernel runs on CPU only under TRITON_INTERPRET=1")
    monkeypatch.setenv("LONGROPE_TRITON_TMA", "1" if request.param == "tma" else "0")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,hq,hk,sq,sk,d,r,causal,interleaved,extra", CASES)
def test_forward_backward_matches_reference(path, dtype, b, hq, hk, sq, sk, d, r, causal, interleaved, extra):
    check_case(dtype, b, hq, hk, sq, sk, d, r, causal, interleaved, extra)


@pytest.mark.parametrize("loads", ["pointers"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,hq,hk,sq,sk,d,r,causal,interleaved,extra", CASES)
def test_pointer_loads_match_reference(loads, dtype, b, hq, hk, sq, sk, d, r, causal, interleaved, extra):
    """The same cases on the kernels' pointer loads (the test above runs their TMA descriptors)."""
    check_case(dtype, b, hq, hk, sq, sk, d, r, causal, interleaved, extra)


def test_regime_and_start_token_change_the_result(path):
    """Sanity that the parity tests can fail: the long regime, n_hat and mscale each change the output."""
    cfg = make_cfg(original=32, start_token=0)
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 40, 40, 64, torch.float32))
    base = fused_rope_attention(q, k, v, cfg)
    assert not torch.allclose(base, fused_rope_attention(q, k, v, cfg, seq_len=32), atol=1e-4)
    assert not torch.allclose(base, fused_rope_attention(q, k, v, cfg.replace(start_token=16)), atol=1e-4)
    assert not torch.allclose(base, fused_rope_attention(q, k, v, cfg.replace(attention_factor=1.5)), atol=1e-4)
    ref = fused_rope_attention_reference(q.double(), k.double(), v.double(), cfg.replace(start_token=16))
    assert torch.allclose(fused_rope_attention(q, k, v, cfg.replace(start_token=16)).double(), ref, atol=2e-5)


def test_seq_len_override_picks_the_regime(path):
    cfg = make_cfg(original=64)
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 40, 40, 64, torch.float32))
    for seq_len in (40, 64, 65, 1000):
        ref = fused_rope_attention_reference(q.double(), k.double(), v.double(), cfg, seq_len=seq_len)
        out = fused_rope_attention(q, k, v, cfg, seq_len=seq_len)
        assert (out.double() - ref).abs().max() < 2e-5, f"seq_len={seq_len}"


def test_per_row_position_ids(path):
    cfg = make_cfg(original=64, maximum=1 << 16)
    q, k, v = (t.detach() for t in make_qkv(2, 4, 2, 33, 33, 64, torch.float32))
    pos = torch.stack([torch.arange(33), torch.arange(1000, 1033)])
    out = fused_rope_attention(q, k, v, cfg, position_ids=pos, kv_position_ids=pos)
    ref = fused_rope_attention_reference(q.double(), k.double(), v.double(), cfg, position_ids=pos,
                                         kv_position_ids=pos)
    assert (out.double() - ref).abs().max() < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_varlen_mixed_regimes(path, dtype):
    """Packed sequences: each one uses its own positions and picks short/long from its own length."""
    cfg = make_cfg(original=40)
    cu = torch.tensor([0, 30, 31, 100, 133])  # lengths 30 (short), 1, 69 (long), 33 (short)
    q, k, v = make_qkv(1, 4, 2, 133, 133, 64, dtype)
    grad_out = torch.randn(1, 4, 133, 64, dtype=dtype)
    ours = run_with_grads(lambda *x: fused_rope_attention(*x, cfg, cu_seqlens=cu), (q, k, v), grad_out)
    reference = run_with_grads(lambda *x: varlen_attention_reference(*x, cfg, cu, cu),
                               [t.double() for t in (q, k, v)], grad_out.double())
    eager = run_with_grads(lambda *x: varlen_attention_reference(*x, cfg, cu, cu, dtype=dtype), (q, k, v),
                           grad_out) if dtype != torch.float32 else reference
    assert_close_to_reference(ours, reference, eager, dtype)
    # The same documents attended one by one give the same rows.
    q0, k0, v0 = (t.detach()[:, :, 31:100] for t in (q, k, v))
    alone = fused_rope_attention(q0, k0, v0, cfg)
    assert (alone.double() - ours[0][:, :, 31:100].double()).abs().max() <= 2 * (
        eager[0][:, :, 31:100].double() - reference[0][:, :, 31:100]).abs().max() + 2e-5


# Packed batches as the Hugging Face packing path builds them: as many sequences as tokens, most of
# them empty (leading, inner and trailing), several shorter than a tile (the interpreter's tiles are
# 32 rows), one longer, and per sequence fewer queries than keys (a chunk after its cache).
PACKED_Q = [0, 0, 3, 3, 20, 21, 21, 70, 70, 75] + [75] * 6
PACKED_K = [0, 2, 7, 7, 40, 41, 43, 100, 101, 109] + [109] * 6


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_packed_many_empty_and_short_sequences(monkeypatch, loads, dtype, causal):
    """Run as a traced or captured call runs (no value read on the host, eager checks off): the grid
    and every loop bound come from shapes and device-side row ranges."""
    monkeypatch.setenv("LONGROPE_TRITON_EAGER_CHECKS", "0")
    cfg = make_cfg(original=40)
    cu_q, cu_k = torch.tensor(PACKED_Q), torch.tensor(PACKED_K)
    q, k, v = make_qkv(1, 4, 2, PACKED_Q[-1], PACKED_K[-1], 64, dtype)
    grad_out = torch.randn(1, 4, PACKED_Q[-1], 64, dtype=dtype)
    kwargs = {"causal": causal}
    ours = run_with_grads(lambda *x: fused_rope_attention(*x, cfg, cu_seqlens=cu_q, cu_seqlens_k=cu_k, **kwargs),
                          (q, k, v), grad_out)
    reference = run_with_grads(lambda *x: varlen_attention_reference(*x, cfg, cu_q, cu_k, **kwargs),
                               [t.double() for t in (q, k, v)], grad_out.double())
    eager = run_with_grads(lambda *x: varlen_attention_reference(*x, cfg, cu_q, cu_k, dtype=dtype, **kwargs),
                           (q, k, v), grad_out) if dtype != torch.float32 else reference
    assert_close_to_reference(ours, reference, eager, dtype)
    assert torch.isfinite(ours[0]).all() and all(torch.isfinite(g).all() for g in ours[1:])


def test_visible_ranges_match_the_masks():
    """The launcher's per-row key ranges and per-key query ranges are the causal / packed / static-cache
    masks, and non-decreasing (the kernels read a tile's bounds at its first and last row); one row of
    ranges shared by the batch (batch stride 0) unless seqused_k gives each batch row its own."""
    from types import SimpleNamespace

    from longrope_triton.attention import _key_ranges, _query_ranges, _range_args
    cu_q, cu_k = torch.tensor(PACKED_Q, dtype=torch.int32), torch.tensor(PACKED_K, dtype=torch.int32)
    sq, sk = PACKED_Q[-1], PACKED_K[-1]
    seq = lambda cu, n: torch.searchsorted(cu[1:], torch.arange(n, dtype=cu.dtype), right=True)  # noqa: E731
    packed = SimpleNamespace(varlen=True, seqused_k=None, cu_q=cu_q, cu_k=cu_k, seq_q=seq(cu_q, sq),
                             seq_k=seq(cu_k, sk))
    batched = SimpleNamespace(varlen=False, seqused_k=None)
    used = [45, 20, 0, 31, 7]  # a static cache of 45 slots: full, as many keys as queries, empty, fewer
    static = SimpleNamespace(varlen=False, seqused_k=torch.tensor(used, dtype=torch.int32))
    # (plan, Sq, Sk, per batch row: the (query, key) bounds of its sequences)
    plans = [(packed, sq, sk, [(cu_q.tolist(), cu_k.tolist())]), (batched, 50, 33, [([0, 50], [0, 33])]),
             (batched, 20, 45, [([0, 20], [0, 45])]), (static, 20, 45, [([0, 20], [0, n]) for n in used])]
    for plan, sq, sk, rows_of_batch in plans:
        for causal in (True, False):
            q_lo, q_hi = _query_ranges(plan, causal, sq, sk, "cpu")
            k_lo, k_hi = _key_ranges(plan, causal, sq, sk, "cpu")
            for lo_hi, n in ((q_lo, sq), (q_hi, sq), (k_lo, sk), (k_hi, sk)):
                assert lo_hi.dtype == torch.int32 and lo_hi.shape == (len(rows_of_batch), n) and lo_hi.is_contiguous()
                assert (lo_hi[:, 1:] >= lo_hi[:, :-1]).all()
            for lo, hi in ((q_lo, q_hi), (k_lo, k_hi)):
                assert _range_args(lo, hi)[2] == (0 if len(rows_of_batch) == 1 else lo.shape[1])
            for b, (bq, bk) in enumerate(rows_of_batch):
                mask = torch.zeros(sq, sk, dtype=torch.bool)
                for s in range(len(bq) - 1):
                    len_q, len_k = bq[s + 1] - bq[s], bk[s + 1] - bk[s]
                    for i in range(len_q):
                        last = len_k if not causal else min(len_k, len_k - len_q + i + 1)
                        mask[bq[s] + i, bk[s]:bk[s] + max(last, 0)] = True
                cols, rows = torch.arange(sk), torch.arange(sq)
                assert torch.equal((cols >= q_lo[b, :, None]) & (cols < q_hi[b, :, None]), mask), (b, causal)
                assert torch.equal(((rows >= k_lo[b, :, None]) & (rows < k_hi[b, :, None])).T, mask), (b, causal)


def static_cache_reference(q, k, v, cfg, used, long, dtype=torch.float64, **kwargs):
    """Each batch row b attending its first used[b] keys alone (positions used[b] - Sq + i and
    arange(used[b]), bottom-right causal against them), in its own regime; float64 by default."""
    rows = [fused_rope_attention_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], cfg,
                                           seq_len=LONG_LEN if lg else SHORT_LEN, dtype=dtype, **kwargs)
            for b, (n, lg) in enumerate(zip(used, long))]
    return torch.cat(rows)


STATIC_ORIGINAL = 40
SHORT_LEN, LONG_LEN = STATIC_ORIGINAL, STATIC_ORIGINAL + 1  # seq_len values that force each regime


@pytest.mark.parametrize("sq", [5, 40], ids=["Sq5-decode", "Sq40-prefill"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_static_cache_seqused_k_matches_reference(monkeypatch, loads, dtype, causal, sq):
    """seqused_k: three batch rows of a 75-slot cache with 61, Sq + 3 and 75 keys in use (each row's
    own ranges: a key tile past a row's keys, a partial one, a full cache), regimes per row by use_long,
    keys rotated here. Sq <= 16 runs the split-KV forward, Sq > 16 the prefill one; the backward is the
    prefill kernels' either way. Output and all gradients against float64, each row alone on its keys;
    the unused slots get exactly zero gradient. Eager checks off: no value read on the host."""
    monkeypatch.setenv("LONGROPE_TRITON_EAGER_CHECKS", "0")
    cfg = make_cfg(original=STATIC_ORIGINAL)
    used, long = [61, sq + 3, 75], [False, True, False]
    q, k, v = make_qkv(3, 4, 2, sq, 75, 64, dtype, bshd=True)
    grad_out = torch.randn(3, 4, sq, 64, dtype=dtype)
    kwargs = {"causal": causal}
    ours = run_with_grads(lambda *x: fused_rope_attention(*x, cfg, seqused_k=torch.tensor(used, dtype=torch.int32),
                                                          use_long=torch.tensor(long), **kwargs), (q, k, v), grad_out)
    reference = run_with_grads(lambda *x: static_cache_reference(*x, cfg, used, long, **kwargs),
                               [t.double() for t in (q, k, v)], grad_out.double())
    eager = run_with_grads(lambda *x: static_cache_reference(*x, cfg, used, long, dtype=dtype, **kwargs), (q, k, v),
                           grad_out) if dtype != torch.float32 else reference
    assert_close_to_reference(ours, reference, eager, dtype)
    for b, n in enumerate(used):
        for name, grad in (("dk", ours[2]), ("dv", ours[3])):
            assert not grad[b, :, n:].any(), f"{name} row {b}: gradient in an unused slot"


@pytest.mark.parametrize("sq", [5, 40], ids=["Sq5-decode", "Sq40-prefill"])
def test_static_cache_step_launches_each_kernel_once(monkeypatch, sq):
    """The launchers read seqused_k themselves: a static-cache step of a 3-row batch launches each
    attention kernel once (not once per batch row), the prefill kernels with one row of ranges per
    batch row (batch stride Sq or Sk), the split-KV forward with the key counts (HAS_USED). Launches
    are recorded, not run (no interpreter needed)."""
    from longrope_triton import _dispatch, attention
    launches = []
    monkeypatch.setattr(_dispatch, "launch", lambda name, kernel, grid, args, meta, **kw: launches.append(
        (name, dict(zip(kernel.arg_names, args)), meta)))
    cfg = make_cfg(original=STATIC_ORIGINAL)
    q, k, v = (t.detach() for t in make_qkv(3, 4, 2, sq, 75, 64, torch.float16))
    used = torch.tensor([61, sq + 3, 75], dtype=torch.int32)
    for seqused_k in (used, None):
        launches.clear()
        plan = attention._Plan(cfg, q, k, None, None, None, None, None, seqused_k=seqused_k)
        out, lse, q_rot, k_rot = attention.attention_forward(q, k, v, cfg, plan, True, 0.125, True, True)
        attention.attention_backward(torch.zeros_like(out), q_rot, k_rot, v, out, lse, None, cfg, plan, True, 0.125,
                                     True, True)
        names = [name for name, _, _ in launches]
        forward = "attention decode" if sq <= 16 else "attention forward"
        for name in (forward, "attention backward dK/dV", "attention backward dQ"):
            assert names.count(name) == 1, names
        for name, args, meta in launches:
            if "p_lo" in args:  # the prefill kernels: range rows of Sq queries (Sk keys for dK/dV)
                rows = 75 if name == "attention backward dK/dV" else sq
                for ranges in (args["p_lo"], args["p_hi"]):
                    assert ranges.shape == ((1 if seqused_k is None else 3), rows) and ranges.dtype == torch.int32
                assert args["stride_rb"] == (0 if seqused_k is None else rows), name
            if name == "attention decode":
                assert meta["HAS_USED"] == (seqused_k is not None)
                assert seqused_k is None or torch.equal(args["p_used"], used)


def test_gradient_kernels_write_fp32_whether_or_not_keys_are_rotated(monkeypatch):
    """dQ and dK/dV always store fp32 (then one rounding pass), so keys from a KV cache (k_is_rotated)
    compile no kernel variant beyond the ones tests/test_compile_budget.py budgets. Recorded, not run."""
    from longrope_triton import _dispatch, attention
    stores = {}
    monkeypatch.setattr(_dispatch, "launch", lambda name, kernel, grid, args, meta, **kw: stores.setdefault(
        rotate_k, {}).update({name: {n: a.dtype for n, a in zip(kernel.arg_names, args) if n in ("p_dk", "p_dq")}}))
    cfg = make_cfg(original=32)
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 40, 40, 64, torch.float16))
    for rotate_k in (True, False):
        plan = attention._Plan(cfg, q, k, None, None, None, None, None, rotate_k=rotate_k)
        out, lse, q_rot, k_rot = attention.attention_forward(q, k, v, cfg, plan, True, 0.125, True, rotate_k)
        attention.attention_backward(torch.zeros_like(out), q_rot, k_rot if rotate_k else k, v, out, lse, None, cfg,
                                     plan, True, 0.125, True, rotate_k)
    assert stores[True]["attention backward dK/dV"] == stores[False]["attention backward dK/dV"] == {
        "p_dk": torch.float32}
    assert stores[True]["attention backward dQ"] == stores[False]["attention backward dQ"] == {"p_dq": torch.float32}


@pytest.mark.parametrize("head_dim,dkdv_tma", [(64, True), (128, False), (256, True)])
def test_a_row_class_without_tma_loads_dkdv_through_pointers(monkeypatch, head_dim, dkdv_tma):
    """Where a Triton release compiles a row class's TMA tiles into local memory (``_NO_TMA``: dK/dV at
    head_dim 80-128 before Triton 3.9), that kernel alone takes its pointer loads there; every other
    launch keeps TMA. Recorded, not run (the pointer path's parity is tested with ``loads``)."""
    from longrope_triton import _dispatch, attention
    monkeypatch.setitem(attention._NO_TMA, "dkdv", {256})
    monkeypatch.setattr(_dispatch, "tma_enabled", lambda device: True)
    use_tma = {}
    monkeypatch.setattr(_dispatch, "launch", lambda name, kernel, grid, args, meta, **kw: use_tma.update(
        {name: meta.get("USE_TMA")}))
    cfg = make_cfg(original=32, head_dim=head_dim)
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 40, 40, head_dim, torch.float16))
    plan = attention._Plan(cfg, q, k, None, None, None, None, None)
    out, lse, q_rot, k_rot = attention.attention_forward(q, k, v, cfg, plan, True, 0.125, True, True)
    attention.attention_backward(torch.zeros_like(out), q_rot, k_rot, v, out, lse, None, cfg, plan, True, 0.125,
                                 True, True)
    assert use_tma["attention backward dK/dV"] is dkdv_tma
    assert use_tma["attention forward"] is use_tma["attention backward dQ"] is True


@pytest.mark.parametrize("scale", [-0.2, 0.0], ids=["negative", "zero"])
def test_nonpositive_softmax_scale(loads, scale):
    """The kernels take the row max before scaling; a negative scale runs as the positive one on -k."""
    cfg = make_cfg(original=32)
    q, k, v = make_qkv(1, 4, 2, 45, 45, 64, torch.float32)
    grad_out = torch.randn(1, 4, 45, 64)
    ours = run_with_grads(lambda *x: fused_rope_attention(*x, cfg, softmax_scale=scale), (q, k, v), grad_out)
    reference = run_with_grads(lambda *x: fused_rope_attention_reference(*x, cfg, softmax_scale=scale),
                               [t.double() for t in (q, k, v)], grad_out.double())
    assert_close_to_reference(ours, reference, reference, torch.float32)


def test_cache_paths_match_full_attention(path):
    """return_rotated_k gives the keys apply_rotary gives; attending to them with k_is_rotated
    (a KV cache) gives the fused result, for a prefill chunk and for single-token decode."""
    cfg = make_cfg(original=48)
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 70, 70, 64, torch.float32))
    full, k_rot = fused_rope_attention(q, k, v, cfg, return_rotated_k=True)
    _, k_expected = apply_rotary(q, k, cfg)
    assert (k_rot - k_expected).abs().max() < 1e-5
    assert (full - fused_rope_attention(q, k, v, cfg)).abs().max() < 1e-5
    for start in (69, 50):  # decode one token; a chunk of 20 queries
        chunk = fused_rope_attention(q[:, :, start:], k_rot, v, cfg, k_is_rotated=True, seq_len=70)
        assert (chunk - full[:, :, start:]).abs().max() < 2e-5, f"query chunk from {start}"


def test_needs_int64_looks_at_the_largest_offset():
    from longrope_triton._dispatch import needs_int64
    assert not needs_int64([torch.empty_strided((2, 3), (2**30, 1), device="meta")])  # last offset 2^30 + 2
    assert needs_int64([torch.empty_strided((3, 4), (2**30, 1), device="meta")])  # 2^31 + 3
    assert needs_int64([1.0, torch.empty_strided((2**16 + 1, 2**15), (2**15, 1), device="meta")])
    assert not needs_int64([torch.empty_strided((2**20, 0), (2**20, 1), device="meta")])  # empty


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs the Triton kernels")
def test_int64_offset_variant_matches_int32(monkeypatch):
    """The kernels' INT64 variant (taken past 2^31 elements) computes exactly what the int32 one does:
    forward, backward, varlen and the rotary kernel, run here on small tensors."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = make_cfg(64, 48, original=40)
    cu = torch.tensor([0, 30, 31, 100, 133], device=device)
    q, k, v = (t.detach().to(device).requires_grad_() for t in make_qkv(1, 6, 2, 133, 133, 64, torch.float32,
                                                                           bshd=True))
    grad_out = torch.randn(1, 6, 133, 64, device=device)

    def run_all():
        batched = run_with_grads(lambda *x: fused_rope_attention(*x, cfg), (q, k, v), grad_out)
        packed = run_with_grads(lambda *x: fused_rope_attention(*x, cfg, cu_seqlens=cu), (q, k, v), grad_out)
        return batched + packed + list(apply_rotary(q.detach(), k.detach(), cfg))

    int32 = run_all()
    monkeypatch.setattr("longrope_triton._dispatch.INT32_OFFSET_LIMIT", 0)
    int64 = run_all()
    for a, b in zip(int32, int64):
        assert torch.equal(a, b)


def test_compile_fullgraph_forward_backward():
    """torch.compile(fullgraph=True) traces through the custom op without graph breaks."""
    cfg = make_cfg(original=32)
    q, k, v = make_qkv(1, 2, 1, 40, 40, 64, torch.float32)
    pos = torch.arange(40)

    def model(q, k, v):
        return (fused_rope_attention(q, k, v, cfg, position_ids=pos, kv_position_ids=pos) * 2).sum(-1)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ours = run_with_grads(compiled, (q, k, v), torch.ones(1, 2, 40))
    eager = run_with_grads(model, (q, k, v), torch.ones(1, 2, 40))
    for a, b in zip(ours, eager):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("make_bad,match", [
    (lambda q, k, v, c: (q[..., :32], k, v, c), "head_dim"),
    (lambda q, k, v, c: (q[:, :3], k, v, c), "multiple"),
    (lambda q, k, v, c: (q, k.half(), v, c), "dtype"),
    (lambda q, k, v, c: (q, k, v[:, :, :5], c), "k and v"),
    (lambda q, k, v, c: (q.int(), k, v, c), "float"),
    (lambda q, k, v, c: (q, k, v, "cfg"), "LongRoPEConfig"),
], ids=["head-dim", "gqa-ratio", "dtype-mix", "kv-mismatch", "int-input", "not-a-config"])
def test_bad_input_raises(make_bad, match):
    cfg = make_cfg()
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 8, 8, 64, torch.float32))
    with pytest.raises((ValueError, TypeError), match=match):
        fused_rope_attention(*make_bad(q, k, v, cfg))


@pytest.mark.parametrize("kwargs,match", [
    ({"position_ids": torch.tensor([-1] + list(range(7)))}, "non-negative"),
    ({"position_ids": torch.arange(8) + 4095}, "max_position_embeddings"),
    ({"position_ids": torch.arange(8.0)}, "integer"),
    ({"position_ids": torch.arange(9)}, "shape"),
    ({"cu_seqlens": torch.tensor([0, 5, 3, 8])}, "non-decreasing"),
    ({"cu_seqlens": torch.tensor([0.0, 8.0])}, "int"),
    ({"softmax_scale": float("nan")}, "softmax_scale"),
    ({"seq_len": 2.5}, "seq_len"),
    ({"k_is_rotated": True, "return_rotated_k": True}, "already rotated"),
], ids=["negative-position", "past-max", "float-positions", "position-shape", "cu-decreasing", "cu-float",
        "nan-scale", "float-seq-len", "rotated-twice"])
def test_bad_arguments_raise(kwargs, match):
    cfg = make_cfg()
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 8, 8, 64, torch.float32))
    with pytest.raises((ValueError, TypeError), match=match):
        fused_rope_attention(q, k, v, cfg, **kwargs)


def test_device_mismatch_raises():
    cfg = make_cfg()
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 8, 8, 64, torch.float32))
    with pytest.raises(ValueError, match="device"):
        fused_rope_attention(q, k.to("meta"), v, cfg)


# ---------------------------------------------------------------------------- GPU (skipped without CUDA)
def _gpu_case(b, hq, hk, s, d, dtype, causal=True):
    cfg = make_cfg(d, original=s // 2 if s > 2 else 1, maximum=max(4096, 2 * s))
    q, k, v = (t.detach().cuda() for t in make_qkv(b, hq, hk, s, s, d, dtype, bshd=True))
    grad_out = torch.randn(b, hq, s, d, dtype=dtype, device="cuda")
    ours = run_with_grads(lambda *x: fused_rope_attention(*x, cfg, causal=causal), (q, k, v), grad_out)
    reference = run_with_grads(lambda *x: fused_rope_attention_reference(*x, cfg, causal=causal, dtype=torch.float32),
                               [t.float() for t in (q, k, v)], grad_out.float())
    eager = run_with_grads(lambda *x: fused_rope_attention_reference(*x, cfg, causal=causal, dtype=dtype), (q, k, v),
                           grad_out)
    assert_close_to_reference(ours, reference, eager, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_parity(dtype, d):
    _gpu_case(2, 8, 2, 1031, d, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("s", [16384, 65536])
def test_gpu_long_forward(s):
    cfg = make_cfg(128, original=4096, maximum=2 * s)
    q, k, v = (torch.randn(1, h, s, 128, device="cuda", dtype=torch.bfloat16) for h in (4, 1, 1))
    out = fused_rope_attention(q, k, v, cfg)
    rows = slice(s - 256, s)  # check the last rows, which see every key, against fp32 math
    pos = torch.arange(s, device="cuda")
    ref = fused_rope_attention_reference(q[:, :, rows].float(), k.float(), v.float(), cfg,
                                         position_ids=pos[rows], kv_position_ids=pos, dtype=torch.float32)
    assert (out[:, :, rows].float() - ref).abs().max() < 2e-2 * math.sqrt(ref.abs().max().item() + 1)


@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    """The last batch of q, k, v starts at element 2^31: addressing must be 64-bit (fwd, bwd, rotary)."""
    h, s, d = 2, 257, 64
    cfg = make_cfg(d)

    def strided():
        buf = torch.randn(2 * 2**30 + h * s * d, device="cuda", dtype=torch.float16)  # 4 GiB
        return buf.as_strided((3, h, s, d), (2**30, s * d, d, 1)).detach().requires_grad_()

    big = [strided() for _ in range(3)]
    small = [t[2:].detach().contiguous().requires_grad_() for t in big]
    grad_out = torch.randn(1, h, s, d, device="cuda", dtype=torch.float16)
    out_big = fused_rope_attention(*big, cfg)
    out_small = fused_rope_attention(*small, cfg)
    torch.autograd.backward([out_big[2:], out_small], [grad_out, grad_out])
    torch.testing.assert_close(out_big[2:], out_small)
    for t_big, t_small in zip(big, small):
        torch.testing.assert_close(t_big.grad[2:], t_small.grad)
    q_rot, k_rot = apply_rotary(big[0].detach(), big[1].detach(), cfg)
    q_ref, k_ref = apply_rotary(small[0].detach(), small[1].detach(), cfg)
    torch.testing.assert_close(q_rot[2:], q_ref)
    torch.testing.assert_close(k_rot[2:], k_ref)


def test_pinned_tiles_take_the_first_tile_of_the_list(monkeypatch):
    """LONGROPE_TRITON_PIN_TILES=1: no autotuning, the same kernel in every process."""
    from longrope_triton import attention

    rows = torch.empty(1, 2, 8, 128, dtype=torch.bfloat16)
    named = {"p_q": rows, "p_k": rows}  # the pruning reads the dtype from whichever stays a pointer
    for tuned in (attention._fwd_tuned, attention._dkdv_tuned, attention._dq_tuned):
        for use_tma in (True, False):
            full = tuned.early_config_prune(tuned.configs, named, BLOCK_D=128, USE_TMA=use_tma)
            monkeypatch.setenv("LONGROPE_TRITON_PIN_TILES", "1")
            pinned = tuned.early_config_prune(tuned.configs, named, BLOCK_D=128, USE_TMA=use_tma)
            monkeypatch.delenv("LONGROPE_TRITON_PIN_TILES")
            assert full and pinned == full[:1]
            assert len(full) > 1 or not use_tma  # pointer loads may keep one tile (attention._POINTER_TILES)


def test_gradient_through_the_returned_rotated_keys(path):
    """A loss on the keys return_rotated_k hands out (what a cache stores) reaches k as well."""
    cfg = make_cfg(original=48)
    q, k, v = make_qkv(1, 4, 2, 30, 30, 64, torch.float32)
    w = torch.randn(1, 2, 30, 64)

    def ours(q_, k_, v_):
        out, k_rot = fused_rope_attention(q_, k_, v_, cfg, return_rotated_k=True)
        return (out * out).sum() + (k_rot * w).sum()

    def reference(q_, k_, v_):
        k_rot = apply_rotary(q_, k_, cfg)[1]
        return (fused_rope_attention_reference(q_, k_, v_, cfg) ** 2).sum() + (k_rot * w.double()).sum()

    grads = [torch.autograd.grad(f(*x), x) for f, x in (
        (ours, [t.detach().clone().requires_grad_() for t in (q, k, v)]),
        (reference, [t.detach().double().requires_grad_() for t in (q, k, v)]))]
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert (a.double() - b).abs().max() <= 2e-5 * max(1.0, b.abs().max().item()), name
