"""The serving building blocks of fused_rope_attention / apply_rotary, on both paths.

- ``use_long``: the caller's regime per batch row, per packed sequence or (apply_rotary) per
  token, instead of the positions' rule (a serving engine decides a request's regime from its
  whole prompt, DESIGN §4 "Serving and compile");
- ``seqused_k``: a static KV cache, its capacity as the tensor length and the filled length per
  batch row on the device (bottom-right causal alignment against it; CUDA-graph friendly);
- packed sequences whose count is only bounded on the host (many empty sequences, as the
  patched model's packing path produces);
- the patched model's documents-from-positions packing (longrope_triton.hf.forward.documents).

Every result is compared with the same computation done one sequence at a time with the regime
given by ``seq_len``: fp32 within 2e-5 (the tolerance of tests/test_attention.py).
"""

import pytest
import torch

from longrope_triton import apply_rotary, fused_rope_attention
from longrope_triton.decode import decode_forward
from test_attention import make_cfg, run_with_grads

TOL = 2e-5
ORIGINAL = 40
SHORT_LEN, LONG_LEN = ORIGINAL, ORIGINAL + 1  # seq_len values that force each regime


def _close(a, b, what):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= TOL * max(1.0, b.abs().max().item()), f"{what}: max err {err:.3e}"


def _rotated_cache(cfg, k, used, long):
    """Keys of each row rotated at positions arange(used_b) in the row's regime; the slots past
    used_b hold keys of ones, which would change the result if a kernel read them."""
    k_rot = torch.ones_like(k)
    for b, (n, lg) in enumerate(zip(used, long)):
        pos = torch.arange(n)
        k_rot[b:b + 1, :, :n] = apply_rotary(k[b:b + 1, :0, :n], k[b:b + 1, :, :n], cfg, position_ids=pos,
                                             seq_len=LONG_LEN if lg else SHORT_LEN)[1]
    return k_rot


@pytest.mark.parametrize("sq", [1, 5, 20], ids=["decode-Sq1", "spec-Sq5", "chunk-Sq20"])
def test_seqused_k_equals_each_row_on_its_filled_cache(path, sq):
    """Three rows of a 48-slot cache filled to 20, 33 and 45 keys (regimes short, short, long by
    use_long): output and gradients equal each row attending its own filled part alone."""
    cfg = make_cfg(original=ORIGINAL, maximum=4096)
    used, long = [max(sq, 20), 33, 45], [False, False, True]
    q, v = torch.randn(3, 4, sq, 64), torch.randn(3, 2, 48, 64)
    k_rot = _rotated_cache(cfg, torch.randn(3, 2, 48, 64), used, long)
    positions = torch.stack([torch.arange(n - sq, n) for n in used])
    grad_out = torch.randn(3, 4, sq, 64)
    seqused = torch.tensor(used, dtype=torch.int32)
    ours = run_with_grads(lambda q_, k_, v_: fused_rope_attention(
        q_, k_, v_, cfg, position_ids=positions, use_long=torch.tensor(long), seqused_k=seqused, k_is_rotated=True),
        (q, k_rot, v), grad_out)
    for b, (n, lg) in enumerate(zip(used, long)):
        alone = run_with_grads(lambda q_, k_, v_: fused_rope_attention(
            q_, k_, v_, cfg, position_ids=positions[b:b + 1], seq_len=LONG_LEN if lg else SHORT_LEN,
            k_is_rotated=True), (q[b:b + 1], k_rot[b:b + 1, :, :n], v[b:b + 1, :, :n]), grad_out[b:b + 1])
        _close(ours[0][b:b + 1], alone[0], f"row {b} out")
        _close(ours[1][b:b + 1], alone[1], f"row {b} dq")
        for i, name in ((2, "dk"), (3, "dv")):
            _close(ours[i][b:b + 1, :, :n], alone[i], f"row {b} {name}")
            assert ours[i][b:b + 1, :, n:].abs().max() == 0, f"row {b} {name}: gradient in an unused slot"


