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
