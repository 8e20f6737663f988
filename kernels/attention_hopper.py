"""PSA forward for Hopper GPUs (sm_90), written in Gluon with warp specialisation.

The same semantics as :mod:`psa_kernels.attention` (the Triton kernel, which serves every other
case), in FlashAttention-3's form. A program owns one 128-row query block of one head:

- A producer warp walks the block's level lists (:class:`LevelMap`) and streams the keys and
  values through a ring of shared-memory stages by TMA ("ready" and "empty" mbarriers). Every
  stage is 128 rows: one level-1 block, or any mix of level-2, -4 and -8 blocks (64, 32 and 16
  pooled rows, each its own TMA box). The whole blocks of all levels are packed first, in level
  order (a level-``p`` block is ``128 / p`` rows, so a block never straddles two stages), then
  from a fresh stage the partial ones; the last stage of each part is filled up with real rows
  that the consumers mask out. So every product is a 64 x 128 x 128 ``wgmma`` whatever the level,
  and a query block wastes at most two part-filled stages (a loop per level wasted one per level
  and ran 1.7x the Triton kernel's time at sparsity 0.9).
- Two consumer warpgroups (64 query rows each, the accumulator in registers) take turns on the
  tensor cores (ping-pong: one's softmax runs under the other's products). A stage of whole
  blocks of one level costs one FMA per logit (the level's ``log2 p`` a constant); a stage that
  mixes levels adds a per-column bias; a stage of partial blocks decodes each column's level,
  block, key, valid-token count and last position (one column a thread, then spread to the
  products' layout) and masks as the Triton kernel's masked tiles.
- Programs run in the Triton kernel's order (chunks of kv heads, longest query blocks first).

Limits (:func:`hopper_reason` says which one a call misses): CUDA capability 9.x, bf16, head
dim <= 128 and a multiple of 8, ``block_q = block_k = 128``. Rows with no visible key write 0.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .attention import kv_chunk_for
from .level_map import LevelMap
from .pyramid import build_device_pyramid
from .utils import check_kv_chunk, int8_view, launch_kernel

_LOG2E = 1.4426950408889634
ROWS = 64  # query rows per consumer warpgroup
HALF = gl.constexpr(ROWS)
KEYS = gl.constexpr(128)  # rows per ring stage (keys at level 1, pooled keys above); also block_q = block_k


@triton.constexpr_function
def wgmma_layout(n):
    """Registers of a warpgroup's 64 x ``n`` product (four warps along the rows)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _program(Hq, GROUP, KV_CHUNK, n_tiles):
    """This program's (query tile, batch, query head, batch x kv head): chunks of ``KV_CHUNK``
    (batch, kv head) pairs one after another, inside a chunk the longest (last) query tiles first,
    the chunk's heads side by side (the Triton PSA kernel's order)."""
    heads = KV_CHUNK * GROUP
    pid = gl.program_id(0)
    chunk = pid // (heads * n_tiles)
    r = pid % (heads * n_tiles)
    tile = n_tiles - 1 - r // heads
    bk = chunk * KV_CHUNK + (r % heads) // GROUP
    Hkv = Hq // GROUP
    return tile, bk // Hkv, (bk % Hkv) * GROUP + r % GROUP, bk


@gluon.jit
def _program_tile(Hq, GROUP, KV_CHUNK, n_tiles):
    """:func:`_program` as (query tile, batch x query head, batch x kv head)."""
    tile, b, h, bk = _program(Hq, GROUP, KV_CHUNK, n_tiles)
    return tile, b * Hq + h, bk


@gluon.jit
def _kv_ring(Q_DESC, K_DESC, V_DESC, BLOCK_N: gl.constexpr, NSTAGE: gl.constexpr):
    """Shared memory of the warp-specialised forms: two 64-row query tiles, a ring of ``NSTAGE``
    K and V stages of ``BLOCK_N`` rows, and their mbarriers, initialised (each stage released by
    both consumer warpgroups; a "turn" barrier per warpgroup for the ping-pong)."""
    D: gl.constexpr = Q_DESC.block_type.shape[1]
    q_smem = gl.allocate_shared_memory(Q_DESC.dtype, [2, HALF, D], Q_DESC.layout)
    k_ring = gl.allocate_shared_memory(K_DESC.dtype, [NSTAGE, BLOCK_N, D], K_DESC.layout)
    v_ring = gl.allocate_shared_memory(V_DESC.dtype, [NSTAGE, BLOCK_N, D], V_DESC.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar.index(0), count=1)
    for i in gl.static_range(NSTAGE):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    return q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn


