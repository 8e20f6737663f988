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
total ``lse[r]`` and add ``2^(lse[r, j] - lse[r])`` per query block. The kernel is persistent (one program per slot, looping over row tiles) so the scratch is
``slots x BLOCK_R x nk`` floats (tens of MB at 64k tokens), not ``(L/s) x nk`` per head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _antidiagonal_kernel(
    Q, K, PAD, OUT, SCR,
    scale_log2,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_om,
    Hq, GROUP, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, n_row_tiles, n_work,
    S: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWS_PER_QBLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, COLS_PER_BLOCK: tl.constexpr,
    BLOCK_J: tl.constexpr, DOT_FP32: tl.constexpr,
):
    QBLOCKS: tl.constexpr = BLOCK_R // ROWS_PER_QBLOCK  # query blocks per row tile
    KBLOCKS: tl.constexpr = BLOCK_C // COLS_PER_BLOCK  # key blocks per column tile
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    r = tl.arange(0, BLOCK_R)
    scr_rows = SCR + tl.program_id(0) * BLOCK_R * nk_pad + r[:, None] * nk_pad
    for work in range(tl.program_id(0), n_work, tl.num_programs(0)):
        bh = work // n_row_tiles
        tile = n_row_tiles - 1 - work % n_row_tiles  # the longest (causal) row tiles first
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

        logits = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        col_ok = tl.zeros([BLOCK_C], dtype=tl.int1)
        n_steps = tl.cdiv(col_end, BLOCK_C) * S
        for step in range(0, n_steps):
            # One flat loop over (column tile, antidiagonal offset i): the loads stay pipelined
            # across column tiles (a loop over i nested in a loop over tiles restarts every tile).
            i = step % S
            c0 = (step // S) * BLOCK_C
            cols = c0 + tl.arange(0, BLOCK_C)
            qpos = m * S + i
            qt = tl.load(q_rows + qpos[:, None] * stride_qm, mask=(qpos < Lq)[:, None] & d_ok[None, :], other=0.0)
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
                logits = logits * scale_log2
                visible = col_ok[None, :] & row_ok[:, None]
                if CAUSAL:
                    # `<` against `+ 1` (see kernels/attention.py on the comparison Triton miscompiled).
                    visible = visible & ((cols * S)[None, :] < (row_last + 1)[:, None])
                logits = tl.where(visible, logits, float("-inf"))
                # Each key block's own log-sum-exp per row, kept for the second loop.
                per_block = tl.reshape(logits, (BLOCK_R, KBLOCKS, COLS_PER_BLOCK))
                bm = tl.max(per_block, 2)
                bm_safe = tl.where(bm == float("-inf"), 0.0, bm)
                bs = tl.sum(tl.exp2(per_block - bm_safe[:, :, None]), 2)
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
        row_lse = tl.where(l_i > 0, m_safe + tl.log2(tl.maximum(l_i, 1e-30)), float("inf"))  # no key: adds 0
        qb = tile * QBLOCKS + tl.arange(0, QBLOCKS)
        for j0 in range(0, j_end, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            lse = tl.load(scr_rows + j[None, :], mask=(j < j_end)[None, :], other=float("-inf"), cache_modifier=".cg")
            p = tl.exp2(lse - row_lse[:, None])
            sums = tl.sum(tl.reshape(p, (QBLOCKS, ROWS_PER_QBLOCK, BLOCK_J)), 1)
            tl.store(OUT + b * stride_ob + h * stride_oh + qb[:, None] * stride_om + j[None, :], sums,
                     mask=(qb < nq)[:, None] & (j < j_end)[None, :])
        tl.debug_barrier()  # the next row tile overwrites the strip


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
    # The fastest launch of benchmarks/tune_importance.py on an H100 at 32k and 64k tokens, stride
    # 8 (benchmarks/results/tune_importance_h100.json); within 3% of the best at stride 16.
    block_r: int = 64,
    block_c: int = 128,
    num_warps: int = 8,
    num_stages: int = 3,
    programs: int | None = None,
) -> torch.Tensor:
    """Block importance ``[B, Hq, nq, nk]`` (fp32); inputs validated by the caller, who also
    checks :func:`supported`."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    nq, nk = triton.cdiv(Lq, block_q), triton.cdiv(Lk, block_k)
    rows_per_qblock, cols_per_block = block_q // stride, block_k // stride
    block_c = max(block_c, cols_per_block)
    block_r = max(block_r, rows_per_qblock)
    n_rows, n_cols = triton.cdiv(Lq, stride), triton.cdiv(Lk, stride)
    n_row_tiles = triton.cdiv(n_rows, block_r)
    n_work = B * Hq * n_row_tiles
    if programs is None:
        programs = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    programs = max(1, min(programs, n_work))
    nk_pad = triton.cdiv(nk, 16) * 16
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.float32, device=q.device)
    scratch = torch.empty(programs, block_r, nk_pad, dtype=torch.float32, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    pad = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else out
    _antidiagonal_kernel[(programs,)](
        q, k, pad, out, scratch,
        scale / stride * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, Lq, Lk, n_rows, n_cols, nq, nk, nk_pad, n_row_tiles, n_work,
        S=stride, CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)), ROWS_PER_QBLOCK=rows_per_qblock, BLOCK_R=block_r,
        BLOCK_C=block_c, COLS_PER_BLOCK=cols_per_block, BLOCK_J=64,
        DOT_FP32=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def supported(block_q: int, block_k: int, stride: int) -> bool:
    """Shapes the kernel's tiles can express: power-of-two stride and rows/columns per block."""
    def pow2(x):
        return x > 0 and x & (x - 1) == 0

    return pow2(stride) and pow2(block_q // stride) and pow2(block_k // stride) and block_k // stride <= 64 \
        and block_q // stride <= 128
