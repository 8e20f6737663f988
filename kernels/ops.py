"""Public entry points of psa_kernels (re-exported by the package), one per op.

Each dispatches between the Triton kernels and the dense reference:

- Triton for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` (Triton's
  interpreter; how CI checks kernel logic without a GPU), for fp16/bf16/fp32 inputs with
  ``head_dim <= 256`` and a multiple of 8 (of 4 in fp32), a power-of-two ``block_q`` in
  16..256 and ``block_k`` a multiple of 8. Launches go to the inputs' GPU, whichever device is
  current.
- elsewhere (a CPU without the interpreter, Triton missing, other devices) attention runs as one
  SDPA call per query block (:mod:`psa_kernels.blockwise`), and the other ops as
  :mod:`psa_kernels.reference`;
- fp64 inputs always take the reference (the tests' oracle).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

import torch

from . import reference
from .blocks import block_visibility, density, forced_full_blocks, sparsity
from .level_map import LevelMap
from .reference import PyramidLevel, assign_levels, dense_attention
from .utils import gluon_importable, kernels_available, log_once
from .validation import LEVEL_VALUES, POOL_FACTORS, check_attention_inputs, check_key_padding_mask, check_qkv, num_blocks

__all__ = [
    "LEVEL_VALUES",
    "POOL_FACTORS",
    "LevelMap",
    "antidiagonal_importance",
    "attention_kernel",
    "assign_levels",
    "block_visibility",
    "build_level_map",
    "build_pyramid",
    "dense_attention",
    "density",
    "forced_full_blocks",
    "kernels_available",
    "num_blocks",
    "psa_attention",
    "similarity_cap",
    "sparsity",
]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
logger = logging.getLogger("psa_kernels")


def _use_triton(q: torch.Tensor, block_q: int, block_k: int) -> bool:
    return (
        kernels_available(q.device)
        and q.dtype in _TRITON_DTYPES
        and q.shape[-1] <= 256
        and q.shape[-1] * q.element_size() % 16 == 0  # rows of whole 16-byte units (vector loads, TMA tiles)
        and 16 <= block_q <= 256
        and block_q & (block_q - 1) == 0
        and block_k % 8 == 0
    )


#: Environment variable choosing the attention kernel on CUDA: ``auto`` (the Hopper kernel where it
#: serves, else the Triton kernel) or ``triton`` (always the Triton kernel).
KERNEL_ENV = "PSA_ATTENTION_KERNEL"
_hopper_failed: list[str] = []  # why the Hopper kernel failed in this process, if it did


def attention_kernel(q: torch.Tensor, block_q: int = 128, block_k: int = 128) -> str:
    """Which kernel :func:`psa_attention` runs for these inputs where the Triton kernels serve:
    ``"hopper"`` (:mod:`psa_kernels.attention_hopper`: Hopper GPUs, bf16 or fp16, head dim <= 128,
    128-token blocks) or ``"triton"`` (:mod:`psa_kernels.attention`: everything else, and every
    call after the Hopper kernel failed to build or launch in this process). The first call that
    cannot take the Hopper kernel on a CUDA device logs why, once."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", "triton"):
        raise ValueError(f"{KERNEL_ENV}={choice!r} is not a kernel choice; use 'auto' or 'triton'")
    if choice == "triton" or not q.is_cuda or _hopper_failed:
        return "triton"
    if not gluon_importable():
        log_once(logger, "kernel:gluon", "PSA attention: the Triton kernel serves (this Triton has no Gluon for the "
                 "Hopper kernel)")
        return "triton"
    from .attention_hopper import hopper_reason

    reason = hopper_reason(q, block_q, block_k)
    if reason is not None:
        log_once(logger, f"kernel:{reason}", f"PSA attention: the Triton kernel serves ({reason}: the Hopper kernel "
                 "does not)")
        return "triton"
    return "hopper"


