"""Writing the compact layout of a level map in Triton (:class:`psa_kernels.LevelMap`).

:func:`write_row` writes one row (batch, map head, query block) from its blocks' levels: the
index list grouped by level (whole blocks first in each level), the counts, the plan (blocks to
read and whole blocks per level), the row's cost and visible pairs, and optionally the dense
``int8`` map. The assignment kernel (:mod:`psa_kernels.assign`) ends with it; here it also runs
alone on a dense map (:func:`compact_triton`, behind :meth:`LevelMap.from_dense`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import index_dtype, launch_kernel, next_pow2, on_device


@triton.jit
def write_row(lvl, jr, lane_ok, row, i, b, MAP, IDX, CNT, PLAN, COST, VIS, ANY_VALID, ALL_VALID,
               nk, Lq, Lk, block_q, block_k,
               CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, WRITE_MAP: tl.constexpr, NK: tl.constexpr):
    """Write one row of a :class:`LevelMap`: lane ``t`` holds key block ``jr[t]`` at level
    ``lvl[t]`` (lanes in any order; ``lane_ok`` marks the lanes holding a block)."""
    offset = Lk - Lq
    first_pos = offset + i * block_q
    last_pos = offset + tl.minimum((i + 1) * block_q, Lq) - 1
    block_end = (jr + 1) * block_k
    whole = lane_ok & (block_end < Lk + 1)
    readable = lane_ok
    if CAUSAL:
        # `a < b + 1` rather than `a <= b` (see kernels/attention.py on a comparison Triton miscompiled).
        readable = readable & (jr * block_k < last_pos + 1)
        whole = whole & (block_end < first_pos + 2)
    visible = readable
    if HAS_PAD:
        visible = visible & (tl.load(ANY_VALID + b * nk + jr, mask=lane_ok, other=0) != 0)
        whole = whole & (tl.load(ALL_VALID + b * nk + jr, mask=lane_ok, other=0) != 0)
    if WRITE_MAP:
        tl.store(MAP + row * nk + jr, lvl.to(tl.int8), mask=lane_ok)
    group = tl.where(lvl == 1, 0, tl.where(lvl == 2, 1, tl.where(lvl == 4, 2, tl.where(lvl == 8, 3, 4))))
    group = tl.where(lane_ok, group, 5)  # padding lanes sort after everything
    # Grouped by level; inside a level the whole blocks first; ascending block index in each part.
    order = tl.sort((group * 2 + tl.where(whole, 0, 1)) * NK + jr, 0)
    rank = tl.arange(0, NK)
    tl.store(IDX + row * nk + rank, (order % NK).to(IDX.dtype.element_ty), mask=rank < nk)
    for r in tl.static_range(4):
        at = group == r
        tl.store(CNT + row * 4 + r, tl.sum(at.to(tl.int32), 0))
        tl.store(PLAN + row * 8 + r, tl.sum((at & readable).to(tl.int32), 0))
        tl.store(PLAN + row * 8 + 4 + r, tl.sum((at & whole).to(tl.int32), 0))
    inv = tl.where((group < 4) & visible, 1.0 / tl.maximum(lvl, 1).to(tl.float32), 0.0)
    tl.store(COST + row, tl.sum(inv, 0))
    tl.store(VIS + row, tl.sum(visible.to(tl.int32), 0))


@triton.jit
def _compact_kernel(DENSE, IDX, CNT, PLAN, COST, VIS, ANY_VALID, ALL_VALID, MAP,
                    stride_db, stride_dh, stride_dm, Hm, nq, nk, Lq, Lk, block_q, block_k,
                    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, NK: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hm
    hm = bh % Hm
    j = tl.arange(0, NK)
    lane_ok = j < nk
    lvl = tl.load(DENSE + b * stride_db + hm * stride_dh + i * stride_dm + j, mask=lane_ok, other=0).to(tl.int32)
    lvl = tl.where((lvl == 1) | (lvl == 2) | (lvl == 4) | (lvl == 8), lvl, 0)  # anything else reads as skip
    write_row(lvl, j, lane_ok, (b * Hm + hm) * nq + i, i, b, MAP, IDX, CNT, PLAN, COST, VIS, ANY_VALID, ALL_VALID,
               nk, Lq, Lk, block_q, block_k, CAUSAL, HAS_PAD, True, NK)


def layout_buffers(B, heads, nq, nk, device, write_map: bool):
    return dict(
        dense=torch.empty(B, heads, nq, nk, dtype=torch.int8, device=device) if write_map else None,
        indices=torch.empty(B, heads, nq, nk, dtype=index_dtype(nk), device=device),
        counts=torch.empty(B, heads, nq, 4, dtype=torch.int32, device=device),
        plan=torch.empty(B, heads, nq, 8, dtype=torch.int32, device=device),
        cost=torch.empty(B, heads, nq, dtype=torch.float32, device=device),
        visible=torch.empty(B, heads, nq, dtype=torch.int32, device=device),
    )


def row_launch(nk: int) -> dict:
    return dict(NK=max(16, next_pow2(nk)), num_warps=4 if nk <= 512 else 8)


def compact_triton(level_map: torch.Tensor, *, block_q, block_k, q_len, k_len, causal, key_padding_mask) -> dict:
    """The fields of :meth:`LevelMap.from_dense`'s layout, written by one launch."""
    from .key_blocks import padding_flags

    B, Hm, nq, nk = level_map.shape
    any_valid, all_valid = padding_flags(key_padding_mask, k_len, block_k)
    out = layout_buffers(B, Hm, nq, nk, level_map.device, write_map=True)
    with on_device(level_map):
        launch_kernel(_compact_kernel, (nq, B * Hm),
            level_map, out["indices"], out["counts"], out["plan"], out["cost"], out["visible"],
            any_valid if any_valid is not None else out["counts"], all_valid if all_valid is not None else out["counts"],
            out["dense"], level_map.stride(0), level_map.stride(1), level_map.stride(2), Hm, nq, nk, q_len, k_len,
            block_q, block_k, CAUSAL=causal, HAS_PAD=any_valid is not None, **row_launch(nk),
        )
    return out
