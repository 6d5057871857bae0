"""apply_rotary against the float64 reference.

Run both ways: ``TRITON_INTERPRET=1 pytest tests/test_rotary.py`` exercises the Triton
kernel (Triton's interpreter on CPU tensors), plain ``pytest`` the PyTorch path; the
tolerances are the same in both modes. CUDA-only cases (bf16, all 2^21 positions,
S=16384) are marked ``gpu``.

Tolerances (tests/conftest.py::assert_parity): fp32 within 2e-6 of the float64 result
relative to its magnitude; fp16/bf16 within twice the error of the float64 result
rounded to that dtype (max and RMS).
"""

import math

import pytest
import torch

from conftest import assert_parity, interpreter_mode
from longrope_triton import LongRoPEConfig, apply_rotary
from longrope_triton import reference
from longrope_triton.reference import apply_rotary_reference
from longrope_triton.rotary import rope_args

ORIG, MAX_POS = 64, 1024  # small L_orig so that both regimes are reachable with short sequences


def make_cfg(head_dim=64, rotary_dim=None, interleaved=False, start_token=0, orig=ORIG, max_pos=MAX_POS,
             base=10000.0, attention_factor=None):
    """Non-trivial, different short and long factor sets (so a wrong regime is visible)."""
    half = (rotary_dim or head_dim) // 2
    short = [1.0 + 0.5 * i / half for i in range(half)]
    long = [1.0 + 15.0 * (i / max(half - 1, 1)) ** 1.5 for i in range(half)]
    return LongRoPEConfig(head_dim=head_dim, rotary_dim=rotary_dim, base=base,
                          original_max_position_embeddings=orig, max_position_embeddings=max_pos,
                          short_factor=short, long_factor=long, start_token=start_token,
                          attention_factor=attention_factor, interleaved=interleaved)


def make_qk(batch, hq, hk, seq, head_dim, dtype, layout="bhsd", device="cpu"):
    """q (B, Hq, S, D), k (B, Hk, S, D) in the requested memory layout."""
    def one(heads):
        if layout == "bshd":  # a (B, S, H, D) tensor seen as (B, H, S, D): no copy
            return torch.randn(batch, seq, heads, head_dim, device=device).to(dtype).transpose(1, 2)
        if layout == "sliced":  # a window of a larger tensor: row and head strides are not D, S*D
            big = torch.randn(batch, heads + 1, seq + 5, head_dim + 16, device=device).to(dtype)
            return big[:, 1:, 2:seq + 2, 3:head_dim + 3]
        return torch.randn(batch, heads, seq, head_dim, device=device).to(dtype)

    return one(hq), one(hk)


def make_positions(kind, batch, seq, cfg, device="cpu"):
    """position_ids of several kinds (None: the default arange)."""
    if kind == "default":
        return None
    if kind == "1d-offset":  # (S,), crossing L_orig -> long regime
        start = max(ORIG - seq // 2, 1)
        return torch.arange(start, start + seq, device=device)
    if kind == "2d-rows":  # (B, S), a different offset per row
        return torch.stack([torch.arange(7 * b, 7 * b + seq) for b in range(batch)]).to(device)
    if kind == "2d-random":  # (B, S), unsorted, anywhere below max_position_embeddings
        return torch.randint(0, cfg.max_position_embeddings, (batch, seq), device=device)
    if kind == "int32":
        return torch.arange(3, 3 + seq, dtype=torch.int32, device=device)
    if kind == "expanded":  # (B, S) with batch stride 0
        return torch.arange(5, 5 + seq, device=device)[None].expand(batch, seq)
    raise ValueError(kind)


def run_and_check(q, k, cfg, position_ids=None, seq_len=None, name=""):
    """apply_rotary vs the float64 reference, plus the contract checks: inputs untouched,
    outputs in the input dtype, shape and (for dense inputs) strides."""
    q0, k0 = q.clone(), k.clone()
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=position_ids, seq_len=seq_len)
    assert torch.equal(q, q0) and torch.equal(k, k0), "apply_rotary modified its inputs"
    q_ref, k_ref = apply_rotary_reference(q, k, cfg, position_ids=position_ids, seq_len=seq_len)
    for out, ref, inp, label in ((q_rot, q_ref, q, "q"), (k_rot, k_ref, k, "k")):
        assert out.dtype == inp.dtype and out.shape == inp.shape and out.device == inp.device
        if inp.is_contiguous() or inp.transpose(1, 2).is_contiguous():
            assert out.stride() == inp.stride(), f"{label}: strides {out.stride()} != input {inp.stride()}"
        assert_parity(out, ref, inp.dtype, name=f"{name} {label}_rot")
    return q_rot, k_rot


