"""Level assignment and the compact layout in Triton: importance in, :class:`LevelMap` out.

``_assign_kernel`` computes exactly the tail of :func:`psa_kernels.reference.build_level_map`
(after the importance estimate): level assignment by energy or quantile over the visible
blocks, the similarity cap, the forced level-1 blocks (sink, first real token, diagonal, text
rows and columns) and the minimum number of level-1 blocks per row. One program owns one row
(batch, map head, query block) and holds its ``nk`` scores in registers:

1. (share_kv_group) sum the scores of the GQA group; mark the visible blocks;
2. rank the row by one sort of packed ``(score, -index)`` keys (descending score, ascending
   index on ties: the reference's stable order); cumulative mass gives each rank's level;
3. cap, force and promote in rank order (the promotion takes the best-ranked blocks not yet
   at level 1, as the reference's second ranking does);
4. write the row (:func:`psa_kernels.layout.write_row`): the compact layout, its plan and cost,
   and optionally the dense ``int8`` map.

Step 4 is :func:`psa_kernels.layout.write_row`, shared with the dense-map compaction. No host
synchronisation, fixed launch shape: it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import layout_buffers, row_launch, write_row
from .level_map import LevelMap
from .reference import BUDGET_FULL_SHARE, BUDGET_STEPS
from .utils import launch_kernel, on_device


@triton.jit
def _budget_choice(s, q1, q2, q4, q8, lam):
    """Per lane, the level maximising ``s * q(p) - lam / p`` (skip: 0), cheapest first so that ties
    keep the cheaper level, as :func:`psa_kernels.reference._budget_choice`; (level, cost)."""
    best = tl.zeros_like(s)
    level = tl.zeros(s.shape, dtype=tl.int32)
    cost = tl.zeros_like(s)
    v = s * q8 - lam * 0.125
    better = v > best
    best, level, cost = tl.where(better, v, best), tl.where(better, 8, level), tl.where(better, 0.125, cost)
    v = s * q4 - lam * 0.25
    better = v > best
    best, level, cost = tl.where(better, v, best), tl.where(better, 4, level), tl.where(better, 0.25, cost)
    v = s * q2 - lam * 0.5
    better = v > best
    best, level, cost = tl.where(better, v, best), tl.where(better, 2, level), tl.where(better, 0.5, cost)
    v = s * q1 - lam
    better = v > best
    level, cost = tl.where(better, 1, level), tl.where(better, 1.0, cost)
    return level, cost


@triton.jit
def _assign_kernel(
    SCORES, CAP, SIMS, TEXT_COLS, TEXT_ROWS, ANY_VALID, ALL_VALID, MAP, IDX, CNT, PLAN, COST, VIS,
    tau1, tau2, tau3, tau4, min_full_fraction, density, full_share,
    stride_sb, stride_sh, stride_sm,
    Hm, GROUP_SUM, CAP_DIV, Hkv, nq, nk, Lq, Lk, block_q, block_k,
    LEVEL1: tl.constexpr, LEVEL2: tl.constexpr, LEVEL3: tl.constexpr, LEVEL4: tl.constexpr,
    ENERGY: tl.constexpr, BUDGET: tl.constexpr, ALLOW2: tl.constexpr, ALLOW4: tl.constexpr, ALLOW8: tl.constexpr,
    BUDGET_STEPS: tl.constexpr, CAUSAL: tl.constexpr, HAS_CAP: tl.constexpr, HAS_PAD: tl.constexpr,
    WRITE_MAP: tl.constexpr, NK: tl.constexpr,
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
    first_valid = 0
    if HAS_PAD:
        valid = tl.load(ANY_VALID + b * nk + j, mask=in_row, other=0) != 0
        visible = visible & valid
        first_valid = tl.min(tl.where(valid, j, NK), 0)  # the block of the first real token
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
    lane_ok = jr < nk
    kv_row = (b * Hkv + hm // CAP_DIV) * nk + jr
    if HAS_CAP:
        cap = tl.load(CAP + kv_row, mask=lane_ok, other=1).to(tl.int32)
    forced = (jr == 0) | (jr == first_valid)
    forced = forced | (tl.load(TEXT_COLS + b * nk + jr, mask=lane_ok, other=0) != 0)
    forced = forced | (tl.load(TEXT_ROWS + b * nq + i) != 0)
    if CAUSAL:
        first_pos = offset + i * block_q
        forced = forced | ((jr >= first_pos // block_k) & (jr <= last_pos // block_k))
    forced = forced & vis_r
    if BUDGET:
        # The budget policy (reference.assign_budget): per lane the level maximising
        # s q(p) - lambda / p, lambda the smallest multiplier whose choices fit the budget.
        total = tl.sum(ranked, 0)
        s_r = tl.where(total > 0, ranked, tl.where(vis_r, 1.0, 0.0))  # no mass at all: uniform
        free = vis_r & ~forced
        s_r = tl.where(free, s_r, 0.0)
        q1 = tl.where(lane_ok, 1.0, 0.0)
        q2 = tl.zeros([NK], dtype=tl.float32)
        q4 = tl.zeros([NK], dtype=tl.float32)
        q8 = tl.zeros([NK], dtype=tl.float32)
        if ALLOW2:
            q2 = tl.minimum(tl.maximum(tl.load(SIMS + kv_row * 3, mask=lane_ok, other=0.0), 0.0), 1.0)
            if HAS_CAP:
                q2 = tl.where(cap >= 2, q2, 0.0)
        if ALLOW4:
            q4 = tl.minimum(tl.maximum(tl.load(SIMS + kv_row * 3 + 1, mask=lane_ok, other=0.0), 0.0), 1.0)
            if HAS_CAP:
                q4 = tl.where(cap >= 4, q4, 0.0)
        if ALLOW8:
            q8 = tl.minimum(tl.maximum(tl.load(SIMS + kv_row * 3 + 2, mask=lane_ok, other=0.0), 0.0), 1.0)
            if HAS_CAP:
                q8 = tl.where(cap >= 8, q8, 0.0)
        budget = density * n_vis.to(tl.float32) - tl.sum(forced.to(tl.float32), 0)
        # Level 1 first for the top-ranked free lanes above the free mean, within full_share of
        # the budget (the lanes are ranked; t is the rank among the free ones).
        t = (tl.cumsum(free.to(tl.int32), 0) - 1).to(tl.float32)
        above = tl.sum(free.to(tl.float32), 0) * s_r > tl.sum(s_r, 0)
        first = free & above & (t < full_share * budget) & (t + 1.0 <= budget)
        budget = budget - tl.sum(first.to(tl.float32), 0)
        free = free & ~first
        s_r = tl.where(free, s_r, 0.0)
        lo = 0.0
        hi = 8.0 * tl.max(s_r, 0)
        for _ in tl.static_range(BUDGET_STEPS):
            mid = (lo + hi) * 0.5
            _, cost = _budget_choice(s_r, q1, q2, q4, q8, mid)
            fits = tl.sum(tl.where(free, cost, 0.0), 0) <= budget
            hi = tl.where(fits, mid, hi)
            lo = tl.where(fits, lo, mid)
        lvl, cost = _budget_choice(s_r, q1, q2, q4, q8, hi)
        # The budget tied blocks leave goes to those one step finer at the smaller multiplier,
        # in rank order (the lanes are ranked: importance descending, index ascending).
        finer, finer_cost = _budget_choice(s_r, q1, q2, q4, q8, lo)
        extra = tl.where(free, finer_cost - cost, 0.0)
        left = budget - tl.sum(tl.where(free, cost, 0.0), 0)
        upgrade = (tl.cumsum(extra, 0) <= left) & (extra > 0)
        lvl = tl.where(upgrade, finer, lvl)
        lvl = tl.where(free, lvl, 0)
        lvl = tl.where(first, 1, lvl)
    else:
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
            lvl = tl.where(lvl > 0, tl.minimum(lvl, cap), lvl)
    lvl = tl.where(forced, 1, lvl)
    need = tl.ceil(min_full_fraction * n_vis.to(tl.float32)).to(tl.int32)
    n_full = tl.sum((lvl == 1).to(tl.int32), 0)
    candidate = vis_r & (lvl != 1)
    ordinal = tl.cumsum(candidate.to(tl.int32), 0)
    lvl = tl.where(candidate & (ordinal <= need - n_full), 1, lvl)

    # 4. The row of the layout (and of the dense map).
    write_row(lvl, jr, lane_ok, (b * Hm + hm) * nq + i, i, b, MAP, IDX, CNT, PLAN, COST, VIS, ANY_VALID, ALL_VALID,
               nk, Lq, Lk, block_q, block_k, CAUSAL, HAS_PAD, WRITE_MAP, NK)


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
    sims: torch.Tensor | None = None,
    target_sparsity: float | None = None,
    budget_full_share: float = BUDGET_FULL_SHARE,
    text_cols: torch.Tensor = None,
    text_rows: torch.Tensor,
    any_valid: torch.Tensor | None,
    all_valid: torch.Tensor | None,
    min_full_fraction: float,
    key_padding_mask: torch.Tensor | None = None,
    write_map: bool = True,
) -> LevelMap:
    """``scores [B, Hq, nq, nk]`` -> the :class:`LevelMap` ``[B, heads, nq, nk]`` (with its dense
    ``int8`` map when ``write_map``).

    ``heads`` is Hq or Hkv (then each map head sums its group's scores); ``cap [B, Hkv, nk]``
    the similarity cap or None; ``sims [B, Hkv, nk, 3]`` the least similar pairs' similarities
    (mode ``budget``: its pooling fidelity; ``target_sparsity`` its budget, ``budget_full_share`` the share first
    spent on level 1 for the top-ranked blocks); ``text_cols [B, nk]`` / ``text_rows [B, nq]`` the key and query
    blocks holding text; ``any_valid`` / ``all_valid [B, nk]`` the key blocks holding some /
    only real tokens (None: no padding). Inputs validated by the caller.
    """
    B, Hq, nq, nk = scores.shape
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    levels = list(levels) + [0] * (4 - len(levels))
    taus = [float(t) for t in thresholds] + [float("-inf")] * (4 - len(thresholds))
    out = layout_buffers(B, heads, nq, nk, scores.device, write_map)
    filler = out["counts"]  # stands in for the optional inputs a launch does not read
    with on_device(scores):
        launch_kernel(_assign_kernel, (nq, B * heads),
            scores, cap if cap is not None else filler, sims if sims is not None else filler, text_cols, text_rows,
            any_valid if any_valid is not None else filler, all_valid if all_valid is not None else filler,
            out["dense"] if write_map else filler, out["indices"], out["counts"], out["plan"], out["cost"],
            out["visible"], *taus, float(min_full_fraction),
            float(1.0 - target_sparsity) if mode == "budget" else 1.0, float(budget_full_share),
            scores.stride(0), scores.stride(1), scores.stride(2),
            heads, Hq // heads, heads // kv_heads, kv_heads, nq, nk, q_len, k_len, block_q, block_k,
            LEVEL1=levels[0], LEVEL2=levels[1], LEVEL3=levels[2], LEVEL4=levels[3], ENERGY=mode == "energy",
            BUDGET=mode == "budget", ALLOW2=2 in levels, ALLOW4=4 in levels, ALLOW8=8 in levels,
            BUDGET_STEPS=BUDGET_STEPS,
            CAUSAL=causal, HAS_CAP=cap is not None, HAS_PAD=any_valid is not None, WRITE_MAP=write_map,
            **row_launch(nk),
        )
    return LevelMap(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, causal=causal,
                    key_padding_mask=key_padding_mask, **out)
