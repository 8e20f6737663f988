"""KV pyramid in one fused Triton pass: the 2x/4x/8x valid-token means of K and V.

Layout of the result (:class:`DevicePyramid`): the pooled levels are concatenated along the
sequence axis, ``keys``/``values [B, Hkv, G2 + G4 + G8, D]`` with level ``p`` at rows
``base[p] .. base[p] + ceil(Lk/p)``; ``counts``/``last [B, G2 + G4 + G8]`` (int32) hold the
number of valid tokens of each group and the position of its last valid token (-1 if none).
Level 1 is the original K/V and is not copied. Each program reads ``8 * groups`` tokens of K and
V once and writes all three levels, each level's sums built from the one below by elementwise
adds. Padded tokens and tokens past ``Lk`` get weight 0 (masked loads, no replicate padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .utils import cdiv, int8_view, launch_kernel, next_pow2


POOLED_FACTORS = (2, 4, 8)


@dataclass(frozen=True)
class DevicePyramid:
    keys: torch.Tensor  # [B, Hkv, Gtot, D]
    values: torch.Tensor  # [B, Hkv, Gtot, D]
    counts: torch.Tensor  # [B, Gtot] int32
    last: torch.Tensor  # [B, Gtot] int32
    base: dict  # p -> first row of level p
    groups: dict  # p -> ceil(Lk / p)


@triton.jit
def _pyramid_kernel(
    K, V, PAD, KP, VP, CNT, LAST,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pb, stride_ph, stride_pn,
    stride_cb,
    H, Lk, base4, base8,
    HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUPS: tl.constexpr,
):
    # Each program pools GROUPS level-8 groups (8 * GROUPS tokens). Token j of every group is one
    # strided [GROUPS, D] load, so every level is a sum of such rows: elementwise adds, no
    # reshape-reductions (whose layout conversions made the kernel bound by its instructions).
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)  # level-8 groups
    offs_d = tl.arange(0, BLOCK_D)
    k_rows = K + b * stride_kb + h * stride_kh + offs_d[None, :]
    v_rows = V + b * stride_vb + h * stride_vh + offs_d[None, :]
    out = b * stride_pb + h * stride_ph + offs_d[None, :]
    d_ok = (offs_d < HEAD_DIM)[None, :]
    head0 = h == 0  # counts depend on the batch row only: the first head writes them
    k0, v0, w0, p0 = _pair(k_rows, v_rows, PAD, KP, VP, CNT, LAST, out, b, g, 0, Lk, stride_kn, stride_vn,
                           stride_pn, stride_cb, d_ok, head0, HAS_PAD)
    k1, v1, w1, p1 = _pair(k_rows, v_rows, PAD, KP, VP, CNT, LAST, out, b, g, 1, Lk, stride_kn, stride_vn,
                           stride_pn, stride_cb, d_ok, head0, HAS_PAD)
    k01, v01, w01, p01 = _merge(k0, v0, w0, p0, k1, v1, w1, p1, KP, VP, CNT, LAST, out, b, base4 + 2 * g,
                                g * 8 < Lk, stride_pn, stride_cb, d_ok, head0)
    k2, v2, w2, p2 = _pair(k_rows, v_rows, PAD, KP, VP, CNT, LAST, out, b, g, 2, Lk, stride_kn, stride_vn,
                           stride_pn, stride_cb, d_ok, head0, HAS_PAD)
    k3, v3, w3, p3 = _pair(k_rows, v_rows, PAD, KP, VP, CNT, LAST, out, b, g, 3, Lk, stride_kn, stride_vn,
                           stride_pn, stride_cb, d_ok, head0, HAS_PAD)
    k23, v23, w23, p23 = _merge(k2, v2, w2, p2, k3, v3, w3, p3, KP, VP, CNT, LAST, out, b, base4 + 2 * g + 1,
                                g * 8 + 4 < Lk, stride_pn, stride_cb, d_ok, head0)
    _merge(k01, v01, w01, p01, k23, v23, w23, p23, KP, VP, CNT, LAST, out, b, base8 + g, g * 8 < Lk,
           stride_pn, stride_cb, d_ok, head0)


@triton.jit
def _write_group(ks, vs, w, pos, KP, VP, CNT, LAST, out, b, rows, ok, stride_pn, stride_cb, d_ok, head0):
    """Store the means of the groups at ``rows`` of the pooled levels (sums ``ks``/``vs`` over
    ``w`` valid tokens, last valid position ``pos``) where ``ok``."""
    denom = tl.maximum(w, 1.0)[:, None]
    dst = out + rows[:, None] * stride_pn
    tl.store(KP + dst, (ks / denom).to(KP.dtype.element_ty), mask=ok[:, None] & d_ok)
    tl.store(VP + dst, (vs / denom).to(VP.dtype.element_ty), mask=ok[:, None] & d_ok)
    tl.store(CNT + b * stride_cb + rows, w.to(tl.int32), mask=ok & head0)
    tl.store(LAST + b * stride_cb + rows, pos, mask=ok & head0)


@triton.jit
def _pair(k_rows, v_rows, PAD, KP, VP, CNT, LAST, out, b, g, j: tl.constexpr, Lk, stride_kn, stride_vn,
          stride_pn, stride_cb, d_ok, head0, HAS_PAD: tl.constexpr):
    """Tokens ``8g + 2j`` and ``8g + 2j + 1``: their level-2 group written, their sums returned."""
    t0 = g * 8 + 2 * j
    t1 = t0 + 1
    ok0 = t0 < Lk
    ok1 = t1 < Lk
    if HAS_PAD:
        ok0 = ok0 & (tl.load(PAD + b * Lk + t0, mask=ok0, other=0) != 0)
        ok1 = ok1 & (tl.load(PAD + b * Lk + t1, mask=ok1, other=0) != 0)
    ks = (tl.load(k_rows + t0[:, None] * stride_kn, mask=ok0[:, None] & d_ok, other=0.0).to(tl.float32)
          + tl.load(k_rows + t1[:, None] * stride_kn, mask=ok1[:, None] & d_ok, other=0.0).to(tl.float32))
    vs = (tl.load(v_rows + t0[:, None] * stride_vn, mask=ok0[:, None] & d_ok, other=0.0).to(tl.float32)
          + tl.load(v_rows + t1[:, None] * stride_vn, mask=ok1[:, None] & d_ok, other=0.0).to(tl.float32))
    w = ok0.to(tl.float32) + ok1.to(tl.float32)
    pos = tl.where(ok1, t1, tl.where(ok0, t0, -1))
    _write_group(ks, vs, w, pos, KP, VP, CNT, LAST, out, b, g * 4 + j, t0 < Lk, stride_pn, stride_cb, d_ok, head0)
    return ks, vs, w, pos


@triton.jit
def _merge(ka, va, wa, pa, kb, vb, wb, pb, KP, VP, CNT, LAST, out, b, rows, ok, stride_pn, stride_cb, d_ok, head0):
    """Two adjacent groups' sums merged into the next level's group: written at ``rows`` where
    ``ok`` (the group starts inside the sequence, so the row is inside its level), and returned."""
    ks = ka + kb
    vs = va + vb
    w = wa + wb
    pos = tl.maximum(pa, pb)
    _write_group(ks, vs, w, pos, KP, VP, CNT, LAST, out, b, rows, ok, stride_pn, stride_cb, d_ok, head0)
    return ks, vs, w, pos


def pyramid_layout(k_len: int) -> tuple[dict, dict, int]:
    groups = {p: math.ceil(k_len / p) for p in POOLED_FACTORS}
    base, total = {}, 0
    for p in POOLED_FACTORS:
        base[p] = total
        total += groups[p]
    return base, groups, total


def build_device_pyramid(k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                         groups: int = 16) -> DevicePyramid:
    """The pooled levels 2, 4, 8 of K and V (in their dtype) with counts and last positions;
    each program pools ``groups`` level-8 groups (a power of two)."""
    B, H, Lk, D = k.shape
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    base, n_groups, total = pyramid_layout(Lk)
    keys = torch.empty(B, H, total, D, dtype=k.dtype, device=k.device)
    values = torch.empty(B, H, total, D, dtype=v.dtype, device=v.device)
    counts = torch.empty(B, total, dtype=torch.int32, device=k.device)
    last = torch.empty(B, total, dtype=torch.int32, device=k.device)
    pad = int8_view(key_padding_mask) if key_padding_mask is not None else counts
    grid = (cdiv(n_groups[8], groups), B * H)
    launch_kernel(_pyramid_kernel, grid,
        k, v, pad, keys, values, counts, last,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        counts.stride(0),
        H, Lk, base[4], base[8],
        HAS_PAD=key_padding_mask is not None, HEAD_DIM=D, BLOCK_D=next_pow2(D), GROUPS=groups,
        num_warps=4,
    )
    return DevicePyramid(keys=keys, values=values, counts=counts, last=last, base=base, groups=n_groups)
