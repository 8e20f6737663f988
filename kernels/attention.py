"""PSA forward in Triton: one kernel body for bidirectional and causal attention.

A program owns ``BLOCK_M`` query rows (``block_q`` or a power-of-two part of it, smaller for
large head dims to keep the accumulator in registers) of one query head. For each level
``p = 1, 2, 4, 8`` it walks that row's level-``p`` key block list (:class:`LevelMap`) in
execution tiles of ``BLOCK_N`` keys *of that level*: a logical key block holds ``block_k / p``
pooled keys, so at ``p = 8`` several small blocks are gathered into one full tile and at ``p = 1``
a large block is split over several tiles; the tensor cores always see ``BLOCK_N``-wide tiles.
Softmax is online (flash-attention style, base 2), accumulation fp32.

- GQA: query head ``h`` reads kv head ``h // GROUP`` straight from K/V; nothing is expanded.
- A pooled key adds ``log2(count)`` to its (base-2) logit; level-1 keys add 0.
- Causal: a key (or pooled group) is visible iff its last valid token is ``<=`` the query's
  absolute position ``Lk - Lq + i`` (bottom-right alignment), the same test at every level.
- Rows with no visible key end with ``l = 0`` and are written as 0.
- Tiles of whole blocks lying before every query of the program (the leading entries of each
  level's list) run without masks; contiguous tiles are read through TMA tensor descriptors
  (plain pointer loads were not pipelined by Triton 3.6/3.8 on sm_90), with the next block index
  fetched one tile ahead. Measurements and open performance work: ``docs/kernel_notes.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .level_map import LevelMap
from .pyramid import build_device_pyramid
from .reference import block_visibility

_LOG2E = 1.4426950408889634


@triton.jit
def _psa_fwd_kernel(
    Q, K, V, KP, VP, CNT, LAST, PAD, IDX, PLAN, OUT, K_DESC, V_DESC, KP_DESC, VP_DESC,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_ph, stride_pn,
    stride_cb,
    stride_ib, stride_ih, stride_im,
    stride_nb, stride_nh, stride_nm,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, GROUP, HM_DIV, Lq, Lk, BASE2, BASE4, BASE8,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Longest query tiles first (the last ones see the most keys when causal): less tail at the end.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    hm = h // HM_DIV

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m < Lq)[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = offs_m + (Lk - Lq)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    q_block = (pid_m * BLOCK_M) // BLOCK_Q  # BLOCK_M divides block_q: a tile never spans two query blocks
    idx_row = IDX + b * stride_ib + hm * stride_ih + q_block * stride_im
    # PLAN row: per level, where its list starts in idx_row, how many blocks to read, how many
    # of those run unmasked (see _block_plan).
    plan_row = PLAN + b * stride_nb + hm * stride_nh + q_block * stride_nm
    acc, m_i, l_i = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row, plan_row, 0,
                                  K, V, K_DESC, V_DESC, CNT, LAST, PAD, b, hk, Lk, 0,
                                  stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
                                  stride_vd, stride_cb,
                                  1, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row, plan_row, 1,
                                  KP, VP, KP_DESC, VP_DESC, CNT, LAST, PAD, b, hk, Lk, BASE2,
                                  stride_pb, stride_ph, stride_pn, 1, stride_pb, stride_ph, stride_pn, 1, stride_cb,
                                  2, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row, plan_row, 2,
                                  KP, VP, KP_DESC, VP_DESC, CNT, LAST, PAD, b, hk, Lk, BASE4,
                                  stride_pb, stride_ph, stride_pn, 1, stride_pb, stride_ph, stride_pn, 1, stride_cb,
                                  4, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row, plan_row, 3,
                                  KP, VP, KP_DESC, VP_DESC, CNT, LAST, PAD, b, hk, Lk, BASE8,
                                  stride_pb, stride_ph, stride_pn, 1, stride_pb, stride_ph, stride_pn, 1, stride_cb,
                                  8, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)

    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=(offs_m < Lq)[:, None] & d_ok[None, :])


@triton.jit
def _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row, plan_row, level, K, V, K_DESC, V_DESC, CNT, LAST,
                  PAD, b, hk, Lk, base,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd, stride_cb,
                  P: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Online-softmax update with the key blocks of this row's level-P list (``level`` = 0..3).

    K/V are the original keys (P = 1) or the pooled level (rows ``base + group``); a logical block
    holds ``BLOCK_K // P`` of them, read ``BLOCK_N`` at a time. The list's first ``n_full``
    blocks are whole, unpadded and (causal) before every query of the program: their tiles run
    without any mask; the rest run masked.
    """
    idx_list = idx_row + tl.load(plan_row + level)
    n_blocks = tl.load(plan_row + 4 + level)
    n_full = tl.load(plan_row + 8 + level)
    n_keys = n_blocks * (BLOCK_K // P)
    full_end = n_full * (BLOCK_K // P) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _level_tiles(acc, m_i, l_i, q, q_pos, qk_scale, idx_list, 0, full_end, K, V, K_DESC, V_DESC,
                                 CNT, LAST, PAD, b, hk, Lk, base, stride_kb, stride_kh, stride_kn, stride_kd,
                                 stride_vb, stride_vh, stride_vn, stride_vd, stride_cb, False,
                                 P, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i = _level_tiles(acc, m_i, l_i, q, q_pos, qk_scale, idx_list, full_end, n_keys, K, V, K_DESC,
                                 V_DESC, CNT, LAST, PAD, b, hk, Lk, base, stride_kb, stride_kh, stride_kn, stride_kd,
                                 stride_vb, stride_vh, stride_vn, stride_vd, stride_cb, True,
                                 P, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _level_tiles(acc, m_i, l_i, q, q_pos, qk_scale, idx_list, start, end, K, V, K_DESC, V_DESC, CNT, LAST, PAD,
                 b, hk, Lk, base,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_cb,
                 MASKED: tl.constexpr, P: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The tiles ``[start, end)`` (in keys of level P) of one level's block list."""
    KEYS_PER_BLOCK: tl.constexpr = BLOCK_K // P
    CONTIGUOUS: tl.constexpr = KEYS_PER_BLOCK % BLOCK_N == 0
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_rows = (Lk + P - 1) // P
    # The next tile's block index is fetched one iteration ahead, so the tile loads do not
    # wait on it.
    next_block = tl.load(idx_list + start // KEYS_PER_BLOCK, mask=start < end, other=0)
    for t0 in range(start, end, BLOCK_N):
        if CONTIGUOUS:
            # The tile lies inside one logical block: contiguous keys, loaded by the tensor-memory
            # accelerator (rows past the end read as zeros and are masked below).
            block = next_block
            next_block = tl.load(idx_list + (t0 + BLOCK_N) // KEYS_PER_BLOCK, mask=t0 + BLOCK_N < end, other=0)
            row0 = block * KEYS_PER_BLOCK + t0 % KEYS_PER_BLOCK
            row = row0 + tl.arange(0, BLOCK_N)
            ok = row < n_rows
        else:
            # Several small (pooled) blocks share the tile: gather their keys.
            cols = t0 + tl.arange(0, BLOCK_N)
            in_list = cols < end
            block = tl.load(idx_list + cols // KEYS_PER_BLOCK, mask=in_list, other=0)
            row = block * KEYS_PER_BLOCK + cols % KEYS_PER_BLOCK  # key (P = 1) or group (P > 1) index
            ok = in_list & (row < n_rows)
        if MASKED:
            if P == 1:
                if HAS_PAD:
                    ok = ok & (tl.load(PAD + b * Lk + row, mask=ok, other=0) != 0)
                last = row
            else:
                cnt = tl.load(CNT + b * stride_cb + base + row, mask=ok, other=0)
                last = tl.load(LAST + b * stride_cb + base + row, mask=ok, other=0)
                ok = ok & (cnt > 0)
        key_rows = (base + row)[:, None]
        kv_mask = ok[:, None] & d_ok[None, :]
        if CONTIGUOUS:
            k = K_DESC.load([b, hk, base + row0, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k = tl.load(K + b * stride_kb + hk * stride_kh + key_rows * stride_kn + offs_d[None, :] * stride_kd,
                        mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            if P > 1:
                s += tl.log2(tl.maximum(cnt, 1).to(tl.float32))[None, :]  # a pooled key stands for cnt tokens
            visible = ok[None, :]
            if CAUSAL:
                # `last < q_pos + 1`, not `last <= q_pos`: with Lq == Lk multiples of 16, Triton
                # 3.6's alignment analysis treated the broadcast comparison as constant over 16
                # rows, and rows 8..15 of each 16 reused the mask of rows 0..7 (seen on an H100).
                # The +1 makes the row positions' divisibility 1, so the mask is computed per row.
                visible = visible & (last[None, :] < (q_pos + 1)[:, None])
            s = tl.where(visible, s, float("-inf"))
        elif P > 1:
            s += tl.log2(P * 1.0)  # whole groups: every pooled key stands for P tokens
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        else:
            m_safe = m_new  # every key of an unmasked tile is visible: the row max is finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if CONTIGUOUS:
            v = V_DESC.load([b, hk, base + row0, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            v = tl.load(V + b * stride_vb + hk * stride_vh + key_rows * stride_vn + offs_d[None, :] * stride_vd,
                        mask=kv_mask, other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


def _block_plan(level_map: LevelMap, *, causal: bool, q_len: int, k_len: int, padded: bool) -> torch.Tensor:
    """What the kernel reads per query block: ``[B, Hm, nq, 12]`` int32, per level ``p = 1, 2, 4, 8``
    (columns 0..3 of each group of four) where its list starts in the row of ``indices``, how many
    of its ascending key blocks to read, and how many of those run unmasked.

    - read: when causal, the blocks that start after the block's last query are invisible to all
      of its rows; they trail each level's list (visibility is monotone in the block index), so
      the kernel stops before them. A map may list them (a user's all-ones map, say): they cost
      nothing.
    - full: the leading blocks that are whole and end at or before the block's first query run
      first, without masks. With key padding every tile is masked (0 full blocks).
    """
    nq, nk = level_map.indices.shape[-2:]
    bq, bk = level_map.block_q, level_map.block_k
    device = level_map.counts.device
    dense = level_map.to_dense()
    # Blocks visible to at least one query of the block (padding aside: the kernel masks it).
    read = block_visibility(batch=1, q_len=q_len, k_len=k_len, block_q=bq, block_k=bk, causal=causal,
                            device=device)[0]
    block_end = (torch.arange(nk, device=device) + 1) * bk  # one past the block's last key
    full = (block_end <= k_len)[None, :].expand(nq, nk)
    if causal:
        first_query = torch.arange(nq, device=device) * bq + (k_len - q_len)
        full = full & (block_end[None, :] - 1 <= first_query[:, None])
    if padded:
        full = torch.zeros_like(full)
    at_level = [dense == p for p in (1, 2, 4, 8)]
    n_read = torch.stack([(m & read).sum(-1, dtype=torch.int32) for m in at_level], dim=-1)
    n_full = torch.stack([(m & full).sum(-1, dtype=torch.int32) for m in at_level], dim=-1)
    starts = level_map.counts.cumsum(-1, dtype=torch.int32) - level_map.counts
    return torch.cat([starts, n_read, n_full], dim=-1).contiguous()


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the tensor-memory accelerator can read it (16-byte aligned base and
    strides, unit last stride), else a contiguous copy."""
    size = t.element_size()
    aligned = t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(st * size % 16 == 0 for st in t.stride()[:-1])
    return t if aligned else t.contiguous()


def psa_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    level_map: torch.Tensor | LevelMap,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    key_padding_mask: torch.Tensor | None = None,
    block_n: int = 64,
    block_m: int | None = None,
    num_warps: int = 4,  # the fastest launch of benchmarks/tune_attention.py on an H100 for every map
    num_stages: int = 2,
) -> torch.Tensor:
    """Run the PSA forward kernel (inputs already validated by the caller)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if not isinstance(level_map, LevelMap):
        level_map = LevelMap.from_dense(level_map, block_q=block_q, block_k=block_k)
    Hm = level_map.indices.shape[1]
    scale = D**-0.5 if scale is None else float(scale)
    pyr = build_device_pyramid(k, v, key_padding_mask)
    out = torch.empty_like(q)
    pad = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else pyr.counts
    idx = level_map.indices
    plan = _block_plan(level_map, causal=causal, q_len=Lq, k_len=Lk, padded=key_padding_mask is not None)
    block_d = max(16, triton.next_power_of_2(D))
    if block_m is None:
        block_m = block_q if block_d <= 128 else min(block_q, 64)
    grid = (triton.cdiv(Lq, block_m), B * Hq)
    box = [1, 1, block_n, block_d]  # one tile of keys of one (batch, kv head); out of range reads as 0
    descriptors = []
    for t in (k, v, pyr.keys, pyr.values):
        t = _tma_ready(t)
        descriptors.append(TensorDescriptor(t, shape=list(t.shape), strides=list(t.stride()), block_shape=box))
    _psa_fwd_kernel[grid](
        q, k, v, pyr.keys, pyr.values, pyr.counts, pyr.last, pad, idx, plan, out, *descriptors,
        scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(),
        pyr.keys.stride(0), pyr.keys.stride(1), pyr.keys.stride(2),
        pyr.counts.stride(0),
        idx.stride(0), idx.stride(1), idx.stride(2),
        plan.stride(0), plan.stride(1), plan.stride(2),
        *out.stride(),
        Hq, Hq // Hkv, Hq // Hm, Lq, Lk, pyr.base[2], pyr.base[4], pyr.base[8],
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HEAD_DIM=D, BLOCK_D=block_d,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_Q=block_q, BLOCK_K=block_k,
        # Triton's CPU interpreter (3.8) computes bf16 dots wrongly: it gets fp32 operands instead.
        DOT_FP32=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        # fp32 inputs get fp32 products (not TF32): a user who pays for fp32 wants its accuracy.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
