"""Angle precision at long context: cos/sin error against float64, by position range.

Three ways to get cos/sin of p * inv_freq for head_dim 128, base 10000 and factors up to
512 (a 2M-token LongRoPE set, DESIGN §2):

- ``naive_fp32``: the fp32 product ``p * inv_freq`` then cos/sin (what eager RoPE code does);
- ``tables_fp32``: the split-position tables of ``longrope_triton.tables`` combined by one
  complex multiply in fp32 -- the kernels' arithmetic, emulated in PyTorch;
- ``kernel``: ``apply_rotary`` on unit vectors through the Triton kernel (run under
  TRITON_INTERPRET=1 on CPU, or on CUDA); skipped when the kernel does not run.

Accuracy, not speed: valid on any device. ``python -m benchmarks.precision [--out DIR]``
writes ``precision-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import torch

from longrope_triton import LongRoPEConfig, apply_rotary
from longrope_triton._dispatch import use_kernel
from longrope_triton.reference import rope_cos_sin, scaled_inv_freq
from longrope_triton.tables import LO_BITS, LO_ROWS, SET_LONG, build_tables

RANGES = [(0, 4096), (4096, 32768), (32768, 131072), (131072, 1 << 20), (1 << 20, 1 << 21)]


def bench_config() -> LongRoPEConfig:
    factors = torch.logspace(0, 9, 64, base=2.0).tolist()  # 1 .. 512
    return LongRoPEConfig(head_dim=128, base=10000.0, original_max_position_embeddings=4096,
                          max_position_embeddings=1 << 21, long_factor=factors, attention_factor=1.0)


def naive_fp32(cfg, pos):
    phi = pos.float()[:, None] * scaled_inv_freq(cfg, True).float()
    return torch.cos(phi).double(), torch.sin(phi).double()


def tables_fp32(cfg, pos):
    tab = build_tables(cfg.base, cfg.rotary_dim, cfg.max_position_embeddings, cfg.short_factor, cfg.long_factor,
                       cfg.mscale)[SET_LONG]
    rows_hi = tab.shape[1] - LO_ROWS
    hi, lo = pos >> LO_BITS, rows_hi + (pos & (LO_ROWS - 1))
    c_hi, s_hi, c_lo, s_lo = tab[0, hi], tab[1, hi], tab[0, lo], tab[1, lo]
    return (c_hi * c_lo - s_hi * s_lo).double(), (s_hi * c_lo + c_hi * s_lo).double()


def kernel(cfg, pos):
    """cos/sin read back from rotating the unit vector e_i (pair (i, i + 64)) at every position."""
    pos = pos.to("cuda" if torch.cuda.is_available() else "cpu")
    q = torch.zeros(1, 64, len(pos), 128, device=pos.device)
    q[0, torch.arange(64), :, torch.arange(64)] = 1.0
    if not use_kernel(q):
        return None
    q_rot, _ = apply_rotary(q, q[:, :1], cfg, position_ids=pos, seq_len=cfg.max_position_embeddings)
    q_rot = q_rot.cpu()
    idx = torch.arange(64)
    return q_rot[0, idx, :, idx].T.double(), q_rot[0, idx, :, idx + 64].T.double()


def measure(samples: int = 1024, seed: int = 0) -> dict:
    cfg = bench_config()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lo, hi in RANGES:
        pos = torch.randint(lo, hi, (samples,), generator=g)
        pos[-1] = hi - 1
        ref_cos, ref_sin = rope_cos_sin(cfg, pos, long=True)
        row = {"positions": [lo, hi], "samples": samples}
        for name, fn in (("naive_fp32", naive_fp32), ("tables_fp32", tables_fp32), ("kernel", kernel)):
            got = fn(cfg, pos)
            row[name] = None if got is None else max(float((got[0] - ref_cos).abs().max()),
                                                     float((got[1] - ref_sin).abs().max()))
        rows.append(row)
    return {"what": "max |cos/sin error| vs float64 (head_dim 128, base 1e4, factors 1..512, mscale 1)",
            "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description="cos/sin precision by position range, written as JSON")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--samples", type=int, default=1024)
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    probe = torch.zeros(1, 1, 1, 128, device="cuda" if torch.cuda.is_available() else "cpu")
    kernel_path = ("compiled Triton (CUDA)" if probe.is_cuda else "Triton interpreter (CPU)") if use_kernel(probe) \
        else "not run (set TRITON_INTERPRET=1 on CPU)"
    record = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "kernel_path": kernel_path, **measure(args.samples)}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"precision-{device.replace(' ', '_')}-{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for row in record["rows"]:
        print(row)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