# ------------------------------------------------------------------------------------------------ parity
# (batch, q heads, k heads, seq, head_dim, rotary_dim, interleaved, start_token, positions, layout)
PARITY_CASES = [
    pytest.param(2, 4, 2, 37, 64, None, False, 0, "default", "bhsd", id="B2-H4/2-S37-D64"),
    pytest.param(1, 2, 1, 37, 80, None, False, 0, "default", "bhsd", id="B1-H2/1-S37-D80"),
    pytest.param(1, 2, 1, 37, 96, None, True, 0, "default", "bhsd", id="B1-H2/1-S37-D96-interleaved"),
    pytest.param(1, 2, 2, 37, 128, None, False, 0, "1d-offset", "bhsd", id="B1-H2/2-S37-D128-long"),
    pytest.param(1, 2, 1, 17, 256, None, False, 0, "1d-offset", "bhsd", id="B1-H2/1-S17-D256-long"),
    pytest.param(2, 9, 3, 37, 80, 48, True, 0, "2d-rows", "bhsd", id="B2-H9/3-S37-D80-r48-interleaved"),
    pytest.param(2, 3, 1, 37, 64, 32, False, 0, "1d-offset", "bhsd", id="B2-H3/1-S37-D64-r32-long"),
    pytest.param(1, 2, 1, 37, 96, 64, False, 0, "2d-random", "bhsd", id="B1-H2/1-S37-D96-r64-random-pos"),
    pytest.param(2, 9, 3, 37, 64, None, False, 0, "default", "bshd", id="B2-H9/3-S37-D64-bshd"),
    pytest.param(2, 2, 2, 37, 80, 64, True, 0, "2d-random", "bshd", id="B2-H2/2-S37-D80-r64-interleaved-bshd"),
    pytest.param(1, 3, 1, 37, 64, None, False, 0, "1d-offset", "sliced", id="B1-H3/1-S37-D64-sliced-long"),
    pytest.param(2, 2, 1, 37, 80, 48, True, 0, "2d-rows", "sliced", id="B2-H2/1-S37-D80-r48-interleaved-sliced"),
    pytest.param(1, 2, 1, 37, 64, None, False, 8, "default", "bhsd", id="B1-H2/1-S37-D64-nhat8-straddled"),
    pytest.param(2, 2, 1, 37, 64, None, True, 20, "2d-rows", "bhsd", id="B2-H2/1-S37-D64-nhat20-rows-interleaved"),
    pytest.param(2, 2, 1, 37, 80, 48, False, 40, "1d-offset", "bshd", id="B2-H2/1-S37-D80-r48-nhat40-long-bshd"),
    pytest.param(1, 2, 1, 1, 64, None, False, 0, "default", "bhsd", id="B1-H2/1-S1-D64"),
    pytest.param(2, 2, 1, 1, 80, 48, True, 0, "2d-random", "bhsd", id="B2-H2/1-S1-D80-r48-interleaved-random"),
    pytest.param(1, 2, 1, 131, 64, None, False, 4, "default", "bhsd", id="B1-H2/1-S131-D64-nhat4-long"),
    pytest.param(2, 3, 1, 131, 96, 32, False, 0, "expanded", "bhsd", id="B2-H3/1-S131-D96-r32-expanded-pos"),
    pytest.param(1, 2, 1, 37, 64, None, False, 0, "int32", "bhsd", id="B1-H2/1-S37-D64-int32-pos"),
]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("batch, hq, hk, seq, head_dim, rotary_dim, interleaved, start_token, positions, layout",
                         PARITY_CASES)
def test_parity(batch, hq, hk, seq, head_dim, rotary_dim, interleaved, start_token, positions, layout, dtype):
    cfg = make_cfg(head_dim, rotary_dim, interleaved, start_token)
    q, k = make_qk(batch, hq, hk, seq, head_dim, dtype, layout)
    pos = make_positions(positions, batch, seq, cfg)
    run_and_check(q, k, cfg, pos, name=f"{layout}/{positions}")


