"""Where an operation runs: Triton on CUDA, Triton's interpreter on CPU, or PyTorch.

Environment flags are read here and only here, lazily, so importing the library has
no side effects and tests can switch modes per process.
"""

from __future__ import annotations

import contextlib
import os

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Launch options of every kernel. FMA contraction is pinned on (Triton's historical default,
# which Triton 3.10 turns off) so results and speed do not change with the Triton version.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
# Kernels index in int32 unless an element offset of some tensor of the launch reaches this
# (then INT64=True widens the offsets that can grow: batch, head and row x stride). A module
# constant so tests can lower it and run the int64 variant on small tensors.
INT32_OFFSET_LIMIT = 2**31


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pinned_tiles() -> bool:
    """True when LONGROPE_TRITON_PIN_TILES=1: every launch takes the first tile of its list instead
    of autotuning, so separate processes (training ranks, reruns) run the same kernels."""
    return os.environ.get("LONGROPE_TRITON_PIN_TILES", "0") == "1"


def tma_enabled(device: torch.device) -> bool:
    """Loops may load through TMA tensor descriptors: on sm_90+ GPUs and in the interpreter (which runs
    them), unless LONGROPE_TRITON_TMA=0 (then every kernel takes its pointer loads)."""
    if os.environ.get("LONGROPE_TRITON_TMA", "1") == "0":
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return triton_interpret()


def descriptor(t: torch.Tensor):
    """A host-side TensorDescriptor of t (no scratch allocator needed, unlike device-side ones), or None
    where TMA cannot read it: no TMA (tma_enabled), a head_dim stride other than 1, a base or a stride
    not 16-byte aligned, or an empty dimension. The block shape is set per config before each launch."""
    size = t.element_size()
    if not tma_enabled(t.device) or t.stride(-1) != 1 or t.data_ptr() % 16 or 0 in t.shape \
            or any(s * size % 16 for s in t.stride()[:-1]):
        return None
    block = [1] * (t.dim() - 1) + [1 << (t.shape[-1] - 1).bit_length()]  # a placeholder: powers of two
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def is_descriptor(x) -> bool:
    return isinstance(x, TensorDescriptor)


def use_kernel(t: torch.Tensor) -> bool:
    """Run the Triton kernel for this tensor (else the PyTorch path).

    CUDA tensors of fp16/bf16/fp32 take the compiled kernel. CPU tensors take it only
    under TRITON_INTERPRET=1, and never for bf16, whose arithmetic the interpreter
    does not support.
    """
    if t.dtype not in KERNEL_DTYPES:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and triton_interpret() and t.dtype != torch.bfloat16


def device_of(x) -> torch.device:
    """The device of a tensor or of a TensorDescriptor's tensor."""
    return (x.base if is_descriptor(x) else x).device


def needs_int64(args) -> bool:
    """True when the largest element offset of a tensor among ``args`` (a descriptor's tensor included)
    reaches INT32_OFFSET_LIMIT."""
    tensors = [a.base if is_descriptor(a) else a for a in args]
    return any(sum((n - 1) * s for n, s in zip(a.shape, a.stride()) if n > 0) >= INT32_OFFSET_LIMIT
               for a in tensors if isinstance(a, torch.Tensor) and a.numel() > 0)


@contextlib.contextmanager
def kernel_errors(name: str):
    """Turn a Triton compilation failure into one readable RuntimeError (no compile trace)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised below unless it is a Triton compile error
        if type(exc).__module__.startswith("triton"):
            first = str(exc).strip().splitlines()
            msg = first[-1] if first else type(exc).__name__
            raise RuntimeError(f"longrope_triton: the {name} kernel failed to compile: {msg}") from None
        raise


def launch_meta(args, meta: dict) -> dict:
    """The meta-parameters a launch compiles with: the caller's, plus the offset width (INT64)
    chosen from the launch's tensors."""
    return {**meta, "INT64": needs_int64(args)}


def launch(name: str, kernel, grid, args, meta: dict, tuned=None, interpret_meta=None):
    """Launch a Triton kernel: the autotuned version when compiled (if given), fixed meta-parameters
    (interpret_meta) under the interpreter, which cannot time configs (the configs' pre_hook, which
    sizes descriptor blocks, runs for them too). The offset width (INT64) is chosen here from the
    tensors of the launch. The one place kernels are launched, so that scripts/compile_check.py can
    record every launch and compile it as the runtime would."""
    meta = launch_meta(args, meta)
    with kernel_errors(name), torch.device(device_of(args[0])):
        if tuned is None:
            kernel[grid](*args, **meta, **LAUNCH_OPTIONS)
        elif triton_interpret():
            if tuned.configs[0].pre_hook:
                tuned.configs[0].pre_hook({**dict(zip(kernel.arg_names, args)), **meta, **interpret_meta})
            kernel[grid(interpret_meta)](*args, **meta, **interpret_meta, **LAUNCH_OPTIONS)
        else:
            tuned[grid](*args, **meta, **LAUNCH_OPTIONS)
