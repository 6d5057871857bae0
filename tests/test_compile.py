"""Patched models compile like stock ones (issue #19): torch.compile, torch.export, no host read.

Tiny random-weight models of tests/test_hf.py (2 layers, head_dim 16, original_max_position_
embeddings 32, so 20 tokens run the short regime and 48 the long one): a patched Llama, a
patched Phi-3 (partial rotary: 8 of 16 dims) and a packed batch whose documents sit on both
sides of the switch. fp32 on CPU; compiled results equal eager ones to 1e-5 (measured ~1e-6:
inductor fuses the model's own arithmetic differently, our op runs the same code).

- ``torch.compile(fullgraph=True, dynamic=True)`` with inductor: one graph serves every length
  on both sides of the switch, plain and packed (compilations counted by a counting backend);
- ``torch.export.export`` of a forward (use_cache=False): one program, dynamic batch and length,
  runs both regimes and equals eager;
- ``torch._dynamo.explain``: 0 graph breaks (prefill, packed, and a static-cache decode step);
- with eager checks off (LONGROPE_TRITON_EAGER_CHECKS=0) an eager forward reads nothing on the
  host: a TorchDispatchMode fails on every syncing op issued from this library, inside our custom
  ops' implementations too (the mode re-enters them), and a positive control with the checks on
  shows that it sees our reads;
- a compiled training step (forward, backward, SGD step) equals eager;
- greedy generation with a StaticCache and a compiled forward, across the switch, equals eager
  (the re-prefill is decided in prepare_inputs_for_generation, outside the compiled forward);
- bad positions still raise in eager mode; compiled, they fail a device assert.

Patched models trace whole from the oldest supported transformers (5.5): their rotary embeddings
compute no tables, so the stock longrope embedding's host-side code is not in the graph (it breaks
stock graphs before 5.25, and PhiMoE's on every release). The model-level compile, export, graph-break
and static-cache generation tests are ``hf``-marked: they run on transformers 5.5 too.

The PyTorch path runs by default (our op is opaque to the compiler, so which implementation runs
inside it changes nothing about tracing); the no-read check also runs on the Triton kernel in
the interpreter. CPU inductor compiles C++ (tens of seconds per graph on 2 cores), so every
compiled model here is built once per module.
"""

import copy
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

import longrope_triton  # noqa: E402
import longrope_triton.attention as attention  # noqa: E402
import longrope_triton.rotary as rotary  # noqa: E402
from longrope_triton import apply_rotary, fused_rope_attention, patch_model  # noqa: E402
from longrope_triton._validation import EAGER_CHECKS_ENV  # noqa: E402
from test_attention import make_cfg, make_qkv  # noqa: E402
from test_hf import LONG, MAX_POS, SHORT, _generate, _ids, make_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_path_quiet")

TOL = 1e-5
PACKAGE_DIR = os.path.dirname(longrope_triton.__file__)
KERNELS_DIR = os.path.realpath(os.path.join(PACKAGE_DIR, "kernels"))


def _graphs_compiled() -> int:
    """Graphs dynamo compiled since the last torch._dynamo.utils.counters.clear()."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class Compilations:
    """A torch.compile backend that counts its calls (proof that something was compiled), then
    hands the graph to inductor (or to a backend that runs it as traced, where only tracing
    matters). Dynamo may call a backend twice for one graph (it restarts a trace to specialize a
    float); dynamo's own counters count graphs."""

    def __init__(self, backend: str = "inductor"):
        self.backend, self.graphs = backend, 0

    def __deepcopy__(self, memo):  # transformers deep-copies a CompileConfig: keep counting here
        return self

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return torch._dynamo.backends.registry.lookup_backend(self.backend)(gm, example_inputs)


# ---------------------------------------------------------------------------- inputs
def _plain(seq: int, batch: int = 2):
    """ids and the positions transformers makes (arange per row), as explicit (B, S) tensors."""
    return _ids(batch, seq), torch.arange(seq).repeat(batch, 1)


def _packed():
    """Two rows of 48 tokens packing documents of 10 + 38 (short + long) and 20 + 28 (both short)."""
    positions = torch.stack([torch.cat([torch.arange(10), torch.arange(38)]),
                             torch.cat([torch.arange(20), torch.arange(28)])])
    return _ids(2, LONG), positions


