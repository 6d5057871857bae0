"""Context-parallel attention timing: ``torchrun --nproc-per-node W -m benchmarks.distributed``.

Per sequence length, on every rank: context_parallel_attention forward and forward+backward on
the local zigzag shards, and the bare all-gather of the local K/V (the communication the
forward cannot avoid), each a fixed number of repetitions so every rank issues the same
collectives (do_bench picks its repetition count from its own timing, which could differ per
rank and hang a collective). A step is as slow as its slowest rank: the JSON keeps every rank's
median and their maximum, the analytic FLOPs and bytes of docs/distributed.md, and provenance.

NCCL on CUDA (one GPU per rank, ``LOCAL_RANK``), else gloo on the CPU — a CPU run checks the
harness only; its times are the PyTorch path's, not kernel performance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import time

import torch
import torch.distributed as dist

from longrope_triton import LongRoPEConfig
from longrope_triton.distributed import context_parallel_attention, shard_sequence

from . import measure

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node W -m benchmarks.distributed",
                                description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072], help="full lengths S")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions")
    p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results"))
    return p.parse_args(argv)


def setup_device() -> torch.device:
    """NCCL with one GPU per rank when CUDA is there, else gloo on the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def timed_ms(fn, device, warmup: int, reps: int) -> list:
    """Wall times of ``reps`` calls (CUDA events on the GPU), after ``warmup`` calls and a barrier."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def every_rank(value: float, device) -> list:
    """``value`` of each rank, in rank order."""
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(table, mine)
    return [float(t) for t in table]


def analytic(s: int, args, world: int) -> dict:
    """Per-rank attention FLOPs (causal halved; backward 2.5x forward) and bytes moved per layer."""
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    flops_fwd = 4 * args.batch * s * s * args.heads * args.head_dim / world / (1 if args.non_causal else 2)
    kv_bytes = (world - 1) / world * args.batch * s * args.kv_heads * args.head_dim * 2 * elem
    return {"flops_fwd_per_rank": flops_fwd, "flops_bwd_per_rank": 2.5 * flops_fwd,
            "bytes_all_gather_per_rank": kv_bytes, "bytes_grad_reduce_per_rank": kv_bytes,
            "flops_per_byte_fwd": flops_fwd / kv_bytes if kv_bytes else None}


def measure_length(s: int, args, cfg: LongRoPEConfig, device) -> dict:
    world = dist.get_world_size()
    torch.manual_seed(0)  # the same full tensors on every rank; each keeps its shard
    dtype = DTYPES[args.dtype]
    q, k, v = (shard_sequence(torch.randn(args.batch, h, s, args.head_dim, dtype=dtype, device=device))
               .requires_grad_() for h in (args.heads, args.kv_heads, args.kv_heads))
    grad_out = torch.randn_like(q)
    causal = not args.non_causal

    def forward():
        with torch.no_grad():
            context_parallel_attention(q, k, v, cfg, causal=causal)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        context_parallel_attention(q, k, v, cfg, causal=causal).backward(grad_out)

    kv_local = torch.stack((k.detach(), v.detach()))
    kv_parts = [torch.empty_like(kv_local) for _ in range(world)]
    row = {"seq_len": s, "local_len": s // world, **analytic(s, args, world)}
    for name, fn in (("forward", forward), ("forward_backward", forward_backward),
                     ("kv_all_gather", lambda: dist.all_gather(kv_parts, kv_local))):
        medians = every_rank(statistics.median(timed_ms(fn, device, args.warmup, args.reps)), device)
        row[name] = {"ms_median_per_rank": medians, "ms_slowest_rank": max(medians)}
    row["tflops_fwd_slowest_rank"] = row["flops_fwd_per_rank"] / (row["forward"]["ms_slowest_rank"] * 1e-3) / 1e12
    return row


def main(argv=None):
    args = parse_args(argv)
    device = setup_device()
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = LongRoPEConfig.longrope(args.head_dim, original_max_position_embeddings=4096,
                                  max_position_embeddings=max(max(args.seq_lens), 4096),
                                  long_factor=[4.0] * (args.head_dim // 2))
    rows = [measure_length(s, args, cfg, device) for s in args.seq_lens]
    if rank == 0:
        meta = measure.provenance(device)
        record = {"benchmark": "context_parallel_attention", "world_size": world,
                  "backend": str(dist.get_backend()), "args": vars(args), "meta": meta, "rows": rows}
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"distributed-{measure.device_slug(meta)}-W{world}-{stamp}.json"
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for row in rows:
            print(f"S={row['seq_len']}: forward {row['forward']['ms_slowest_rank']:.3f} ms, "
                  f"forward+backward {row['forward_backward']['ms_slowest_rank']:.3f} ms, "
                  f"K/V all-gather {row['kv_all_gather']['ms_slowest_rank']:.3f} ms (slowest rank)")
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
