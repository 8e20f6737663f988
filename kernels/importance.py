"""Antidiagonal block importance in Triton: one pass of logit work, no ``(L/s)^2`` score matrix.

Computes exactly :func:`psa_kernels.reference.antidiagonal_importance`: for strided query row
``m`` and strided key column ``n`` the logit is the mean of the ``s`` antidiagonal products of the
``s x s`` tile, ``scale / s * sum_i q[m*s + i] . k[n*s + s-1-i]``; each row is softmaxed over its
visible columns and the probabilities are summed per (query block, key block).

The logits of a tile of ``BLOCK_R`` strided rows (several query blocks: the tensor cores get
M = 64/128) and ``BLOCK_C`` strided columns are ``s`` matrix products over the head dimension.
The softmax needs each row's total before any probability is final, so instead of sweeping the
columns twice, one sweep writes, per row and key block, the block's own log-sum-exp
``lse[r, j]`` (base 2) to a scratch strip; two cheap loops over the strip then give each row's
total ``lse[r]`` and add ``2^(lse[r, j] - lse[r])`` per query block. The kernel is persistent
(one program per slot, looping over row tiles) so the scratch is ``slots x BLOCK_R x nk`` floats
(tens of MB at 64k tokens), not ``(L/s) x nk`` per head.

Two ways to feed the products:

- ``full`` precision: the strided rows are gathered from Q and K with pointer loads.
- ``fp8``: :func:`quantize_qk` first writes fp8 (e4m3) copies laid out for this kernel (both
  in one launch): row ``m`` of the query copy holds the ``s`` queries of group ``m`` in reverse order, row ``n`` of
  the key copy the ``s`` keys of group ``n`` (padded ones zeroed), each token padded to
  ``BLOCK_D`` values, with one power-of-two scale per row (:func:`reference.quantize_fp8_rows`).
  Product ``i`` of a tile is then chunk ``i`` of both rows: contiguous tiles the tensor-memory
  accelerator loads, half the bytes of bf16 at twice the tensor-core rate. The estimate is
  bound by the bytes each tile moves (its products have a contraction of ``s * D`` but only
  ``BLOCK_R x BLOCK_C`` outputs), so halving the bytes is what pays.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (cdiv, check_kv_chunk, descriptor, dot_in_fp32, int8_view, interpreting, launch_kernel, next_pow2,
                    on_device, sm_count)

_LOG2E = 1.4426950408889634


@triton.jit
def _exp2_int(e):
    """``2.0 ** e`` for int32 ``e`` in [-126, 127], exactly (built from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _floor_log2(a):
    """``floor(log2(a))`` of positive normal fp32 values (the exponent field)."""
    return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _round_to_e4m3(y):
    """``y`` (|y| <= 448) rounded to the nearest e4m3 value, ties to even, in fp32 arithmetic that
    is exact: the final cast to fp8 then has nothing to round (Triton's interpreter rounds fp8
    casts wrongly when the mantissa carries into the exponent)."""
    e = tl.maximum(_floor_log2(tl.abs(y)), -6)  # subnormals below 2^-6 share the spacing 2^-9
    z = y * _exp2_int(3 - e)  # three mantissa bits: multiples of 2^(e-3)
    f = tl.floor(z)
    d = z - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return (f + tl.where(up, 1.0, 0.0)) * _exp2_int(e - 3)


@triton.jit
def _quantize_tile(
    X, PAD, OUT, SCALE, stride_xb, stride_xh, stride_xn, bh, H, L, n_groups, pid,
    S: tl.constexpr, REVERSE: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUPS: tl.constexpr, EMULATE_FP8: tl.constexpr,
):
    """``GROUPS`` groups of ``S`` tokens of row ``bh`` (= b * H + h) of ``X`` to fp8, one scale each."""
    b = bh // H
    h = bh % H
    g = pid * GROUPS + tl.arange(0, GROUPS)
    slot = tl.arange(0, S)
    d = tl.arange(0, BLOCK_D)
    if REVERSE:
        token = g[:, None] * S + (S - 1 - slot)[None, :]
    else:
        token = g[:, None] * S + slot[None, :]
    ok = (token < L) & (g < n_groups)[:, None]
    if HAS_PAD:
        ok = ok & (tl.load(PAD + b * L + token, mask=ok, other=0) != 0)
    x = tl.load(X + b * stride_xb + h * stride_xh + token[:, :, None] * stride_xn + d[None, None, :],
                mask=ok[:, :, None] & (d < HEAD_DIM)[None, None, :], other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), 2), 1)
    tiny = amax < 7.888609052210118e-31  # 2^-100
    safe = tl.where(tiny, 1.0, amax)
    mant = safe.to(tl.int32, bitcast=True) & 0x7FFFFF
    ceil_log2 = _floor_log2(safe) + tl.where(mant != 0, 1, 0)
    inv = tl.where(tiny, 0.0, _exp2_int(8 - ceil_log2))
    scale = tl.where(tiny, 1.0, _exp2_int(ceil_log2 - 8))
    if EMULATE_FP8:  # the interpreter's own fp8 cast rounds wrongly (see _round_to_e4m3)
        y = _round_to_e4m3(x * inv[:, None, None])
    else:  # the GPU's conversion (cvt.rn.satfinite): nearest, ties to even, as the reference
        y = x * inv[:, None, None]
    row = bh * n_groups + g
    dst = OUT + row.to(tl.int64)[:, None, None] * (S * BLOCK_D) + slot[None, :, None] * BLOCK_D + d[None, None, :]
    tl.store(dst, y.to(OUT.dtype.element_ty), mask=(g < n_groups)[:, None, None])
    # A group with no real token (all padding) gets scale 0: the estimate skips such columns.
    any_real = tl.max(ok.to(tl.int32), 1) > 0
    tl.store(SCALE + row, tl.where(any_real, scale, 0.0), mask=g < n_groups)


