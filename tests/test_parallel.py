"""Search, evaluation and fine-tuning over ranks (longrope_triton.parallel) vs one process.

Two gloo ranks (CPU) are spawned once, in a module fixture, and join the default process group
the way ``torchrun`` sets it up (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment, read by
``parallel.init_from_env``). They run every scenario below in turn, each rank saving what its
scenario returns; a test then runs the same scenario in this process, with one rank (no process
group), and compares. The spawn is bounded in time: stragglers are killed and the tests fail
with the failing rank's traceback.

Scenarios: the CLI search (same log lines, fitness within float noise), resuming a killed
1-rank search on 2 ranks, an error on one rank raised on both, the CLI eval and passkey (same
rows), data-parallel fine-tuning with a checkpoint resume (same weights as one process running
the whole batch), the context-parallel patched Llama (same logits, loss and gradients as the
unsharded patched model) and context-parallel fine-tuning. The ranks run the PyTorch attention path: the kernels under
context parallelism are tested in test_distributed.py, and the interpreter would dominate here.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import time
import traceback

import pytest
import torch

from longrope_triton import LongRoPEConfig, parallel
from longrope_triton.cli import main
from longrope_triton.search import SearchParams, SearchSpace, evolution_search
from test_cli import text_file, tiny_model_dir  # noqa: F401 - module fixtures used below
from test_eval import tiny_llama
from test_hf import make_model
from test_search import SMALL, TargetFitness, ramp, template

WORLD = 2
SPAWN_TIMEOUT_S = 150  # every scenario on both ranks; ~25 s on 2 cores
FLOAT_NOISE = 1e-6  # relative: one process vs two ranks sum the same numbers in another order


# ---------------------------------------------------------------------------- scenarios (ranks and this process)
def written_by_rank0(read):
    """What ``read()`` finds in the files rank 0 wrote (read there, after it wrote; sent to every rank)."""
    return parallel.from_main(read)


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}


def search_log(paths: dict, name: str) -> list:
    """`longrope-triton search` on the tiny model; the log's records without their timings."""
    log = paths["tmp"] / f"{name}.jsonl"
    code = main([str(a) for a in [
        "search", "--model", paths["model"], "--text", paths["text"], "--target", 64, "--score-tokens", 16,
        "--windows", 2, "--population", 6, "--iterations", 2, "--start-tokens", "0,2", "--backend", "stock",
        "--log", log, "-o", paths["tmp"] / f"{name}.json"]])
    assert code == 0
    return written_by_rank0(lambda: [untimed(json.loads(line)) for line in log.read_text().splitlines()])


def resumed_search(paths: dict) -> dict:
    """Resume the killed 1-rank search log (written by the fixture) to the end."""
    fitness = TargetFitness(ramp(8, 1.0, 3.0))
    result = evolution_search(fitness, SearchSpace(template()), SearchParams(**SMALL),
                              log_path=paths["tmp"] / "killed.jsonl")
    return {"resumed": result.resumed, "calls": fitness.calls, "config": result.config.to_dict()}


def collective_errors(paths: dict) -> list:
    """What each rank catches when one rank's work item (imap) or rank 0's own work (from_main) raises."""
    def fail_on_item_one(i):
        if i == 1:
            raise ValueError(f"item {i} failed on rank {parallel.world().rank}")
        return i

    caught = []
    for collective in (lambda: list(parallel.imap(fail_on_item_one, range(4))),
                       lambda: parallel.from_main(lambda: 1 / 0)):
        try:
            collective()
        except Exception as exc:
            caught.append(f"{type(exc).__name__}: {exc}")
    return caught


def eval_rows(paths: dict, name: str) -> list:
    out = paths["tmp"] / name
    code = main([str(a) for a in [
        "eval", "--model", paths["model"], "--text", paths["text"], "--methods", "plain,pi,yarn", "--lengths",
        "32,64", "--score-tokens", 8, "--windows", 3, "--backend", "stock", "--out", out]])
    assert code == 0
    return written_by_rank0(lambda: [untimed(row) for row in json.loads(out.with_suffix(".json").read_text())["rows"]])


def passkey_results(paths: dict, name: str) -> list:
    out = paths["tmp"] / name
    code = main([str(a) for a in [
        "passkey", "--model", paths["model"], "--method", "pi", "--lengths", "400,480", "--target", 512,
        "--depths", "0.2,0.5,0.8", "--backend", "stock", "--out", out]])
    assert code == 0
    return written_by_rank0(lambda: json.loads(out.with_suffix(".json").read_text())["results"])


FINETUNE_CFG = LongRoPEConfig.longrope(16, 32, 64, long_factor=[1.0 + 0.1 * i for i in range(8)], start_token=2)
# two rows a step; one long document (40 > L_orig = 32: long factors) + one short (8) per row
FINETUNE_KW = dict(long_tokens=40, short_tokens=8, shorts_per_row=1, lr=1e-2, seed=0, grad_accum=2, steps=3)