def test_parity_float64_pytorch_path():
    """float64 always takes the PyTorch path and is exact to float64 rounding."""
    cfg = make_cfg(80, 48, interleaved=True, start_token=5)
    q, k = make_qk(2, 3, 1, 37, 80, torch.float64, "bshd")
    run_and_check(q, k, cfg, make_positions("2d-random", 2, 37, cfg), name="fp64")


def test_mixed_layouts():
    """q as a (B, S, H, D) view and k as a sliced (B, H, S, D) window in the same call."""
    cfg = make_cfg(64)
    q, _ = make_qk(2, 4, 2, 37, 64, torch.float32, "bshd")
    _, k = make_qk(2, 4, 2, 37, 64, torch.float32, "sliced")
    run_and_check(q, k, cfg, make_positions("2d-rows", 2, 37, cfg), name="mixed")


def test_pass_through_dims_are_copied_exactly():
    cfg = make_cfg(96, 32, start_token=3)
    q, k = make_qk(1, 2, 1, 37, 96, torch.float16, "bshd")
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=torch.arange(50, 87))
    assert torch.equal(q_rot[..., 32:], q[..., 32:]) and torch.equal(k_rot[..., 32:], k[..., 32:])


@pytest.mark.parametrize("dtype, kernel_dtype", [
    pytest.param(torch.float32, True, id="fp32"),
    pytest.param(torch.float16, True, id="fp16"),
    pytest.param(torch.bfloat16, False, id="bf16-never-in-interpreter"),
    pytest.param(torch.float64, False, id="fp64-always-pytorch"),
])
def test_mode_decides_the_path(monkeypatch, dtype, kernel_dtype):
    """The tests of this file really run the kernel under TRITON_INTERPRET=1 (and only then)."""
    import longrope_triton.rotary as rotary_mod

    calls = []
    launch = rotary_mod.launch_rotary
    monkeypatch.setattr(rotary_mod, "launch_rotary", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    cfg = make_cfg(64)
    q, k = make_qk(1, 2, 1, 5, 64, dtype)
    q_rot, _ = apply_rotary(q, k, cfg)
    assert bool(calls) == (interpreter_mode() and kernel_dtype)
    q_ref, _ = apply_rotary_reference(q, k, cfg)
    assert_parity(q_rot, q_ref, dtype, name="q_rot")


# ------------------------------------------------------------------------------------------------ regimes
def _differs(a, b, min_gap=1e-2):
    return float((a.double() - b.double()).abs().max()) > min_gap


@pytest.mark.parametrize("interleaved", [pytest.param(False, id="half"), pytest.param(True, id="interleaved")])
def test_regime_switch_at_original_max(interleaved):
    """Default seq_len = max(position_ids) + 1: positions ending at L_orig - 1 are short, one more is long."""
    cfg = make_cfg(64, interleaved=interleaved)
    seq = 37
    q, k = make_qk(1, 2, 1, seq, 64, torch.float32)
    short_pos = torch.arange(ORIG - seq, ORIG)       # max + 1 == L_orig -> short
    long_pos = torch.arange(ORIG - seq + 1, ORIG + 1)  # max + 1 == L_orig + 1 -> long
    q_short, _ = run_and_check(q, k, cfg, short_pos, name="L_orig")
    q_long, _ = run_and_check(q, k, cfg, long_pos, name="L_orig+1")
    # the regimes are really different: the same positions under the other factor set are far off
    q_short_as_long, _ = apply_rotary_reference(q, k, cfg, position_ids=short_pos, seq_len=ORIG + 1)
    q_long_as_short, _ = apply_rotary_reference(q, k, cfg, position_ids=long_pos, seq_len=ORIG)
    assert _differs(q_short, q_short_as_long) and _differs(q_long, q_long_as_short)


def test_seq_len_override():
    """Same positions, different seq_len: short at <= L_orig, long beyond, each matching the reference."""
    cfg = make_cfg(80, 48, start_token=4)
    q, k = make_qk(2, 3, 1, 37, 80, torch.float32, "bshd")
    pos = torch.arange(0, 37)
    outs = {}
    for seq_len in (None, ORIG, ORIG + 1, MAX_POS):
        outs[seq_len] = run_and_check(q, k, cfg, pos, seq_len=seq_len, name=f"seq_len={seq_len}")
    assert torch.equal(outs[None][0], outs[ORIG][0])       # default (37) and L_orig: both short
    assert torch.equal(outs[ORIG + 1][0], outs[MAX_POS][0])  # both long
    assert _differs(outs[ORIG][0], outs[ORIG + 1][0]) and _differs(outs[ORIG][1], outs[ORIG + 1][1])


def test_regime_from_batch_maximum():
    """Hugging Face rule: one row past L_orig switches every row of the batch to the long factors."""
    cfg = make_cfg(64)
    q, k = make_qk(2, 2, 1, 37, 64, torch.float32)
    pos = torch.stack([torch.arange(0, 37), torch.arange(ORIG - 20, ORIG + 17)])
    q_rot, k_rot = run_and_check(q, k, cfg, pos, name="batch-max")
    q0_long, _ = apply_rotary_reference(q[:1], k[:1], cfg, position_ids=pos[:1], seq_len=ORIG + 17)
    q0_short, _ = apply_rotary_reference(q[:1], k[:1], cfg, position_ids=pos[:1])
    assert_parity(q_rot[:1], q0_long, torch.float32, name="row 0 uses long factors")
    assert _differs(q_rot[:1], q0_short)


def test_start_token_bypass_uses_plain_rope_without_mscale():
    """Positions < n_hat: lambda = 1 and mscale 1, i.e. exactly the plain RoPE of the same base."""
    cfg = make_cfg(64, start_token=16, attention_factor=1.3)
    plain = LongRoPEConfig(head_dim=64, original_max_position_embeddings=ORIG, max_position_embeddings=MAX_POS,
                           attention_factor=1.0)
    q, k = make_qk(1, 2, 1, 37, 64, torch.float32)
    pos = torch.arange(0, 37)
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=pos)
    q_plain, k_plain = apply_rotary_reference(q, k, plain, position_ids=pos)
    assert_parity(q_rot[:, :, :16], q_plain[:, :, :16], torch.float32, name="q below n_hat")
    assert_parity(k_rot[:, :, :16], k_plain[:, :, :16], torch.float32, name="k below n_hat")
    assert _differs(q_rot[:, :, 16:], q_plain[:, :, 16:])