LLAMA_INPUTS = {"short": lambda: _plain(SHORT), "long": lambda: _plain(LONG), "packed": _packed}


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return patch_model(make_model("llama"))


@pytest.fixture(scope="module")
def phi3():
    torch.manual_seed(0)
    return patch_model(make_model("phi3"))


def _logits(model, ids, positions=None):
    with torch.no_grad():
        kwargs = {} if positions is None else {"position_ids": positions}
        return model(ids, use_cache=False, **kwargs).logits


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.hf  # also run with the oldest supported transformers
def test_llama_and_packed_batch_compile_whole_in_both_regimes(llama):
    """One fullgraph, dynamic graph for a short batch, a long batch and a packed batch with
    documents on both sides of the switch (the regimes are device tensors, not guards)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(llama, fullgraph=True, dynamic=True, backend=Compilations())
    for name, make in LLAMA_INPUTS.items():
        ids, positions = make()
        ours, eager = _logits(compiled, ids, positions), _logits(llama, ids, positions)
        assert (ours - eager).abs().max() <= TOL, f"{name}: {(ours - eager).abs().max():.2e}"
    assert 1 <= _graphs_compiled() <= 2, f"{_graphs_compiled()} compilations for lengths on both sides of the switch"


@pytest.mark.hf  # also run with the oldest supported transformers
def test_phi3_partial_rotary_compiles_whole_in_both_regimes(phi3):
    """model(ids) as users call it (no position_ids): short and long lengths, one graph."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(phi3, fullgraph=True, dynamic=True, backend=Compilations())
    for seq in (SHORT, LONG):
        ids = _ids(2, seq)
        ours, eager = _logits(compiled, ids), _logits(phi3, ids)
        assert (ours - eager).abs().max() <= TOL, f"S={seq}: {(ours - eager).abs().max():.2e}"
    assert 1 <= _graphs_compiled() <= 2, f"{_graphs_compiled()} compilations"


# ---------------------------------------------------------------------------- torch.export
@pytest.mark.hf  # also run with the oldest supported transformers
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_export_one_program_serves_both_regimes(family, llama, phi3):
    """torch.export of a forward (use_cache=False) with dynamic batch and length: the same program
    runs 20 and 48 tokens (short and long regime) and, for Llama, a packed batch."""
    from torch.export import Dim

    model = llama if family == "llama" else phi3
    seq = Dim("seq", min=2, max=MAX_POS)
    if family == "llama":
        ids, positions = _plain(SHORT)
        shapes = {"input_ids": {0: Dim.AUTO, 1: seq}, "position_ids": {0: Dim.AUTO, 1: seq}}
        program = torch.export.export(model, (), {"input_ids": ids, "position_ids": positions, "use_cache": False},
                                      dynamic_shapes={**shapes, "use_cache": None})
        cases = [make() for make in LLAMA_INPUTS.values()]
    else:
        ids = _ids(2, SHORT)
        program = torch.export.export(model, (), {"input_ids": ids, "use_cache": False},
                                      dynamic_shapes={"input_ids": {0: Dim.AUTO, 1: seq}, "use_cache": None})
        cases = [(_ids(2, s), None) for s in (SHORT, LONG)]
    exported = program.module()
    for ids, positions in cases:
        kwargs = {"input_ids": ids, "use_cache": False}
        if positions is not None:
            kwargs["position_ids"] = positions
        with torch.no_grad():
            ours = exported(**kwargs).logits
        eager = _logits(model, ids, positions)
        assert (ours - eager).abs().max() <= TOL, f"S={ids.shape[1]}: {(ours - eager).abs().max():.2e}"