def finetuned(checkpoint_dir=None, stop_after=None, context_parallel: int = 1) -> dict:
    """Fine-tune a fresh seeded tiny Llama (resuming from ``checkpoint_dir`` if it holds one)."""
    from longrope_triton.train import finetune
    torch.manual_seed(0)
    model = tiny_llama(max_pos=32, vocab=16)
    result = finetune(model, FINETUNE_CFG, [torch.arange(400) % 7], checkpoint_dir=checkpoint_dir, save_every=1,
                      stop_after=stop_after, context_parallel=context_parallel, **FINETUNE_KW)
    return {"losses": result.losses, "step": result.step, "weights": model.state_dict()}


def data_parallel_with_resume(paths: dict) -> dict:
    """2 ranks: one step, 'killed', then resumed from rank 0's checkpoint to the end."""
    first = finetuned(paths["tmp"] / "ckpt", stop_after=1)
    rest = finetuned(paths["tmp"] / "ckpt")
    return {**rest, "losses": first["losses"] + rest["losses"]}


CP_LENGTH = 48  # > L_orig = 32 (long factors) while each rank's 24 tokens are not: the regime is global


def patched_llama_step(group=None) -> dict:
    """Logits, mean next-token loss and parameter gradients of a patched tiny Llama on 2 sequences
    (n_hat = 4); with ``group``, context parallel: each rank feeds its zigzag shard."""
    import torch.nn.functional as F
    from longrope_triton import patch_model
    from longrope_triton.train.finetune import shift_labels

    torch.manual_seed(0)
    model = make_model("llama")
    ids = torch.randint(3, 100, (2, CP_LENGTH))
    targets = shift_labels(ids)  # on the full sequences, before sharding
    count = int((targets != -100).sum())
    patch_model(model, LongRoPEConfig.from_hf(model.config).replace(start_token=4), process_group=group)
    if group is not None:
        from longrope_triton.distributed import gather_sequence, shard_sequence
        ids, targets = shard_sequence(ids, dim=1, group=group), shard_sequence(targets, dim=1, group=group)
    logits = model(input_ids=ids, use_cache=False).logits  # position_ids None: the patch fills in the global ones
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / count
    loss.backward()
    parallel.sum_gradients(model.parameters())
    if group is not None:
        logits = gather_sequence(logits.detach(), dim=1, group=group)
        with pytest.raises(ValueError, match="zigzag"):  # the shard's local positions would be wrong
            model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None])
    return {"logits": logits.detach(), "loss": parallel.sum_float(float(loss.detach())),
            "grads": {n: p.grad for n, p in model.named_parameters()}}


# what the ranks run, in order: name -> function of the paths
RANK_SCENARIOS = {
    "search": lambda paths: search_log(paths, "search-2"),
    "resume": resumed_search,
    "errors": collective_errors,
    "eval": lambda paths: eval_rows(paths, "eval-2"),
    "passkey": lambda paths: passkey_results(paths, "passkey-2"),
    "data_parallel": data_parallel_with_resume,
    "cp_model": lambda paths: patched_llama_step(torch.distributed.group.WORLD),
    "cp_finetune": lambda paths: finetuned(context_parallel=WORLD),
}


# ---------------------------------------------------------------------------- spawning
def _rank_main(rank: int, port: int, paths: dict) -> None:
    """One rank: join the group as torchrun would, run every scenario, save each result (or traceback)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TRITON_INTERPRET="0")
    torch.set_num_threads(1)  # two ranks on two cores
    parallel.init_from_env(timeout_s=SPAWN_TIMEOUT_S)
    for name, scenario in RANK_SCENARIOS.items():
        try:
            result = {"ok": scenario(paths)}
        except Exception:  # saved for the test to show; the other rank may now wait: stop here
            result = {"error": traceback.format_exc()}
        torch.save(result, paths["tmp"] / f"{name}.rank{rank}.pt")
        if "error" in result:
            break
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(paths: dict) -> dict:
    """Run the ranks (bounded in time, stragglers killed); {rank: exit code}."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, port, paths)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = {}
    for rank, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            codes[rank] = f"killed after {SPAWN_TIMEOUT_S} s"
        else:
            codes[rank] = p.exitcode
    return codes


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_model_dir, text_file):  # noqa: F811 - the imported fixtures
    """Spawn the ranks once; returns a function: scenario name -> [result of rank 0, of rank 1]."""
    paths = {"tmp": tmp_path_factory.mktemp("ranks"), "model": tiny_model_dir, "text": text_file}
    # a 1-rank search killed after 5 evaluations, for the ranks to resume
    with pytest.raises(KeyboardInterrupt):
        evolution_search(TargetFitness(ramp(8, 1.0, 3.0), die_after=5), SearchSpace(template()),
                         SearchParams(**SMALL), log_path=paths["tmp"] / "killed.jsonl")
    codes = _spawn_ranks(paths)

    def results(name: str) -> list:
        out = []
        for rank in range(WORLD):
            path = paths["tmp"] / f"{name}.rank{rank}.pt"
            if not path.is_file():
                pytest.fail(f"scenario {name!r} did not run on rank {rank} (exit codes {codes}; an earlier "
                            "scenario failed or the ranks timed out)")
            saved = torch.load(path, weights_only=False)
            if "error" in saved:
                pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{saved['error']}")
            out.append(saved["ok"])
        return out

    results.paths = paths
    return results