@pytest.mark.parametrize("interleaved", [pytest.param(False, id="half"), pytest.param(True, id="interleaved")])
def test_reference_matches_complex_formula(interleaved):
    """The oracle itself, against an independent complex-number statement of DESIGN §1."""
    cfg = make_cfg(80, 48, interleaved=interleaved, start_token=6)
    q = torch.randn(2, 3, 37, 80, dtype=torch.float64)
    pos = torch.randint(0, MAX_POS, (2, 37))
    pos[:, :3] = torch.tensor([0, 5, 6])  # some below n_hat, one exactly at it
    long = cfg.use_long(int(pos.max()) + 1)
    q_ref, _ = apply_rotary_reference(q, q, cfg, position_ids=pos)
    r, half = cfg.rotary_dim, cfg.rotary_dim // 2
    theta = torch.tensor([cfg.base ** (-2 * i / r) for i in range(half)], dtype=torch.float64)
    lam = torch.tensor(cfg.long_factor if long else cfg.short_factor, dtype=torch.float64)
    below = (pos < cfg.start_token)[..., None]
    phi = torch.where(below, pos[..., None] * theta, pos[..., None] * theta / lam)
    m = torch.where(below, torch.tensor(1.0, dtype=torch.float64), torch.tensor(cfg.mscale, dtype=torch.float64))
    rot = torch.polar(m.expand_as(phi), phi)[:, None]  # (B, 1, S, half)
    if interleaved:
        z = torch.complex(q[..., 0:r:2], q[..., 1:r:2]) * rot
        want = torch.cat([torch.stack([z.real, z.imag], -1).flatten(-2), q[..., r:]], -1)
    else:
        z = torch.complex(q[..., :half], q[..., half:r]) * rot
        want = torch.cat([z.real, z.imag, q[..., r:]], -1)
    # angles reach ~1e3 rad: float64 rounding of phi alone is ~1e-13 rad
    torch.testing.assert_close(q_ref, want, rtol=0, atol=1e-11)