def test_seqused_k_default_positions_end_at_the_filled_length(path):
    """Without position_ids, row b's queries sit at used_b - Sq + i (bottom-right alignment) and the
    regime follows max(used) + ... : the same as the row alone with its filled part as the cache."""
    cfg = make_cfg(original=ORIGINAL, maximum=4096)
    used = [12, 30]
    q, v = torch.randn(2, 4, 3, 64), torch.randn(2, 2, 32, 64)
    k_rot = _rotated_cache(cfg, torch.randn(2, 2, 32, 64), used, [False, False])
    out = fused_rope_attention(q, k_rot, v, cfg, seqused_k=torch.tensor(used), k_is_rotated=True)
    for b, n in enumerate(used):
        alone = fused_rope_attention(q[b:b + 1], k_rot[b:b + 1, :, :n], v[b:b + 1, :, :n], cfg, seq_len=SHORT_LEN,
                                     k_is_rotated=True)
        _close(out[b:b + 1], alone, f"row {b}")


def test_decode_kernel_reads_the_key_counts_from_the_device(path):
    """decode_forward with seqused_k, any split count: each row as its own shorter cache."""
    if path == "torch":
        pytest.skip("the split-KV kernels run on the kernel path")
    q, k, v = torch.randn(2, 6, 2, 64), torch.randn(2, 2, 200, 64), torch.randn(2, 2, 200, 64)
    used = torch.tensor([7, 131], dtype=torch.int32)
    for splits in (1, 3, 16):
        out, lse = decode_forward(q, k, v, True, 0.125, num_splits=splits, seqused_k=used)
        for b, n in enumerate(used.tolist()):
            ref, ref_lse = decode_forward(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], True, 0.125, num_splits=1)
            _close(out[b:b + 1], ref, f"{splits} splits, row {b}")
            _close(lse[b:b + 1], ref_lse, f"{splits} splits, row {b} lse")


def test_use_long_per_batch_row(path):
    """Two rows at the same short positions, the second told to run the long factors."""
    cfg = make_cfg(original=ORIGINAL, maximum=4096)
    q, k, v = torch.randn(2, 4, 24, 64), torch.randn(2, 2, 24, 64), torch.randn(2, 2, 24, 64)
    out = fused_rope_attention(q, k, v, cfg, use_long=torch.tensor([False, True]))
    for b, length in enumerate((SHORT_LEN, LONG_LEN)):
        _close(out[b:b + 1], fused_rope_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], cfg, seq_len=length),
               f"row {b}")
    short = fused_rope_attention(q[1:], k[1:], v[1:], cfg)
    assert (out[1:] - short).abs().max() > 1e-3, "use_long did not change the regime"


def test_use_long_per_packed_sequence_and_many_empty_sequences(path):
    """Packed documents 10, 40 and 14 tokens long (short by use_long, long, short), bounds padded
    to one sequence per token as the patched model's packing makes them, an empty one inside:
    output and gradients equal each document alone in its regime."""
    cfg = make_cfg(original=ORIGINAL, maximum=4096)
    lengths, long = [10, 40, 14], [False, True, False]
    cu = torch.tensor([0, 10, 10, 50] + [64] * 61)  # 64 sequences for 64 tokens, 61 of them empty
    use_long = torch.zeros(64, dtype=torch.bool)
    use_long[2] = True  # the third sequence (the first two: 10 tokens, then empty)
    q, k, v = torch.randn(1, 4, 64, 64), torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64)
    grad_out = torch.randn(1, 4, 64, 64)
    ours = run_with_grads(lambda *x: fused_rope_attention(*x, cfg, cu_seqlens=cu, use_long=use_long), (q, k, v),
                          grad_out)
    start = 0
    for n, lg in zip(lengths, long):
        rows = slice(start, start + n)
        alone = run_with_grads(lambda *x: fused_rope_attention(*x, cfg, seq_len=LONG_LEN if lg else SHORT_LEN),
                               (q[:, :, rows], k[:, :, rows], v[:, :, rows]), grad_out[:, :, rows])
        for name, a, b in zip(("out", "dq", "dk", "dv"), ours, alone):
            _close(a[:, :, rows], b, f"document at {start}: {name}")
        start += n


