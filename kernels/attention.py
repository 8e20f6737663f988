"""PSA forward in Triton: one kernel body for bidirectional and causal attention.

A program owns ``BLOCK_M`` query rows (``block_q`` or a power-of-two part of it) of one query
head. Its query block's key lists (:class:`LevelMap`: per level ``p = 1, 2, 4, 8`` the listed key
blocks, whole ones first, and the plan saying how many to read and how many are whole) are walked
level by level. A level-``p`` block holds ``block_k / p`` keys of that level (rows of the pooled
K/V, :mod:`psa_kernels.pyramid`; level 1 reads K/V themselves), contiguous in memory, so every
tile is one box of the tensor-memory accelerator: ``BLOCK_N`` (64) keys at level 1 and 2, one
whole block (32 or 16 keys) at levels 4 and 8 with 128-token blocks. Only where a block holds
fewer than 16 keys (small ``block_k``) are several blocks gathered into a 16-key tile with
pointer loads. Gathering 64-key tiles of any level with pointer loads (one loop over all levels)
was measured at 2x the time of TMA tiles on an H200 (``docs/kernel_notes.md``).

Per level two loops: the whole blocks (every key real and, when causal, at or before the block's
first query) run without masks, the others decode each key's count and last position and mask.
The next tile's block index is fetched one iteration ahead, so the tile loads do not wait on it.
Softmax is online (flash-attention style, base 2), accumulation fp32.

- GQA: query head ``h`` reads kv head ``h // GROUP`` straight from K/V; nothing is expanded.
- A pooled key adds ``log2(count)`` to its (base-2) logit; level-1 keys add 0.
- Causal: a key (or pooled group) is visible iff its last valid token is ``<=`` the query's
  absolute position ``Lk - Lq + i`` (bottom-right alignment), the same test at every level.
- Rows with no visible key end with ``l = 0`` and are written as 0.

Two launches per call: the pyramid and this kernel; everything the kernel needs about the map
was written with the layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .level_map import LevelMap
from .pyramid import build_device_pyramid
from .utils import (cdiv, check_kv_chunk, descriptor, dot_in_fp32, int8_view, launch_kernel, next_pow2, on_device,
                    tma_ready)

_LOG2E = 1.4426950408889634


@triton.jit
def _psa_fwd_kernel(
    Q, K, V, KP, VP, PCNT, PLAST, PAD, IDX, LCNT, PLAN, OUT,
    K_DESC, V_DESC, K2_DESC, V2_DESC, K4_DESC, V4_DESC, K8_DESC, V8_DESC,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pb, stride_ph, stride_pn,
    stride_cb,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, Hm, GROUP, HM_DIV, Lq, Lk, nq, nk, BASE2, BASE4, BASE8, KV_CHUNK,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BN1: tl.constexpr, BN2: tl.constexpr, BN4: tl.constexpr, BN8: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program order (the GPU starts programs in id order): chunks of KV_CHUNK (batch, kv head)
    # pairs one after another; inside a chunk, query tiles longest first (causal: the last ones
    # see the most keys), the chunk's heads side by side. Long tiles start first and short ones
    # fill the tail (at 8k-16k the tail was a third of the time), while the chunk is small enough
    # for the programs running together to share its K/V in L2 (every head at once thrashed it at
    # 64k). See launch_config.
    n_tiles = tl.cdiv(Lq, BLOCK_M)
    heads = KV_CHUNK * GROUP  # query heads per chunk
    pid = tl.program_id(0)
    chunk = pid // (heads * n_tiles)
    r = pid % (heads * n_tiles)
    pid_m = n_tiles - 1 - r // heads
    bk = chunk * KV_CHUNK + (r % heads) // GROUP  # b * Hkv + hk
    Hkv = Hq // GROUP
    b = bk // Hkv
    hk = bk % Hkv
    h = hk * GROUP + r % GROUP
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
    list_start = 0
    acc, m_i, l_i, list_start = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row, list_start, LCNT, PLAN, row,
                                              0, K, V, K_DESC, V_DESC, PCNT, PLAST, PAD, b, hk, Lk, 0,
                                              stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                                              stride_cb, 1, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BN1, BLOCK_K,
                                              DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i, list_start = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row, list_start, LCNT, PLAN, row,
                                              1, KP, VP, K2_DESC, V2_DESC, PCNT, PLAST, PAD, b, hk, Lk, BASE2,
                                              stride_pb, stride_ph, stride_pn, stride_pb, stride_ph, stride_pn,
                                              stride_cb, 2, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BN2, BLOCK_K,
                                              DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i, list_start = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row, list_start, LCNT, PLAN, row,
                                              2, KP, VP, K4_DESC, V4_DESC, PCNT, PLAST, PAD, b, hk, Lk, BASE4,
                                              stride_pb, stride_ph, stride_pn, stride_pb, stride_ph, stride_pn,
                                              stride_cb, 4, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BN4, BLOCK_K,
                                              DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i, list_start = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row, list_start, LCNT, PLAN, row,
                                              3, KP, VP, K8_DESC, V8_DESC, PCNT, PLAST, PAD, b, hk, Lk, BASE8,
                                              stride_pb, stride_ph, stride_pn, stride_pb, stride_ph, stride_pn,
                                              stride_cb, 8, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BN8, BLOCK_K,
                                              DOT_FP32, DOT_PRECISION)

    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=(offs_m < Lq)[:, None] & d_ok[None, :])


@triton.jit
def _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row, list_start, LCNT, PLAN, row, r,
                  K, V, K_DESC, V_DESC, PCNT, PLAST, PAD, b, hk, Lk, base,
                  stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_cb,
                  P: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Online-softmax update with the row's level-P list (``r = log2 P``), which starts at entry
    ``list_start`` of the row's index list; returns the next level's start too.

    K/V are the original keys (P = 1) or the pooled levels (rows ``base + group``); a block holds
    ``BLOCK_K // P`` of them, read ``BLOCK_N`` at a time. The list's first ``n_whole`` blocks are
    whole and (causal) before every query of the block: their tiles run without any mask."""
    KEYS_PER_BLOCK: tl.constexpr = BLOCK_K // P
    n_blocks = tl.load(PLAN + row * 8 + r)
    n_whole = tl.load(PLAN + row * 8 + 4 + r)
    idx_list = idx_row + list_start
    n_keys = n_blocks * KEYS_PER_BLOCK
    whole_end = n_whole * KEYS_PER_BLOCK // BLOCK_N * BLOCK_N  # a tile reaching past the whole blocks runs masked
    acc, m_i, l_i = _level_tiles(acc, m_i, l_i, q, q_pos, qk_scale, idx_list, 0, whole_end, K, V, K_DESC, V_DESC,
                                 PCNT, PLAST, PAD, b, hk, Lk, base, stride_kb, stride_kh, stride_kn,
                                 stride_vb, stride_vh, stride_vn, stride_cb, False,
                                 P, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i = _level_tiles(acc, m_i, l_i, q, q_pos, qk_scale, idx_list, whole_end, n_keys, K, V, K_DESC,
                                 V_DESC, PCNT, PLAST, PAD, b, hk, Lk, base, stride_kb, stride_kh, stride_kn,
                                 stride_vb, stride_vh, stride_vn, stride_cb, True,
                                 P, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
    return acc, m_i, l_i, list_start + tl.load(LCNT + row * 4 + r)


@triton.jit
def _tile_scores(q, q_pos, qk_scale, idx_list, t0, end, block, K, K_DESC, PCNT, PLAST, PAD, b, hk, Lk, base,
                 stride_kb, stride_kh, stride_kn, stride_cb,
                 MASKED: tl.constexpr, P: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Base-2 logits ``[BLOCK_M, BLOCK_N]`` of the tile starting at key ``t0`` of a level's list
    (``block``: its block index when the tile lies inside one block), -inf where a key is not
    visible (masked tiles only); also where its values are (first row, or rows and mask)."""
    KEYS_PER_BLOCK: tl.constexpr = BLOCK_K // P
    CONTIGUOUS: tl.constexpr = KEYS_PER_BLOCK % BLOCK_N == 0
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_rows = (Lk + P - 1) // P
    if CONTIGUOUS:
        # The tile lies inside one block: contiguous keys, one box of the tensor-memory
        # accelerator (rows past the end read as zeros and are masked below).
        row0 = block * KEYS_PER_BLOCK + t0 % KEYS_PER_BLOCK
        row = row0 + tl.arange(0, BLOCK_N)
        ok = (row < n_rows) & (t0 < end)
    else:
        # Several small blocks share the tile: gather their keys.
        row0 = 0
        cols = t0 + tl.arange(0, BLOCK_N)
        in_list = cols < end
        blocks = tl.load(idx_list + cols // KEYS_PER_BLOCK, mask=in_list, other=0).to(tl.int32)
        row = blocks * KEYS_PER_BLOCK + cols % KEYS_PER_BLOCK  # key (P = 1) or group (P > 1) index
        ok = in_list & (row < n_rows)
    if MASKED:
        if P == 1:
            if HAS_PAD:
                ok = ok & (tl.load(PAD + b * Lk + row, mask=ok, other=0) != 0)
            last = row
        else:
            cnt = tl.load(PCNT + b * stride_cb + base + row, mask=ok, other=0)
            last = tl.load(PLAST + b * stride_cb + base + row, mask=ok, other=0)
            ok = ok & (cnt > 0)
    key_rows = (base + row)[:, None]
    kv_mask = ok[:, None] & d_ok[None, :]
    if CONTIGUOUS:
        k = K_DESC.load([b, hk, base + row0, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        k = tl.load(K + b * stride_kb + hk * stride_kh + key_rows * stride_kn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        s = s * qk_scale
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
    # Unmasked tiles return the products unscaled: the caller folds the scale and the pooled
    # keys' log2(P) into one multiply-add per logit.
    return s, row0, key_rows, kv_mask


@triton.jit
def _tile_values(p, V, V_DESC, b, hk, base, row0, key_rows, kv_mask, stride_vb, stride_vh, stride_vn,
                 P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``p @ V`` of the tile whose keys :func:`_tile_scores` located."""
    CONTIGUOUS: tl.constexpr = (BLOCK_K // P) % BLOCK_N == 0
    if CONTIGUOUS:
        v = V_DESC.load([b, hk, base + row0, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        v = tl.load(V + b * stride_vb + hk * stride_vh + key_rows * stride_vn + tl.arange(0, BLOCK_D)[None, :],
                    mask=kv_mask, other=0.0)
    if DOT_FP32:
        v = v.to(tl.float32)
    return tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)


@triton.jit
def _level_tiles(acc, m_i, l_i, q, q_pos, qk_scale, idx_list, start, end, K, V, K_DESC, V_DESC, PCNT, PLAST, PAD,
                 b, hk, Lk, base,
                 stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_cb,
                 MASKED: tl.constexpr, P: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The tiles ``[start, end)`` (in keys of level P) of one level's block list."""
    KEYS_PER_BLOCK: tl.constexpr = BLOCK_K // P
    # The next tile's block index is fetched one iteration ahead, so the tile loads do not wait on it.
    next_block = tl.load(idx_list + start // KEYS_PER_BLOCK, mask=start < end, other=0).to(tl.int32)
    for t0 in range(start, end, BLOCK_N):
        block = next_block
        next_block = tl.load(idx_list + (t0 + BLOCK_N) // KEYS_PER_BLOCK, mask=t0 + BLOCK_N < end,
                             other=0).to(tl.int32)
        s, row0, key_rows, kv_mask = _tile_scores(
            q, q_pos, qk_scale, idx_list, t0, end, block, K, K_DESC, PCNT, PLAST, PAD, b, hk, Lk, base,
            stride_kb, stride_kh, stride_kn, stride_cb,
            MASKED, P, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
        if MASKED:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
            p = tl.exp2(s - m_safe[:, None])
        else:
            # Raw products: every key is visible (the row max is finite) and a pooled key stands
            # for P tokens (+log2 P). qk_scale > 0 (the wrapper makes it so), so the row max of
            # the products scales to the row max of the logits, and each logit costs one FMA.
            bias = tl.log2(P * 1.0)
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale + bias)
            m_safe = m_new
            p = tl.exp2(s * qk_scale - (m_new - bias)[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _tile_values(p, V, V_DESC, b, hk, base, row0, key_rows, kv_mask,
                                                  stride_vb, stride_vh, stride_vn,
                                                  P, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


#: Bytes of K/V (pooled levels included) that the programs running together may share: about an
#: H100/H200's L2 (50 MB). Beyond it the program order takes fewer kv heads at a time.
L2_SHARE_BYTES = 64 << 20


def kv_chunk_for(kv_heads: int, bytes_per_head: int) -> int:
    """(batch, kv head) pairs per chunk of the program order: the largest divisor of
    ``kv_heads`` whose K and V with their pooled levels (7/8 more) fit :data:`L2_SHARE_BYTES`, at
    least 1. All of them when they fit (8k-16k tokens of a 7B model: the order is then longest
    tiles first across every head, which removed most of the tail there); one kv head at a time
    at 64k, where all heads at once had thrashed L2 (pyramid at 0.65: 29.8 ms against 25.5 ms)."""
    per_head = 2 * bytes_per_head * 15 // 8
    fit = max(1, L2_SHARE_BYTES // max(per_head, 1))
    return max(d for d in range(1, kv_heads + 1) if kv_heads % d == 0 and d <= fit)


def launch_config(q: torch.Tensor, block_q: int) -> dict:
    """Tile shape and launch for these inputs (``block_n``, ``block_m``, ``num_warps``,
    ``num_stages``; the program order's ``kv_chunk`` comes from :func:`kv_chunk_for`);
    :func:`psa_attention_triton` takes overrides of all five. bf16/fp16: the fastest launch of ``benchmarks/tune_attention.py`` on an H200
    for every map it times (4 warps, 128 query rows, 2 stages: 1.21x SDPA on dense work at 32k,
    8 warps x 3 stages 1.30x; ``tune_attention_h200.json``). fp32: 32-key tiles (the shared
    memory), 128 rows and 8 warps where D <= 128 (at 16k 47 ms on dense work against 65-71 ms for
    64-row launches, ``tune_attention_h200_fp32/``); head dims above 128 take 64 rows."""
    D = q.shape[-1]
    if q.dtype == torch.float32:
        if D <= 128:
            return dict(block_n=32, block_m=min(block_q, 128), num_warps=8, num_stages=2)
        return dict(block_n=32, block_m=min(block_q, 64), num_warps=4, num_stages=2)
    if D > 128:
        return dict(block_n=64, block_m=min(block_q, 64), num_warps=4, num_stages=2)
    return dict(block_n=64, block_m=block_q, num_warps=4, num_stages=2)


def level_tiles(block_k: int, block_n: int) -> tuple[int, int, int, int]:
    """Keys per tile at levels 1, 2, 4, 8: the largest power of two up to ``block_n`` dividing a
    block's ``block_k / p`` keys (a box of the tensor-memory accelerator), or 16 where that is
    below 16 (then blocks are gathered into 16-key tiles with pointer loads)."""
    tiles = []
    for p in (1, 2, 4, 8):
        keys = block_k // p
        n = 1 << min((keys & -keys).bit_length() - 1, block_n.bit_length() - 1)
        tiles.append(n if n >= 16 else 16)
    return tuple(tiles)


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
    :func:`launch_config` (``block_n``, ``block_m``, ``num_warps``, ``num_stages``, ``kv_chunk``:
    (batch, kv head) pairs per chunk of the program order, a divisor of ``B * Hkv``)."""
    unknown = set(launch) - {"block_n", "block_m", "num_warps", "num_stages", "kv_chunk"}
    if unknown:
        raise TypeError(f"unknown launch option(s) {sorted(unknown)}; see psa_kernels.attention.launch_config")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    level_map = LevelMap.for_call(level_map, block_q=block_q, block_k=block_k, q_len=Lq, k_len=Lk, causal=causal,
                                  key_padding_mask=key_padding_mask)
    cfg = {**launch_config(q, block_q), **launch}
    Hm, nq, nk = level_map.indices.shape[1:]
    scale = D**-0.5 if scale is None else float(scale)
    block_d = max(16, next_pow2(D))
    block_m = min(cfg["block_m"], block_q)
    if cfg.get("kv_chunk") is None:
        kv_chunk = kv_chunk_for(B * Hkv, Lk * D * k.element_size())
    else:
        kv_chunk = check_kv_chunk(cfg["kv_chunk"], B * Hkv)
    if scale < 0:  # the kernel wants a positive scale (unmasked tiles take the row max before scaling)
        q, scale = -q, -scale
    tiles = level_tiles(block_k, cfg["block_n"])
    with on_device(q):
        k, v = tma_ready(k), tma_ready(v)
        pyr = build_device_pyramid(k, v, key_padding_mask)
        out = torch.empty_like(q)
        pad = int8_view(key_padding_mask) if key_padding_mask is not None else pyr.counts
        # One box per level (its tile of keys of one batch and kv head; rows past the end read as 0).
        descriptors = []
        for level, (kt, vt, n) in enumerate(zip((k, pyr.keys, pyr.keys, pyr.keys), (v, pyr.values, pyr.values,
                                                                                      pyr.values), tiles)):
            box = [1, 1, n, block_d]
            descriptors += [descriptor(kt, box), descriptor(vt, box)]
        grid = (B * Hq * cdiv(Lq, block_m),)
        launch_kernel(_psa_fwd_kernel, grid,
            q, k, v, pyr.keys, pyr.values, pyr.counts, pyr.last, pad, level_map.indices, level_map.counts,
            level_map.plan, out, *descriptors,
            scale * _LOG2E,
            *q.stride(), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            pyr.keys.stride(0), pyr.keys.stride(1), pyr.keys.stride(2),
            pyr.counts.stride(0),
            *out.stride(),
            Hq, Hm, Hq // Hkv, Hq // Hm, Lq, Lk, nq, nk, pyr.base[2], pyr.base[4], pyr.base[8], kv_chunk,
            CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HEAD_DIM=D, BLOCK_D=block_d,
            BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_K=block_k, BN1=tiles[0], BN2=tiles[1], BN4=tiles[2],
            BN8=tiles[3], DOT_FP32=dot_in_fp32(q.dtype),
            # fp32 inputs: three TF32 products per dot (about fp32 accuracy on the tensor cores;
            # IEEE fp32 dots ran on the CUDA cores: 300 s for one 16k causal call on an H100).
            DOT_PRECISION="tf32x3" if q.dtype == torch.float32 and q.is_cuda else "tf32",
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return out
