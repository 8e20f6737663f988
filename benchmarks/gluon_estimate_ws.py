"""EXPERIMENT (not used by the package): the fp8 antidiagonal estimate in Gluon with warp
specialisation, the next step after ``benchmarks/gluon_estimate.py``.

Two forms, each a producer warp streaming the key chunks (``BLOCK_C`` strided key rows x 128 bytes)
through a ring of ``NSTAGE`` shared-memory stages with "ready" and "empty" mbarriers, and two
consumer warpgroups over a tile of 128 strided rows whose fp8 query chunks stay in shared memory
(128 KB):

- rows (``estimate_lse_ws``: first phase only; ``importance_ws``: the whole estimate, persistent,
  second phase in the consumers): each warpgroup owns 64 rows, both read every stage;
- cols (``importance_cols``): each column tile belongs to one warpgroup for all 128 rows, dealt in
  turn, so one warpgroup's epilogue can run under the other's products;
- qreg (``importance_qreg``): each warpgroup's 64 rows of queries in registers, shared memory all
  key ring, the warpgroups in ping-pong on the tensor cores (``--check`` compares it with the
  Triton kernel on awkward shapes first).

Outcome on an H200 (``benchmarks/results/gluon_estimate_h200/``, 6-8): both right, neither faster
than the Triton kernel at 32k-64k. Rows: 2.89 ms at 64k against 2.92 (the products and key loads
alone take 1.5-1.6 ms of its 2.35-2.49 ms first phase: the warpgroups run their epilogues
together). Cols: 4.08 ms; the ring holds 1.25 column tiles beside the queries, so each warpgroup
waits for the other's stages and the key loads sit on the critical path. Qreg (10): bit-equal
to the Triton kernel, 2.72 ms at 64k against 2.95 (-8%), equal at 32k, slower at 12k.

    python benchmarks/gluon_estimate_ws.py --lengths 32768,65536 [--kernels rows,cols]   # on the GPU
    python benchmarks/gluon_estimate_ws.py --offline        # compile for sm_90, no GPU"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia import hopper  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

from benchmarks.gluon_estimate import _LOG2E, _epilogue, cdiv, importance_from_lse, prepare  # noqa: E402


@gluon.jit
def _geometry(rows0, n_rows_here, Lq, Lk, n_cols, CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_C: gl.constexpr):
    """Column tiles that rows ``[rows0, rows0 + n_rows_here)`` see."""
    last = (Lk - Lq) + gl.minimum((rows0 + n_rows_here - 1) * S + S - 1, Lq - 1)
    if CAUSAL:
        col_end = gl.minimum(n_cols, last // S + 1)
    else:
        col_end = n_cols
    return gl.cdiv(col_end, BLOCK_C)


@gluon.jit
def _row_setup(r0, ROWS: gl.constexpr, bh, SQ, scale_log2, n_rows, Lq, Lk, S: gl.constexpr,
               row_layout: gl.constexpr):
    """Rows ``[r0, r0 + ROWS)``: their indices, which exist, each one's last visible key, the
    first row's, and each row's scale into the exponent."""
    m = r0 + gl.arange(0, ROWS, layout=row_layout)
    row_ok = m < n_rows
    row_last = (Lk - Lq) + gl.minimum(m * S + S - 1, Lq - 1)
    first_last = (Lk - Lq) + gl.minimum(r0 * S + S - 1, Lq - 1)
    row_scale = gl.maximum(gl.load(SQ + bh * n_rows + m, mask=row_ok, other=0.0) * scale_log2, 1e-30)
    return m, row_ok, row_last, first_last, row_scale


@gluon.jit
def _col_scales(SK, key_row0, t, n_cols, BLOCK_C: gl.constexpr, acc_layout: gl.constexpr):
    """Column tile ``t``'s key scales (0 past the end: the epilogue's ``-inf`` bias)."""
    cols = t * BLOCK_C + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, acc_layout))
    return gl.load(SK + key_row0 + cols, mask=cols < n_cols, other=0.0)


@gluon.jit
def _stream_keys(K_DESC, k_ring, ready, empty, key_row0, n_tiles, step, S: gl.constexpr, BLOCK_C: gl.constexpr,
                 BLOCK_D: gl.constexpr, NSTAGE: gl.constexpr):
    """The producer's loop: column tiles ``[0, n_tiles)`` of one kv head, chunk by chunk into the
    ring from stage counter ``step``; returns the counter after them."""
    step = gl.to_tensor(step)  # a literal 0 would be a constexpr, which a loop cannot carry
    for t in range(n_tiles):
        for i in gl.static_range(S):
            s = (step + i) % NSTAGE
            # A fresh mbarrier counts as having completed the phase before phase 0: the first
            # round's waits (parity 1) pass at once.
            mbarrier.wait(empty.index(s), (((step + i) // NSTAGE) & 1) ^ 1)
            mbarrier.expect(ready.index(s), BLOCK_C * BLOCK_D)
            tma.async_copy_global_to_shared(K_DESC, [key_row0 + t * BLOCK_C, i * BLOCK_D], ready.index(s),
                                            k_ring.index(s))
        step += S
    return step


@gluon.jit
def _smem_chunks(q_smem, BASE: gl.constexpr):
    """The eight query chunks at ``q_smem[BASE:BASE + 8]`` as the products' A operands (stride 8)."""
    return (q_smem.index(BASE), q_smem.index(BASE + 1), q_smem.index(BASE + 2), q_smem.index(BASE + 3),
            q_smem.index(BASE + 4), q_smem.index(BASE + 5), q_smem.index(BASE + 6), q_smem.index(BASE + 7))