# ------------------------------------------------------------------------------------------------ 2^21
def _unit_vector_cos_sin(cfg, pos, device="cpu"):
    """Rotate unit vectors: q = e_a, k = e_b for every pair (a, b); returns ours and the float64 truth.

    q = e_a -> (a, b) = mscale (cos, sin); k = e_b -> (a, b) = mscale (-sin, cos).
    """
    seq = pos.shape[-1]
    a_idx, b_idx = (t.to(device) for t in reference.rotary_pairs(cfg))
    q = torch.zeros(1, 1, seq, cfg.head_dim, device=device)
    k = torch.zeros(1, 1, seq, cfg.head_dim, device=device)
    q[..., a_idx] = 1.0
    k[..., b_idx] = 1.0
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=pos)
    cos, sin = reference.rope_cos_sin(cfg, pos, cfg.use_long(int(pos.max()) + 1))
    ours = torch.stack([q_rot[0, 0][:, a_idx], q_rot[0, 0][:, b_idx], -k_rot[0, 0][:, a_idx],
                        k_rot[0, 0][:, b_idx]]).double()
    truth = torch.stack([cos, sin, sin, cos])
    return ours, truth


def _config_2m(interleaved=False, head_dim=128):
    half = head_dim // 2
    long = torch.logspace(0, math.log10(512.0), half, dtype=torch.float64).tolist()  # lambda 1 .. 512
    return LongRoPEConfig(head_dim=head_dim, original_max_position_embeddings=2 ** 21 // 64,
                          max_position_embeddings=2 ** 21, long_factor=long, start_token=4, interleaved=interleaved)


@pytest.mark.parametrize("interleaved, count", [
    pytest.param(False, 5000, id="half-last5000"),
    # the pair layout does not change the angles: a sample keeps the interpreter run short
    pytest.param(True, 1000, id="interleaved-1000-of-last5000"),
])
def test_positions_near_2_21_cos_sin_error(interleaved, count):
    """|cos/sin error| <= 1e-6 (times mscale) for positions in [2^21 - 5000, 2^21), where a naive
    fp32 ``pos * inv_freq`` is ~1e-2 off — so this test would catch it."""
    cfg = _config_2m(interleaved)
    pos = torch.arange(2 ** 21 - 5000, 2 ** 21)
    if count < pos.numel():
        pos = pos[torch.randperm(pos.numel())[:count]]
    ours, truth = _unit_vector_cos_sin(cfg, pos)
    tol = 1e-6 * cfg.mscale
    err = float((ours - truth).abs().max())
    # what a naive fp32 angle would give on the same positions
    inv_freq = reference.scaled_inv_freq(cfg, long=True).float()
    phi32 = pos.float()[:, None] * inv_freq
    naive = torch.stack([torch.cos(phi32), torch.sin(phi32)]).double() * cfg.mscale
    naive_err = float((naive - truth[:2]).abs().max())
    assert naive_err > 100 * tol, f"the test is too weak: naive fp32 error only {naive_err:.2e}"
    assert err <= tol, f"cos/sin error {err:.3e} > {tol:.3e} near 2^21 (naive fp32 angle: {naive_err:.3e})"


# ------------------------------------------------------------------------------------------------ gradients
GRAD_CASES = [
    pytest.param(1, 2, 1, 5, 8, None, False, 0, id="B1-H2/1-S5-D8"),
    pytest.param(2, 2, 1, 4, 12, 8, True, 2, id="B2-H2/1-S4-D12-r8-interleaved-nhat2"),
    pytest.param(1, 2, 2, 7, 10, 6, False, 3, id="B1-H2/2-S7-D10-r6-nhat3"),
]


