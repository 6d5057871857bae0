"""Ranks for search, evaluation and fine-tuning: torch.distributed, launched by ``torchrun``.

One process per rank, started by ``torchrun --nproc-per-node N -m -- longrope_triton.cli ...``.
:func:`launched` (used by the CLI) initializes the default process group from the environment
torchrun sets (``WORLD_SIZE`` > 1): NCCL when CUDA is available, else gloo; each rank then
works on its own device (:func:`device`: ``cuda:LOCAL_RANK``, or the CPU). Outside such a launch
every function here is the trivial single-rank case, so the library code that uses them
(search, eval, train) runs unchanged in one process.

The work-splitting rule, used everywhere: items are dealt out round-robin in *rounds* of W
(item j of a round goes to rank j), and every rank receives every result, in item order, after
each round (:func:`imap`). All ranks therefore hold the same state, results arrive in the order
a single process would produce them, and only rank 0 writes files and prints
(:func:`is_main`, :func:`main_only`).

Example (two ranks on one machine)::

    torchrun --nproc-per-node 2 -m -- longrope_triton.cli search --target 16384 --log s.jsonl -o f.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import pickle
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the ranks of the default process group."""

    rank: int
    size: int


def world() -> World:
    """The ranks of the default process group (rank 0 of 1 when none is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World(0, 1)
    return World(dist.get_rank(), dist.get_world_size())


def is_main() -> bool:
    """True on rank 0, the rank that writes logs, results and checkpoints, and prints."""
    return world().rank == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_from_env(timeout_s: Optional[float] = None) -> bool:
    """Initialize the default process group from torchrun's environment when WORLD_SIZE > 1.

    Backend NCCL when CUDA is available (after selecting ``cuda:LOCAL_RANK``), else gloo.
    Returns True when this call initialized it (False: one rank, or already initialized).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
        dist.init_process_group("nccl", device_id=device(), **kw)
    else:
        dist.init_process_group("gloo", **kw)
    return True


@contextlib.contextmanager
def launched():
    """Context for a command: the process group of a torchrun launch, destroyed on exit if made here."""
    created = init_from_env()
    try:
        yield world()
    finally:
        if created:
            dist.destroy_process_group()


def main_only(print_fn: Callable) -> Callable:
    """``print_fn`` on rank 0; a function that prints nothing on the other ranks."""
    return print_fn if is_main() else _silent


def _silent(*args, **kwargs) -> None:
    return None


def _collective_device() -> torch.device:
    # NCCL moves objects and reduces tensors on the GPU; gloo on the CPU
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def from_main(fn: Callable):
    """Run ``fn()`` on rank 0 only; every rank returns its result, or raises the exception it raised.

    For what one rank must do alone (read and repair a log file) while the others wait for it:
    an error there is raised on every rank instead of leaving them blocked in a collective.
    """
    if world().size == 1:
        return fn()
    mine = payload = None
    if is_main():
        try:
            mine = payload = (True, fn())
        except Exception as exc:  # raised again on every rank below
            mine, payload = (False, exc), (False, _sendable(exc))
    box = [payload]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    ok, value = mine if is_main() else box[0]  # rank 0 keeps its own objects (and tracebacks)
    if not ok:
        raise value
    return value


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others will read)."""
    if world().size > 1:
        dist.barrier()


def share(items: Sequence, index: int, count: int) -> list:
    """The items of worker ``index`` when ``count`` workers deal them out round-robin."""
    return list(items[index::count])


def all_gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if world().size == 1:
        return [obj]
    out = [None] * world().size
    dist.all_gather_object(out, obj)
    return out


def imap(fn: Callable, items: Iterable) -> Iterator:
    """``fn(item)`` for every item, in order, on every rank; the calls are split over the ranks.

    Rounds of W items: item j of a round runs on rank j, then all ranks exchange the results, so
    at most W calls are in flight and a consumer that records results as they arrive (a search
    log) loses at most one round if killed. An exception in any call is raised on every rank
    (the first, in item order), so no rank is left waiting in a collective. Lazy: a round runs
    when its first result is asked for.
    """
    items = list(items)
    size, rank = world().size, world().rank
    for start in range(0, len(items), size):
        batch = items[start: start + size]
        mine = _attempt(fn, batch[rank]) if rank < len(batch) else None
        results = all_gather(mine)[: len(batch)]
        if rank < len(batch):
            results[rank] = mine  # this rank's own objects (and tracebacks), not copies
        for ok, value in results:
            if not ok:
                raise value
        yield from (value for _, value in results)


def _attempt(fn: Callable, item):
    try:
        return True, fn(item)
    except Exception as exc:  # raised again, on every rank, by imap
        return False, _sendable(exc)


def _sendable(exc: Exception) -> Exception:
    """The exception itself when it can travel to the other ranks (pickle), else a RuntimeError naming it."""
    if world().size == 1:
        return exc
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def sum_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over all ranks (a missing gradient counts as zeros).

    Each rank backpropagates its part of the step's loss (its rows, or its shard of a row,
    already divided by the step's global token or row count), so the sum is the gradient of the
    whole step: the same as one process computing it all, up to the order of float additions.
    """
    if world().size == 1:
        return
    grads = []
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    # all in flight at once, then waited: one round trip's latency, not one per tensor
    handles = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in grads]
    for handle in handles:
        handle.wait()


def sum_float(value: float) -> float:
    """A Python float summed over all ranks."""
    if world().size == 1:
        return float(value)
    return float(sum(all_gather(float(value))))


def sequence_groups(ranks_per_sequence: int):
    """Split the ranks into consecutive groups of ``ranks_per_sequence`` (context parallel).

    Returns (this rank's group, its index, number of groups): ranks of one group share each
    sequence (each holds a shard); the groups take different rows of the batch (data parallel).
    Every rank must call this, with the same size (``torch.distributed.new_group`` is collective).
    """
    w = world()
    if ranks_per_sequence < 1 or w.size % ranks_per_sequence:
        raise ValueError(f"--context-parallel {ranks_per_sequence} must divide the number of ranks, {w.size} "
                         "(launch with torchrun --nproc-per-node N)")
    if ranks_per_sequence == 1:  # data parallel only: no sequence is shared
        return None, w.rank, w.size
    count = w.size // ranks_per_sequence
    mine = None
    for index in range(count):
        group = dist.new_group(list(range(index * ranks_per_sequence, (index + 1) * ranks_per_sequence)))
        if w.rank // ranks_per_sequence == index:
            mine = group
    return mine, w.rank // ranks_per_sequence, count