# ---------------------------------------------------------------------------- graph breaks
def _decode_step_inputs(model):
    """A StaticCache after a 36-token prefill (long regime) and the next token's inputs."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=64)
    ids = _ids(1, 36)
    with torch.no_grad():
        model(ids, position_ids=torch.arange(36)[None], **{longrope_triton.hf.cache_argument(): cache})
    return {"input_ids": _ids(1, 1), "position_ids": torch.tensor([[36]]),
            longrope_triton.hf.cache_argument(): cache}


@pytest.mark.hf  # also run with the oldest supported transformers
@pytest.mark.parametrize("case", ["short", "long", "packed", "phi3", "static-cache-decode"])
def test_no_graph_breaks(case, llama, phi3):
    model = phi3 if case == "phi3" else llama
    if case == "static-cache-decode":
        kwargs = _decode_step_inputs(llama)
    elif case == "phi3":
        kwargs = {"input_ids": _ids(2, LONG), "use_cache": False}
    else:
        ids, positions = LLAMA_INPUTS[case]()
        kwargs = {"input_ids": ids, "position_ids": positions, "use_cache": False}
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _compiles_whole_in_both_regimes(model, label: str) -> None:
    """One fullgraph dynamic program (aot_eager: what differs per family is the tracing) for a short and
    a long batch, equal to eager, at most 2 compilations."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=Compilations("aot_eager"))
    for seq in (SHORT, LONG):
        ids, positions = _plain(seq)
        ours, eager = _logits(compiled, ids, positions), _logits(model, ids, positions)
        assert (ours - eager).abs().max() <= TOL, f"{label} S{seq}: {(ours - eager).abs().max():.2e}"
    assert 1 <= _graphs_compiled() <= 2


def _graph_breaks(model) -> list:
    """The reasons of the graph breaks dynamo finds in a long-regime forward."""
    torch._dynamo.reset()
    with torch.no_grad():
        return torch._dynamo.explain(model)(input_ids=_ids(2, LONG), use_cache=False).break_reasons


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_the_other_families_compile_whole(family):
    """Every family of the table is as compile-friendly as Llama: Mistral (window from the config) and
    Qwen2 (per-layer window, q/k/v biases) trace whole with no graph break, one fullgraph dynamic
    program for both regimes, equal to eager."""
    torch.manual_seed(0)
    model = patch_model(make_model(family))
    _compiles_whole_in_both_regimes(model, family)
    assert not _graph_breaks(model)


@pytest.mark.hf  # also run with the oldest supported transformers
def test_phimoe_compiles_whole_where_stock_breaks():
    """PhiMoE's stock rotary embedding picks its per-regime attention factor with a host branch on the
    sequence length (graph breaks, no fullgraph); the patched model computes no position tables, so it
    traces whole: one fullgraph dynamic program for both regimes, equal to eager."""
    from test_hf import _per_regime_rope, _phimoe

    torch.manual_seed(0)
    stock = _phimoe(_per_regime_rope(attention_factor=1.3))
    model = patch_model(copy.deepcopy(stock))
    _compiles_whole_in_both_regimes(model, "phimoe")
    assert not _graph_breaks(model)
    assert _graph_breaks(stock), "the stock PhiMoE now traces whole: this test no longer shows a difference"


# ---------------------------------------------------------------------------- no host read
_SYNCING = {getattr(torch.ops.aten, name).default for name in (
    "_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "unique_consecutive",
    "bincount")} | {torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default,
                    torch.ops.aten.repeat_interleave.Tensor, torch.ops.aten.item.default}
# Our custom ops, re-entered under the mode: their implementations' ops are checked too.
_IMPLEMENTATIONS = {
    torch.ops.longrope_triton.fused_rope_attention.default: attention.attention_impl,
    torch.ops.longrope_triton.fused_rope_attention_backward.default: attention.attention_backward_impl,
    torch.ops.longrope_triton.rotary.default: rotary.rotary_impl,
}


def _ours(frame) -> bool:
    path = os.path.realpath(frame.filename)
    return path.startswith(os.path.realpath(PACKAGE_DIR)) or path.startswith(KERNELS_DIR)