@gluon.jit
def _issue_products(queries, k_ring, ready, empty, step, acc, S: gl.constexpr, NSTAGE: gl.constexpr):
    """One column tile's ``S`` chunk products from stage counter ``step``: each waits for its keys,
    and frees the previous chunk's stage once that product is done. The last is left in flight
    (:func:`_finish_products`)."""
    for i in gl.static_range(S):
        s = (step + i) % NSTAGE
        mbarrier.wait(ready.index(s), ((step + i) // NSTAGE) & 1)
        acc = hopper.warpgroup_mma(queries[i], k_ring.index(s).permute((1, 0)), acc, is_async=True)
        if i > 0:
            acc = hopper.warpgroup_mma_wait(num_outstanding=1, deps=[acc])
            mbarrier.arrive(empty.index((step + i - 1) % NSTAGE), count=1)
    return acc


@gluon.jit
def _finish_products(acc, empty, step, S: gl.constexpr, NSTAGE: gl.constexpr):
    acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    mbarrier.arrive(empty.index((step + S - 1) % NSTAGE), count=1)
    return acc


@gluon.jit
def _pass_stages(ready, empty, step, S: gl.constexpr, NSTAGE: gl.constexpr):
    """A column tile only the other warpgroup's rows see: release its stages unread."""
    for i in gl.static_range(S):
        s = (step + i) % NSTAGE
        mbarrier.wait(ready.index(s), ((step + i) // NSTAGE) & 1)
        mbarrier.arrive(empty.index(s), count=1)


@gluon.jit
def _producer(Q_DESC, K_DESC, SQ, SK, LSE, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nk,
              q_smem, k_ring, q_bar, ready, empty,
              CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
              BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr,
              EPILOGUE: gl.constexpr):
    tile = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // Hq
    hk = (bh % Hq) // GROUP
    rows0 = tile * 2 * BLOCK_R
    n_tiles = _geometry(rows0, 2 * BLOCK_R, Lq, Lk, n_cols, CAUSAL, S, BLOCK_C)
    key_row0 = (b * Hkv + hk) * n_cols
    mbarrier.expect(q_bar.index(0), 2 * S * BLOCK_R * BLOCK_D)
    for w in gl.static_range(2):
        for i in gl.static_range(S):
            tma.async_copy_global_to_shared(Q_DESC, [bh * n_rows + rows0 + w * BLOCK_R, i * BLOCK_D], q_bar.index(0),
                                            q_smem.index(w * S + i))
    _stream_keys(K_DESC, k_ring, ready, empty, key_row0, n_tiles, 0, S, BLOCK_C, BLOCK_D, NSTAGE)


@gluon.jit
def _consume(Q_DESC, K_DESC, SQ, SK, LSE, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nk,
             q_smem, k_ring, q_bar, ready, empty,
             CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
             BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr, EPILOGUE: gl.constexpr,
             W: gl.constexpr):
    tile = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // Hq
    hk = (bh % Hq) // GROUP
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_C, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
    rows0 = tile * 2 * BLOCK_R
    r0 = rows0 + W * BLOCK_R
    n_tiles = _geometry(rows0, 2 * BLOCK_R, Lq, Lk, n_cols, CAUSAL, S, BLOCK_C)  # what the producer loads
    n_mine = _geometry(r0, BLOCK_R, Lq, Lk, n_cols, CAUSAL, S, BLOCK_C)  # what these rows see
    m, row_ok, row_last, first_last, row_scale = _row_setup(r0, BLOCK_R, bh, SQ, scale_log2, n_rows, Lq, Lk, S,
                                                            row_layout)
    key_row0 = (b * Hkv + hk) * n_cols
    lse_row_base = bh.to(gl.int64) * n_rows * nk
    mbarrier.wait(q_bar.index(0), 0)
    total = gl.zeros([BLOCK_R], gl.float32, row_layout)
    queries = _smem_chunks(q_smem, W * S)
    for t in range(n_tiles):
        if t < n_mine:
            col_scale = _col_scales(SK, key_row0, t, n_cols, BLOCK_C, acc_layout)
            acc = gl.zeros([BLOCK_R, BLOCK_C], gl.float32, acc_layout)
            acc = _issue_products(queries, k_ring, ready, empty, t * S, acc, S, NSTAGE)
            acc = _finish_products(acc, empty, t * S, S, NSTAGE)
            if EPILOGUE:
                _epilogue(acc, col_scale, t * BLOCK_C, m, row_ok, row_last, first_last, row_scale, LSE, lse_row_base,
                          nk, CAUSAL, S, BLOCK_R, BLOCK_C, COLS_PER_BLOCK, acc_layout)
            else:  # diagnostic: products and key loads only (a row sum keeps them alive)
                total += gl.sum(acc, 1)
        else:
            _pass_stages(ready, empty, t * S, S, NSTAGE)
    if not EPILOGUE:
        gl.store(LSE + lse_row_base + m.to(gl.int64) * nk, total, mask=row_ok)


@gluon.jit
def _estimate_ws_kernel(
    Q_DESC, K_DESC, SQ, SK, LSE, scale_log2,
    Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nk,
    CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
    BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, EPILOGUE: gl.constexpr,
):
    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [2 * S, BLOCK_R, BLOCK_D], Q_DESC.layout)
    k_ring = gl.allocate_shared_memory(gl.float8e4nv, [NSTAGE, BLOCK_C, BLOCK_D], K_DESC.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar.index(0), count=1)
    for i in gl.static_range(NSTAGE):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumer warpgroups release a stage
    # The argument tuples are written out in the call: a tuple built first turned the constexprs
    # in it into tensors (Triton 3.6).
    gl.warp_specialize([
        (_consume, (Q_DESC, K_DESC, SQ, SK, LSE, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nk, q_smem,
                    k_ring, q_bar, ready, empty, CAUSAL, S, BLOCK_R, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE,
                    EPILOGUE, 0)),
        (_consume, (Q_DESC, K_DESC, SQ, SK, LSE, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nk, q_smem,
                    k_ring, q_bar, ready, empty, CAUSAL, S, BLOCK_R, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE,
                    EPILOGUE, 1)),
        (_producer, (Q_DESC, K_DESC, SQ, SK, LSE, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nk, q_smem,
                     k_ring, q_bar, ready, empty, CAUSAL, S, BLOCK_R, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE,
                     EPILOGUE)),
    ], [4, 1], [CONSUMER_REGS, 40])


def _positive_scale(q, scale):
    """The kernels scale inside the exponent after the row max: they want ``scale >= 0``."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return (-q, -scale) if scale < 0 else (q, scale)


def _persistent_setup(q, k, *, stride, block_q, block_k, block_c, rows_per_item, q_box_rows, scratch_rows,
                      programs, key_padding_mask=None):
    """What the three persistent kernels' launches share: the fp8 copies (the head dim padded to
    128), the key descriptor (and the query one, ``q_box_rows`` rows per box, unless 0), the sizes,
    one program per SM, the output and each program's scratch strip of ``scratch_rows`` rows."""
    from types import SimpleNamespace

    from psa_kernels.importance import quantize_qk

    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    block_d = 128
    q8, sq, k8, sk = quantize_qk(q, k, stride, key_padding_mask=key_padding_mask)
    n_rows, n_cols, nq, nk = cdiv(Lq, stride), cdiv(Lk, stride), cdiv(Lq, block_q), cdiv(Lk, block_k)
    nk_pad = cdiv(nk, 64) * 64
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    q_desc = TensorDescriptor.from_tensor(q8.view(B * Hq * n_rows, stride * block_d), [q_box_rows, block_d],
                                          layout) if q_box_rows else None
    k_desc = TensorDescriptor.from_tensor(k8.view(B * Hkv * n_cols, stride * block_d), [block_c, block_d], layout)
    n_row_tiles = cdiv(n_rows, rows_per_item)
    n_work = B * Hq * n_row_tiles
    if programs is None:
        programs = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    programs = max(1, min(programs, n_work))
    out = torch.empty(B, Hq, nq, nk, dtype=torch.float32, device=q.device)
    scratch = torch.empty(programs * scratch_rows * nk_pad, dtype=torch.float32, device=q.device)
    sizes = (Hq, Hq // Hkv, Hkv, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, n_row_tiles, n_work)
    return SimpleNamespace(q8=q8, sq=sq, sk=sk, q_desc=q_desc, k_desc=k_desc, sizes=sizes, programs=programs,
                           out=out, scratch=scratch, block_d=block_d)


def estimate_lse_ws(q, k, *, causal=True, scale=None, stride=8, block_k=128, block_c=64, nstage=12,
                    consumer_regs=232, maxnreg=168, prepared=None, epilogue=True):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    assert D == 128 and stride == 8, "experiment: D = 128, stride 8"
    q, scale = _positive_scale(q, scale)
    block_r = 64
    q_desc, k_desc, sq, sk, lse, n_rows, n_cols, nk = prepared or prepare(q, k, stride, block_k, block_r, block_c)
    grid = (cdiv(n_rows, 2 * block_r), B * Hq)
    _estimate_ws_kernel[grid](
        q_desc, k_desc, sq, sk, lse, scale / stride * _LOG2E,
        Hq, Hq // Hkv, Hkv, Lq, Lk, n_rows, n_cols, nk,
        CAUSAL=causal, S=stride, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=D, COLS_PER_BLOCK=block_k // stride,
        NSTAGE=nstage, CONSUMER_REGS=consumer_regs, EPILOGUE=epilogue, num_warps=4, maxnreg=maxnreg,
    )
    return lse


# --- the whole estimate: persistent programs, second phase in the consumers ---------------------


@gluon.jit
def _item(w, n_row_tiles, BHQ):
    """Work item ``w``: every head's longest (last) row tile before any head's next."""
    return n_row_tiles - 1 - w // BHQ, w % BHQ


@gluon.jit
def _producer_full(Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk,
                   nk_pad, n_row_tiles, n_work, q_smem, k_ring, q_bar, q_free, ready, empty,
                   CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
                   BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr):
    step = 0
    item = 0
    for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
        tile, bh = _item(w, n_row_tiles, n_work // n_row_tiles)
        b = bh // Hq
        hk = (bh % Hq) // GROUP
        rows0 = tile * 2 * BLOCK_R
        n_tiles = _geometry(rows0, 2 * BLOCK_R, Lq, Lk, n_cols, CAUSAL, S, BLOCK_C)
        key_row0 = (b * Hkv + hk) * n_cols
        mbarrier.wait(q_free.index(0), (item & 1) ^ 1)  # both consumers are done with the last item's rows
        mbarrier.expect(q_bar.index(0), 2 * S * BLOCK_R * BLOCK_D)
        for h2 in gl.static_range(2):
            for i in gl.static_range(S):
                tma.async_copy_global_to_shared(Q_DESC, [bh * n_rows + rows0 + h2 * BLOCK_R, i * BLOCK_D],
                                                q_bar.index(0), q_smem.index(h2 * S + i))
        step = _stream_keys(K_DESC, k_ring, ready, empty, key_row0, n_tiles, step, S, BLOCK_C, BLOCK_D, NSTAGE)
        item += 1


@gluon.jit
def _second_phase(strip, r0, bh, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, OUT, CAUSAL: gl.constexpr, S: gl.constexpr,
                  BLOCK_R: gl.constexpr, COLS_PER_BLOCK: gl.constexpr):
    """Rows ``[r0, r0 + BLOCK_R)``, whose per-block log-sum-exps sit at ``strip`` (``nk_pad`` apart):
    each row's log-sum-exp over its blocks, then each query block's sum of its rows' block
    probabilities, stored (as the Triton kernel's second loop)."""
    BLOCK_J: gl.constexpr = 64
    QBLOCKS: gl.constexpr = BLOCK_R // 16  # 128-token query blocks (16 strided rows)
    strip_layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
    last = (Lk - Lq) + gl.minimum((r0 + BLOCK_R - 1) * S + S - 1, Lq - 1)
    if CAUSAL:
        col_end = gl.minimum(n_cols, last // S + 1)
    else:
        col_end = n_cols
    j_end = gl.cdiv(col_end, COLS_PER_BLOCK)
    rr = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, strip_layout))
    rok = (r0 + rr) < n_rows
    m_i = gl.full([BLOCK_R], float("-inf"), gl.float32, gl.SliceLayout(1, strip_layout))
    l_i = gl.zeros([BLOCK_R], gl.float32, gl.SliceLayout(1, strip_layout))
    for j0 in range(0, j_end, BLOCK_J):
        j = j0 + gl.arange(0, BLOCK_J, layout=gl.SliceLayout(0, strip_layout))
        msk = rok[:, None] & (j < j_end)[None, :]
        lse = gl.load(strip + rr[:, None] * nk_pad + j[None, :], mask=msk, other=float("-inf"))
        m_new = gl.maximum(m_i, gl.max(lse, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * gl.exp2(m_i - m_safe) + gl.sum(gl.exp2(lse - m_safe[:, None]), 1)
        m_i = m_new
    m_safe = gl.where(m_i == float("-inf"), 0.0, m_i)
    row_lse = gl.where((l_i > 0) & rok, m_safe + gl.log2(gl.maximum(l_i, 1e-30)), float("inf"))
    out_base = OUT + bh.to(gl.int64) * nq * nk
    for j0 in range(0, nk, BLOCK_J):
        j = j0 + gl.arange(0, BLOCK_J, layout=gl.SliceLayout(0, strip_layout))
        msk = rok[:, None] & (j < j_end)[None, :]
        lse = gl.load(strip + rr[:, None] * nk_pad + j[None, :], mask=msk, other=float("-inf"))
        p = gl.where(msk, gl.exp2(lse - row_lse[:, None]), 0.0)  # never the strip's stale entries
        sums = gl.sum(gl.reshape(p, [QBLOCKS, 16, BLOCK_J]), 1)
        sl: gl.constexpr = sums.type.layout
        qb = r0 // 16 + gl.arange(0, QBLOCKS, layout=gl.SliceLayout(1, sl))
        jj = j0 + gl.arange(0, BLOCK_J, layout=gl.SliceLayout(0, sl))
        gl.store(out_base + qb[:, None] * nk + jj[None, :], sums, mask=(qb < nq)[:, None] & (jj < nk)[None, :])


@gluon.jit
def _consume_full(Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk,
                  nk_pad, n_row_tiles, n_work, q_smem, k_ring, q_bar, q_free, ready, empty,
                  CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
                  BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr, W: gl.constexpr):
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_C, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
    strip = SCR + (gl.program_id(0) * 2 + W).to(gl.int64) * BLOCK_R * nk_pad
    step = 0
    item = 0
    for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
        tile, bh = _item(w, n_row_tiles, n_work // n_row_tiles)
        b = bh // Hq
        hk = (bh % Hq) // GROUP
        rows0 = tile * 2 * BLOCK_R
        r0 = rows0 + W * BLOCK_R
        n_tiles = _geometry(rows0, 2 * BLOCK_R, Lq, Lk, n_cols, CAUSAL, S, BLOCK_C)
        n_mine = _geometry(r0, BLOCK_R, Lq, Lk, n_cols, CAUSAL, S, BLOCK_C)
        m, row_ok, row_last, first_last, row_scale = _row_setup(r0, BLOCK_R, bh, SQ, scale_log2, n_rows, Lq, Lk,
                                                                S, row_layout)
        key_row0 = (b * Hkv + hk) * n_cols
        mbarrier.wait(q_bar.index(0), item & 1)
        queries = _smem_chunks(q_smem, W * S)
        for t in range(n_tiles):
            if t < n_mine:
                col_scale = _col_scales(SK, key_row0, t, n_cols, BLOCK_C, acc_layout)
                acc = gl.zeros([BLOCK_R, BLOCK_C], gl.float32, acc_layout)
                acc = _issue_products(queries, k_ring, ready, empty, step, acc, S, NSTAGE)
                acc = _finish_products(acc, empty, step, S, NSTAGE)
                # The strip holds local rows: row m at strip + (m - r0) * nk_pad.
                _epilogue(acc, col_scale, t * BLOCK_C, m, row_ok, row_last, first_last, row_scale, strip,
                          -r0.to(gl.int64) * nk_pad, nk_pad, CAUSAL, S, BLOCK_R, BLOCK_C, COLS_PER_BLOCK, acc_layout)
            else:
                _pass_stages(ready, empty, step, S, NSTAGE)
            step += S
        mbarrier.arrive(q_free.index(0), count=1)
        gl.thread_barrier()  # the strip written above is read by other threads of this warpgroup
        _second_phase(strip, r0, bh, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, OUT, CAUSAL, S, BLOCK_R, COLS_PER_BLOCK)
        gl.thread_barrier()  # the next item overwrites the strip
        item += 1


@gluon.jit
def _importance_ws_kernel(
    Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2,
    Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, n_row_tiles, n_work,
    CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
    BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):
    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [2 * S, BLOCK_R, BLOCK_D], Q_DESC.layout)
    k_ring = gl.allocate_shared_memory(gl.float8e4nv, [NSTAGE, BLOCK_C, BLOCK_D], K_DESC.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar.index(0), count=1)
    mbarrier.init(q_free.index(0), count=2)
    for i in gl.static_range(NSTAGE):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    gl.warp_specialize([
        (_consume_full, (Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq,
                         nk, nk_pad, n_row_tiles, n_work, q_smem, k_ring, q_bar, q_free, ready, empty,
                         CAUSAL, S, BLOCK_R, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE, 0)),
        (_consume_full, (Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq,
                         nk, nk_pad, n_row_tiles, n_work, q_smem, k_ring, q_bar, q_free, ready, empty,
                         CAUSAL, S, BLOCK_R, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE, 1)),
        (_producer_full, (Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq,
                          nk, nk_pad, n_row_tiles, n_work, q_smem, k_ring, q_bar, q_free, ready, empty,
                          CAUSAL, S, BLOCK_R, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE)),
    ], [4, 1], [CONSUMER_REGS, 40])


def importance_ws(q, k, *, causal=True, scale=None, stride=8, block_q=128, block_k=128, block_c=64, nstage=10,
                  consumer_regs=232, maxnreg=168, programs=None):
    """Block importance ``[B, Hq, nq, nk]`` as ``antidiagonal_importance_triton(precision="fp8")``."""
    D = q.shape[-1]
    assert D == 128 and stride == 8 and block_q == 128, "experiment: D = 128, stride 8, 128-token query blocks"
    q, scale = _positive_scale(q, scale)
    block_r = 64
    x = _persistent_setup(q, k, stride=stride, block_q=block_q, block_k=block_k, block_c=block_c,
                          rows_per_item=2 * block_r, q_box_rows=block_r, scratch_rows=2 * block_r, programs=programs)
    _importance_ws_kernel[(x.programs,)](
        x.q_desc, x.k_desc, x.sq, x.sk, x.out, x.scratch, scale / stride * _LOG2E, *x.sizes,
        CAUSAL=causal, S=stride, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=x.block_d, COLS_PER_BLOCK=block_k // stride,
        NSTAGE=nstage, CONSUMER_REGS=consumer_regs, num_warps=4, maxnreg=maxnreg,
    )
    return x.out


# --- the whole estimate, column tiles dealt to the warpgroups in turn -----------------------------
#
# Above, both warpgroups wait on the same key stages, so they multiply together and then run their
# epilogues together while the tensor cores idle (on the GPU: products and key loads alone take
# about two thirds of the first phase). Here each column tile belongs to one warpgroup, for all
# 128 rows of the item (two m64 products per chunk): tile g of the stream to warpgroup g % 2. The
# ring hands out stages in stream order and holds fewer than two tiles, so a warpgroup's next tile
# can only start once the other's products have freed their stages. The intent was
# FlashAttention-3's ping-pong from the ring's order (each epilogue under the other warpgroup's
# products); measured, the short ring puts every tile's key loads on the critical path instead
# (module docstring). Both warpgroups then meet to run the second phase on 64 rows each of the
# item's strip.


@gluon.jit
def _producer_cols(Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk,
                   nk_pad, n_row_tiles, n_work, q_smem, k_ring, q_bar, q_free, ready, empty, meet,
                   CAUSAL: gl.constexpr, S: gl.constexpr, ROWS: gl.constexpr, BLOCK_C: gl.constexpr,
                   BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr):
    step = 0
    item = 0
    for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
        tile, bh = _item(w, n_row_tiles, n_work // n_row_tiles)
        b = bh // Hq
        hk = (bh % Hq) // GROUP
        rows0 = tile * ROWS
        n_tiles = _geometry(rows0, ROWS, Lq, Lk, n_cols, CAUSAL, S, BLOCK_C)
        key_row0 = (b * Hkv + hk) * n_cols
        mbarrier.wait(q_free.index(0), (item & 1) ^ 1)  # both consumers are done with the last item's rows
        mbarrier.expect(q_bar.index(0), S * ROWS * BLOCK_D)
        for i in gl.static_range(S):
            tma.async_copy_global_to_shared(Q_DESC, [bh * n_rows + rows0, i * BLOCK_D], q_bar.index(0),
                                            q_smem.index(i))
        step = _stream_keys(K_DESC, k_ring, ready, empty, key_row0, n_tiles, step, S, BLOCK_C, BLOCK_D, NSTAGE)
        item += 1


@gluon.jit
def _consume_cols(Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk,
                  nk_pad, n_row_tiles, n_work, q_smem, k_ring, q_bar, q_free, ready, empty, meet,
                  CAUSAL: gl.constexpr, S: gl.constexpr, ROWS: gl.constexpr, BLOCK_C: gl.constexpr,
                  BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr, W: gl.constexpr):
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_C, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
    HALF: gl.constexpr = ROWS // 2
    strip = SCR + gl.program_id(0).to(gl.int64) * ROWS * nk_pad  # the program's, shared by both warpgroups
    step = 0
    dealt = 0  # column tiles of earlier items: the stream's tile g goes to warpgroup g % 2
    item = 0
    for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
        tile, bh = _item(w, n_row_tiles, n_work // n_row_tiles)
        b = bh // Hq
        hk = (bh % Hq) // GROUP
        rows0 = tile * ROWS
        n_tiles = _geometry(rows0, ROWS, Lq, Lk, n_cols, CAUSAL, S, BLOCK_C)
        m, row_ok, row_last, first_last, row_scale = _row_setup(rows0, ROWS, bh, SQ, scale_log2, n_rows, Lq, Lk,
                                                                S, row_layout)
        key_row0 = (b * Hkv + hk) * n_cols
        mbarrier.wait(q_bar.index(0), item & 1)
        queries = _smem_chunks(q_smem, 0)
        for t in range((dealt + W) % 2, n_tiles, 2):
            st = step + t * S
            col_scale = _col_scales(SK, key_row0, t, n_cols, BLOCK_C, acc_layout)
            acc = gl.zeros([ROWS, BLOCK_C], gl.float32, acc_layout)
            acc = _issue_products(queries, k_ring, ready, empty, st, acc, S, NSTAGE)
            acc = _finish_products(acc, empty, st, S, NSTAGE)
            _epilogue(acc, col_scale, t * BLOCK_C, m, row_ok, row_last, first_last, row_scale, strip,
                      -rows0.to(gl.int64) * nk_pad, nk_pad, CAUSAL, S, ROWS, BLOCK_C, COLS_PER_BLOCK, acc_layout)
        step += n_tiles * S
        dealt += n_tiles
        mbarrier.arrive(q_free.index(0), count=1)
        # Both warpgroups' tiles are in the strip: meet, run the second phase on half the rows each,
        # meet again before the next item's epilogues overwrite the strip.
        gl.thread_barrier()
        mbarrier.arrive(meet.index(0), count=1)
        mbarrier.wait(meet.index(0), 0)
        _second_phase(strip + W * HALF * nk_pad, rows0 + W * HALF, bh, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, OUT,
                      CAUSAL, S, HALF, COLS_PER_BLOCK)
        gl.thread_barrier()
        mbarrier.arrive(meet.index(0), count=1)
        mbarrier.wait(meet.index(0), 1)
        item += 1


@gluon.jit
def _importance_cols_kernel(
    Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2,
    Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, n_row_tiles, n_work,
    CAUSAL: gl.constexpr, S: gl.constexpr, ROWS: gl.constexpr, BLOCK_C: gl.constexpr,
    BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [S, ROWS, BLOCK_D], Q_DESC.layout)
    k_ring = gl.allocate_shared_memory(gl.float8e4nv, [NSTAGE, BLOCK_C, BLOCK_D], K_DESC.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    meet = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar.index(0), count=1)
    mbarrier.init(q_free.index(0), count=2)
    mbarrier.init(meet.index(0), count=2)
    for i in gl.static_range(NSTAGE):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)  # each stage belongs to one warpgroup's tile
    gl.warp_specialize([
        (_consume_cols, (Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq,
                         nk, nk_pad, n_row_tiles, n_work, q_smem, k_ring, q_bar, q_free, ready, empty, meet,
                         CAUSAL, S, ROWS, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE, 0)),
        (_consume_cols, (Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq,
                         nk, nk_pad, n_row_tiles, n_work, q_smem, k_ring, q_bar, q_free, ready, empty, meet,
                         CAUSAL, S, ROWS, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE, 1)),
        (_producer_cols, (Q_DESC, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq,
                          nk, nk_pad, n_row_tiles, n_work, q_smem, k_ring, q_bar, q_free, ready, empty, meet,
                          CAUSAL, S, ROWS, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def importance_cols(q, k, *, causal=True, scale=None, stride=8, block_q=128, block_k=128, block_c=64, nstage=10,
                    consumer_regs=232, producer_regs=40, maxnreg=168, programs=None):
    """As ``importance_ws``, with column tiles dealt to the warpgroups in turn."""
    D = q.shape[-1]
    assert D == 128 and stride == 8 and block_q == 128, "experiment: D = 128, stride 8, 128-token query blocks"
    q, scale = _positive_scale(q, scale)
    rows = 128
    x = _persistent_setup(q, k, stride=stride, block_q=block_q, block_k=block_k, block_c=block_c,
                          rows_per_item=rows, q_box_rows=rows, scratch_rows=rows, programs=programs)
    _importance_cols_kernel[(x.programs,)](
        x.q_desc, x.k_desc, x.sq, x.sk, x.out, x.scratch, scale / stride * _LOG2E, *x.sizes,
        CAUSAL=causal, S=stride, ROWS=rows, BLOCK_C=block_c, BLOCK_D=x.block_d, COLS_PER_BLOCK=block_k // stride,
        NSTAGE=nstage, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, num_warps=4, maxnreg=maxnreg,
    )
    return x.out


# --- the whole estimate, queries in registers, warpgroups in ping-pong ----------------------------
#
# Both forms above keep the 128 KB of queries in shared memory, which leaves room for 1.25 column
# tiles of keys. Here each consumer warpgroup holds its 64 rows' fp8 queries in registers (the
# A operand of its products: 64 x 1,024 bytes = 128 registers per thread) and shared memory is all
# key ring (24 stages of 64 keys: three column tiles). The warpgroups take turns on the tensor
# cores (a "turn" mbarrier each): warpgroup 0 issues a tile's eight products, hands the turn over,
# runs that tile's epilogue while warpgroup 1's products of the same tile run, waits for its turn,
# and so on (FlashAttention-3's ping-pong). A stage is freed when both have read it.


@gluon.jit
def _producer_qreg(Q8, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk,
                   nk_pad, n_row_tiles, n_work, k_ring, ready, empty, turn,
                   CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
                   BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr, FLAGS: gl.constexpr):
    step = 0
    for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
        tile, bh = _item(w, n_row_tiles, n_work // n_row_tiles)
        b = bh // Hq
        hk = (bh % Hq) // GROUP
        n_tiles = _geometry(tile * 2 * BLOCK_R, 2 * BLOCK_R, Lq, Lk, n_cols, CAUSAL, S, BLOCK_C)
        key_row0 = (b * Hkv + hk) * n_cols
        step = _stream_keys(K_DESC, k_ring, ready, empty, key_row0, n_tiles, step, S, BLOCK_C, BLOCK_D, NSTAGE)


@gluon.jit
def _query_chunk(Q8, row_off, cols, i: gl.constexpr, BLOCK_D: gl.constexpr):
    return gl.load(Q8 + row_off[:, None] + (i * BLOCK_D + cols)[None, :])


@gluon.jit
def _consume_qreg(Q8, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk,
                  nk_pad, n_row_tiles, n_work, k_ring, ready, empty, turn,
                  CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
                  BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr, FLAGS: gl.constexpr,
                  W: gl.constexpr):
    # FLAGS (diagnostics): bit 0 runs the epilogue, bit 1 the ping-pong turns (production: 3).
    EPILOGUE: gl.constexpr = (FLAGS & 1) != 0
    PINGPONG: gl.constexpr = (FLAGS & 2) != 0
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_C, 32])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=4)
    row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
    strip = SCR + (gl.program_id(0) * 2 + W).to(gl.int64) * BLOCK_R * nk_pad
    step = 0
    g = 0  # column tiles so far: the turn barriers' phase
    for w in range(gl.program_id(0), n_work, gl.num_programs(0)):
        tile, bh = _item(w, n_row_tiles, n_work // n_row_tiles)
        b = bh // Hq
        hk = (bh % Hq) // GROUP
        rows0 = tile * 2 * BLOCK_R
        r0 = rows0 + W * BLOCK_R
        n_tiles = _geometry(rows0, 2 * BLOCK_R, Lq, Lk, n_cols, CAUSAL, S, BLOCK_C)
        n_mine = _geometry(r0, BLOCK_R, Lq, Lk, n_cols, CAUSAL, S, BLOCK_C)
        m, row_ok, row_last, first_last, row_scale = _row_setup(r0, BLOCK_R, bh, SQ, scale_log2, n_rows, Lq, Lk,
                                                                S, row_layout)
        key_row0 = (b * Hkv + hk) * n_cols
        # This warpgroup's rows of the fp8 queries, as the products' A operand (rows past the end
        # read the last row: their results are never stored).
        qr = gl.minimum(r0 + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, a_layout)), n_rows - 1)
        row_off = (bh * n_rows + qr).to(gl.int64) * (S * BLOCK_D)
        qc = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, a_layout))
        a0 = _query_chunk(Q8, row_off, qc, 0, BLOCK_D)
        a1 = _query_chunk(Q8, row_off, qc, 1, BLOCK_D)
        a2 = _query_chunk(Q8, row_off, qc, 2, BLOCK_D)
        a3 = _query_chunk(Q8, row_off, qc, 3, BLOCK_D)
        a4 = _query_chunk(Q8, row_off, qc, 4, BLOCK_D)
        a5 = _query_chunk(Q8, row_off, qc, 5, BLOCK_D)
        a6 = _query_chunk(Q8, row_off, qc, 6, BLOCK_D)
        a7 = _query_chunk(Q8, row_off, qc, 7, BLOCK_D)
        queries = (a0, a1, a2, a3, a4, a5, a6, a7)
        for t in range(n_tiles):
            # Warpgroup 0 goes first (a fresh barrier passes a wait on parity 1).
            if PINGPONG:
                mbarrier.wait(turn.index(W), (g & 1) ^ (1 - W))
            if t < n_mine:
                col_scale = _col_scales(SK, key_row0, t, n_cols, BLOCK_C, acc_layout)
                acc = gl.zeros([BLOCK_R, BLOCK_C], gl.float32, acc_layout)
                acc = _issue_products(queries, k_ring, ready, empty, step, acc, S, NSTAGE)
                if PINGPONG:  # the last product is issued: the other's turn
                    mbarrier.arrive(turn.index(1 - W), count=1)
                acc = _finish_products(acc, empty, step, S, NSTAGE)
                if EPILOGUE:
                    _epilogue(acc, col_scale, t * BLOCK_C, m, row_ok, row_last, first_last, row_scale, strip,
                              -r0.to(gl.int64) * nk_pad, nk_pad, CAUSAL, S, BLOCK_R, BLOCK_C, COLS_PER_BLOCK,
                              acc_layout)
                else:  # products only: one sum keeps them alive
                    gl.store(strip + (m - r0).to(gl.int64) * nk_pad + t, gl.sum(acc, 1), mask=row_ok)
            else:  # a tile only the other warpgroup's rows see
                if PINGPONG:
                    mbarrier.arrive(turn.index(1 - W), count=1)
                _pass_stages(ready, empty, step, S, NSTAGE)
            step += S
            g += 1
        gl.thread_barrier()  # the strip written above is read by other threads of this warpgroup
        _second_phase(strip, r0, bh, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, OUT, CAUSAL, S, BLOCK_R, COLS_PER_BLOCK)
        gl.thread_barrier()  # the next item overwrites the strip


@gluon.jit
def _importance_qreg_kernel(
    Q8, K_DESC, SQ, SK, OUT, SCR, scale_log2,
    Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, n_row_tiles, n_work,
    CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
    BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NSTAGE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    FLAGS: gl.constexpr,
):
    k_ring = gl.allocate_shared_memory(gl.float8e4nv, [NSTAGE, BLOCK_C, BLOCK_D], K_DESC.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NSTAGE):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both warpgroups read every stage
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    gl.warp_specialize([
        (_consume_qreg, (Q8, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk,
                         nk_pad, n_row_tiles, n_work, k_ring, ready, empty, turn,
                         CAUSAL, S, BLOCK_R, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE, FLAGS, 0)),
        (_consume_qreg, (Q8, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk,
                         nk_pad, n_row_tiles, n_work, k_ring, ready, empty, turn,
                         CAUSAL, S, BLOCK_R, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE, FLAGS, 1)),
        (_producer_qreg, (Q8, K_DESC, SQ, SK, OUT, SCR, scale_log2, Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nq, nk,
                          nk_pad, n_row_tiles, n_work, k_ring, ready, empty, turn,
                          CAUSAL, S, BLOCK_R, BLOCK_C, BLOCK_D, COLS_PER_BLOCK, NSTAGE, FLAGS)),
    ], [4, 1], [CONSUMER_REGS, 40])


def importance_qreg(q, k, *, causal=True, scale=None, stride=8, block_q=128, block_k=128, block_c=64, nstage=24,
                    consumer_regs=232, maxnreg=168, programs=None, key_padding_mask=None, flags=3):
    """As ``importance_ws``, the queries in registers and the warpgroups in ping-pong; any head
    dim up to 128 (the fp8 copies pad it to 128) and key padding (zero key scales)."""
    D = q.shape[-1]
    assert 64 < D <= 128 and stride == 8 and block_q == 128 and block_k == 128, \
        "experiment: head dim 65-128, stride 8, 128-token blocks"
    q, scale = _positive_scale(q, scale)
    block_r = 64
    x = _persistent_setup(q, k, stride=stride, block_q=block_q, block_k=block_k, block_c=block_c,
                          rows_per_item=2 * block_r, q_box_rows=0, scratch_rows=2 * block_r, programs=programs,
                          key_padding_mask=key_padding_mask)
    _importance_qreg_kernel[(x.programs,)](
        x.q8, x.k_desc, x.sq, x.sk, x.out, x.scratch, scale / stride * _LOG2E, *x.sizes,
        CAUSAL=causal, S=stride, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=x.block_d, COLS_PER_BLOCK=block_k // stride,
        NSTAGE=nstage, CONSUMER_REGS=consumer_regs, FLAGS=flags, num_warps=4, maxnreg=maxnreg,
    )
    return x.out

VARIANTS = [  # (label, block_c, stages of the first-phase kernel, stages of the whole kernel, consumer
    # registers, maxnreg). The queries take 128 KB of the 227 KB; the whole kernel's second phase
    # another 8 KB for its reduction. Per 64 x N x 128 product a warpgroup reads 8 KB of queries and
    # N x 128 B of keys from shared memory: with N = 64 the two warpgroups plus the TMA writes ask
    # about 160 B per clock at the tensor cores' fp8 rate (over the 128 B/clock shared memory gives),
    # with N = 128 about 128.
    ("C64", 64, 10, 10, 232, 168),
    ("C128", 128, 6, 5, 232, 168),
]
COL_VARIANTS = [  # (label, block_c, stages): the column-dealt kernel (whole estimate only)
    # Nine warps launch as twelve (384 threads), so the launch's register cap stays 168; offline
    # the first consumer spills 356 bytes there (loop-invariant 64-bit shared-memory descriptors,
    # reloaded once per chunk), the same at a cap of 224.
    ("cols C64 ring 10", 64, 10),
    ("cols C64 ring 11", 64, 11),
    ("cols C32 ring 20", 32, 20),
]
QREG_VARIANTS = [  # (label, block_c, stages): queries in registers, all of shared memory key ring
    ("qreg C64 ring 24", 64, 24),
    ("qreg C32 ring 48", 32, 48),
]
QREG_DIAGNOSTICS = [  # (label, flags): the C64 form without its ping-pong, without its epilogue (wrong numbers)
    ("qreg C64 no ping-pong", 1),
    ("qreg C64 products only", 2),
    ("qreg C64 products only, no ping-pong", 0),
]


def check_qreg():
    """importance_qreg against the Triton kernel (fp8, same quantisation) on awkward shapes."""
    from psa_kernels.importance import antidiagonal_importance_triton

    cases = [  # (B, Hq, Hkv, Lq, Lk, D, causal, left padding of the second sample)
        (1, 28, 4, 3000, 3000, 128, True, 0),
        (2, 28, 4, 2500, 2500, 80, True, 700),
        (1, 7, 1, 1000, 5000, 128, True, 0),
        (2, 14, 2, 2048, 2048, 128, False, 300),
        (1, 28, 4, 130, 130, 128, True, 0),
    ]
    for B, Hq, Hkv, Lq, Lk, D, causal, pad in cases:
        q = torch.randn(B, Hq, Lq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, Lk, D, device="cuda", dtype=torch.bfloat16)
        mask = None
        if pad:
            mask = torch.ones(B, Lk, dtype=torch.bool, device="cuda")
            mask[1, :pad] = False
        want = antidiagonal_importance_triton(q, k, causal=causal, precision="fp8", key_padding_mask=mask)
        got = importance_qreg(q, k, causal=causal, key_padding_mask=mask)
        torch.cuda.synchronize()
        err = ((got - want).norm() / want.norm()).item()
        worst = (got - want).abs().max().item()
        print(f"check B {B} heads {Hq}/{Hkv} Lq {Lq} Lk {Lk} D {D} causal {causal} pad {pad}: rel err {err:.1e} "
              f"max abs {worst:.1e} nan {bool(got.isnan().any())} {'OK' if worst < 1e-5 else 'MISMATCH'}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768,65536")
    parser.add_argument("--offline", action="store_true", help="compile for sm_90 without a GPU and report")
    parser.add_argument("--check", action="store_true", help="compare importance_qreg with the Triton kernel on "
                        "awkward shapes (GQA 7, head dim 80, Lq < Lk, batch 2 with left padding, odd lengths, "
                        "bidirectional) before timing")
    parser.add_argument("--kernels", default="rows,cols,qreg", help="which forms to time: rows (shared key "
                        "stages), cols (column tiles dealt in turn), qreg (queries in registers, ping-pong), "
                        "diag (qreg without its ping-pong or epilogue)")
    args = parser.parse_args(argv)
    if args.offline:
        from benchmarks.offline_compile import compile_and_report

        q = torch.randn(1, 28, 4096, 128, dtype=torch.bfloat16)
        k = torch.randn(1, 4, 4096, 128, dtype=torch.bfloat16)
        for label, block_c, nstage, nstage_whole, regs, maxnreg in VARIANTS:
            def both(block_c=block_c, nstage=nstage, nstage_whole=nstage_whole, regs=regs, maxnreg=maxnreg):
                estimate_lse_ws(q, k, block_c=block_c, nstage=nstage, consumer_regs=regs, maxnreg=maxnreg)
                importance_ws(q, k, block_c=block_c, nstage=nstage_whole, consumer_regs=regs, maxnreg=maxnreg)

            compile_and_report(label, both, Path("/tmp/gluon_ws"), keep=lambda name: "ws" in name)
        for label, block_c, nstage, whole in [(*v, importance_cols) for v in COL_VARIANTS] + \
                [(*v, importance_qreg) for v in QREG_VARIANTS]:
            compile_and_report(label, lambda whole=whole, block_c=block_c, nstage=nstage: whole(
                q, k, block_c=block_c, nstage=nstage), Path("/tmp/gluon_ws"),
                keep=lambda name: "cols" in name or "qreg" in name)
        return 0
    from triton.testing import do_bench

    from psa_kernels.importance import antidiagonal_importance_triton, quantize_qk

    def bench(f):
        return do_bench(f, warmup=10, rep=50, return_mode="median")

    if args.check:
        check_qreg()

    for L in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, 28, L, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 4, L, 128, device="cuda", dtype=torch.bfloat16)
        want = antidiagonal_importance_triton(q, k, causal=True, precision="fp8")
        t_triton = bench(lambda q=q, k=k: antidiagonal_importance_triton(q, k, causal=True, precision="fp8"))
        t_quant = bench(lambda q=q, k=k: quantize_qk(q, k, 8))
        print(f"L {L}: triton (quantise + both phases) {t_triton:.3f} ms, quantise {t_quant:.3f}", flush=True)
        for label, block_c, nstage, nstage_whole, regs, maxnreg in VARIANTS if "rows" in args.kernels else []:
            kw = {"block_c": block_c, "nstage": nstage, "consumer_regs": regs, "maxnreg": maxnreg}
            got = importance_from_lse(estimate_lse_ws(q, k, **kw), 1, 28, L)
            torch.cuda.synchronize()
            err = ((got - want).norm() / want.norm()).item()
            prepared = prepare(q, k, block_c=block_c)
            t = bench(lambda q=q, k=k, kw=kw, p=prepared: estimate_lse_ws(q, k, prepared=p, **kw))
            t_bare = bench(lambda q=q, k=k, kw=kw, p=prepared: estimate_lse_ws(q, k, prepared=p, epilogue=False, **kw))
            print(f"  {label:6s} phase-1 kernel {t:.3f} ms  rel err {err:.2e}; products and key loads only "
                  f"{t_bare:.3f} ms", flush=True)
            kw["nstage"] = nstage_whole
            full = importance_ws(q, k, **kw)
            torch.cuda.synchronize()
            err = ((full - want).norm() / want.norm()).item()
            worst = (full - want).abs().max().item()
            t = bench(lambda q=q, k=k, kw=kw: importance_ws(q, k, **kw))
            print(f"  {label:6s} WHOLE (quantise + both phases) {t:.3f} ms  rel err {err:.2e}  max abs {worst:.1e}"
                  f"  nan {bool(full.isnan().any())}", flush=True)
        forms = [(label, c, n, importance_cols) for label, c, n in COL_VARIANTS if "cols" in args.kernels]
        forms += [(label, c, n, importance_qreg) for label, c, n in QREG_VARIANTS if "qreg" in args.kernels]
        for label, block_c, nstage, whole in forms:
            kw = {"block_c": block_c, "nstage": nstage}
            full = whole(q, k, **kw)
            torch.cuda.synchronize()
            err = ((full - want).norm() / want.norm()).item()
            worst = (full - want).abs().max().item()
            t = bench(lambda q=q, k=k, kw=kw, whole=whole: whole(q, k, **kw))
            print(f"  {label:18s} WHOLE (quantise + both phases) {t:.3f} ms  rel err {err:.2e}  max abs {worst:.1e}"
                  f"  nan {bool(full.isnan().any())}", flush=True)
        for label, flags in QREG_DIAGNOSTICS if "diag" in args.kernels else []:
            t = bench(lambda q=q, k=k, flags=flags: importance_qreg(q, k, flags=flags))
            print(f"  {label:36s} {t:.3f} ms (quantise + kernel)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
