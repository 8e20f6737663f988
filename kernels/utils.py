"""Helpers shared by the op entry points and the Triton wrappers (one home for each)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading

import torch


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no kernels here
        return False
    return True


@functools.lru_cache(maxsize=None)
def gluon_importable() -> bool:
    """Triton's Gluon (3.5+), in which the Hopper attention kernel is written."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: the Triton kernel serves
        return False
    return True


def interpreting() -> bool:
    """Triton runs its CPU interpreter (``TRITON_INTERPRET=1``): how CI checks kernel logic."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels serve tensors on ``device`` in this process."""
    device = torch.device(device)
    return triton_importable() and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter (3.8) computes bf16 ``tl.dot`` wrongly: kernels upcast the
    operands of such dots to fp32 when interpreting (exact for bf16 and fp8 values)."""
    return dtype in (torch.bfloat16, torch.float8_e4m3fn) and interpreting()


def on_device(t: torch.Tensor):
    """Context in which Triton launches go to ``t``'s GPU: Triton launches on the *current* CUDA
    device, which is not the tensors' device when a model is split over GPUs (``device_map``)."""
    if t.device.type != "cuda" or t.device.index is None or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (read once: a property query
    costs microseconds of host time on every call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def int8_view(mask: torch.Tensor) -> torch.Tensor:
    """A bool (or integer) mask as a contiguous int8 tensor for a kernel; a contiguous bool mask is
    viewed, not copied (a conversion is one more launch and tens of microseconds of host time)."""
    mask = mask.contiguous()
    if mask.dtype in (torch.bool, torch.int8):
        return mask.view(torch.int8)
    return (mask != 0).to(torch.int8)


def descriptor(t: torch.Tensor, block_shape: list[int]):
    """A host-side tensor descriptor of all of ``t`` (the tensor-memory accelerator's box
    ``block_shape``). The caller guarantees what Triton's constructor would assert (16-byte aligned
    base and strides, unit last stride: :func:`tma_ready` or a fresh allocation); skipping its
    checks saves microseconds per descriptor, and a call builds up to ten."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    d = object.__new__(TensorDescriptor)
    # Fields without a value here (padding, and in newer Triton round_f32_to_tf32) keep their
    # dataclass defaults, which are class attributes.
    d.__dict__.update(base=t, shape=list(t.shape), strides=list(t.stride()), block_shape=block_shape)
    return d


_compiled: dict = {}  # (kernel, specialisation key) -> compiled kernel, filled by launch_kernel()
#: Off: every launch takes ``kernel[grid]`` (``benchmarks/offline_compile.py`` compiles without
#: launching, so it must not be handed a compiled kernel to run).
FAST_LAUNCH = True


@functools.lru_cache(maxsize=None)
def _fast_launch_supported() -> bool:
    """Whether this Triton has the internals :func:`launch_kernel` relies on (3.6-3.8 do)."""
    try:
        from triton import knobs
        from triton.compiler import CompiledKernel

        return all(hasattr(knobs.runtime, name) for name in ("launch_enter_hook", "launch_exit_hook")) \
            and hasattr(CompiledKernel, "launch_metadata")
    except Exception:  # noqa: BLE001 - another Triton: take its own launch path
        return False


def launch_kernel(kernel, grid: tuple, *args, **options):
    """``kernel[grid](*args, **options)`` for a ``@triton.jit`` kernel, with Triton's per-call
    bookkeeping skipped once the call's specialisation has been compiled.

    Triton's launch path spends 15-30 us of host time per launch (option knobs, the cache key as
    a string, launch metadata, hooks) besides binding the arguments, and a PSA call makes six.
    Here the arguments are bound by Triton's own binder, so the specialisation, hence the
    compiled kernel, is exactly the one Triton would pick; the compiled kernel is looked up by
    that specialisation and its launcher called directly. The first launch of each
    specialisation, the interpreter, launch hooks (profilers) and a Triton without these
    internals take ``kernel[grid]`` itself. ``grid`` is a tuple of ints.
    """
    caches = getattr(kernel, "device_caches", None)  # absent in the interpreter
    if caches is None or not FAST_LAUNCH or not _fast_launch_supported():
        return kernel[grid](*args, **options)
    from triton import knobs
    from triton.runtime.driver import driver

    runtime = knobs.runtime
    if kernel.pre_run_hooks or _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook) \
            or getattr(runtime, "add_stages_inspection_hook", None) is not None:
        return kernel[grid](*args, **options)
    active = driver.active
    device = active.get_current_device()
    binder = caches.get(device)  # created by the first launch on this device
    if binder is None:
        return _compile_and_launch(kernel, grid, args, options, device)
    bound, specialization, rest = binder[4](*args, **options)
    key = (kernel, device, tuple(specialization), tuple(rest.items()))
    try:
        compiled = _compiled.get(key)
    except TypeError:  # an argument Triton specialises on something unhashable
        return kernel[grid](*args, **options)
    if compiled is None:
        return _compile_and_launch(kernel, grid, args, options, device, key)
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                 active.get_current_stream(device), compiled.function, compiled.packed_metadata, None, None, None,
                 *bound.values())
    return compiled


def _hooked(hook) -> bool:
    """A launch hook is set (Triton 3.6+ keeps them in a chain, empty when none is)."""
    return hook is not None and (not hasattr(hook, "calls") or bool(hook.calls))


def _compile_and_launch(kernel, grid, args, options, device, key=None):
    """Triton's own launch (compiling if needed); remembers the compiled kernel under ``key`` (the
    specialisation :func:`launch_kernel` looks up; bound here when the binder did not exist yet)."""
    compiled = kernel[grid](*args, **options)
    if key is None:
        _, specialization, rest = kernel.device_caches[device][4](*args, **options)
        key = (kernel, device, tuple(specialization), tuple(rest.items()))
    if all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
        try:
            _compiled[key] = compiled
        except TypeError:
            pass
    return compiled


def tma_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the tensor-memory accelerator can read it (16-byte aligned base and
    strides, unit last stride), else a contiguous copy."""
    size = t.element_size()
    aligned = t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(st * size % 16 == 0 for st in t.stride()[:-1])
    return t if aligned else t.contiguous()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv`` is a jit function: microseconds per Python call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n >= 1``)."""
    return 1 << (int(n) - 1).bit_length()


def check_kv_chunk(kv_chunk: int, pairs: int) -> int:
    """``kv_chunk`` itself if it can order a launch's programs: a divisor of ``pairs`` (batch x kv
    heads), the (batch, kv head) pairs per chunk of the attention's and the estimate's order."""
    if kv_chunk < 1 or pairs % kv_chunk:
        raise ValueError(f"kv_chunk={kv_chunk} must divide batch x kv heads ({pairs})")
    return kv_chunk


def index_dtype(nk: int) -> torch.dtype:
    """Key block indices fit int16 up to 32,767 blocks (4M tokens at 128-token blocks)."""
    return torch.int16 if nk < 2**15 else torch.int32


_logged: set[tuple[str, str]] = set()
_log_lock = threading.Lock()


def log_once(logger: logging.Logger, key: str, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` on ``logger`` the first time ``key`` is seen (per logger) in this process:
    a fallback or a warning that would otherwise repeat on every layer of every forward."""
    with _log_lock:
        if (logger.name, key) in _logged:
            return
        _logged.add((logger.name, key))
    logger.log(level, message)