@pytest.mark.parametrize("batch, hq, hk, seq, head_dim, rotary_dim, interleaved, start_token", GRAD_CASES)
@pytest.mark.parametrize("regime", ["short", "long"])
def test_gradcheck_float64(batch, hq, hk, seq, head_dim, rotary_dim, interleaved, start_token, regime):
    cfg = make_cfg(head_dim, rotary_dim, interleaved, start_token)
    q = torch.randn(batch, hq, seq, head_dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, hk, seq, head_dim, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(seq) + (0 if regime == "short" else ORIG)
    assert torch.autograd.gradcheck(lambda a, b: apply_rotary(a, b, cfg, position_ids=pos), (q, k))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("batch, hq, hk, seq, head_dim, rotary_dim, interleaved, start_token, positions, layout", [
    pytest.param(1, 9, 3, 37, 80, 48, True, 4, "2d-rows", "bshd", id="B1-H9/3-S37-D80-r48-interleaved-nhat4-bshd"),
    pytest.param(1, 2, 1, 131, 64, None, False, 0, "1d-offset", "bhsd", id="B1-H2/1-S131-D64-long"),
    pytest.param(1, 2, 2, 37, 96, 64, False, 10, "2d-random", "sliced", id="B1-H2/2-S37-D96-r64-nhat10-sliced"),
])
def test_backward_parity(batch, hq, hk, seq, head_dim, rotary_dim, interleaved, start_token, positions, layout,
                         dtype):
    """Kernel (or PyTorch-path) backward vs autograd through the float64 reference, one combined loss."""
    cfg = make_cfg(head_dim, rotary_dim, interleaved, start_token)
    q, k = make_qk(batch, hq, hk, seq, head_dim, dtype, layout)
    q.requires_grad_(True)
    k.requires_grad_(True)
    pos = make_positions(positions, batch, seq, cfg)
    w_q = torch.randn(q.shape).to(dtype)
    w_k = torch.randn(k.shape).to(dtype)
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=pos)
    ((q_rot * w_q).sum() + (k_rot * w_k).sum()).backward()

    q64 = q.detach().double().requires_grad_(True)
    k64 = k.detach().double().requires_grad_(True)
    q_ref, k_ref = apply_rotary_reference(q64, k64, cfg, position_ids=pos)
    ((q_ref * w_q.double()).sum() + (k_ref * w_k.double()).sum()).backward()
    assert q.grad.dtype == dtype and k.grad.dtype == dtype
    assert_parity(q.grad, q64.grad, dtype, name="dq")
    assert_parity(k.grad, k64.grad, dtype, name="dk")


def test_backward_with_one_output_unused():
    cfg = make_cfg(64, start_token=3)
    q, k = make_qk(1, 2, 1, 37, 64, torch.float32)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_rot, _ = apply_rotary(q, k, cfg, position_ids=torch.arange(40, 77))
    w = torch.randn(q.shape)
    (q_rot * w).sum().backward()
    q64 = q.detach().double().requires_grad_(True)
    q_ref, _ = apply_rotary_reference(q64, k.detach().double(), cfg, position_ids=torch.arange(40, 77))
    (q_ref * w.double()).sum().backward()
    assert_parity(q.grad, q64.grad, torch.float32, name="dq")
    assert k.grad is not None and torch.count_nonzero(k.grad) == 0


# ------------------------------------------------------------------------------------------------ bad input
def _cfg64():
    return make_cfg(64)