@gluon.jit
def _block(Hq, Hm, GROUP, KV_CHUNK, nq):
    """This program's (query block, batch, batch x head, batch x kv head, layout row head)."""
    qb, b, h, bk = _program(Hq, GROUP, KV_CHUNK, nq)
    return qb, b, b * Hq + h, bk, h // (Hq // Hm)


@gluon.jit
def _row_plan(PLAN, LCNT, row):
    """Per level 1, 2, 4, 8 of this query block: whole blocks, blocks to read, first list entry."""
    w1, w2, w4, w8 = (gl.load(PLAN + row * 8 + 4), gl.load(PLAN + row * 8 + 5), gl.load(PLAN + row * 8 + 6),
                      gl.load(PLAN + row * 8 + 7))
    n1, n2, n4, n8 = (gl.load(PLAN + row * 8), gl.load(PLAN + row * 8 + 1), gl.load(PLAN + row * 8 + 2),
                      gl.load(PLAN + row * 8 + 3))
    o2 = gl.load(LCNT + row * 4)
    o4 = o2 + gl.load(LCNT + row * 4 + 1)
    o8 = o4 + gl.load(LCNT + row * 4 + 2)
    return w1, w2, w4, w8, n1, n2, n4, n8, o2, o4, o8


@gluon.jit
def _copy_block(K_DESC, V_DESC, k_ring, v_ring, k_ready, v_ready, s, off, row, col, P: gl.constexpr):
    """One block of level ``P`` (``128 / P`` rows from ``[row, col]`` of the descriptors) into rows
    ``off ..`` of stage ``s``."""
    KPB: gl.constexpr = KEYS // P
    # A stage's rows are not one strided array (with 128-byte swizzling a 128-wide row is stored as
    # two 64-column halves, each half of all rows together), so the sub-view must be a static
    # slice of the stage: one branch per position.
    for i in gl.static_range(P):
        if off == i * KPB:
            tma.async_copy_global_to_shared(K_DESC, [row, col], k_ready.index(s), k_ring.index(s).slice(i * KPB, KPB))
            tma.async_copy_global_to_shared(V_DESC, [row, col], v_ready.index(s), v_ring.index(s).slice(i * KPB, KPB))


