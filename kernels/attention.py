"""PSA forward in Triton: one kernel body for bidirectional and causal attention.

A program owns ``BLOCK_M`` query rows (``block_q`` or a power-of-two part of it) of one query
head. Its query block's key lists (:class:`LevelMap`: per level ``p = 1, 2, 4, 8`` the listed
key blocks, whole ones first, and the plan saying how many to read and how many are whole) are
read as one *virtual key list* of eight segments:

    whole level-1 blocks | whole level-2 | whole level-4 | whole level-8 |
    other level-1 blocks | other level-2 | other level-4 | other level-8

where a level-``p`` block contributes its ``block_k / p`` pooled keys (rows of the pooled K/V,
:mod:`psa_kernels.pyramid`; level 1 reads K/V themselves). The program walks this list in tiles
of ``BLOCK_N`` keys, so keys of small pooled blocks of different levels share a tile and the
tensor cores always see full tiles: the pooled levels cost per FLOP what level 1 costs. Two
loops: the tiles made only of whole keys run without any mask (a pooled key then stands for
exactly ``p`` tokens), the rest decode each key's count and last position and mask. Each key's
address is decoded from the list (its segment, block and offset), so tiles are gathered with
pointer loads that Triton turns into asynchronous copies; with ``L1_TMA`` the whole level-1
blocks run first in a loop of their own through the tensor-memory accelerator instead.

Softmax is online (flash-attention style, base 2), accumulation fp32.

- GQA: query head ``h`` reads kv head ``h // GROUP`` straight from K/V; nothing is expanded.
- A pooled key adds ``log2(count)`` to its (base-2) logit; level-1 keys add 0.
- Causal: a key (or pooled group) is visible iff its last valid token is ``<=`` the query's
  absolute position ``Lk - Lq + i`` (bottom-right alignment), the same test at every level.
- Rows with no visible key end with ``l = 0`` and are written as 0.

Two launches per call: the pyramid and this kernel; everything the kernel needs about the map
was written with the layout. Measurements and open performance work: ``docs/kernel_notes.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .level_map import LevelMap
from .pyramid import build_device_pyramid
from .utils import cdiv, dot_in_fp32, next_pow2, on_device, tma_ready

_LOG2E = 1.4426950408889634


@triton.jit
def _select8(seg, v0, v1, v2, v3, v4, v5, v6, v7):
    """``[v0..v7][seg]`` for a vector of segment numbers (scalars ``v``)."""
    lo = tl.where(seg == 0, v0, tl.where(seg == 1, v1, tl.where(seg == 2, v2, v3)))
    hi = tl.where(seg == 4, v4, tl.where(seg == 5, v5, tl.where(seg == 6, v6, v7)))
    return tl.where(seg < 4, lo, hi)


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, q_pos, qk_scale, start, end, idx_row,
                  e0, e1, e2, e3, e4, e5, e6, e7, s0, s1, s2, s3, s4, s5, s6, s7,
                  K, V, KP, VP, PCNT, PLAST, PAD, b, hk, Lk, BASE2, BASE4, BASE8,
                  stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  stride_pb, stride_ph, stride_pn, stride_cb,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Online-softmax update with the keys ``[start, end)`` of the virtual key list.

    Segment ``t`` of the list ends at ``e_t`` and starts at list entry ``s_t`` of the row's
    index list; its level is ``p = 2^(t % 4)``. Unmasked tiles (``MASKED`` false) must hold only
    keys of whole blocks: every key visible to every row, every pooled key standing for ``p``
    tokens.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for t0 in range(start, end, BLOCK_N):
        c = t0 + tl.arange(0, BLOCK_N)
        in_list = c < end
        seg = ((c >= e0).to(tl.int32) + (c >= e1).to(tl.int32) + (c >= e2).to(tl.int32) + (c >= e3).to(tl.int32)
               + (c >= e4).to(tl.int32) + (c >= e5).to(tl.int32) + (c >= e6).to(tl.int32))
        r = seg % 4  # log2 of the level
        seg_begin = _select8(seg, 0, e0, e1, e2, e3, e4, e5, e6)
        keys_per_block = BLOCK_K >> r
        local = c - seg_begin
        entry = _select8(seg, s0, s1, s2, s3, s4, s5, s6, s7) + local // keys_per_block
        block = tl.load(idx_row + entry, mask=in_list, other=0).to(tl.int32)
        group = block * keys_per_block + local % keys_per_block  # key position (p = 1) or pooled group
        pooled = r > 0
        base = tl.where(r == 1, BASE2, tl.where(r == 2, BASE4, BASE8))
        k_rows = tl.where(pooled, KP + b * stride_pb + hk * stride_ph + (base + group).to(tl.int64) * stride_pn,
                          K + b * stride_kb + hk * stride_kh + group.to(tl.int64) * stride_kn)
        v_rows = tl.where(pooled, VP + b * stride_pb + hk * stride_ph + (base + group).to(tl.int64) * stride_pn,
                          V + b * stride_vb + hk * stride_vh + group.to(tl.int64) * stride_vn)
        if MASKED:
            n_groups = (Lk + (1 << r) - 1) >> r  # groups of level p (p = 1: keys)
            ok = in_list & (group < n_groups)
            cnt = tl.load(PCNT + b * stride_cb + base + group, mask=ok & pooled, other=1)
            last = tl.load(PLAST + b * stride_cb + base + group, mask=ok & pooled, other=0)
            if HAS_PAD:
                real = tl.load(PAD + b * Lk + group, mask=ok & ~pooled, other=0)
                cnt = tl.where(pooled, cnt, real.to(tl.int32))
            last = tl.where(pooled, last, group)
            ok = ok & (cnt > 0)
            bias = tl.log2(tl.maximum(cnt, 1).to(tl.float32))
        else:
            ok = in_list
            bias = r.to(tl.float32)  # whole groups: every pooled key stands for p tokens
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + bias[None, :]
        if MASKED:
            visible = ok[None, :]
            if CAUSAL:
                # `last < q_pos + 1`, not `last <= q_pos`: with Lq == Lk multiples of 16, Triton
                # 3.6's alignment analysis treated the broadcast comparison as constant over 16
                # rows, and rows 8..15 of each 16 reused the mask of rows 0..7 (seen on an H100).
                # The +1 makes the row positions' divisibility 1, so the mask is computed per row.
                visible = visible & (last[None, :] < (q_pos + 1)[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        else:
            m_safe = m_new  # every key of an unmasked tile is visible: the row max is finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_level1_tma(acc, m_i, l_i, q, qk_scale, idx_row, n_whole, K_DESC, V_DESC, b, hk,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The whole level-1 blocks (the first ``n_whole`` entries of the row's list) through the
    tensor-memory accelerator: contiguous tiles, no masks."""
    TILES: tl.constexpr = BLOCK_K // BLOCK_N
    for t in range(0, n_whole * TILES):
        block = tl.load(idx_row + t // TILES).to(tl.int32)
        row0 = block * BLOCK_K + (t % TILES) * BLOCK_N
        k = K_DESC.load([b, hk, row0, 0]).reshape(BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = V_DESC.load([b, hk, row0, 0]).reshape(BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _psa_fwd_kernel(
    Q, K, V, KP, VP, PCNT, PLAST, PAD, IDX, LCNT, PLAN, OUT, K_DESC, V_DESC,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pb, stride_ph, stride_pn,
    stride_cb,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, Hm, GROUP, HM_DIV, Lq, Lk, nq, nk, BASE2, BASE4, BASE8,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    L1_TMA: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    row = (b * Hm + hm) * nq + q_block
    idx_row = IDX + row.to(tl.int64) * nk
    # Per level: listed blocks (layout counts), blocks to read and whole blocks (plan).
    c1 = tl.load(LCNT + row * 4)
    c2 = tl.load(LCNT + row * 4 + 1)
    c4 = tl.load(LCNT + row * 4 + 2)
    n1 = tl.load(PLAN + row * 8)
    n2 = tl.load(PLAN + row * 8 + 1)
    n4 = tl.load(PLAN + row * 8 + 2)
    n8 = tl.load(PLAN + row * 8 + 3)
    w1 = tl.load(PLAN + row * 8 + 4)
    w2 = tl.load(PLAN + row * 8 + 5)
    w4 = tl.load(PLAN + row * 8 + 6)
    w8 = tl.load(PLAN + row * 8 + 7)
    s2 = c1  # where each level's list starts in the row
    s4 = c1 + c2
    s8 = c1 + c2 + c4
    if L1_TMA:
        acc, m_i, l_i = _attend_level1_tma(acc, m_i, l_i, q, qk_scale, idx_row, w1, K_DESC, V_DESC, b, hk,
                                           BLOCK_D, BLOCK_N, BLOCK_K)
        v1 = 0  # whole level-1 blocks already read
    else:
        v1 = w1
    # Segment ends of the virtual key list (keys per block: BLOCK_K >> log2 p).
    e0 = v1 * BLOCK_K
    e1 = e0 + w2 * (BLOCK_K // 2)
    e2 = e1 + w4 * (BLOCK_K // 4)
    e3 = e2 + w8 * (BLOCK_K // 8)
    e4 = e3 + (n1 - w1) * BLOCK_K
    e5 = e4 + (n2 - w2) * (BLOCK_K // 2)
    e6 = e5 + (n4 - w4) * (BLOCK_K // 4)
    e7 = e6 + (n8 - w8) * (BLOCK_K // 8)
    unmasked_end = e3 // BLOCK_N * BLOCK_N  # a tile reaching past the whole keys runs masked
    # Where each segment starts in the row's index list (whole blocks lead each level's list).
    s5 = s2 + w2
    s6 = s4 + w4
    s7 = s8 + w8
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, qk_scale, 0, unmasked_end, idx_row,
                                  e0, e1, e2, e3, e4, e5, e6, e7, 0, s2, s4, s8, w1, s5, s6, s7,
                                  K, V, KP, VP, PCNT, PLAST, PAD, b, hk, Lk, BASE2, BASE4, BASE8,
                                  stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                                  stride_pb, stride_ph, stride_pn, stride_cb,
                                  False, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32,
                                  DOT_PRECISION)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, qk_scale, unmasked_end, e7, idx_row,
                                  e0, e1, e2, e3, e4, e5, e6, e7, 0, s2, s4, s8, w1, s5, s6, s7,
                                  K, V, KP, VP, PCNT, PLAST, PAD, b, hk, Lk, BASE2, BASE4, BASE8,
                                  stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                                  stride_pb, stride_ph, stride_pn, stride_cb,
                                  True, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32,
                                  DOT_PRECISION)

    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=(offs_m < Lq)[:, None] & d_ok[None, :])


def launch_config(q: torch.Tensor, block_q: int) -> dict:
    """Tile shape and launch of the kernel for these inputs (``block_n``, ``block_m``,
    ``num_warps``, ``num_stages``, ``l1_tma``); :func:`psa_attention_triton` takes overrides."""
    D = q.shape[-1]
    block_d = max(16, next_pow2(D))
    return dict(block_n=64, block_m=block_q if block_d <= 128 else min(block_q, 64), num_warps=8, num_stages=2,
                l1_tma=False)


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
    **launch,
) -> torch.Tensor:
    """Run the PSA forward kernel (inputs already validated by the caller). ``launch`` overrides
    :func:`launch_config` (``block_n``, ``block_m``, ``num_warps``, ``num_stages``, ``l1_tma``)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    geometry = dict(q_len=Lq, k_len=Lk, causal=causal, key_padding_mask=key_padding_mask)
    if not isinstance(level_map, LevelMap):
        level_map = LevelMap.from_dense(level_map, block_q=block_q, block_k=block_k, **geometry)
    else:
        level_map = level_map.replanned(**geometry)
    cfg = {**launch_config(q, block_q), **launch}
    Hm, nq, nk = level_map.indices.shape[1:]
    scale = D**-0.5 if scale is None else float(scale)
    block_d = max(16, next_pow2(D))
    block_n, block_m = cfg["block_n"], min(cfg["block_m"], block_q)
    # Pointer loads need a unit last stride (vector loads); TMA needs 16-byte strides too.
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    l1_tma = cfg["l1_tma"] and block_k % block_n == 0
    with on_device(q):
        pyr = build_device_pyramid(k, v, key_padding_mask)
        out = torch.empty_like(q)
        pad = key_padding_mask.to(torch.int8) if key_padding_mask is not None else pyr.counts
        descriptors = [None, None]
        if l1_tma:
            k, v = tma_ready(k), tma_ready(v)
            box = [1, 1, block_n, block_d]  # one tile of keys of one (batch, kv head)
            descriptors = [TensorDescriptor(t, shape=list(t.shape), strides=list(t.stride()), block_shape=box)
                           for t in (k, v)]
        grid = (cdiv(Lq, block_m), B * Hq)
        _psa_fwd_kernel[grid](
            q, k, v, pyr.keys, pyr.values, pyr.counts, pyr.last, pad, level_map.indices, level_map.counts,
            level_map.plan, out, *descriptors,
            scale * _LOG2E,
            *q.stride(), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            pyr.keys.stride(0), pyr.keys.stride(1), pyr.keys.stride(2),
            pyr.counts.stride(0),
            *out.stride(),
            Hq, Hm, Hq // Hkv, Hq // Hm, Lq, Lk, nq, nk, pyr.base[2], pyr.base[4], pyr.base[8],
            CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HEAD_DIM=D, BLOCK_D=block_d,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_Q=block_q, BLOCK_K=block_k, L1_TMA=l1_tma,
            DOT_FP32=dot_in_fp32(q.dtype),
            # fp32 inputs: three TF32 products per dot (about fp32 accuracy on the tensor cores;
            # IEEE fp32 dots ran on the CUDA cores: 300 s for one 16k causal call on an H100).
            DOT_PRECISION="tf32x3" if q.dtype == torch.float32 and q.is_cuda else "tf32",
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return out