def _q(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


BAD_INPUTS = [
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64, dtype=torch.float16), _cfg64(), {}),
                 TypeError, "share one dtype", id="q-fp32-k-fp16"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64, device="meta"), _cfg64(), {}),
                 ValueError, "one device", id="q-cpu-k-meta"),
    pytest.param(lambda: (_q(1, 2, 5, 32), _q(1, 1, 5, 32), _cfg64(), {}),
                 ValueError, "head_dim 32 but cfg.head_dim is 64", id="wrong-head_dim"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 32), _cfg64(), {}),
                 ValueError, "k has head_dim 32", id="k-wrong-head_dim"),
    pytest.param(lambda: (_q(2, 5, 64), _q(2, 5, 64), _cfg64(), {}),
                 ValueError, r"q must have shape \(batch, heads, seq, head_dim\)", id="3d-q"),
    pytest.param(lambda: (_q(1, 1, 2, 5, 64), _q(1, 1, 2, 5, 64), _cfg64(), {}),
                 ValueError, r"must have shape \(batch, heads, seq, head_dim\)", id="5d-q"),
    pytest.param(lambda: (torch.ones(1, 2, 5, 64, dtype=torch.int32), _q(1, 1, 5, 64), _cfg64(), {}),
                 TypeError, "q must be float16, bfloat16, float32 or float64", id="int-q"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 6, 64), _cfg64(), {}),
                 ValueError, "must share batch and seq", id="seq-mismatch"),
    pytest.param(lambda: (_q(2, 2, 5, 64), _q(1, 1, 5, 64), _cfg64(), {}),
                 ValueError, "must share batch and seq", id="batch-mismatch"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64), _cfg64(), dict(position_ids=torch.arange(5.0))),
                 TypeError, "position_ids must have an integer dtype", id="float-positions"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64), _cfg64(), dict(position_ids=[0, 1, 2, 3, 4])),
                 TypeError, "position_ids must be an int tensor", id="list-positions"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64), _cfg64(), dict(position_ids=torch.arange(-1, 4))),
                 ValueError, "position_ids must be non-negative, got -1", id="negative-positions"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64), _cfg64(),
                          dict(position_ids=torch.arange(MAX_POS - 4, MAX_POS + 1))),
                 ValueError, "past max_position_embeddings", id="positions-ge-max"),
    pytest.param(lambda: (_q(1, 2, MAX_POS + 1, 64), _q(1, 1, MAX_POS + 1, 64), _cfg64(), {}),
                 ValueError, "past max_position_embeddings", id="default-positions-ge-max"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64), _cfg64(), dict(position_ids=torch.arange(6))),
                 ValueError, r"position_ids must have shape \(5,\) or \(1, 5\)", id="positions-wrong-seq"),
    pytest.param(lambda: (_q(2, 2, 5, 64), _q(2, 1, 5, 64), _cfg64(),
                          dict(position_ids=torch.zeros(3, 5, dtype=torch.long))),
                 ValueError, r"position_ids must have shape", id="positions-wrong-batch"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64), _cfg64(),
                          dict(position_ids=torch.zeros(1, 1, 5, dtype=torch.long))),
                 ValueError, r"position_ids must have shape", id="positions-3d"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64), _cfg64(), dict(seq_len=100.0)),
                 TypeError, "seq_len must be an int", id="seq_len-float"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64), _cfg64(), dict(seq_len=torch.tensor(100))),
                 TypeError, "seq_len must be an int", id="seq_len-tensor"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64), _cfg64(), dict(seq_len=0)),
                 ValueError, "seq_len must be >= 1", id="seq_len-zero"),
    pytest.param(lambda: (_q(1, 2, 5, 64), _q(1, 1, 5, 64), _cfg64().to_dict(), {}),
                 TypeError, "cfg must be a LongRoPEConfig", id="cfg-dict"),
    pytest.param(lambda: ([[0.0] * 64], _q(1, 1, 5, 64), _cfg64(), {}),
                 TypeError, "q must be a torch.Tensor", id="q-list"),
]


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_bad_input(make, exc, match):
    q, k, cfg, kwargs = make()
    with pytest.raises(exc, match=match):
        apply_rotary(q, k, cfg, **kwargs)


# ------------------------------------------------------------------------------------------------ torch.compile
def _compile_cfg():
    return make_cfg(64, 48, interleaved=False, start_token=2)


def _rope_then_math(q, k, pos, cfg):
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=pos)
    # kept small: on CPU every fused op is C++ that inductor compiles cold in CI
    return torch.tanh(q_rot) * k_rot.mean(dim=1, keepdim=True)