@pytest.fixture
def torch_path(monkeypatch):
    """The one-process references run the PyTorch attention path, as the ranks do."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def assert_records_match(actual: list, expected: list, what: str) -> None:
    """Same records in the same order; floats within float noise."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} records, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.keys() == e.keys(), f"{what}[{i}]: fields {sorted(a)} != {sorted(e)}"
        for key in a:
            if isinstance(e[key], float) and math.isfinite(e[key]):
                assert a[key] == pytest.approx(e[key], rel=FLOAT_NOISE), f"{what}[{i}].{key}: {a[key]} != {e[key]}"
            else:
                assert a[key] == e[key], f"{what}[{i}].{key}: {a[key]!r} != {e[key]!r}"


def assert_tensors_close(actual: dict, expected: dict, what: str, tol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        err = float((actual[name].double() - e.double()).abs().max())
        bound = tol * max(1.0, float(e.abs().max()))
        assert err <= bound, f"{what} {name}: max error {err:.3e} > {bound:.3e}"


# ---------------------------------------------------------------------------- tests
def test_search_on_two_ranks_writes_the_one_rank_log(ranks):
    rank0, _ = ranks("search")
    assert_records_match(rank0, search_log(ranks.paths, "search-1"), "search log")


def test_killed_one_rank_search_resumes_on_two_ranks(ranks):
    rank0, rank1 = ranks("resume")
    full = TargetFitness(ramp(8, 1.0, 3.0))
    log = ranks.paths["tmp"] / "uninterrupted.jsonl"
    expected = evolution_search(full, SearchSpace(template()), SearchParams(**SMALL), log_path=log)
    assert rank0["resumed"] == rank1["resumed"] == 5
    assert rank0["calls"] + rank1["calls"] == full.calls - 5  # nothing evaluated twice, the rest split
    assert rank0["calls"] > 0 and rank1["calls"] > 0
    assert rank0["config"] == rank1["config"] == expected.config.to_dict()
    records = [[untimed(json.loads(line)) for line in path.read_text().splitlines()]
               for path in (ranks.paths["tmp"] / "killed.jsonl", log)]
    assert records[0] == records[1]


def test_errors_in_one_rank_are_raised_on_every_rank(ranks):
    expected = ["ValueError: item 1 failed on rank 1", "ZeroDivisionError: division by zero"]
    assert ranks("errors") == [expected, expected]


def test_eval_on_two_ranks_equals_one_rank(ranks):
    rank0, _ = ranks("eval")
    assert_records_match(rank0, eval_rows(ranks.paths, "eval-1"), "eval rows")


def test_passkey_on_two_ranks_equals_one_rank(ranks):
    rank0, _ = ranks("passkey")
    assert_records_match(rank0, passkey_results(ranks.paths, "passkey-1"), "passkey trials")


@pytest.fixture(scope="module")
def one_process_finetune():
    """The reference of both fine-tuning tests: one process, the whole batch, the PyTorch path."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "0")
        return finetuned()


def test_data_parallel_finetune_with_resume_equals_full_batch(ranks, one_process_finetune):
    rank0, rank1 = ranks("data_parallel")
    expected = one_process_finetune
    assert rank0["step"] == rank1["step"] == 3
    assert rank0["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    for rank in (rank0, rank1):
        assert_tensors_close(rank["weights"], expected["weights"], "weight")


def test_context_parallel_patched_llama_equals_unsharded(ranks, torch_path):
    rank0, rank1 = ranks("cp_model")
    expected = patched_llama_step()
    for rank in (rank0, rank1):
        assert_tensors_close({"logits": rank["logits"]}, {"logits": expected["logits"]}, "")
        assert rank["loss"] == pytest.approx(expected["loss"], rel=FLOAT_NOISE)
        assert_tensors_close(rank["grads"], expected["grads"], "gradient of")


def test_context_parallel_finetune_equals_one_process(ranks, one_process_finetune):
    rank0, rank1 = ranks("cp_finetune")
    expected = one_process_finetune
    assert rank0["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    for rank in (rank0, rank1):
        assert_tensors_close(rank["weights"], expected["weights"], "weight")