class HostReads(TorchDispatchMode):
    """Records every op that reads device memory on the host (or could: a sync on a GPU) issued
    with a frame of this library on the stack, and runs our custom ops' implementations under
    itself, so that nothing they do is hidden. Device->host copies count too (GPU runs)."""

    def __init__(self):
        super().__init__()
        self.ours, self.custom_ops, self.inner_ops = [], 0, 0
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _IMPLEMENTATIONS:
            self.custom_ops += 1
            self._depth += 1
            try:
                with self:
                    return _IMPLEMENTATIONS[func](*args, **kwargs)
            finally:
                self._depth -= 1
        self.inner_ops += self._depth > 0
        syncing = func in _SYNCING or (func is torch.ops.aten.repeat_interleave.self_Tensor
                                       and kwargs.get("output_size") is None)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source, target = args[1 if func is torch.ops.aten.copy_.default else 0], kwargs.get("device")
            if func is torch.ops.aten.copy_.default:
                target = args[0].device
            syncing = target is not None and source.device.type != "cpu" and torch.device(target).type == "cpu"
        if syncing:
            stack = traceback.extract_stack()
            if any(_ours(f) for f in stack):
                self.ours.append(f"{func}: " + " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}"
                                                           for f in reversed(stack) if _ours(f)))
        return func(*args, **kwargs)


def _forwards(model_name: str):
    """The forwards checked: prefill of a short, a long and a packed batch, and with a StaticCache
    a prefill then a decode step (what a CUDA graph captures)."""
    from transformers import StaticCache

    model = patch_model(make_model(model_name))
    key = longrope_triton.hf.cache_argument()

    def run():
        with torch.no_grad():
            for make in LLAMA_INPUTS.values():
                ids, positions = make()
                model(ids, position_ids=positions, use_cache=False)
            cache = StaticCache(config=model.config, max_cache_len=64)
            model(_ids(1, 36), position_ids=torch.arange(36)[None], **{key: cache})
            model(_ids(1, 1), position_ids=torch.tensor([[36]]), **{key: cache})

    return model, run


@pytest.mark.parametrize("model_name", ["llama", "phi3"])
def test_a_forward_reads_nothing_on_the_host_with_eager_checks_off(model_name, path, monkeypatch):
    model, run = _forwards(model_name)
    run()  # warm: table caches, lazy initialization
    monkeypatch.setenv(EAGER_CHECKS_ENV, "1")
    with HostReads() as control:
        run()
    assert control.ours, "positive control: with eager checks on, the checks read positions on the host"
    monkeypatch.setenv(EAGER_CHECKS_ENV, "0")
    with HostReads() as mode:
        run()
    n_layers = model.config.num_hidden_layers
    assert mode.custom_ops >= 5 * n_layers and mode.inner_ops > 100, "the custom ops were not looked into"
    assert not mode.ours, "host reads with eager checks off:\n" + "\n".join(mode.ours)


def test_the_functions_read_nothing_with_eager_checks_off(path, monkeypatch):
    """fused_rope_attention (batched, packed with use_long, static cache with seqused_k, forward and
    backward) and apply_rotary, outside any model."""
    monkeypatch.setenv(EAGER_CHECKS_ENV, "0")
    cfg = make_cfg(original=40)
    q, k, v = make_qkv(2, 4, 2, 33, 33, 64, torch.float32)
    pos = torch.arange(33).repeat(2, 1)
    cu = torch.tensor([0, 30, 31, 66], dtype=torch.int32)
    with HostReads() as mode:
        fused_rope_attention(q, k, v, cfg, position_ids=pos, kv_position_ids=pos).sum().backward()
        qp, kp, vp = (t.detach().reshape(1, t.shape[1], 66, 64) for t in (q, k, v))
        fused_rope_attention(qp, kp, vp, cfg, cu_seqlens=cu, use_long=torch.tensor([False, True, True]))
        fused_rope_attention(q.detach()[:, :, :1], k.detach(), v.detach(), cfg, position_ids=pos[:, 20:21],
                             seqused_k=torch.tensor([21, 21]), k_is_rotated=True)
        apply_rotary(q.detach(), k.detach(), cfg, position_ids=pos)
    assert mode.custom_ops >= 5 and not mode.ours, "\n".join(mode.ours)