def test_compile_has_no_graph_breaks():
    cfg = _compile_cfg()
    q, k = make_qk(1, 2, 2, 17, 64, torch.float32)
    pos = torch.arange(ORIG - 8, ORIG + 9)
    explanation = torch._dynamo.explain(_rope_then_math)(q, k, pos, cfg)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _check_compiled(device, backend="inductor"):
    torch._dynamo.reset()
    cfg = _compile_cfg()
    q, k = make_qk(1, 2, 2, 17, 64, torch.float32, "bshd", device=device)
    pos = torch.arange(ORIG - 8, ORIG + 9, device=device)  # crosses L_orig: long regime
    compiled = torch.compile(lambda a, b, p: _rope_then_math(a, b, p, cfg), fullgraph=True, backend=backend)

    q_c, k_c = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    out_c = compiled(q_c, k_c, pos)
    q_e, k_e = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    out_e = _rope_then_math(q_e, k_e, pos, cfg)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    # and both equal the float64 reference followed by the same math
    q_ref, k_ref = apply_rotary_reference(q, k, cfg, position_ids=pos)
    assert_parity(out_c, torch.tanh(q_ref) * k_ref.mean(dim=1, keepdim=True), torch.float32, name="compiled")
    w = torch.randn(out_e.shape, device=device)
    (out_c * w).sum().backward()
    (out_e * w).sum().backward()
    torch.testing.assert_close(q_c.grad, q_e.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_c.grad, k_e.grad, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_matches_eager_and_backward():
    """fullgraph=True raises on any graph break; result and gradients equal eager.

    On CPU this uses the aot_eager backend (Dynamo + the fake impl + AOTAutograd, i.e. all
    that the custom op registers); inductor's own C++ codegen costs 30-50 s cold on these
    machines and adds nothing about our op beyond the fake impl's strides, which
    test_custom_op_opcheck checks against real outputs. Inductor runs in the gpu test.
    """
    _check_compiled("cpu", backend="aot_eager")


@pytest.mark.parametrize("layout", ["bshd", "sliced"])
def test_custom_op_opcheck(layout):
    """torch.library.opcheck: schema, autograd registration, fake impl vs real (shapes, strides,
    dtypes) and AOT dispatch — in the mode under test (kernel or PyTorch path)."""
    cfg = make_cfg(32, 16, start_token=2)
    q, k = make_qk(1, 2, 1, 5, 32, torch.float32, layout)
    q.requires_grad_(True)
    k.requires_grad_(True)
    pos = torch.arange(ORIG - 2, ORIG + 3)[None]
    torch.library.opcheck(torch.ops.longrope_triton.rotary.default, (q, k, pos, None, False), rope_args(cfg))


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("batch, hq, hk, seq, head_dim, rotary_dim, interleaved, start_token, positions, layout", [
    pytest.param(2, 9, 3, 131, 80, 48, True, 4, "2d-rows", "bshd", id="B2-H9/3-S131-D80-r48-interleaved-bshd"),
    pytest.param(2, 8, 2, 257, 128, None, False, 0, "1d-offset", "bhsd", id="B2-H8/2-S257-D128-long"),
    pytest.param(1, 4, 4, 100, 256, 128, False, 16, "2d-random", "sliced", id="B1-H4/4-S100-D256-r128-sliced"),
    pytest.param(3, 6, 1, 37, 64, None, True, 0, "default", "bhsd", id="B3-H6/1-S37-D64-interleaved"),
    pytest.param(2, 4, 2, 64, 96, 64, False, 8, "expanded", "bshd", id="B2-H4/2-S64-D96-r64-expanded"),
])
def test_parity_gpu(batch, hq, hk, seq, head_dim, rotary_dim, interleaved, start_token, positions, layout, dtype):
    cfg = make_cfg(head_dim, rotary_dim, interleaved, start_token)
    q, k = make_qk(batch, hq, hk, seq, head_dim, dtype, layout, device="cuda")
    run_and_check(q, k, cfg, make_positions(positions, batch, seq, cfg, device="cuda"), name=f"cuda {layout}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
def test_backward_parity_gpu(dtype):
    cfg = make_cfg(80, 48, True, 4)
    q, k = make_qk(2, 9, 3, 131, 80, dtype, "bshd", device="cuda")
    q.requires_grad_(True)
    k.requires_grad_(True)
    pos = make_positions("2d-random", 2, 131, cfg, device="cuda")
    w_q, w_k = torch.randn(q.shape, device="cuda").to(dtype), torch.randn(k.shape, device="cuda").to(dtype)
    q_rot, k_rot = apply_rotary(q, k, cfg, position_ids=pos)
    ((q_rot * w_q).sum() + (k_rot * w_k).sum()).backward()
    q64, k64 = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    q_ref, k_ref = apply_rotary_reference(q64, k64, cfg, position_ids=pos)
    ((q_ref * w_q.double()).sum() + (k_ref * w_k.double()).sum()).backward()
    assert_parity(q.grad, q64.grad, dtype, name="dq")
    assert_parity(k.grad, k64.grad, dtype, name="dk")


@pytest.mark.gpu
def test_compile_fullgraph_gpu():
    _check_compiled("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [pytest.param(False, id="half"), pytest.param(True, id="interleaved")])
def test_all_2_21_positions_gpu(interleaved):
    """Every position p < 2^21 (max_position_embeddings = 2^21, lambda up to 512): |cos/sin error| <= 1e-6."""
    cfg = _config_2m(interleaved)
    pos = torch.arange(2 ** 21, device="cuda")
    ours, truth = _unit_vector_cos_sin(cfg, pos, device="cuda")
    err = float((ours - truth).abs().max())
    assert err <= 1e-6 * cfg.mscale, f"cos/sin error {err:.3e} over [0, 2^21)"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
def test_long_sequence_gpu(dtype):
    """S = 16384 (long regime), GQA 8/2, D = 128, (B, S, H, D) layout."""
    cfg = make_cfg(128, orig=4096, max_pos=32768, start_token=4)
    q, k = make_qk(1, 8, 2, 16384, 128, dtype, "bshd", device="cuda")
    run_and_check(q, k, cfg, None, name="S16384")