@triton.jit
def _quantize_kernel(
    Q, K, PAD, QOUT, KOUT, QSCALE, KSCALE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    q_rows, Hq, Hkv, Lq, Lk, nq_groups, nk_groups,
    S: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUPS: tl.constexpr, EMULATE_FP8: tl.constexpr,
):
    # Queries (reversed groups) and keys (padding applied) in one launch: the grid's second axis
    # holds the ``q_rows`` (batch, query head) rows first, then the (batch, kv head) rows. The
    # launch, not the bytes, is what a short call pays for (about 50 us of host time each).
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    if bh < q_rows:
        _quantize_tile(Q, PAD, QOUT, QSCALE, stride_qb, stride_qh, stride_qn, bh, Hq, Lq, nq_groups, pid,
                       S, True, False, HEAD_DIM, BLOCK_D, GROUPS, EMULATE_FP8)
    else:
        _quantize_tile(K, PAD, KOUT, KSCALE, stride_kb, stride_kh, stride_kn, bh - q_rows, Hkv, Lk, nk_groups, pid,
                       S, False, HAS_PAD, HEAD_DIM, BLOCK_D, GROUPS, EMULATE_FP8)


def _fp8_copy(x: torch.Tensor, stride: int, block_d: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Empty fp8 copy ``[B, H, ceil(L/s), s * block_d]`` and scales ``[B, H, ceil(L/s)]`` for ``x``."""
    B, H, L, _ = x.shape
    n = cdiv(L, stride)
    out = torch.empty(B, H, n, stride * block_d, dtype=torch.float8_e4m3fn, device=x.device)
    return out, torch.empty(B, H, n, dtype=torch.float32, device=x.device), n


def quantize_qk(q: torch.Tensor | None, k: torch.Tensor | None, stride: int, *,
                key_padding_mask: torch.Tensor | None = None):
    """The estimate's fp8 copies of ``q`` (groups reversed) and ``k`` (padded keys zeroed) in one
    launch: ``(q8, q_scales, k8, k_scales)``, each copy ``[B, H, ceil(L/s), s * BLOCK_D]`` e4m3 with
    one power-of-two scale per group (``[B, H, ceil(L/s)]``; 0 marks a key group with no real
    token). Either input may be None (its outputs are then None)."""
    x = q if q is not None else k
    D = x.shape[-1]
    block_d = max(16, next_pow2(D))
    q = q if q is None or q.stride(-1) == 1 else q.contiguous()
    k = k if k is None or k.stride(-1) == 1 else k.contiguous()
    q8, sq, nq = _fp8_copy(q, stride, block_d) if q is not None else (None, None, 0)
    k8, sk, nk = _fp8_copy(k, stride, block_d) if k is not None else (None, None, 0)
    q_rows = q.shape[0] * q.shape[1] if q is not None else 0
    k_rows = k.shape[0] * k.shape[1] if k is not None else 0
    groups = max(1, 4096 // (stride * block_d) * 4)
    pad = int8_view(key_padding_mask) if key_padding_mask is not None and k is not None else None
    # An absent side is given the other side's tensors as placeholders: the grid has no row for it.
    qa = (q, q8, sq) if q is not None else (k, k8, sk)
    ka = (k, k8, sk) if k is not None else qa
    launch_kernel(_quantize_kernel, (cdiv(max(nq, nk), groups), q_rows + k_rows),
        qa[0], ka[0], pad if pad is not None else qa[2], qa[1], ka[1], qa[2], ka[2],
        qa[0].stride(0), qa[0].stride(1), qa[0].stride(2), ka[0].stride(0), ka[0].stride(1), ka[0].stride(2),
        q_rows, qa[0].shape[1], ka[0].shape[1], qa[0].shape[2], ka[0].shape[2], nq, nk,
        S=stride, HAS_PAD=pad is not None, HEAD_DIM=D, BLOCK_D=block_d, GROUPS=groups,
        EMULATE_FP8=interpreting(), num_warps=4,
    )
    return q8, sq, k8, sk


def quantize_groups(x: torch.Tensor, stride: int, *, reverse: bool,
                    key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One side of :func:`quantize_qk`: ``x`` as the queries (``reverse``) or as the keys."""
    if reverse:
        if key_padding_mask is not None:
            raise ValueError("quantize_groups: a key_padding_mask applies to keys (reverse=False), not queries")
        q8, sq, _, _ = quantize_qk(x, None, stride)
        return q8, sq
    _, _, k8, sk = quantize_qk(None, x, stride, key_padding_mask=key_padding_mask)
    return k8, sk


@triton.jit
def _antidiagonal_kernel(
    Q, K, PAD, OUT, SCR, Q_DESC, K_DESC, SQ, SK,
    scale_log2,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_om,
    Hq, Hkv, GROUP, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, n_row_tiles, n_work, KV_CHUNK,
    S: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWS_PER_QBLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, COLS_PER_BLOCK: tl.constexpr,
    BLOCK_J: tl.constexpr, PREPPED: tl.constexpr, DOT_FP32: tl.constexpr,
):
    QBLOCKS: tl.constexpr = BLOCK_R // ROWS_PER_QBLOCK  # query blocks per row tile
    KBLOCKS: tl.constexpr = BLOCK_C // COLS_PER_BLOCK  # key blocks per column tile
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    r = tl.arange(0, BLOCK_R)
    scr_rows = SCR + tl.program_id(0) * BLOCK_R * nk_pad + r[:, None] * nk_pad
    # Work items in chunks of KV_CHUNK (batch, kv head) pairs, one chunk after another; inside a
    # chunk, in order of length across its query heads (every head's last row tile, the longest
    # when causal, before any head's next). The default chunk holds every pair: one kv head at a
    # time keeps the keys the programs share in L2 (at 64k every head's keys and the programs'
    # query tiles overflow it: ncu read 58% L2 hits), but it was no faster at 64k and slower at
    # 16k-32k (benchmarks/results/tune_importance_h200_lean/).
    chunk_heads = KV_CHUNK * GROUP  # query heads per chunk
    per_chunk = chunk_heads * n_row_tiles
    # Dealt in rounds of one item per program, every other round in reverse program order: the
    # program with the longest item of a round gets the shortest of the next (round-robin in one
    # direction left some programs two long items at 8k, where a program gets one or two).
    programs = tl.num_programs(0)
    for base in range(0, n_work, programs):
        if (base // programs) % 2 == 0:
            work = base + tl.program_id(0)
        else:
            work = base + programs - 1 - tl.program_id(0)
        if work < n_work:
            r_work = work % per_chunk
            bh = (work // per_chunk) * chunk_heads + r_work % chunk_heads  # b * Hq + h
            tile = n_row_tiles - 1 - r_work // chunk_heads
            b = bh // Hq
            h = bh % Hq
            hk = h // GROUP
            m = tile * BLOCK_R + r  # strided rows
            row_ok = m < n_rows
            # Last query position (absolute, bottom-right aligned) of each strided row.
            row_last = (Lk - Lq) + tl.minimum(m * S + S - 1, Lq - 1)
            if CAUSAL:
                col_end = tl.minimum(n_cols, tl.max(tl.where(row_ok, row_last, 0), 0) // S + 1)
            else:
                col_end = n_cols
            q_rows = Q + b * stride_qb + h * stride_qh + offs_d[None, :]
            k_rows = K + b * stride_kb + hk * stride_kh + offs_d[None, :]

            if PREPPED:
                # Per-row scale (> 0; 0 only on rows past the end, which phase two ignores), applied
                # inside the exponent: max_c(rs * t) = rs * max_c(t) for rs >= 0.
                row_scale = tl.load(SQ + bh * n_rows + m, mask=row_ok, other=0.0) * scale_log2
            else:
                row_scale = tl.full([BLOCK_R], scale_log2, dtype=tl.float32)
            row_scale = tl.maximum(row_scale, 1e-30)  # -inf * 0 would be NaN (scale 0: uniform rows)
            # First strided row's last position: the tile's smallest, so a column tile before it is
            # visible to every row (no causal mask needed).
            first_last = (Lk - Lq) + tl.minimum(tile * BLOCK_R * S + S - 1, Lq - 1)

            logits = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            col_ok = tl.zeros([BLOCK_C], dtype=tl.int1)
            n_steps = tl.cdiv(col_end, BLOCK_C) * S
            for step in range(0, n_steps):
                # One flat loop over (column tile, antidiagonal offset i): the loads stay pipelined
                # across column tiles (a loop over i nested in a loop over tiles restarts every tile).
                i = step % S
                c0 = (step // S) * BLOCK_C
                cols = c0 + tl.arange(0, BLOCK_C)
                if PREPPED:
                    # Chunk i of query row m is q[m*s + s-1-i], of key row n is k[n*s + i].
                    qt = Q_DESC.load([b, h, tile * BLOCK_R, i * BLOCK_D]).reshape(BLOCK_R, BLOCK_D)
                    kt = K_DESC.load([b, hk, c0, i * BLOCK_D]).reshape(BLOCK_C, BLOCK_D)
                else:
                    qpos = m * S + i
                    qt = tl.load(q_rows + qpos[:, None] * stride_qm, mask=(qpos < Lq)[:, None] & d_ok[None, :],
                                 other=0.0)
                    kpos = cols * S + (S - 1 - i)
                    k_ok = kpos < Lk
                    if HAS_PAD:
                        k_ok = k_ok & (tl.load(PAD + b * Lk + kpos, mask=k_ok, other=0) != 0)
                    col_ok = col_ok | k_ok
                    kt = tl.load(k_rows + kpos[:, None] * stride_kn, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                if DOT_FP32:
                    qt = qt.to(tl.float32)
                    kt = kt.to(tl.float32)
                logits = tl.dot(qt, tl.trans(kt), logits)
                if i == S - 1:
                    # The epilogue is most of the kernel's instructions (its products are few: a
                    # contraction of s * D for each output), so per logit it does one multiply-add
                    # here, one inside the exponent, a max, an exp2 and a sum.
                    if PREPPED:
                        col_scale = tl.load(SK + (b * Hkv + hk) * n_cols + cols, mask=cols < n_cols, other=0.0)
                        col_ok = col_scale > 0  # scale 0: no real key in the group
                    else:
                        col_scale = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
                    # Invisible columns (no real key, past the end) get -inf from the same multiply-add.
                    col_bias = tl.where(col_ok, 0.0, float("-inf"))
                    t = logits * col_scale[None, :] + col_bias[None, :]
                    if CAUSAL:
                        if (c0 + BLOCK_C - 1) * S >= first_last + 1:  # the tile reaches past some row's last query
                            # `<` against `+ 1` (see kernels/attention.py on the comparison Triton miscompiled).
                            t = tl.where((cols * S)[None, :] < (row_last + 1)[:, None], t, float("-inf"))
                    # Each key block's own log-sum-exp per row, kept for the second loop.
                    per_block = tl.reshape(t, (BLOCK_R, KBLOCKS, COLS_PER_BLOCK))
                    bm = tl.max(per_block, 2)
                    bm_safe = tl.where(bm == float("-inf"), 0.0, bm) * row_scale[:, None]
                    bs = tl.sum(tl.exp2(per_block * row_scale[:, None, None] - bm_safe[:, :, None]), 2)
                    block_lse = tl.where(bs > 0, bm_safe + tl.log2(tl.maximum(bs, 1e-30)), float("-inf"))
                    j = c0 // COLS_PER_BLOCK + tl.arange(0, KBLOCKS)
                    tl.store(scr_rows + j[None, :], block_lse, mask=(j < nk)[None, :])
                    logits = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
                    col_ok = tl.zeros([BLOCK_C], dtype=tl.int1)
            tl.debug_barrier()  # the strip written above is read back by other threads of the program
            # Each row's log-sum-exp from its blocks' (cheaper than running row statistics per tile).
            j_end = (col_end + COLS_PER_BLOCK - 1) // COLS_PER_BLOCK
            m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
            for j0 in range(0, j_end, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                lse = tl.load(scr_rows + j[None, :], mask=(j < j_end)[None, :], other=float("-inf"), cache_modifier=".cg")
                m_new = tl.maximum(m_i, tl.max(lse, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(lse - m_safe[:, None]), 1)
                m_i = m_new
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            # A row with no visible key, or past the end (its strip holds garbage), adds 0.
            row_lse = tl.where((l_i > 0) & row_ok, m_safe + tl.log2(tl.maximum(l_i, 1e-30)), float("inf"))
            qb = tile * QBLOCKS + tl.arange(0, QBLOCKS)
            for j0 in range(0, j_end, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                lse = tl.load(scr_rows + j[None, :], mask=(j < j_end)[None, :], other=float("-inf"), cache_modifier=".cg")
                p = tl.exp2(lse - row_lse[:, None])
                sums = tl.sum(tl.reshape(p, (QBLOCKS, ROWS_PER_QBLOCK, BLOCK_J)), 1)
                tl.store(OUT + b * stride_ob + h * stride_oh + qb[:, None] * stride_om + j[None, :], sums,
                         mask=(qb < nq)[:, None] & (j < j_end)[None, :])
            for j0 in range(j_end, nk, BLOCK_J):  # blocks no row of the tile sees (causal): importance 0
                j = j0 + tl.arange(0, BLOCK_J)
                tl.store(OUT + b * stride_ob + h * stride_oh + qb[:, None] * stride_om + j[None, :],
                         tl.zeros([QBLOCKS, BLOCK_J], dtype=tl.float32), mask=(qb < nq)[:, None] & (j < nk)[None, :])
            tl.debug_barrier()  # the next row tile overwrites the strip


#: Launches per precision, from ``benchmarks/tune_importance.py`` on the GPU (see its results). fp8:
#: 64 query rows fit 4 warps without spills (128 rows spilled 328 bytes); 2.95 ms at 64k, 0.81 ms at
#: 32k on an H200 with the quantisation (``tune_importance_h200_lean/``).
LAUNCH = {
    "full": dict(block_r=64, block_c=128, num_warps=8, num_stages=3, programs_per_sm=2, maxnreg=None),
    "fp8": dict(block_r=64, block_c=128, num_warps=4, num_stages=3, programs_per_sm=2, maxnreg=None),
}


def antidiagonal_importance_triton(
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
    block_r: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    programs: int | None = None,
    kv_chunk: int | None = None,
    maxnreg: int | None = None,
) -> torch.Tensor:
    """Block importance ``[B, Hq, nq, nk]`` (fp32); inputs validated by the caller, who also
    checks :func:`supported`. Launch parameters left as None take :data:`LAUNCH`'s; ``kv_chunk``
    (a divisor of batch x kv heads, default all of them) sets the program order (see the kernel)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    cfg = LAUNCH[precision]
    if precision == "full" and q.element_size() == 4:
        # fp32 tiles take twice the bytes: three stages of 64 query + 128 key rows need 290 KB of
        # shared memory, over a Hopper SM's 227 KB (seen on an H200); half the key rows, two stages.
        cfg = dict(cfg, block_c=64, num_stages=2)
    block_r = block_r or cfg["block_r"]
    maxnreg = maxnreg or cfg["maxnreg"]
    launch_extra = {"maxnreg": maxnreg} if maxnreg and not interpreting() else {}
    block_c = block_c or cfg["block_c"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    scale = D**-0.5 if scale is None else float(scale)
    if scale < 0:  # the kernel scales inside the exponent after the row max: it wants scale >= 0
        q, scale = -q, -scale
    nq, nk = cdiv(Lq, block_q), cdiv(Lk, block_k)
    rows_per_qblock, cols_per_block = block_q // stride, block_k // stride
    block_c = max(block_c, cols_per_block)
    block_r = max(block_r, rows_per_qblock)
    n_rows, n_cols = cdiv(Lq, stride), cdiv(Lk, stride)
    n_row_tiles = cdiv(n_rows, block_r)
    n_work = B * Hq * n_row_tiles
    if programs is None:
        programs = cfg["programs_per_sm"] * sm_count(q.device.index) if q.is_cuda else 4
    programs = max(1, min(programs, n_work))
    kv_chunk = B * Hkv if kv_chunk is None else check_kv_chunk(kv_chunk, B * Hkv)
    nk_pad = cdiv(nk, 16) * 16
    block_d = max(16, next_pow2(D))
    with on_device(q):
        out = torch.empty(B, Hq, nq, nk, dtype=torch.float32, device=q.device)  # every entry written
        scratch = torch.empty(programs, block_r, nk_pad, dtype=torch.float32, device=q.device)
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        pad = int8_view(key_padding_mask) if key_padding_mask is not None else out
        prepped = precision == "fp8"
        descriptors, sq, sk, dot_dtype = [None, None], out, out, q.dtype
        if prepped:
            q8, sq, k8, sk = quantize_qk(q, k, stride, key_padding_mask=key_padding_mask)
            descriptors = [descriptor(q8, [1, 1, block_r, block_d]), descriptor(k8, [1, 1, block_c, block_d])]
            dot_dtype = q8.dtype
        launch_kernel(_antidiagonal_kernel, (programs,),
            q, k, pad, out, scratch, *descriptors, sq, sk,
            scale / stride * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            Hq, Hkv, Hq // Hkv, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, n_row_tiles, n_work, kv_chunk,
            S=stride, CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HEAD_DIM=D,
            BLOCK_D=block_d, ROWS_PER_QBLOCK=rows_per_qblock, BLOCK_R=block_r,
            BLOCK_C=block_c, COLS_PER_BLOCK=cols_per_block, BLOCK_J=64, PREPPED=prepped,
            DOT_FP32=dot_in_fp32(dot_dtype),
            num_warps=num_warps, num_stages=num_stages, **launch_extra,
        )
    return out


def supported(block_q: int, block_k: int, stride: int) -> bool:
    """Shapes the kernel's tiles can express: power-of-two stride and rows/columns per block."""
    def pow2(x):
        return x > 0 and x & (x - 1) == 0

    return pow2(stride) and pow2(block_q // stride) and pow2(block_k // stride) and block_k // stride <= 64 \
        and block_q // stride <= 128