# ---------------------------------------------------------------------------- training
def test_compiled_training_step_equals_eager():
    """Forward, backward and an SGD step, compiled (fullgraph model, compiled optimizer step), from
    the same weights as an eager step: the same loss and the same weights after the step."""
    torch.manual_seed(0)
    eager_model = patch_model(make_model("llama").train())
    compiled_model = patch_model(make_model("llama").train())
    compiled_model.load_state_dict(eager_model.state_dict())
    ids, positions = _packed()  # documents on both sides of the switch

    def step(model, optimizer, forward):
        loss = forward(ids, position_ids=positions, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer()
        return loss.detach()

    opt_e = torch.optim.SGD(eager_model.parameters(), lr=0.5)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.5)
    counter = Compilations()
    loss_e = step(eager_model, opt_e.step, eager_model)
    loss_c = step(compiled_model, torch.compile(opt_c.step, backend=counter),
                  torch.compile(compiled_model, fullgraph=True, backend=counter))
    assert counter.graphs >= 2, "the step was not compiled"
    assert abs(float(loss_e - loss_c)) <= TOL
    for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters()):
        assert (a - b).abs().max() <= TOL * max(1.0, float(a.abs().max())), name


# ---------------------------------------------------------------------------- generation
@pytest.mark.hf  # also run with the oldest supported transformers
def test_static_cache_generation_with_a_compiled_forward_crosses_the_switch():
    """generate() with a StaticCache and ``model.forward = torch.compile(..., fullgraph=True)``: from
    24 to 40 tokens, across the switch at 32, the same tokens and per-step logits as eager; the
    re-prefill at the switch happens once, decided outside the compiled forward."""
    from transformers import StaticCache

    torch.manual_seed(0)
    model = patch_model(make_model("llama"))
    prompt = _ids(1, 24)
    eager_cache = StaticCache(config=model.config, max_cache_len=64)
    sequences, logits = _generate(model, prompt, 16, cache=eager_cache)
    counter = Compilations()
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=True, backend=counter)
    cache = StaticCache(config=model.config, max_cache_len=64)
    compiled_sequences, compiled_logits = _generate(model, prompt, 16, cache=cache)
    assert counter.graphs >= 1, "nothing was compiled"
    assert torch.equal(compiled_sequences, sequences)
    assert (compiled_logits - logits).abs().max() <= TOL
    assert cache._longrope_long and int(cache.get_seq_length()) == 39, "the re-prefill did not run in the cache"


def test_generation_compile_config_path():
    """transformers' own compiled decoding (generation_config.compile_config; on CPU only with
    _compile_all_devices): the decode steps and the re-prefill run the compiled call."""
    from transformers import CompileConfig, StaticCache

    torch.manual_seed(0)
    model = patch_model(make_model("llama"))
    prompt = _ids(1, 28)
    eager = _generate(model, prompt, 8, cache=StaticCache(config=model.config, max_cache_len=64))
    counter = Compilations("aot_eager")
    config = CompileConfig(fullgraph=True, dynamic=True, backend=counter, mode=None)
    config._compile_all_devices = True
    compiled = _generate(model, prompt, 8, cache=StaticCache(config=model.config, max_cache_len=64),
                         compile_config=config)
    assert counter.graphs >= 1, "transformers did not compile the decoding steps"
    assert torch.equal(compiled[0], eager[0]) and (compiled[1] - eager[1]).abs().max() <= TOL


# ---------------------------------------------------------------------------- bad positions
def test_bad_positions_raise_in_eager_and_assert_when_compiled(monkeypatch):
    cfg = make_cfg(original=32, maximum=128)
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 8, 8, 64, torch.float32))
    bad = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="non-negative"):
        fused_rope_attention(q, k, v, cfg, position_ids=bad, kv_position_ids=bad)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        apply_rotary(q, k, cfg, position_ids=bad + 200)
    model = make_model("llama")
    patch_model(model)
    with pytest.raises(ValueError, match="max_position_embeddings"), torch.no_grad():
        model(_ids(1, 8), position_ids=torch.arange(8)[None] + MAX_POS, use_cache=False)
    compiled = torch.compile(lambda *a, **kw: fused_rope_attention(*a, **kw), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="position_ids must lie in"):
        compiled(q, k, v, cfg, position_ids=bad, kv_position_ids=bad)
    # Checks off: no error and no stray read -- the kernels clamp table rows; the result is garbage.
    monkeypatch.setenv(EAGER_CHECKS_ENV, "0")
    out = fused_rope_attention(q, k, v, cfg, position_ids=bad + 1000, kv_position_ids=bad + 1000)
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
                    reason="needs the Triton kernels")
