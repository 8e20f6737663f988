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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .level_map import LevelMap
from .pyramid import build_device_pyramid

_LOG2E = 1.4426950408889634


@triton.jit
def _psa_fwd_kernel(
    Q, K, V, KP, VP, CNT, LAST, PAD, IDX, NUM, OUT,
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
    pid_m = tl.program_id(0)
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
    num_row = NUM + b * stride_nb + hm * stride_nh + q_block * stride_nm
    # The four levels in turn; each call walks that level's block list of this query block.
    n1 = tl.load(num_row)
    n2 = tl.load(num_row + 1)
    n4 = tl.load(num_row + 2)
    n8 = tl.load(num_row + 3)
    acc, m_i, l_i = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row, n1, K, V, CNT, LAST, PAD,
                                  b, hk, Lk, 0, stride_kb, stride_kh, stride_kn, stride_kd,
                                  stride_vb, stride_vh, stride_vn, stride_vd, stride_cb,
                                  1, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row + n1, n2, KP, VP, CNT, LAST, PAD,
                                  b, hk, Lk, BASE2, stride_pb, stride_ph, stride_pn, 1,
                                  stride_pb, stride_ph, stride_pn, 1, stride_cb,
                                  2, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row + n1 + n2, n4, KP, VP, CNT, LAST,
                                  PAD, b, hk, Lk, BASE4, stride_pb, stride_ph, stride_pn, 1,
                                  stride_pb, stride_ph, stride_pn, 1, stride_cb,
                                  4, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)
    acc, m_i, l_i = _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_row + n1 + n2 + n4, n8, KP, VP, CNT,
                                  LAST, PAD, b, hk, Lk, BASE8, stride_pb, stride_ph, stride_pn, 1,
                                  stride_pb, stride_ph, stride_pn, 1, stride_cb,
                                  8, CAUSAL, HAS_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_K, DOT_FP32, DOT_PRECISION)

    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=(offs_m < Lq)[:, None] & d_ok[None, :])


@triton.jit
def _attend_level(acc, m_i, l_i, q, q_pos, qk_scale, idx_list, n_blocks, K, V, CNT, LAST, PAD,
                  b, hk, Lk, base,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd, stride_cb,
                  P: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Online-softmax update with the ``n_blocks`` key blocks of ``idx_list`` read at level P.

    K/V are the original keys (P = 1) or the pooled level (rows ``base + group``); a logical block
    holds ``BLOCK_K // P`` of them, gathered ``BLOCK_N`` at a time.
    """
    KEYS_PER_BLOCK: tl.constexpr = BLOCK_K // P
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_keys = n_blocks * KEYS_PER_BLOCK
    n_rows = (Lk + P - 1) // P
    for t0 in range(0, n_keys, BLOCK_N):
        cols = t0 + tl.arange(0, BLOCK_N)
        in_list = cols < n_keys
        block = tl.load(idx_list + cols // KEYS_PER_BLOCK, mask=in_list, other=0)
        row = block * KEYS_PER_BLOCK + cols % KEYS_PER_BLOCK  # key (P = 1) or group (P > 1) index
        ok = in_list & (row < n_rows)
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
        k = tl.load(K + b * stride_kb + hk * stride_kh + key_rows * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if P > 1:
            s += tl.log2(tl.maximum(cnt, 1).to(tl.float32))[None, :]  # a pooled key stands for cnt tokens
        visible = ok[None, :]
        if CAUSAL:
            # `last < q_pos + 1`, not `last <= q_pos`: with Lq == Lk multiples of 16, Triton 3.6's
            # alignment analysis treated the broadcast comparison as constant over 16 rows and
            # rows 8..15 of each 16 reused the mask of rows 0..7 (seen on an H100). The +1 makes
            # the row positions' divisibility 1, so the mask is computed per row.
            visible = visible & (last[None, :] < (q_pos + 1)[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + hk * stride_vh + key_rows * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


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
    num_warps: int | None = None,
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
    idx, num = level_map.indices, level_map.counts
    block_d = max(16, triton.next_power_of_2(D))
    if block_m is None:
        block_m = block_q if block_d <= 128 else min(block_q, 64)
    if num_warps is None:
        num_warps = 8 if block_m * block_d >= 128 * 128 else 4
    grid = (triton.cdiv(Lq, block_m), B * Hq)
    _psa_fwd_kernel[grid](
        q, k, v, pyr.keys, pyr.values, pyr.counts, pyr.last, pad, idx, num, out,
        scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(),
        pyr.keys.stride(0), pyr.keys.stride(1), pyr.keys.stride(2),
        pyr.counts.stride(0),
        idx.stride(0), idx.stride(1), idx.stride(2),
        num.stride(0), num.stride(1), num.stride(2),
        *out.stride(),
        Hq, Hq // Hkv, Hq // Hm, Lq, Lk, pyr.base[2], pyr.base[4], pyr.base[8],
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HEAD_DIM=D, BLOCK_D=block_d,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_Q=block_q, BLOCK_K=block_k,
        # Triton's CPU interpreter (3.8) computes bf16 dots wrongly: it gets fp32 operands instead.
        DOT_FP32=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        # fp32 inputs get fp32 products (not TF32): a user who pays for fp32 wants its accuracy.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return out
