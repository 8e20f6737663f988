"""The similarity cap (paper appendix B.1) in Triton: one program per (batch, kv head, key block).

Computes :func:`psa_kernels.reference.similarity_cap`: for pooling factor ``p`` the mean cosine
similarity of the token pairs ``(t*p, t*p + p - 1)`` of the block (pairs with both tokens
valid); ``p`` is allowed when it exceeds the factor's threshold, and the cap is the largest
allowed factor (1 if none). One read of K per factor, fp32 arithmetic, no intermediate tensors
(the tensor-op version converts K to fp32 and keeps per-pair similarities: about 1 ms at 64k
tokens on an H100, for a few MB of output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _factor_allowed(K, PAD, b, block, Lk, stride_kn, threshold, offs_d, d_ok,
                    P: tl.constexpr, PAIRS: tl.constexpr, PAIRS_POW2: tl.constexpr, HAS_PAD: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    t = tl.arange(0, PAIRS_POW2)
    first = block * BLOCK_K + t * P
    last = first + P - 1
    ok = (t < PAIRS) & (last < Lk)
    if HAS_PAD:
        ok = ok & (tl.load(PAD + b * Lk + first, mask=ok, other=0) != 0)
        ok = ok & (tl.load(PAD + b * Lk + last, mask=ok, other=0) != 0)
    mask = ok[:, None] & d_ok[None, :]
    x = tl.load(K + first[:, None] * stride_kn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(K + last[:, None] * stride_kn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    eps = 1e-8
    norms = tl.maximum(tl.sqrt(tl.sum(x * x, 1)), eps) * tl.maximum(tl.sqrt(tl.sum(y * y, 1)), eps)
    sim = tl.sum(x * y, 1) / norms
    count = tl.sum(ok.to(tl.float32), 0)
    mean = tl.sum(tl.where(ok, sim, 0.0), 0) / tl.maximum(count, 1.0)
    return (count > 0) & (mean > threshold)


@triton.jit
def _similarity_cap_kernel(
    K, PAD, CAP, thr2, thr4, thr8,
    stride_kb, stride_kh, stride_kn,
    Hkv, Lk, nk,
    USE2: tl.constexpr, USE4: tl.constexpr, USE8: tl.constexpr, HAS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    PAIRS2: tl.constexpr, PAIRS4: tl.constexpr, PAIRS8: tl.constexpr,
):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = K + b * stride_kb + h * stride_kh
    cap = 1
    # Ascending factors: the largest allowed one wins, as in the reference.
    if USE2:
        if _factor_allowed(k, PAD, b, block, Lk, stride_kn, thr2, offs_d, d_ok, 2, BLOCK_K // 2, PAIRS2, HAS_PAD,
                           BLOCK_K):
            cap = 2
    if USE4:
        if _factor_allowed(k, PAD, b, block, Lk, stride_kn, thr4, offs_d, d_ok, 4, BLOCK_K // 4, PAIRS4, HAS_PAD,
                           BLOCK_K):
            cap = 4
    if USE8:
        if _factor_allowed(k, PAD, b, block, Lk, stride_kn, thr8, offs_d, d_ok, 8, BLOCK_K // 8, PAIRS8, HAS_PAD,
                           BLOCK_K):
            cap = 8
    tl.store(CAP + bh * nk + block, cap.to(tl.int8))


def similarity_cap_triton(k: torch.Tensor, *, block_k: int, thresholds: dict,
                          key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Hkv, nk]`` int8 cap; ``thresholds`` maps factors (a subset of 2, 4, 8) to thresholds."""
    B, H, Lk, D = k.shape
    nk = triton.cdiv(Lk, block_k)
    cap = torch.empty(B, H, nk, dtype=torch.int8, device=k.device)
    k = k if k.stride(-1) == 1 else k.contiguous()
    pad = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else cap
    pairs = {p: triton.next_power_of_2(max(1, block_k // p)) for p in (2, 4, 8)}
    _similarity_cap_kernel[(nk, B * H)](
        k, pad, cap, *(float(thresholds.get(p, 0.0)) for p in (2, 4, 8)),
        k.stride(0), k.stride(1), k.stride(2),
        H, Lk, nk,
        USE2=2 in thresholds, USE4=4 in thresholds, USE8=8 in thresholds, HAS_PAD=key_padding_mask is not None,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_K=block_k,
        PAIRS2=pairs[2], PAIRS4=pairs[4], PAIRS8=pairs[8],
        num_warps=4,
    )
    return cap