def psa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    level_map: torch.Tensor | LevelMap,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pyramid sparse attention: ``q [B,Hq,Lq,D]``, ``k, v [B,Hkv,Lk,D]`` -> ``[B,Hq,Lq,D]``.

    ``level_map`` is an integer tensor ``[B, Hm, ceil(Lq/block_q), ceil(Lk/block_k)]`` with
    values in {0, 1, 2, 4, 8} and ``Hm`` in {Hq, Hkv}, or a :class:`LevelMap` (which carries its
    block sizes; a layout planned for another geometry is re-planned). Blocks default to 128.
    ``key_padding_mask`` is a bool ``[B, Lk]`` (True = real token); ``causal`` aligns queries to
    the end of the keys. The output has q's dtype; accumulation is fp32. Semantics:
    :func:`psa_kernels.reference.psa_attention`.
    """
    if isinstance(level_map, LevelMap):
        for name, given, own in (("block_q", block_q, level_map.block_q), ("block_k", block_k, level_map.block_k)):
            if given is not None and given != own:
                raise ValueError(f"{name}={given} differs from the LevelMap's {name} ({own}); leave it out")
        block_q, block_k = level_map.block_q, level_map.block_k
    block_q = 128 if block_q is None else block_q
    block_k = 128 if block_k is None else block_k
    # Checking a dense map's values costs a device synchronisation: done off the GPU only (on
    # CUDA an out-of-range value reads as "skip").
    check_attention_inputs(q, k, v, level_map, block_q=block_q, block_k=block_k, key_padding_mask=key_padding_mask,
                           check_values=not q.is_cuda)
    kw = dict(causal=causal, scale=scale, block_q=block_q, block_k=block_k, key_padding_mask=key_padding_mask)
    if _use_triton(q, block_q, block_k):
        if attention_kernel(q, block_q, block_k) == "hopper":
            from triton.compiler.errors import CompilationError
            from triton.runtime.errors import OutOfResources

            from .attention_hopper import psa_attention_hopper

            # Planned once here: the Triton kernel below takes the planned layout as it is.
            level_map = LevelMap.for_call(level_map, block_q=block_q, block_k=block_k, q_len=q.shape[2],
                                          k_len=k.shape[2], causal=causal, key_padding_mask=key_padding_mask)
            try:
                return psa_attention_hopper(q, k, v, level_map, causal=causal, scale=scale,
                                            key_padding_mask=key_padding_mask)
            except (CompilationError, OutOfResources) as err:
                # Gluon is experimental: another Triton may not build the kernel, or a GPU may lack
                # its shared memory. The Triton kernel serves from then on.
                _hopper_failed.append(f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}")
                log_once(logger, "kernel:hopper-failed", "PSA attention: the Hopper kernel failed to build or "
                         f"launch here ({_hopper_failed[-1]}); the Triton kernel serves", logging.WARNING)
        from .attention import psa_attention_triton

        return psa_attention_triton(q, k, v, level_map, **kw)
    dense_map = level_map.to_dense() if isinstance(level_map, LevelMap) else level_map
    if q.dtype == torch.float64:
        return reference.psa_attention(q, k, v, dense_map, **kw)
    from .blockwise import psa_attention_blockwise

    return psa_attention_blockwise(q, k, v, dense_map, **kw)


def antidiagonal_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    stride: int = 8,
    key_padding_mask: torch.Tensor | None = None,
    precision: str = "full",
) -> torch.Tensor:
    """Block importance ``[B, Hq, nq, nk]`` by antidiagonal scoring (XAttention), streamed in a
    Triton kernel where kernels serve (never materialising the ``(L/s)^2`` scores); semantics:
    :func:`psa_kernels.reference.antidiagonal_importance` (``precision`` ``full`` or ``fp8``)."""
    check_qkv(q, k, k)
    if block_q % stride or block_k % stride:
        raise ValueError(f"stride {stride} must divide block_q ({block_q}) and block_k ({block_k})")
    if precision not in reference.ESTIMATE_PRECISIONS:
        raise ValueError(f"estimate precision must be one of {reference.ESTIMATE_PRECISIONS}, got {precision!r}")
    check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2], k.device)
    kw = dict(causal=causal, scale=scale, block_q=block_q, block_k=block_k, stride=stride,
              key_padding_mask=key_padding_mask, precision=precision)
    if _use_triton(q, block_q, block_k):
        from triton.runtime.errors import OutOfResources

        from .importance import antidiagonal_importance_triton, supported

        if supported(block_q, block_k, stride):
            try:
                return antidiagonal_importance_triton(q, k, **kw)
            except OutOfResources as err:  # a GPU with less shared memory than the launch asks for
                log_once(logger, "importance", f"antidiagonal importance kernel does not fit this GPU ({err}); "
                         "using the reference", logging.WARNING)
    return reference.antidiagonal_importance(q, k, **kw)


@functools.lru_cache(maxsize=None)
def _mask_defaults() -> dict:
    """The keyword defaults of :func:`reference.build_level_map` (their one home), read once:
    binding a signature on every call cost tens of microseconds per layer."""
    params = inspect.signature(reference.build_level_map).parameters
    return {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}


def build_level_map(q: torch.Tensor, k: torch.Tensor, *, compact: bool = False, **kwargs):
    """The mask generator (section 7 of the semantics): an ``int8`` level map ``[B, Hm, nq, nk]``,
    or with ``compact=True`` its :class:`LevelMap` planned for this call (``q``'s and ``k``'s
    lengths, ``causal``, ``key_padding_mask``), which :func:`psa_attention` reads directly.

    Keyword arguments as :func:`psa_kernels.reference.build_level_map`. Where kernels serve:
    the importance kernel (with one launch first for the fp8 copies of q and k when
    ``estimate_precision="fp8"``), one kernel for the similarity cap, the least similar pairs'
    similarities (``mode="budget"``) and the block flags, and one for the assignment and the layout: three
    or four launches, no host synchronisation.
    """
    defaults = _mask_defaults()
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"build_level_map() got unexpected keyword argument(s) {sorted(unknown)}")
    a = {**defaults, **kwargs}
    block_q, block_k = a["block_q"], a["block_k"]
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    geometry = dict(q_len=Lq, k_len=Lk, causal=a["causal"], key_padding_mask=a["key_padding_mask"])
    if not (kernels_available(q.device) and q.dtype in _TRITON_DTYPES and a["mode"] != "dense"
            and a["antidiagonal"] is None and 0 < len(a["levels"]) <= 4):
        level_map = reference.build_level_map(q, k, **{**a, "antidiagonal": a["antidiagonal"] or antidiagonal_importance})
        if not compact:
            return level_map
        return LevelMap.from_dense(level_map, block_q=block_q, block_k=block_k, **geometry)

    from .assign import assign_levels_triton
    from .key_blocks import key_blocks
    from .utils import on_device
    from .validation import check_block_sizes

    check_qkv(q, k, k)
    check_block_sizes(block_q, block_k)
    Hkv = k.shape[1]
    pad = a["key_padding_mask"]
    check_key_padding_mask(pad, B, Lk, k.device)
    text = a["text_mask"]
    if text is not None and tuple(text.shape) != (B, Lk):
        raise ValueError(f"text_mask must have shape [B, Lk] = {(B, Lk)}, got {tuple(text.shape)}")
    reference.check_assignment(a["mode"], a["levels"], a["thresholds"], a["target_sparsity"])
    reference.check_full_share(a["budget_full_share"])
    budget = a["mode"] == "budget"
    given_sims, given_min = a["block_sims"], a["block_min_sims"]
    for name, given in (("block_sims", given_sims), ("block_min_sims", given_min)):
        if given is not None and tuple(given.shape) != (B, k.shape[1], -(-Lk // block_k), 3):
            raise ValueError(f"{name} must have shape [B, Hkv, nk, 3] = {(B, k.shape[1], -(-Lk // block_k), 3)}, "
                             f"got {tuple(given.shape)}")
    with on_device(q):
        scores = reference.block_importance(q, k, scores=a["scores"], estimator=a["estimator"], causal=a["causal"],
                                            scale=a["scale"], block_q=block_q, block_k=block_k, stride=a["stride"],
                                            key_padding_mask=pad, generator=a["generator"],
                                            antidiagonal=antidiagonal_importance,
                                            estimate_precision=a["estimate_precision"])
        similarity = a["similarity"]
        if similarity is not None and not isinstance(similarity, dict):
            similarity = dict(zip((2, 4, 8), similarity))
        blocks = key_blocks(k, q_len=Lq, block_q=block_q, block_k=block_k,
                            thresholds=similarity if given_sims is None else None, text_mask=text,
                            dense_tail_tokens=a["dense_tail_tokens"], key_padding_mask=pad,
                            min_sims=budget and given_min is None)
        if given_sims is not None and similarity is not None:  # the cap of the given similarities
            blocks["cap"] = reference.cap_from_similarity(given_sims, similarity).contiguous()
        return_layout = assign_levels_triton(
            scores if scores.dtype == torch.float32 else scores.float(), heads=Hkv if a["share_kv_group"] else Hq,
            kv_heads=Hkv, causal=a["causal"], q_len=Lq, k_len=Lk, block_q=block_q, block_k=block_k,
            mode=a["mode"], levels=a["levels"], thresholds=a["thresholds"], cap=blocks["cap"],
            sims=given_min.float().contiguous() if given_min is not None else blocks["min_sims"],
            target_sparsity=a["target_sparsity"],
            budget_full_share=a["budget_full_share"],
            text_cols=blocks["text_cols"], text_rows=blocks["text_rows"], any_valid=blocks["any_valid"],
            all_valid=blocks["all_valid"], min_full_fraction=a["min_full_fraction"], key_padding_mask=pad,
            write_map=not compact,
        )
    return return_layout if compact else return_layout.dense


def similarity_cap(
    k: torch.Tensor,
    *,
    block_k: int = 128,
    thresholds=(0.75, 0.70, 0.70),
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Largest pooling factor each key block allows, ``[B, Hkv, nk]`` int8 (paper appendix B.1), in
    Triton where kernels serve; semantics: :func:`psa_kernels.reference.similarity_cap`."""
    from collections.abc import Mapping

    check_qkv(k, k, k)
    check_key_padding_mask(key_padding_mask, k.shape[0], k.shape[2], k.device)
    table = dict(thresholds) if isinstance(thresholds, Mapping) else dict(zip((2, 4, 8), thresholds))
    if (kernels_available(k.device) and k.dtype in _TRITON_DTYPES and k.shape[-1] <= 256 and block_k % 8 == 0
            and table and set(table) <= {2, 4, 8}):
        from .key_blocks import similarity_cap_triton
        from .utils import on_device

        with on_device(k):
            return similarity_cap_triton(k, block_k=block_k, thresholds=table, key_padding_mask=key_padding_mask)
    return reference.similarity_cap(k, block_k=block_k, thresholds=thresholds, key_padding_mask=key_padding_mask)


