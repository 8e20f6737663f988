"""Level assignment in one Triton kernel: importance scores in, level map and compact layout out.

Computes exactly the tail of :func:`psa_kernels.reference.build_level_map` (after the importance
estimate): level assignment by energy or quantile over the visible blocks, the similarity cap,
the forced level-1 blocks (sink, first real token, diagonal, text rows and columns) and the
minimum number of level-1 blocks per row. One program owns one row (batch, map head, query
block) and holds its ``nk`` scores in registers:

1. (share_kv_group) sum the scores of the GQA group; mark the visible blocks;
2. rank the row by one sort of packed ``(score, -index)`` keys (descending score, ascending
   index on ties: the reference's stable order); cumulative mass gives each rank's level;
3. cap, force and promote in rank order (the promotion takes the best-ranked blocks not yet
   at level 1, as the reference's second ranking does);
4. scatter the levels to the dense ``int8`` map, and sort once more by (level, index) to write
   the compact :class:`LevelMap` row (counts per level and the grouped index list).

No host synchronisation, fixed launch shape: it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .level_map import LevelMap


@triton.jit
def _assign_kernel(
    SCORES, CAP, FORCED_COLS, FORCED_ROWS, VALID_COLS, MAP, IDX, CNT,
    tau1, tau2, tau3, tau4, min_full_fraction,
    stride_sb, stride_sh, stride_sm,
    Hm, GROUP_SUM, CAP_DIV, Hkv, nq, nk, Lq, Lk, block_q, block_k,
    LEVEL1: tl.constexpr, LEVEL2: tl.constexpr, LEVEL3: tl.constexpr, LEVEL4: tl.constexpr,
    ENERGY: tl.constexpr, CAUSAL: tl.constexpr, HAS_CAP: tl.constexpr, HAS_VALID: tl.constexpr,
    NK: tl.constexpr,
):
    i = tl.program_id(0)  # query block
    bh = tl.program_id(1)
    b = bh // Hm
    hm = bh % Hm
    j = tl.arange(0, NK)
    in_row = j < nk

    # 1. Scores (summed over the query heads this map head stands for) and visibility.
    s = tl.zeros([NK], dtype=tl.float32)
    for g in range(GROUP_SUM):
        s += tl.load(SCORES + b * stride_sb + (hm * GROUP_SUM + g) * stride_sh + i * stride_sm + j, mask=in_row,
                     other=0.0)
    visible = in_row
    offset = Lk - Lq
    last_pos = offset + tl.minimum((i + 1) * block_q, Lq) - 1
    if CAUSAL:
        visible = visible & (j * block_k < last_pos + 1)
    if HAS_VALID:
        visible = visible & (tl.load(VALID_COLS + b * nk + j, mask=in_row, other=0) != 0)
    n_vis = tl.sum(visible.to(tl.int32), 0)

    # 2. Rank: descending score, ascending index on ties; invisible blocks last.
    positive = tl.where(s > 0, s, 0.0)  # +0.0 for <= 0 (a -0.0 would have the sign bit set)
    hi = tl.where(visible, positive.to(tl.int32, bitcast=True).to(tl.int64) + 1, 0)
    key = (hi << 32) | (NK - 1 - j).to(tl.int64)
    key = tl.sort(key, 0, descending=True)
    jr = NK - 1 - (key & 0xFFFFFFFF).to(tl.int32)  # block index at each rank
    hr = (key >> 32).to(tl.int32)
    vis_r = hr > 0
    ranked = tl.where(vis_r, (hr - 1).to(tl.float32, bitcast=True), 0.0)
    rank = tl.arange(0, NK)
    if ENERGY:
        total = tl.sum(ranked, 0)
        uniform = total <= 0  # no mass at all: uniform over the visible blocks
        ranked = tl.where(uniform, tl.where(vis_r, 1.0, 0.0), ranked)
        total = tl.where(uniform, n_vis.to(tl.float32), total)
        preceding = (tl.cumsum(ranked, 0) - ranked) / tl.maximum(total, 1e-30)
    else:
        preceding = rank.to(tl.float32) / tl.maximum(n_vis, 1).to(tl.float32)
    lvl = tl.zeros([NK], dtype=tl.int32)
    lvl = tl.where(preceding < tau4, LEVEL4, lvl)  # the finest satisfied level wins
    lvl = tl.where(preceding < tau3, LEVEL3, lvl)
    lvl = tl.where(preceding < tau2, LEVEL2, lvl)
    lvl = tl.where(preceding < tau1, LEVEL1, lvl)
    lvl = tl.where(vis_r, lvl, 0)

    # 3. Similarity cap, forced blocks, minimum level-1 count (all in rank order).
    if HAS_CAP:
        cap = tl.load(CAP + (b * Hkv + hm // CAP_DIV) * nk + jr, mask=jr < nk, other=1).to(tl.int32)
        lvl = tl.where(lvl > 0, tl.minimum(lvl, cap), lvl)
    forced = tl.load(FORCED_COLS + b * nk + jr, mask=jr < nk, other=0) != 0
    forced = forced | (tl.load(FORCED_ROWS + b * nq + i) != 0)
    if CAUSAL:
        first_pos = offset + i * block_q
        forced = forced | ((jr >= first_pos // block_k) & (jr <= last_pos // block_k))
    lvl = tl.where(forced & vis_r, 1, lvl)
    need = tl.ceil(min_full_fraction * n_vis.to(tl.float32)).to(tl.int32)
    n_full = tl.sum((lvl == 1).to(tl.int32), 0)
    candidate = vis_r & (lvl != 1)
    ordinal = tl.cumsum(candidate.to(tl.int32), 0)
    lvl = tl.where(candidate & (ordinal <= need - n_full), 1, lvl)

    # 4. Dense map (scatter) and the compact layout (grouped by level 1, 2, 4, 8, then skipped).
    row = (b * Hm + hm) * nq + i
    tl.store(MAP + row * nk + jr, lvl.to(tl.int8), mask=jr < nk)
    group = tl.where(lvl == 1, 0, tl.where(lvl == 2, 1, tl.where(lvl == 4, 2, tl.where(lvl == 8, 3, 4))))
    group = tl.where(jr < nk, group, 5)  # padding lanes sort after everything
    order = tl.sort(group * NK + jr, 0)
    tl.store(IDX + row * nk + rank, order % NK, mask=rank < nk)
    for r in tl.static_range(4):
        tl.store(CNT + row * 4 + r, tl.sum((group == r).to(tl.int32), 0))


def assign_levels_triton(
    scores: torch.Tensor,
    *,
    heads: int,
    kv_heads: int,
    causal: bool,
    q_len: int,
    k_len: int,
    block_q: int,
    block_k: int,
    mode: str,
    levels,
    thresholds,
    cap: torch.Tensor | None,
    forced_cols: torch.Tensor,
    forced_rows: torch.Tensor,
    valid_cols: torch.Tensor | None,
    min_full_fraction: float,
) -> tuple[torch.Tensor, LevelMap]:
    """``scores [B, Hq, nq, nk]`` -> (``int8`` map ``[B, heads, nq, nk]``, its :class:`LevelMap`).

    ``heads`` is Hq or Hkv (then each map head sums its group's scores); ``cap [B, Hkv, nk]``
    the similarity cap or None; ``forced_cols [B, nk]`` / ``forced_rows [B, nq]`` the forced
    level-1 columns (sink, first real token, text) and rows (text); ``valid_cols [B, nk]`` the
    key blocks holding a real token (None: all). Inputs validated by the caller.
    """
    B, Hq, nq, nk = scores.shape
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    levels = list(levels) + [0] * (4 - len(levels))
    taus = [float(t) for t in thresholds] + [float("-inf")] * (4 - len(thresholds))
    dense = torch.empty(B, heads, nq, nk, dtype=torch.int8, device=scores.device)
    indices = torch.empty(B, heads, nq, nk, dtype=torch.int32, device=scores.device)
    counts = torch.empty(B, heads, nq, 4, dtype=torch.int32, device=scores.device)
    to_i8 = lambda t: t.to(torch.int8).contiguous()  # noqa: E731
    cap_arg = to_i8(cap) if cap is not None else dense
    _assign_kernel[(nq, B * heads)](
        scores, cap_arg, to_i8(forced_cols), to_i8(forced_rows),
        to_i8(valid_cols) if valid_cols is not None else dense, dense, indices, counts,
        *taus, float(min_full_fraction),
        scores.stride(0), scores.stride(1), scores.stride(2),
        heads, Hq // heads, heads // kv_heads, kv_heads, nq, nk, q_len, k_len, block_q, block_k,
        LEVEL1=levels[0], LEVEL2=levels[1], LEVEL3=levels[2], LEVEL4=levels[3], ENERGY=mode == "energy",
        CAUSAL=causal, HAS_CAP=cap is not None, HAS_VALID=valid_cols is not None,
        NK=max(16, triton.next_power_of_2(nk)),
        num_warps=4 if nk <= 512 else 8,
    )
    return dense, LevelMap(counts=counts, indices=indices, block_q=block_q, block_k=block_k, dense=dense)