def test_the_rotary_kernel_clamps_positions_past_its_table(monkeypatch):
    """With the checks off, positions past the table read its last row (no stray read): the same
    numbers as the last valid position's row, for the hi part of the split position."""
    monkeypatch.setenv(EAGER_CHECKS_ENV, "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = make_cfg(original=32, maximum=4096)  # 2 p_hi rows: positions < 4096
    q, k = (torch.randn(1, 2, 4, 64, device=device) for _ in range(2))
    top = torch.tensor([4095 - 2047, 4095, 4096 + 2047, 10 ** 6], device=device)
    q_rot, _ = apply_rotary(q, k, cfg, position_ids=top, seq_len=64)
    assert torch.isfinite(q_rot).all()
    # position p >= 4096 uses p_hi = 1 (the last row) and its own p_lo: p - 2048 * (p_hi_true - 1)
    same = torch.tensor([4096 + 2047 - 2048, 10 ** 6 % 2048 + 2048], device=device)
    q_ref, _ = apply_rotary(q[:, :, 2:], k[:, :, 2:], cfg, position_ids=same, seq_len=64)
    assert torch.allclose(q_rot[:, :, 2:], q_ref, atol=1e-6)


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_decode_step_in_a_cuda_graph_equals_eager():
    """A patched model's decode step (StaticCache, seqused_k on the device) captured in a CUDA graph
    and replayed step after step gives the logits of eager steps; and torch.compile with
    mode="reduce-overhead" (CUDA graphs through inductor) gives the same tokens."""
    from transformers import StaticCache

    torch.manual_seed(0)
    model = patch_model(make_model("llama").cuda())
    key = longrope_triton.hf.cache_argument()
    prompt = _ids(1, 36).cuda()

    def prefill(cache):
        with torch.no_grad():
            return model(prompt, position_ids=torch.arange(36, device="cuda")[None], **{key: cache}).logits[:, -1]

    eager_cache, graph_cache = (StaticCache(config=model.config, max_cache_len=64) for _ in range(2))
    first = prefill(eager_cache).argmax(-1, keepdim=True)
    prefill(graph_cache)
    ids = first.clone()
    position = torch.tensor([[36]], device="cuda")
    static_kwargs = {"input_ids": ids, "position_ids": position, key: graph_cache}
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream (tables, autotuning), as CUDA graphs need
            for _ in range(2):
                model(**static_kwargs)
                graph_cache.crop(-1)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(**static_kwargs).logits[:, -1]
    token = first
    for step in range(6):
        with torch.no_grad():
            expected = model(token, position_ids=torch.tensor([[36 + step]], device="cuda"),
                             **{key: eager_cache}).logits[:, -1]
        ids.copy_(token)
        position.fill_(36 + step)
        graph.replay()
        assert (static_logits - expected).abs().max() <= 1e-4, f"step {step}"
        token = expected.argmax(-1, keepdim=True)

    compiled = patch_model(make_model("llama").cuda())
    compiled.load_state_dict(model.state_dict())
    compiled.forward = torch.compile(compiled.forward, fullgraph=True, mode="reduce-overhead")
    a = _generate(model, prompt[:, :24], 16, cache=StaticCache(config=model.config, max_cache_len=64))
    b = _generate(compiled, prompt[:, :24], 16, cache=StaticCache(config=model.config, max_cache_len=64))
    assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() <= 1e-4


@pytest.mark.gpu
def test_gpu_compiled_patched_model_equals_eager():
    """Inductor on CUDA around the Triton kernels: fullgraph, both regimes and a packed batch."""
    torch.manual_seed(0)
    model = patch_model(make_model("llama").cuda())
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for name, make in LLAMA_INPUTS.items():
        ids, positions = (t.cuda() for t in make())
        assert (_logits(compiled, ids, positions) - _logits(model, ids, positions)).abs().max() <= 1e-4, name