def test_apply_rotary_use_long_per_row_and_per_token(path):
    cfg = make_cfg(original=ORIGINAL, maximum=4096)
    q, k = torch.randn(2, 4, 8, 64), torch.randn(2, 2, 8, 64)
    per_row = apply_rotary(q, k, cfg, use_long=torch.tensor([True, False]))
    per_token = apply_rotary(q, k, cfg, use_long=torch.tensor([[True] * 8, [False] * 4 + [True] * 4]))
    long, short = apply_rotary(q, k, cfg, seq_len=LONG_LEN), apply_rotary(q, k, cfg, seq_len=SHORT_LEN)
    for i, name in ((0, "q"), (1, "k")):
        _close(per_row[i][:1], long[i][:1], f"row 0 {name}")
        _close(per_row[i][1:], short[i][1:], f"row 1 {name}")
        _close(per_token[i][:1], long[i][:1], f"row 0 {name}, per token")
    assert (long[0] - short[0]).abs().max() > 1e-3, "the two regimes must differ for this check to mean anything"
    _close(per_token[0][1:, :, :4], short[0][1:, :, :4], "row 1 q, short tokens")
    _close(per_token[0][1:, :, 4:], long[0][1:, :, 4:], "row 1 q, long tokens")
    _close(per_token[1][1:, :, 4:], long[1][1:, :, 4:], "row 1 k, long tokens")


@pytest.mark.parametrize("kwargs,error,match", [
    ({"use_long": torch.tensor([1, 0])}, TypeError, "bool"),
    ({"use_long": torch.tensor([True])}, ValueError, "one per batch row"),
    ({"seqused_k": torch.tensor([8])}, ValueError, "one key count per batch row"),
    ({"seqused_k": torch.tensor([8.0, 8.0])}, TypeError, "integer"),
    ({"seqused_k": torch.tensor([9, 8])}, ValueError, "seqused_k must lie in"),
    ({"seqused_k": torch.tensor([2, 8]), "k_is_rotated": True}, ValueError, "own tokens"),
], ids=["use-long-int", "use-long-shape", "seqused-shape", "seqused-float", "seqused-past-keys",
        "seqused-fewer-than-queries"])
def test_bad_serving_inputs_raise(kwargs, error, match):
    cfg = make_cfg()
    q, k, v = torch.randn(2, 4, 4, 64), torch.randn(2, 2, 8, 64), torch.randn(2, 2, 8, 64)
    with pytest.raises(error, match=match):
        fused_rope_attention(q, k, v, cfg, **kwargs)


def test_packed_inputs_raise():
    cfg = make_cfg()
    q, k, v = torch.randn(1, 4, 8, 64), torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)
    cu = torch.tensor([0, 3, 8])
    with pytest.raises(ValueError, match="one per packed sequence"):
        fused_rope_attention(q, k, v, cfg, cu_seqlens=cu, use_long=torch.tensor([True]))
    with pytest.raises(ValueError, match="seqused_k is for batched rows"):
        fused_rope_attention(q, k, v, cfg, cu_seqlens=cu, seqused_k=torch.tensor([8]))
    with pytest.raises(ValueError, match="at least as many keys"):
        fused_rope_attention(q, k, v, cfg, cu_seqlens=cu, cu_seqlens_k=torch.tensor([0, 1, 8]))
    with pytest.raises(ValueError, match="at least 2 entries"):
        fused_rope_attention(q, k, v, cfg, cu_seqlens=torch.tensor([0]))


def test_documents_from_positions():
    """The patched model's packing: a document per restart, the batch rule without any restart."""
    pytest.importorskip("transformers")
    from longrope_triton.hf.forward import documents

    cfg = make_cfg(original=ORIGINAL)
    plain = torch.stack([torch.arange(30), torch.arange(12, 42)])  # no restart: one document per row
    cu, long = documents(plain, cfg, None)
    assert cu.tolist() == [0, 30, 60] + [60] * 58
    assert long[:2].tolist() == [True, True], "a plain batch takes the batch rule (row 1 reaches 42 > 40)"
    packed = torch.stack([torch.cat([torch.arange(10), torch.arange(20)]),
                          torch.cat([torch.arange(5), torch.arange(25)])])
    cu, long = documents(packed, cfg, None)
    assert cu[:5].tolist() == [0, 10, 30, 35, 60] and bool((cu[5:] == 60).all())
    assert not bool(long.any()), "packed: each document's own length (all short)"
    jump = torch.cat([torch.arange(10), torch.arange(50, 70)])[None]  # a jump starts a document too
    cu, long = documents(jump, cfg, None)
    assert cu[:3].tolist() == [0, 10, 30] and long[:2].tolist() == [False, True]
    assert documents(plain, cfg, ORIGINAL + 1)[1] is None