@gluon.jit
def _fill_run(K_DESC, V_DESC, k_ring, v_ring, k_ready, v_ready, empty, entries, n, row0, col, step, off,
              P: gl.constexpr, NSTAGE: gl.constexpr):
    """The producer's copies of ``n`` level-``P`` blocks (list ``entries``), packed after ``off``
    rows of stage ``step``; a stage is waited for and armed when its first block goes in."""
    KPB: gl.constexpr = KEYS // P
    for j in range(n):
        s = step % NSTAGE
        if off == 0:
            # A fresh mbarrier counts as having completed the phase before phase 0.
            mbarrier.wait(empty.index(s), ((step // NSTAGE) & 1) ^ 1)
            mbarrier.expect(k_ready.index(s), KEYS * K_DESC.block_type.shape[1] * 2)
            mbarrier.expect(v_ready.index(s), KEYS * V_DESC.block_type.shape[1] * 2)
        blk = gl.load(entries + j).to(gl.int32)
        _copy_block(K_DESC, V_DESC, k_ring, v_ring, k_ready, v_ready, s, off, row0 + blk * KPB, col, P)
        off += KPB
        if off == KEYS:
            off = 0
            step += 1
    return step, off


@gluon.jit
def _close_stage(K8, V8, k_ring, v_ring, k_ready, v_ready, step, off, row, NSTAGE: gl.constexpr):
    """Fill the rest of a partly filled stage with 16-row boxes of real (finite) keys and values,
    which the consumers mask out: rows never written could hold NaN, and 0 x NaN is NaN."""
    if off != 0:
        s = step % NSTAGE
        for i in gl.static_range(KEYS // 16):
            if i * 16 >= off:
                tma.async_copy_global_to_shared(K8, [row, 0], k_ready.index(s), k_ring.index(s).slice(i * 16, 16))
                tma.async_copy_global_to_shared(V8, [row, 0], v_ready.index(s), v_ring.index(s).slice(i * 16, 16))
        step += 1
    return step


@gluon.jit
def _producer(Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
              Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8, so_b, so_h, so_m,
              q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn,
              CAUSAL: gl.constexpr, HAS_PAD: gl.constexpr, HEAD_DIM: gl.constexpr, NSTAGE: gl.constexpr,
              Q_TOKEN_MAJOR: gl.constexpr, KV_TOKEN_MAJOR: gl.constexpr):
    qb, b, bh, bk, hm = _block(Hq, Hm, GROUP, KV_CHUNK, nq)
    mbarrier.expect(q_bar.index(0), 2 * HALF * Q_DESC.block_type.shape[1] * 2)
    # Token-major tensors ([B, L, H, D] in memory) are read as rows of tokens, a head's columns.
    if Q_TOKEN_MAJOR:
        q_row = b * Lq + qb * 2 * HALF
        q_col = (bh - b * Hq) * HEAD_DIM
    else:
        q_row = bh * Lq + qb * 2 * HALF
        q_col = 0
    tma.async_copy_global_to_shared(Q_DESC, [q_row, q_col], q_bar.index(0), q_smem.index(0))
    tma.async_copy_global_to_shared(Q_DESC, [q_row + HALF, q_col], q_bar.index(0), q_smem.index(1))
    row = (b * Hm + hm) * nq + qb
    idx = IDX + row.to(gl.int64) * nk
    w1, w2, w4, w8, n1, n2, n4, n8, o2, o4, o8 = _row_plan(PLAN, LCNT, row)
    if KV_TOKEN_MAJOR:
        r1 = b * Lk
        c1 = (bk - b * (Hq // GROUP)) * HEAD_DIM
    else:
        r1 = bk * Lk
        c1 = 0
    r2 = bk * total + base2
    r4 = bk * total + base4
    r8 = bk * total + base8
    # The whole blocks of every level packed one after another (a level-P block is 128 / P rows, so
    # coarser blocks never straddle a stage), then, from a fresh stage, the partial ones.
    zero = gl.to_tensor(0)  # loop-carried counters must start as tensors, not constants
    step, off = _fill_run(K1, V1, k_ring, v_ring, k_ready, v_ready, empty, idx, w1, r1, c1, zero, zero, 1, NSTAGE)
    step, off = _fill_run(K2, V2, k_ring, v_ring, k_ready, v_ready, empty, idx + o2, w2, r2, 0, step, off, 2, NSTAGE)
    step, off = _fill_run(K4, V4, k_ring, v_ring, k_ready, v_ready, empty, idx + o4, w4, r4, 0, step, off, 4, NSTAGE)
    step, off = _fill_run(K8, V8, k_ring, v_ring, k_ready, v_ready, empty, idx + o8, w8, r8, 0, step, off, 8, NSTAGE)
    step = _close_stage(K8, V8, k_ring, v_ring, k_ready, v_ready, step, off, r8, NSTAGE)
    step, off = _fill_run(K1, V1, k_ring, v_ring, k_ready, v_ready, empty, idx + w1, n1 - w1, r1, c1, step, zero, 1,
                          NSTAGE)
    step, off = _fill_run(K2, V2, k_ring, v_ring, k_ready, v_ready, empty, idx + o2 + w2, n2 - w2, r2, 0, step, off, 2,
                          NSTAGE)
    step, off = _fill_run(K4, V4, k_ring, v_ring, k_ready, v_ready, empty, idx + o4 + w4, n4 - w4, r4, 0, step, off, 4,
                          NSTAGE)
    step, off = _fill_run(K8, V8, k_ring, v_ring, k_ready, v_ready, empty, idx + o8 + w8, n8 - w8, r8, 0, step, off, 8,
                          NSTAGE)
    _close_stage(K8, V8, k_ring, v_ring, k_ready, v_ready, step, off, r8, NSTAGE)


@gluon.jit
def _packed_level(x, e1, e2, e4):
    """Level index (0..3 for P = 1, 2, 4, 8, also log2 P) of packed row ``x`` of a section whose
    levels end at rows ``e1``, ``e2``, ``e4`` (level 8 after)."""
    return (x >= e1).to(gl.int32) + (x >= e2).to(gl.int32) + (x >= e4).to(gl.int32)


@gluon.jit
def _light_columns(x0, a1, a2, a4, rows_a, col_layout: gl.constexpr):
    """Per column of a stage of whole blocks starting at packed row ``x0``: the logit's bias (log2 P
    of its level, -inf past the section's end) and a last position every query sees."""
    # Column vectors are decoded one column a thread, then spread to the MMA's column layout: in
    # that layout each is 32 registers a thread.
    x = x0 + gl.arange(0, KEYS, layout=gl.BlockedLayout([1], [32], [4], [0]))
    bias = gl.where(x < rows_a, _packed_level(x, a1, a2, a4).to(gl.float32), float("-inf"))
    return gl.convert_layout(bias, col_layout), gl.convert_layout(x * 0 - 1, col_layout)


@gluon.jit
def _masked_columns(x0, e1, e2, e4, rows_b, f1, f2, f4, f8, idx, PCNT, PLAST, PAD, b, Lk, total, base2, base4, base8,
                    HAS_PAD: gl.constexpr, col_layout: gl.constexpr):
    """Per column of a stage of partial blocks starting at packed row ``x0``: its level, list entry
    (level lists start at ``f1..f8``) and key, then the logit's bias (log2 of the key's valid-token
    count, -inf where there is none) and the key's last position, as the Triton kernel's masked tiles."""
    x = x0 + gl.arange(0, KEYS, layout=gl.BlockedLayout([1], [32], [4], [0]))
    lev = _packed_level(x, e1, e2, e4)
    start = gl.where(lev == 0, 0, gl.where(lev == 1, e1, gl.where(lev == 2, e2, e4)))
    shift = 7 - lev  # log2 of the keys per block at that level (KEYS = 128)
    first = gl.where(lev == 0, f1, gl.where(lev == 1, f2, gl.where(lev == 2, f4, f8)))
    ok = x < rows_b
    blk = gl.load(idx + first + ((x - start) >> shift), mask=ok, other=0).to(gl.int32)
    key = (blk << shift) + ((x - start) & ((1 << shift) - 1))
    ok = ok & (key < ((Lk + (1 << lev) - 1) >> lev))
    pooled = lev > 0
    at = gl.where(lev == 1, base2, gl.where(lev == 2, base4, base8)) + b * total + key
    cnt = gl.load(PCNT + at, mask=ok & pooled, other=1)
    last = gl.where(pooled, gl.load(PLAST + at, mask=ok & pooled, other=0), key)
    ok = ok & (cnt > 0)
    if HAS_PAD:
        ok = ok & (pooled | (gl.load(PAD + b * Lk + key, mask=ok & (lev == 0), other=0) != 0))
    bias = gl.where(ok, gl.log2(gl.maximum(cnt, 1).to(gl.float32)), float("-inf"))
    return gl.convert_layout(bias, col_layout), gl.convert_layout(last, col_layout)


@gluon.jit
def _stage_scores(q, k_ring, k_ready, turn, zeros, t, NSTAGE: gl.constexpr, W: gl.constexpr):
    """Stage ``t``'s products ``q @ K^T`` (raw), on the tensor cores in this warpgroup's turn."""
    s = t % NSTAGE
    mbarrier.wait(turn.index(W), (t & 1) ^ (1 - W))  # warpgroup 0 goes first
    mbarrier.wait(k_ready.index(s), (t // NSTAGE) & 1)
    qk = hopper.warpgroup_mma(q, k_ring.index(s).permute((1, 0)), zeros, use_acc=False, is_async=True)
    mbarrier.arrive(turn.index(1 - W), count=1)
    return hopper.warpgroup_mma_wait(num_outstanding=0, deps=[qk])


@gluon.jit
def _whole_logits(qk, m_i, qk_scale, level_bias):
    """Online-softmax step of a stage of whole blocks of one level: every key visible, a pooled key
    stands for P tokens (``level_bias`` = log2 P); the row max of the raw products scales to that
    of the logits (qk_scale > 0): one FMA a logit. Returns the new row max and the weights."""
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale + level_bias)
    return m_new, gl.exp2(qk * qk_scale - (m_new - level_bias)[:, None])


@gluon.jit
def _stage_values(acc, m_i, l_i, m_new, m_safe, p, v_ring, v_ready, empty, t, NSTAGE: gl.constexpr,
                  o_layout: gl.constexpr):
    """Rescale the accumulator and add ``p @ V`` of stage ``t``; release the stage."""
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s = t % NSTAGE
    alpha = gl.exp2(m_i - m_safe)
    l_i = l_i * alpha + gl.sum(p, 1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    mbarrier.wait(v_ready.index(s), (t // NSTAGE) & 1)
    acc = hopper.warpgroup_mma(gl.convert_layout(p.to(v_ring.dtype), p_layout), v_ring.index(s), acc, is_async=True)
    acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    mbarrier.arrive(empty.index(s), count=1)
    return acc, m_new, l_i


@gluon.jit
def _consumer(Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
              Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8, so_b, so_h, so_m,
              q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn,
              CAUSAL: gl.constexpr, HAS_PAD: gl.constexpr, HEAD_DIM: gl.constexpr, NSTAGE: gl.constexpr,
              Q_TOKEN_MAJOR: gl.constexpr, KV_TOKEN_MAJOR: gl.constexpr, LEAD_LOOP: gl.constexpr,
              W: gl.constexpr):
    D: gl.constexpr = Q_DESC.block_type.shape[1]
    s_layout: gl.constexpr = wgmma_layout(KEYS)
    o_layout: gl.constexpr = wgmma_layout(D)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    qb, b, bh, bk, hm = _block(Hq, Hm, GROUP, KV_CHUNK, nq)
    row = (b * Hm + hm) * nq + qb
    idx = IDX + row.to(gl.int64) * nk
    w1, w2, w4, w8, n1, n2, n4, n8, o2, o4, o8 = _row_plan(PLAN, LCNT, row)
    # Where each level's run ends in the two sections' packed rows (see the producer).
    a1 = w1 * KEYS
    a2 = a1 + w2 * (KEYS // 2)
    a4 = a2 + w4 * (KEYS // 4)
    rows_a = a4 + w8 * (KEYS // 8)
    e1 = (n1 - w1) * KEYS
    e2 = e1 + (n2 - w2) * (KEYS // 2)
    e4 = e2 + (n4 - w4) * (KEYS // 4)
    rows_b = e4 + (n8 - w8) * (KEYS // 8)
    stages_a = gl.cdiv(rows_a, KEYS)
    r0 = qb * 2 * HALF + W * HALF
    q_pos = r0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout)) + (Lk - Lq)
    m_i = gl.full([HALF], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([HALF], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([HALF, D], gl.float32, o_layout)
    zeros = gl.zeros([HALF, KEYS], gl.float32, s_layout)
    mbarrier.wait(q_bar.index(0), 0)
    q = q_smem.index(W)
    if LEAD_LOOP:
        # The leading stages hold the whole level-1 blocks (a dense map's all but the diagonal):
        # their own loop, without the per-stage checks and branches of the general one.
        for t in range(w1):
            qk = _stage_scores(q, k_ring, k_ready, turn, zeros, t, NSTAGE, W)
            m_new, p = _whole_logits(qk, m_i, qk_scale, 0.0)
            acc, m_i, l_i = _stage_values(acc, m_i, l_i, m_new, m_new, p, v_ring, v_ready, empty, t, NSTAGE,
                                          o_layout)
        first = w1
    else:
        first = 0
    for t in range(first, stages_a + gl.cdiv(rows_b, KEYS)):
        qk = _stage_scores(q, k_ring, k_ready, turn, zeros, t, NSTAGE, W)
        x0 = t * KEYS
        lev0 = _packed_level(x0, a1, a2, a4)
        if (x0 + KEYS <= rows_a) & (lev0 == _packed_level(x0 + KEYS - 1, a1, a2, a4)):
            # Whole blocks of one level.
            m_new, p = _whole_logits(qk, m_i, qk_scale, lev0.to(gl.float32))
            m_safe = m_new
        else:
            if t < stages_a:
                # Whole blocks of two or more levels, or the section's last, partly filled stage.
                bias, last = _light_columns(x0, a1, a2, a4, rows_a, col_layout)
            else:
                # Partial blocks (the causal diagonal, padding, the tail).
                bias, last = _masked_columns(x0 - stages_a * KEYS, e1, e2, e4, rows_b, w1, o2 + w2, o4 + w4, o8 + w8,
                                             idx, PCNT, PLAST, PAD, b, Lk, total, base2, base4, base8, HAS_PAD,
                                             col_layout)
            logits = qk * qk_scale + bias[None, :]
            if CAUSAL:
                logits = gl.where(last[None, :] < (q_pos + 1)[:, None], logits, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(logits, 1))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
            p = gl.exp2(logits - m_safe[:, None])
        acc, m_i, l_i = _stage_values(acc, m_i, l_i, m_new, m_safe, p, v_ring, v_ready, empty, t, NSTAGE, o_layout)
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = gl.where(l_o[:, None] > 0, acc / gl.maximum(l_o, 1e-30)[:, None], 0.0)
    r = r0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    o_rows = b.to(gl.int64) * so_b + (bh - b * Hq).to(gl.int64) * so_h + r.to(gl.int64) * so_m
    gl.store(OUT + o_rows[:, None] + d[None, :], out.to(OUT.dtype.element_ty),
             mask=(r < Lq)[:, None] & (d < HEAD_DIM)[None, :])


@gluon.jit
def _psa_kernel(Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
                Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8, so_b, so_h, so_m,
                CAUSAL: gl.constexpr, HAS_PAD: gl.constexpr, HEAD_DIM: gl.constexpr, NSTAGE: gl.constexpr,
                Q_TOKEN_MAJOR: gl.constexpr, KV_TOKEN_MAJOR: gl.constexpr, LEAD_LOOP: gl.constexpr,
                CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn = _kv_ring(Q_DESC, K1, V1, KEYS, NSTAGE)
    # (The argument tuples are written out: a tuple built in the kernel would lose the constexprs.)
    gl.warp_specialize([
        (_consumer, (Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
                     Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8, so_b, so_h, so_m,
                     q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn, CAUSAL, HAS_PAD, HEAD_DIM,
                     NSTAGE, Q_TOKEN_MAJOR, KV_TOKEN_MAJOR, LEAD_LOOP, 0)),
        (_consumer, (Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
                     Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8, so_b, so_h, so_m,
                     q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn, CAUSAL, HAS_PAD, HEAD_DIM,
                     NSTAGE, Q_TOKEN_MAJOR, KV_TOKEN_MAJOR, LEAD_LOOP, 1)),
        (_producer, (Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
                     Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8, so_b, so_h, so_m,
                     q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn, CAUSAL, HAS_PAD, HEAD_DIM,
                     NSTAGE, Q_TOKEN_MAJOR, KV_TOKEN_MAJOR)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


#: Ring stages and registers of the consumer warpgroups / producer warp: the fastest of the forms
#: timed on an H200 (``benchmarks/gluon_psa.py``, ``docs/kernel_notes.md``).
LAUNCH = dict(nstage=2, consumer_regs=240, producer_regs=24, lead_loop=True)


def hopper_reason(q: torch.Tensor, block_q: int, block_k: int) -> str | None:
    """Why this kernel cannot serve a call with these inputs (None: it can)."""
    if not q.is_cuda:
        return "not a CUDA tensor"
    if _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())[0] != 9:
        return "not a Hopper GPU (CUDA capability 9.x)"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} (bf16 or fp16 only)"
    D = q.shape[-1]
    if D > 128 or D % 8:
        return f"head dim {D} (at most 128, a multiple of 8)"
    if block_q != 128 or block_k != 128:
        return f"blocks {block_q}x{block_k} (128x128 only)"
    return None


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _token_major(t: torch.Tensor) -> bool:
    """``t [B, H, L, 128]`` is a view of a contiguous ``[B, L, H, 128]`` (16-byte aligned)."""
    B, H, L, D = t.shape
    # A batch of one may carry any batch stride (a permuted tensor's, say): it is never stepped.
    return (D == 128 and H > 1 and t.stride()[1:] == (D, H * D, 1) and (B == 1 or t.stride(0) == L * H * D)
            and t.data_ptr() % 16 == 0)


def _rows_of_d(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if contiguous with a 16-byte aligned base (the TMA's requirement), else a copy."""
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


#: Shared-memory layout of every tile (bf16/fp16 rows of 128 elements, 128-byte swizzle).
_TILE_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


def _descriptor(t: torch.Tensor, rows: int, token_major: bool = False, like: TensorDescriptor | None = None):
    """``t`` as rows of D (``[B * H * L, D]``; head dims below 128 read zeros past D, the
    descriptor's own bounds) or, token-major, as ``[B * L, H * 128]``; boxes of ``rows x 128``.
    With ``like`` (a descriptor the constructor checked), a copy of it with this base, shape and
    box, without the constructor's checks (microseconds each, nine per call): the caller
    guarantees them (16-byte aligned base and rows, unit last stride, the same dtype)."""
    B, H, L, D = t.shape
    if token_major:
        base, shape = t.transpose(1, 2).reshape(B * L, H * D), [B * L, H * D]
    else:
        base, shape = t.view(-1, D), [t.numel() // D, D]
    if like is None or not hasattr(like, "__dict__"):  # (a descriptor with slots: the constructor)
        return TensorDescriptor(base, shape=shape, strides=[shape[1], 1], block_shape=[rows, 128],
                                layout=_TILE_LAYOUT)
    d = object.__new__(TensorDescriptor)
    d.__dict__.update(like.__dict__)  # every field this Triton's descriptor has, then ours
    d.__dict__.update(base=base, shape=shape, strides=[shape[1], 1], block_shape=[rows, 128])
    return d


def psa_attention_hopper(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    level_map: LevelMap,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    kv_chunk: int | None = None,
    **launch,
) -> torch.Tensor:
    """Run the Hopper kernel (inputs validated and :func:`hopper_reason` checked by the caller;
    ``level_map`` planned for this call's geometry). ``launch`` overrides :data:`LAUNCH`."""
    unknown = set(launch) - set(LAUNCH)
    if unknown:
        raise TypeError(f"unknown launch option(s) {sorted(unknown)}; see psa_kernels.attention_hopper.LAUNCH")
    cfg = {**LAUNCH, **launch}
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    if scale < 0:  # the kernel wants a positive scale (whole stages take the row max before scaling)
        q, scale = -q, -scale
    kv_chunk = kv_chunk_for(B * Hkv, Lk * D * k.element_size()) if kv_chunk is None else \
        check_kv_chunk(kv_chunk, B * Hkv)
    # The descriptors are two-dimensional: rows of D ([B, H, L, D] contiguous) or, with D = 128,
    # rows of tokens holding every head ([B, L, H, D] in memory, as a model's projections leave
    # them: no copy); anything else is copied to the first form.
    q_tm = _token_major(q)
    kv_tm = _token_major(k) and _token_major(v) and k.stride() == v.stride()
    if not q_tm:
        q = _rows_of_d(q)
    if not kv_tm:
        k, v = _rows_of_d(k), _rows_of_d(v)
    pyr = build_device_pyramid(k, v, key_padding_mask)
    q_desc = _descriptor(q, ROWS, q_tm)
    descriptors = [q_desc, _descriptor(k, 128, kv_tm, q_desc), _descriptor(v, 128, kv_tm, q_desc)]
    for rows in (64, 32, 16):  # levels 2, 4, 8: one block per box
        descriptors += [_descriptor(pyr.keys, rows, like=q_desc), _descriptor(pyr.values, rows, like=q_desc)]
    out = torch.empty_like(q)
    nq, nk = level_map.indices.shape[2:]
    Hm = level_map.indices.shape[1]
    pad = int8_view(key_padding_mask) if key_padding_mask is not None else pyr.counts
    launch_kernel(_psa_kernel, (B * Hq * nq,),
        *descriptors, level_map.indices, level_map.counts, level_map.plan, pyr.counts, pyr.last, pad,
        out, scale * _LOG2E, Hq, Hm, Hq // Hkv, kv_chunk, Lq, Lk, nq, nk, pyr.keys.shape[2], pyr.base[2], pyr.base[4],
        pyr.base[8], out.stride(0), out.stride(1), out.stride(2),
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HEAD_DIM=D, NSTAGE=cfg["nstage"],
        Q_TOKEN_MAJOR=q_tm, KV_TOKEN_MAJOR=kv_tm, LEAD_LOOP=bool(cfg["lead_loop"]),
        CONSUMER_REGS=cfg["consumer_regs"], PRODUCER_REGS=cfg["producer_regs"], num_warps=4,
        # The whole kernel's register cap: the warp groups then re-split the file (setmaxnreg).
        maxnreg=168,
    )
    return out
