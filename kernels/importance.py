"""Antidiagonal block importance in Triton, streamed: the ``(L/s)^2`` score matrix never exists.

Computes exactly :func:`psa_kernels.reference.antidiagonal_importance`: for strided query row
``m`` and strided key column ``n`` the logit is the mean of the ``s`` antidiagonal products of the
``s x s`` tile, ``scale / s * sum_i q[m*s + s-1-i] . k[n*s + i]``; each row is softmaxed over its
visible columns and the probabilities are summed per (query block, key block).

A program owns the ``block_q / s`` strided rows of one query block of one query head and sweeps
the visible columns twice, ``BLOCK_C`` at a time: pass 1 keeps the running row max and sum
(online softmax), pass 2 recomputes the logits, normalises them and adds each tile's
probabilities into its key blocks. Twice the logit work instead of an ``(L/s)^2`` buffer; each
logit tile is ``s`` small matrix products over the head dimension.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _antidiagonal_kernel(
    Q, K, PAD, OUT,
    scale_log2,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_om,
    Hq, GROUP, Lq, Lk, n_rows, n_cols, nk,
    S: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, COLS_PER_BLOCK: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_i = tl.program_id(0)  # query block
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    r = tl.arange(0, BLOCK_R)
    m = pid_i * ROWS + r  # strided rows of this query block
    row_ok = (r < ROWS) & (m < n_rows)
    # Last query position (absolute, bottom-right aligned) of each strided row.
    row_last = (Lk - Lq) + tl.minimum(m * S + S - 1, Lq - 1)
    if CAUSAL:
        last_visible = tl.max(tl.where(row_ok, row_last, 0), 0)
        col_end = tl.minimum(n_cols, last_visible // S + 1)
    else:
        col_end = n_cols

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for pass_ in tl.static_range(2):
        for c0 in range(0, col_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            logits = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            col_ok = tl.zeros([BLOCK_C], dtype=tl.int1)
            for i in tl.static_range(S):
                qpos = m * S + (S - 1 - i)
                qt = tl.load(Q + b * stride_qb + h * stride_qh + qpos[:, None] * stride_qm + offs_d[None, :],
                             mask=(row_ok & (qpos < Lq))[:, None] & d_ok[None, :], other=0.0)
                kpos = cols * S + i
                k_ok = kpos < Lk
                if HAS_PAD:
                    k_ok = k_ok & (tl.load(PAD + b * Lk + kpos, mask=k_ok, other=0) != 0)
                col_ok = col_ok | k_ok
                kt = tl.load(K + b * stride_kb + hk * stride_kh + kpos[:, None] * stride_kn + offs_d[None, :],
                             mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                if DOT_FP32:
                    qt = qt.to(tl.float32)
                    kt = kt.to(tl.float32)
                logits += tl.dot(qt, tl.trans(kt))
            logits = logits * scale_log2
            visible = col_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                # `<` against `+ 1` (see kernels/attention.py on the comparison Triton miscompiled).
                visible = visible & ((cols * S)[None, :] < (row_last + 1)[:, None])
            logits = tl.where(visible, logits, float("-inf"))
            if pass_ == 0:
                m_new = tl.maximum(m_i, tl.max(logits, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(logits - m_safe[:, None]), 1)
                m_i = m_new
            else:
                m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
                p = tl.exp2(logits - m_safe[:, None]) / tl.maximum(l_i, 1e-30)[:, None]
                p = tl.where(l_i[:, None] > 0, p, 0.0)
                per_block = tl.sum(tl.reshape(p, (BLOCK_R, BLOCK_C // COLS_PER_BLOCK, COLS_PER_BLOCK)), axis=2)
                block_sum = tl.sum(per_block, axis=0)  # [BLOCK_C // COLS_PER_BLOCK]
                j = c0 // COLS_PER_BLOCK + tl.arange(0, BLOCK_C // COLS_PER_BLOCK)
                tl.store(OUT + b * stride_ob + h * stride_oh + pid_i * stride_om + j, block_sum, mask=j < nk)


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
    block_c: int = 64,
) -> torch.Tensor:
    """Block importance ``[B, Hq, nq, nk]`` (fp32); inputs validated by the caller."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    nq, nk = triton.cdiv(Lq, block_q), triton.cdiv(Lk, block_k)
    rows, cols_per_block = block_q // stride, block_k // stride
    block_c = max(block_c, cols_per_block)
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.float32, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    pad = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else out
    _antidiagonal_kernel[(nq, B * Hq)](
        q, k, pad, out,
        scale / stride * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, Lq, Lk, triton.cdiv(Lq, stride), triton.cdiv(Lk, stride), nk,
        S=stride, CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)), ROWS=rows, BLOCK_R=max(16, rows), BLOCK_C=block_c,
        COLS_PER_BLOCK=cols_per_block, DOT_FP32=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        # The s unrolled tile loads, software-pipelined 3 deep, asked Triton 3.6 for 328 KB of
        # shared memory on an H100 (limit 227 KB): no pipelining until this kernel is tuned.
        num_stages=1,
    )
    return out