def build_pyramid(
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> dict[int, PyramidLevel]:
    """The KV pyramid: for p in 1, 2, 4, 8, the valid-token means of K/V over groups of p tokens,
    their counts and last valid positions (see :func:`psa_kernels.reference.build_pyramid`).

    The Triton path pools 2/4/8 in one fused pass and keeps K/V's dtype; level 1 is K/V itself.
    """
    check_qkv(k, k, v)
    check_key_padding_mask(key_padding_mask, k.shape[0], k.shape[2], k.device)
    if not (kernels_available(k.device) and k.dtype in _TRITON_DTYPES and k.shape[-1] <= 256):
        return reference.build_pyramid(k, v, key_padding_mask)
    from .pyramid import build_device_pyramid
    from .utils import on_device

    with on_device(k):
        pyr = build_device_pyramid(k, v, key_padding_mask)
    Lk = k.shape[2]
    valid = key_padding_mask if key_padding_mask is not None else torch.ones_like(k[:, 0, :, 0], dtype=torch.bool)
    positions = torch.arange(Lk, device=k.device).expand_as(valid)
    levels = {1: PyramidLevel(1, k, v, valid.to(torch.int32), torch.where(valid, positions, -1))}
    for p, base in pyr.base.items():
        rows = slice(base, base + pyr.groups[p])
        levels[p] = PyramidLevel(p, pyr.keys[:, :, rows], pyr.values[:, :, rows], pyr.counts[:, rows],
                                 pyr.last[:, rows].long())
    return levels
