"""Dense PyTorch reference of Pyramid Sparse Attention (PSA).

This module *defines* what every fast path computes (``docs/semantics.md``, sections 1-8). It
favours clarity over speed: it materialises the logits of a chunk of query rows against every
pooled key, so use it at small sizes or as the ground truth in tests.

Vocabulary
----------
- ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
  K/V are never expanded to ``Hq`` heads: queries are viewed as ``[B, Hkv, G, Lq, D]`` instead.
- Query blocks of ``block_q`` tokens, key blocks of ``block_k`` tokens (the last may be short).
- A *level map* ``[B, Hm, nq, nk]`` (``Hm`` = Hq or Hkv) holds, per (query block, key block) pair,
  the pooling factor ``p`` in {1, 2, 4, 8} used for that pair, or 0 to skip it.
- The *KV pyramid* holds, for each ``p``, the means of the valid tokens of the groups
  ``[t*p, (t+1)*p)`` and their counts ``c_t``; a pooled key enters the softmax with the bias
  ``ln(c_t)`` because it stands for ``c_t`` tokens. Level 1 is the original K/V (bias 0).
- Causal attention is bottom-right aligned: query ``i`` sits at absolute position ``Lk - Lq + i``.
  A pooled group is visible only when its last valid token is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .blocks import block_visibility, forced_full_blocks, per_kv_head, valid_keys
from .validation import (
    POOL_FACTORS,
    check_attention_inputs,
    check_block_sizes,
    check_key_padding_mask,
    check_qkv,
    num_blocks,
)

# Bound on the fp32 logits one chunk of query rows materialises (elements, about 256 MB).
_MAX_CHUNK_ELEMENTS = 1 << 26


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 at least (fp64 inputs stay fp64, which tests use as an oracle)."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------
# KV pyramid (section 3)
# --------------------------------------------------------------------------------------------


@dataclass
class PyramidLevel:
    """One level ``p`` of the KV pyramid; ``G = ceil(Lk / p)`` groups."""

    factor: int
    keys: torch.Tensor  # [B, Hkv, G, D] mean of the valid tokens of each group (0 if none)
    values: torch.Tensor  # [B, Hkv, G, D]
    counts: torch.Tensor  # [B, G] number of valid tokens in each group
    last: torch.Tensor  # [B, G] position of the group's last valid token, -1 if it has none


def build_pyramid(
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    factors: Sequence[int] = POOL_FACTORS,
) -> dict[int, PyramidLevel]:
    """Mean-pool K and V over groups of ``p`` tokens for every ``p`` in ``factors``.

    Means are taken over the valid tokens only (not padded, not beyond ``Lk``), so a group cut
    short by the sequence end or by padding is the mean of what it really holds. Results are in
    the accumulation dtype (fp32 for half inputs).
    """
    B, H, Lk, D = k.shape
    acc = _acc_dtype(k.dtype)
    valid = valid_keys(key_padding_mask, B, Lk, k.device)
    pos = torch.arange(Lk, device=k.device)
    out = {}
    for p in factors:
        groups = math.ceil(Lk / p)
        pad = groups * p - Lk
        w = F.pad(valid.to(acc), (0, pad))  # zero weight beyond Lk: no replicate padding
        kp = F.pad(k.to(acc), (0, 0, 0, pad)).view(B, H, groups, p, D)
        vp = F.pad(v.to(acc), (0, 0, 0, pad)).view(B, H, groups, p, D)
        wg = w.view(B, 1, groups, p, 1)
        counts = w.view(B, groups, p).sum(-1)
        denom = counts.clamp(min=1).view(B, 1, groups, 1)
        last_pos = torch.where(valid, pos, -1)
        last = F.pad(last_pos, (0, pad), value=-1).view(B, groups, p).amax(-1)
        out[p] = PyramidLevel(
            factor=p,
            keys=(kp * wg).sum(3) / denom,
            values=(vp * wg).sum(3) / denom,
            counts=counts.to(torch.int32),
            last=last,
        )
    return out


# --------------------------------------------------------------------------------------------
# Attention (sections 1-5)
# --------------------------------------------------------------------------------------------


def psa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    level_map: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pyramid sparse attention, computed densely. Returns ``[B, Hq, Lq, D]`` in ``q.dtype``.

    Each query row takes a softmax over the union of the keys its blocks are assigned: original
    keys of level-1 blocks, pooled keys (with bias ``ln(count)``) of level-2/4/8 blocks, nothing
    from skipped blocks. A row with no visible key outputs exactly 0.
    """
    check_attention_inputs(q, k, v, level_map, block_q=block_q, block_k=block_k, key_padding_mask=key_padding_mask)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    acc = _acc_dtype(q.dtype)
    offset = Lk - Lq  # bottom-right alignment of causal queries

    pyramid = build_pyramid(k, v, key_padding_mask)
    levels = per_kv_head(level_map.long(), Hq, Hkv)
    qg = q.to(acc).view(B, Hkv, G, Lq, D)
    out = torch.zeros(B, Hkv, G, Lq, D, dtype=acc, device=q.device)
    if Lq == 0 or Lk == 0:
        return out.view(B, Hq, Lq, D).to(q.dtype)

    keys_per_row = sum(lvl.keys.shape[2] for lvl in pyramid.values())
    rows_per_chunk = max(block_q, (_MAX_CHUNK_ELEMENTS // max(1, B * Hq * keys_per_row)) // block_q * block_q)
    for r0 in range(0, Lq, rows_per_chunk):
        r1 = min(Lq, r0 + rows_per_chunk)
        rows = torch.arange(r0, r1, device=q.device)
        row_levels = levels[..., rows // block_q, :]  # [B, Hkv, G|1, R, nk]
        logits, values = [], []
        for p, lvl in pyramid.items():
            groups = lvl.keys.shape[2]
            block_of_group = (torch.arange(groups, device=q.device) * p) // block_k
            assigned = row_levels[..., block_of_group] == p  # [B, Hkv, G|1, R, groups]
            visible = (lvl.counts > 0)[:, None, None, None, :]
            if causal:
                visible = visible & (lvl.last[:, None, None, None, :] <= (offset + rows)[:, None])
            s = torch.einsum("bhgrd,bhtd->bhgrt", qg[..., r0:r1, :], lvl.keys) * scale
            s = s + torch.log(lvl.counts.clamp(min=1).to(acc))[:, None, None, None, :]
            logits.append(s.masked_fill(~(assigned & visible), float("-inf")))
            values.append(lvl.values)
        logits = torch.cat(logits, dim=-1)
        values = torch.cat(values, dim=2)
        row_max = logits.amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(logits - row_max)  # exp(-inf) = 0 for keys not assigned
        denom = weights.sum(-1, keepdim=True)
        chunk = torch.einsum("bhgrt,bhtd->bhgrd", weights, values)
        out[..., r0:r1, :] = torch.where(denom > 0, chunk / denom.clamp(min=torch.finfo(acc).tiny), 0.0)
    return out.view(B, Hq, Lq, D).to(q.dtype)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention with PSA's conventions, through torch SDPA (GQA without expanding K/V).

    Causal masks are bottom-right aligned (decode with ``Lq = 1`` sees every key) and rows with
    no visible key return 0 instead of NaN.
    """
    check_qkv(q, k, v)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    check_key_padding_mask(key_padding_mask, B, Lk, k.device)
    gqa = Hq != k.shape[1]
    if causal and Lq == Lk and key_padding_mask is None:
        # SDPA's own causal flag (top-left = bottom-right here): its flash kernels, no mask tensor.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = None
    if causal and Lq > 1:
        rows = torch.arange(Lq, device=q.device) + (Lk - Lq)
        mask = (torch.arange(Lk, device=q.device)[None, :] <= rows[:, None])[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        mask = pad if mask is None else mask & pad
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    # A row that sees nothing would be NaN in SDPA: let it see everything, then zero it.
    empty = ~mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, scale=scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0)


# --------------------------------------------------------------------------------------------
# Mask generation (section 7)
# --------------------------------------------------------------------------------------------


def _strided_queries(q: torch.Tensor, stride: int) -> torch.Tensor:
    """``[.., L, D] -> [.., ceil(L/s), s*D]``: row ``m`` holds ``q[m*s + s-1-i]`` for ``i = 0..s-1``."""
    L = q.shape[-2]
    q = F.pad(q, (0, 0, 0, math.ceil(L / stride) * stride - L))
    return torch.cat([q[..., stride - 1 - i :: stride, :] for i in range(stride)], dim=-1)


def _strided_keys(k: torch.Tensor, stride: int) -> torch.Tensor:
    """``[.., L, D] -> [.., ceil(L/s), s*D]``: column ``n`` holds ``k[n*s + i]``, so that the product
    of row ``m`` and column ``n`` sums the antidiagonal of the ``s x s`` tile ``(m, n)``."""
    L = k.shape[-2]
    k = F.pad(k, (0, 0, 0, math.ceil(L / stride) * stride - L))
    return torch.cat([k[..., i::stride, :] for i in range(stride)], dim=-1)


def _block_sum(x: torch.Tensor, rows_per_block: int, cols_per_block: int, nq: int, nk: int) -> torch.Tensor:
    R, C = x.shape[-2:]
    x = F.pad(x, (0, nk * cols_per_block - C, 0, nq * rows_per_block - R))
    return x.view(*x.shape[:-2], nq, rows_per_block, nk, cols_per_block).sum((-3, -1))


ESTIMATE_PRECISIONS = ("full", "fp8")


def quantize_fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., F]`` rounded as the fp8 estimate sees it: each row is scaled by the power of two
    ``2^(ceil(log2 amax) - 8)`` (so every value lands within +-256, inside e4m3's range, and the
    scaling is exact), rounded to e4m3 (nearest, ties to even) and scaled back. Rows whose largest
    magnitude is below 2^-100 read as zero."""
    amax = x.abs().amax(-1, keepdim=True)
    mantissa, exponent = torch.frexp(amax.to(torch.float32))
    ceil_log2 = torch.where(mantissa > 0.5, exponent, exponent - 1)
    tiny = amax < 2.0**-100
    scale = torch.where(tiny, torch.ones_like(amax), torch.ldexp(torch.ones_like(amax), (ceil_log2 - 8).to(amax.dtype)))
    y = torch.where(tiny, torch.zeros_like(x), x / scale)
    return y.to(torch.float8_e4m3fn).to(x.dtype) * scale


def antidiagonal_importance(
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
) -> torch.Tensor:
    """Block importance ``S [B, Hq, nq, nk] >= 0`` by antidiagonal scoring (XAttention).

    The attention of strided antidiagonal samples (mean of the ``s`` antidiagonal logits of each
    ``s x s`` tile, softmaxed per strided query row over the visible strided columns), summed
    per block pair. A strided column is visible to a row when its first key is at or before the
    row's last query position (bottom-right aligned) and it holds a valid key.

    ``precision="fp8"``: the logits are computed from fp8 (e4m3) copies of the queries and keys,
    one power-of-two scale per strided row (the ``s`` queries) and per strided column (the ``s``
    keys, padded ones zeroed first), :func:`quantize_fp8_rows`; everything after the products is
    as with ``"full"`` (the inputs' precision). Half the bytes and twice the tensor-core rate of
    bf16 on GPUs with fp8 units, for block scores that rank the same (docs/performance.md).
    """
    check_qkv(q, k, k)
    if block_q % stride or block_k % stride:
        raise ValueError(f"stride {stride} must divide block_q ({block_q}) and block_k ({block_k})")
    if precision not in ESTIMATE_PRECISIONS:
        raise ValueError(f"estimate precision must be one of {ESTIMATE_PRECISIONS}, got {precision!r}")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    acc = _acc_dtype(q.dtype)
    nq, nk = num_blocks(Lq, block_q), num_blocks(Lk, block_k)
    valid = valid_keys(key_padding_mask, B, Lk, k.device)
    k = k.to(acc) * valid[:, None, :, None]  # padded keys contribute nothing to a column's sum
    qs = _strided_queries(q.to(acc), stride).view(B, Hkv, G, -1, stride * D)
    ks = _strided_keys(k, stride)
    if precision == "fp8":
        qs, ks = quantize_fp8_rows(qs), quantize_fp8_rows(ks)
    n_rows, n_cols = qs.shape[-2], ks.shape[-2]
    col_first = torch.arange(n_cols, device=q.device) * stride
    col_valid = F.pad(valid, (0, n_cols * stride - Lk)).view(B, n_cols, stride).any(-1)  # [B, C]

    out = torch.zeros(B, Hkv, G, nq, nk, dtype=acc, device=q.device)
    rows_per_block = block_q // stride
    chunk_blocks = max(1, _MAX_CHUNK_ELEMENTS // max(1, B * Hq * n_cols * rows_per_block))
    for i0 in range(0, nq, chunk_blocks):
        i1 = min(nq, i0 + chunk_blocks)
        m0, m1 = i0 * rows_per_block, min(n_rows, i1 * rows_per_block)
        rows = torch.arange(m0, m1, device=q.device)
        logits = torch.einsum("bhgmd,bhnd->bhgmn", qs[..., m0:m1, :], ks) * (scale / stride)
        vis = col_valid[:, None, :].expand(B, m1 - m0, n_cols)
        if causal:
            row_last = (Lk - Lq) + torch.clamp(rows * stride + stride - 1, max=Lq - 1)
            vis = vis & (col_first[None, :] <= row_last[:, None])[None]
        logits = logits.masked_fill(~vis[:, None, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with nothing visible -> 0
        out[..., i0:i1, :] = _block_sum(probs, rows_per_block, block_k // stride, i1 - i0, nk)
    return out.view(B, Hq, nq, nk)


def sampled_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    samples: int = 8,
    key_padding_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Block importance ``S [B, Hq, nq, nk]`` by random token sampling (bidirectional use).

    ``samples`` random queries per query block attend to ``samples`` random keys per key block;
    the softmax over all sampled keys is taken per sampled query, and ``S[i, j]`` is the largest
    probability any sampled query of block ``i`` gives a sampled key of block ``j``.
    """
    check_qkv(q, k, k)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    acc = _acc_dtype(q.dtype)
    nq, nk = num_blocks(Lq, block_q), num_blocks(Lk, block_k)
    valid = valid_keys(key_padding_mask, B, Lk, k.device)

    def pick(n_blocks, block, length):
        offs = torch.rand(n_blocks, samples, generator=generator, device="cpu")
        sizes = torch.clamp(length - torch.arange(n_blocks) * block, max=block)
        idx = torch.arange(n_blocks)[:, None] * block + (offs * sizes[:, None]).long()
        return idx.to(q.device)  # [n_blocks, samples]

    qi, ki = pick(nq, block_q, Lq), pick(nk, block_k, Lk)
    qs = q.to(acc)[:, :, qi.flatten()].view(B, Hkv, G, nq * samples, D)
    ks = k.to(acc)[:, :, ki.flatten()]
    logits = torch.einsum("bhgmd,bhnd->bhgmn", qs, ks) * scale
    kvalid = valid[:, ki.flatten()]
    logits = logits.masked_fill(~kvalid[:, None, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    probs = probs.view(B, Hkv, G, nq, samples, nk, samples)
    return probs.amax(dim=(4, 6)).view(B, Hq, nq, nk)


def check_assignment(mode: str, levels: Sequence[int], thresholds: Sequence[float],
                     target_sparsity: float | None = None) -> None:
    """Reject an assignment mode other than energy/quantile/budget, levels and thresholds that do
    not pair up, or a budget mode without a target sparsity in [0, 1)."""
    if mode not in ("energy", "quantile", "budget"):
        raise ValueError(f"mode must be 'energy', 'quantile' or 'budget' (or 'dense' for build_level_map), got {mode!r}")
    if mode == "budget":
        if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, (int, float)) \
                or not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"mode 'budget' needs target_sparsity in [0, 1), got {target_sparsity!r}")
        if not levels or 1 not in levels:
            raise ValueError(f"mode 'budget' needs level 1 among the levels, got {list(levels)}")
        return
    if len(levels) != len(thresholds):
        raise ValueError(f"{len(levels)} levels need {len(levels)} thresholds, got {len(thresholds)}")


def assign_levels(
    scores: torch.Tensor,
    visible: torch.Tensor,
    *,
    mode: str = "energy",
    levels: Sequence[int] = (1, 2, 4, 8),
    thresholds: Sequence[float] = (0.7, 0.8, 0.9, 0.9),
) -> torch.Tensor:
    """Assign a level per (query block, key block) from importance ``scores [..., nq, nk]``.

    Per row, the visible blocks are ranked by score (descending, ties by index). ``energy``: a
    block whose *preceding* normalised mass (the mass ranked above it) is ``< thresholds[0]``
    gets ``levels[0]``, ``< thresholds[1]`` gets ``levels[1]`` ... else 0. ``quantile``: the same
    with the block's rank fraction (rank / number of visible blocks) instead of the mass.
    Invisible blocks get 0. (The budget mode is :func:`assign_budget`.)
    """
    if mode == "budget":
        raise ValueError("mode 'budget' assigns with assign_budget (it needs the pooling fidelity and forced blocks)")
    check_assignment(mode, levels, thresholds)
    visible = visible.expand_as(scores)
    s = torch.where(visible, scores.clamp(min=0).float(), torch.full_like(scores, -1.0, dtype=torch.float32))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(s, -1, order).clamp(min=0)
    n_vis = visible.sum(-1, keepdim=True).float()
    if mode == "energy":
        total = ranked.sum(-1, keepdim=True)
        # A row with no mass at all (every score 0) is treated as uniform over its visible blocks.
        ranked = torch.where(total > 0, ranked, torch.ones_like(ranked))
        total = torch.where(total > 0, total, n_vis)
        preceding = (ranked.cumsum(-1) - ranked) / total.clamp(min=1e-30)
    else:  # quantile
        preceding = torch.arange(s.shape[-1], device=s.device, dtype=torch.float32) / n_vis.clamp(min=1)
        preceding = preceding.expand_as(ranked)
    ranked_levels = torch.zeros(s.shape, dtype=torch.int8, device=s.device)
    for lvl, tau in reversed(list(zip(levels, thresholds))):  # the finest satisfied level wins
        ranked_levels = torch.where(preceding < tau, torch.tensor(lvl, dtype=torch.int8, device=s.device), ranked_levels)
    out = torch.empty_like(ranked_levels).scatter_(-1, order, ranked_levels)
    return torch.where(visible, out, torch.zeros_like(out))


def block_similarity(
    k: torch.Tensor,
    *,
    block_k: int = 128,
    key_padding_mask: torch.Tensor | None = None,
    reduce: str = "mean",
) -> torch.Tensor:
    """``[B, Hkv, nk, 3]``: for key block ``j`` and pooling factor ``p = 2, 4, 8`` (last axis), the
    cosine similarity of the token pairs ``(t*p, t*p + p - 1)`` inside the block (pairs with both
    tokens valid), reduced over the block's pairs: ``reduce="mean"`` gives ``sim_p``, their mean
    (how alike the tokens a level-``p`` mean stands for are, on average: the similarity cap reads
    it), ``"min"`` gives ``wsim_p``, the least similar pair's (the group pooling represents worst:
    the budget policy's fidelity reads it); ``-inf`` where the block has no such pair."""
    if reduce not in ("mean", "min"):
        raise ValueError(f"reduce must be 'mean' or 'min', got {reduce!r}")
    B, H, Lk, D = k.shape
    nk = num_blocks(Lk, block_k)
    valid = valid_keys(key_padding_mask, B, Lk, k.device)
    kf = F.pad(k.to(_acc_dtype(k.dtype)), (0, 0, 0, nk * block_k - Lk))
    vf = F.pad(valid, (0, nk * block_k - Lk))
    out = []
    for p in POOL_FACTORS[1:]:
        first, last = kf[..., 0::p, :], kf[..., p - 1 :: p, :]
        ok = (vf[:, 0::p] & vf[:, p - 1 :: p]).float()  # [B, groups]
        sim = F.cosine_similarity(first, last, dim=-1)  # [B, H, groups]
        per_block = block_k // p  # groups per key block (block_k is a multiple of 8)
        cnt = ok.view(B, 1, nk, per_block).sum(-1).expand(B, H, nk)
        if reduce == "mean":
            red = (sim * ok[:, None]).view(B, H, nk, per_block).sum(-1) / cnt.clamp(min=1)
        else:
            red = torch.where(ok[:, None] > 0, sim, torch.full_like(sim, float("inf"))).view(B, H, nk, per_block).amin(-1)
        out.append(torch.where(cnt > 0, red, torch.full_like(red, float("-inf"))))
    return torch.stack(out, dim=-1)


def similarity_cap(
    k: torch.Tensor,
    *,
    block_k: int = 128,
    thresholds: Mapping[int, float] | Sequence[float] = (0.75, 0.70, 0.70),
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Largest pooling factor each key block allows, ``[B, Hkv, nk]`` (paper appendix B.1).

    ``p`` is allowed iff the block's ``sim_p`` (:func:`block_similarity`) exceeds
    ``thresholds[p]``; the cap is the largest allowed ``p``, 1 if none. ``thresholds`` maps
    p -> threshold, or lists them for p = 2, 4, 8.
    """
    return cap_from_similarity(block_similarity(k, block_k=block_k, key_padding_mask=key_padding_mask), thresholds)


def cap_from_similarity(sims: torch.Tensor, thresholds: Mapping[int, float] | Sequence[float]) -> torch.Tensor:
    """The similarity cap ``[..., nk]`` (int8) of block similarities ``[..., nk, 3]``."""
    if not isinstance(thresholds, Mapping):
        thresholds = dict(zip((2, 4, 8), thresholds))
    cap = torch.ones(sims.shape[:-1], dtype=torch.int8, device=sims.device)
    for r, p in enumerate(POOL_FACTORS[1:]):
        if p in thresholds:
            cap = torch.where(sims[..., r] > thresholds[p], torch.tensor(p, dtype=torch.int8, device=sims.device), cap)
    return cap


def pooling_fidelity(sims: torch.Tensor, levels: Sequence[int], cap: torch.Tensor | None = None) -> torch.Tensor:
    """``[..., nk, 4]``: how much of a block's attention each level keeps, for p = 1, 2, 4, 8 (the
    budget policy's utility per unit of importance): 1 at level 1, ``clamp(sims_p, 0, 1)`` at a
    pooled level (a mean of dissimilar keys keeps little), 0 for a level not in ``levels`` or
    above the block's similarity ``cap``. ``build_level_map`` passes the least similar pair's
    similarity (:func:`block_similarity` with ``reduce="min"``): a row whose weight sits on one
    key keeps only what that key's group keeps, and nothing in a block's importance says which
    group that is."""
    q = torch.cat([torch.ones_like(sims[..., :1]), sims.clamp(0.0, 1.0)], dim=-1)
    for r, p in enumerate(POOL_FACTORS):
        allowed = p in levels
        if cap is not None and p > 1:
            allowed = (cap >= p) & allowed
        q[..., r] = torch.where(torch.as_tensor(allowed, device=q.device), q[..., r], torch.zeros_like(q[..., r]))
    return q


_LEVEL_COST = {1: 1.0, 2: 0.5, 4: 0.25, 8: 0.125}
#: Bisection steps of the budget policy's multiplier (relative precision 2^-32 of its range).
BUDGET_STEPS = 32
#: Share of a row's budget the budget policy spends first on reading its top-ranked blocks at full
#: resolution (the ``budget_full_share`` of a preset; docs/semantics.md section 7, step 3).
BUDGET_FULL_SHARE = 0.5


def _budget_choice(s: torch.Tensor, fidelity: torch.Tensor, lam: torch.Tensor):
    """Per block, the level maximising ``s * q(p) - lam * cost(p)`` (skip: 0), cheapest first so
    that ties keep the cheaper level; returns (level int8, cost)."""
    level = torch.zeros(s.shape, dtype=torch.int8, device=s.device)
    cost = torch.zeros_like(s)
    best = torch.zeros_like(s)
    for r, p in reversed(list(enumerate(POOL_FACTORS))):
        value = s * fidelity[..., r] - lam * _LEVEL_COST[p]
        better = value > best
        best = torch.where(better, value, best)
        level = torch.where(better, torch.tensor(p, dtype=torch.int8, device=s.device), level)
        cost = torch.where(better, torch.full_like(cost, _LEVEL_COST[p]), cost)
    return level, cost


def check_full_share(full_share) -> None:
    """Reject a ``budget_full_share`` that is not a number in [0, 1]."""
    if isinstance(full_share, bool) or not isinstance(full_share, (int, float)) or not 0.0 <= full_share <= 1.0:
        raise ValueError(f"budget_full_share must be a number in [0, 1], got {full_share!r}")


def assign_budget(
    scores: torch.Tensor,
    visible: torch.Tensor,
    forced: torch.Tensor,
    fidelity: torch.Tensor,
    *,
    sparsity: float,
    full_share: float = BUDGET_FULL_SHARE,
) -> torch.Tensor:
    """Budget-aware levels (``mode="budget"``): per query-block row, the levels that keep the most
    of the row's attention for a compute budget of ``(1 - sparsity)`` of its visible pairs.

    A block ``j`` at level ``p`` costs ``1/p`` (skipped: 0) and keeps ``s_j * q_j(p)`` of the
    attention, ``s_j`` its importance and ``q_j(p)`` the level's fidelity (:func:`pooling_fidelity`).
    The forced blocks (``forced``, level 1) spend their cost first; of the budget ``b`` left for
    the other (free) blocks, the free block at rank ``t`` (importance descending, index
    ascending; ``t`` from 0) is then read at level 1 when ``t < full_share * b``, ``t + 1 <= b``
    and its importance is above the mean of the free blocks': a prefix of the blocks binary
    top-k would read, about ``full_share`` of the budget, at least one block when ``b >= 1``.
    The optimiser spends the rest on the remaining blocks: each independently takes the level
    maximising ``s_j q_j(p) - lambda / p``, and ``lambda`` is the smallest multiplier (bisection,
    32 steps) whose choices fit the budget: the optimum on the upper hull of each block's (cost,
    kept attention) options; the budget that tied blocks leave then goes to them in rank order
    (the blocks one step finer at a slightly smaller multiplier, best-ranked first).

    Why the first step: the utility model trusts the importance's magnitudes, and an estimate
    that averages logits (the antidiagonal) flattens a peak: a block whose weight sits on one
    key unlike the rest (a needle) shows up barely above the others, so with little budget the
    optimiser buys many pooled blocks, and pooling averages the peak away. The ranking is what
    the estimate gets right; spending a share of the budget on it in rank order bounds the loss
    against binary top-k (it keeps the top blocks top-k at ``full_share`` of the budget keeps)
    while the optimiser keeps coarse coverage elsewhere. A block at or below the mean carries no
    sign of a peak (a flat row has no ranking worth following), so it is left to the optimiser.
    The same peak inside a block is why :func:`build_level_map` gives the optimiser the fidelity
    of the block's least similar pair rather than the mean. ``full_share=0`` is the optimiser
    alone; with ``levels=(1,)`` the whole is binary top-k block-sparse attention. A row with no importance at all is uniform over its visible blocks.
    """
    check_full_share(full_share)
    visible = visible.expand_as(scores)
    forced = forced.expand_as(scores) & visible
    s = torch.where(visible, scores.float().clamp(min=0), torch.zeros_like(scores, dtype=torch.float32))
    total = s.sum(-1, keepdim=True)
    s = torch.where(total > 0, s, visible.float())
    free = visible & ~forced
    s = torch.where(free, s, torch.zeros_like(s))
    fidelity = fidelity.expand(*scores.shape, 4).float()
    density = torch.tensor(1.0 - sparsity, dtype=torch.float32, device=s.device)
    budget = density * visible.sum(-1, keepdim=True).float() - forced.sum(-1, keepdim=True).float()
    # Rank order of the free blocks (importance descending, index ascending); they come first.
    priority = torch.where(free, scores.float().clamp(min=0), torch.full_like(s, -1.0))
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    # 1. Level 1 for the top-ranked free blocks above the mean, within full_share of the budget.
    share = torch.tensor(full_share, dtype=torch.float32, device=s.device)
    rank = torch.arange(s.shape[-1], device=s.device, dtype=torch.float32)
    above = free.sum(-1, keepdim=True).float() * torch.gather(s, -1, order) > s.sum(-1, keepdim=True)
    first = above & (rank < share * budget) & (rank + 1 <= budget)
    first = torch.empty_like(first).scatter_(-1, order, first)
    budget = budget - first.sum(-1, keepdim=True).float()
    free = free & ~first
    s = torch.where(free, s, torch.zeros_like(s))
    # 2. The optimiser on the rest.
    lo = torch.zeros_like(total)
    hi = 8.0 * s.amax(-1, keepdim=True)
    for _ in range(BUDGET_STEPS):
        mid = (lo + hi) * 0.5
        _, cost = _budget_choice(s, fidelity, mid)
        fits = torch.where(free, cost, torch.zeros_like(cost)).sum(-1, keepdim=True) <= budget
        hi = torch.where(fits, mid, hi)
        lo = torch.where(fits, lo, mid)
    level, cost = _budget_choice(s, fidelity, hi)
    # Blocks tied at the multiplier (equal importance, say) move together, so the last step may
    # leave budget unused: upgrade the blocks that a slightly smaller multiplier would upgrade,
    # best-ranked first (importance descending, index ascending), while the budget allows.
    finer, finer_cost = _budget_choice(s, fidelity, lo)
    extra = torch.where(free, finer_cost - cost, torch.zeros_like(cost))
    left = budget - torch.where(free, cost, torch.zeros_like(cost)).sum(-1, keepdim=True)
    upgrade = torch.gather(extra, -1, order).cumsum(-1) <= left
    upgrade = torch.empty_like(upgrade).scatter_(-1, order, upgrade) & (extra > 0)
    level = torch.where(upgrade, finer, level)
    level = torch.where(free, level, torch.zeros_like(level))
    return torch.where(forced | first, torch.ones_like(level), level)


def block_importance(q, k, *, scores=None, estimator="antidiagonal", causal=False, scale=None, block_q=128,
                     block_k=128, stride=8, key_padding_mask=None, generator=None, antidiagonal=None,
                     estimate_precision="full"):
    """The importance step of :func:`build_level_map`: ``scores`` checked against
    ``[B, Hq, nq, nk]`` when given, else computed by ``estimator`` (``antidiagonal`` with
    ``stride`` and ``estimate_precision``, through the ``antidiagonal`` function when given, e.g.
    the Triton kernel; or ``sampled`` with ``stride`` samples)."""
    B, Hq, Lq, _ = q.shape
    expected = (B, Hq, num_blocks(Lq, block_q), num_blocks(k.shape[2], block_k))
    if scores is not None:
        if tuple(scores.shape) != expected:
            raise ValueError(f"scores must have shape [B, Hq, nq, nk] = {expected}, got {tuple(scores.shape)}")
        return scores
    if estimator == "antidiagonal":
        return (antidiagonal or antidiagonal_importance)(
            q, k, causal=causal, scale=scale, block_q=block_q, block_k=block_k, stride=stride,
            key_padding_mask=key_padding_mask, precision=estimate_precision,
        )
    if estimator == "sampled":
        return sampled_importance(q, k, scale=scale, block_q=block_q, block_k=block_k, samples=stride,
                                  key_padding_mask=key_padding_mask, generator=generator)
    raise ValueError(f"estimator must be 'antidiagonal' or 'sampled', got {estimator!r}")


def build_level_map(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    mode: str = "energy",
    levels: Sequence[int] = (1, 2, 4, 8),
    thresholds: Sequence[float] = (0.7, 0.8, 0.9, 0.9),
    similarity: Mapping[int, float] | Sequence[float] | None = (0.75, 0.70, 0.70),
    estimator: str = "antidiagonal",
    stride: int = 8,
    text_mask: torch.Tensor | None = None,
    dense_tail_tokens: int = 512,
    min_full_fraction: float = 0.06,
    share_kv_group: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    antidiagonal=None,
    scores: torch.Tensor | None = None,
    estimate_precision: str = "full",
    target_sparsity: float | None = None,
    block_sims: torch.Tensor | None = None,
    budget_full_share: float = BUDGET_FULL_SHARE,
    block_min_sims: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full mask generator of section 7: an ``int8`` level map ``[B, Hm, nq, nk]``.

    Steps: block importance (``antidiagonal`` or ``sampled``), level assignment (``energy`` or
    ``quantile``) over the visible blocks, the similarity cap (``similarity=None`` turns it off),
    forced level-1 blocks (sink, diagonal, text), and at least ``ceil(min_full_fraction * n)``
    level-1 blocks per row of ``n`` visible blocks. ``Hm`` is Hkv when ``share_kv_group`` (the
    importance of a GQA group is summed), else Hq. ``mode='dense'`` gives every visible pair level 1.
    ``antidiagonal`` replaces the importance function (same signature), e.g. by a kernel;
    ``scores [B, Hq, nq, nk]`` skips the estimate altogether (already computed importance);
    ``estimate_precision`` (``full`` or ``fp8``) is the antidiagonal estimate's
    (:func:`antidiagonal_importance`). ``mode='budget'`` spends a compute budget of
    ``1 - target_sparsity`` per row (:func:`assign_budget`; ``thresholds`` unused; the similarity
    thresholds, when given, forbid a pooled level to a block as the cap does; ``budget_full_share``
    the share of the budget first spent on the top-ranked blocks at level 1); ``block_sims
    [B, Hkv, nk, 3]`` replaces :func:`block_similarity` (already computed) for the cap, and
    ``block_min_sims`` (the same shape) its ``reduce="min"`` form for the budget's fidelity.
    """
    check_qkv(q, k, k)
    check_block_sizes(block_q, block_k)
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    check_key_padding_mask(key_padding_mask, B, Lk, k.device)
    visible = block_visibility(
        batch=B, q_len=Lq, k_len=Lk, block_q=block_q, block_k=block_k, causal=causal,
        key_padding_mask=key_padding_mask, device=q.device,
    )[:, None]
    Hm = Hkv if share_kv_group else Hq
    if mode != "dense":
        check_assignment(mode, levels, thresholds, target_sparsity)
        check_full_share(budget_full_share)
    if mode == "dense":
        return visible.expand(B, Hm, -1, -1).to(torch.int8)

    scores = block_importance(q, k, scores=scores, estimator=estimator, causal=causal, scale=scale,
                              block_q=block_q, block_k=block_k, stride=stride, key_padding_mask=key_padding_mask,
                              generator=generator, antidiagonal=antidiagonal, estimate_precision=estimate_precision)
    if share_kv_group:
        scores = scores.view(B, Hkv, Hq // Hkv, *scores.shape[-2:]).sum(2)

    forced = forced_full_blocks(
        batch=B, q_len=Lq, k_len=Lk, block_q=block_q, block_k=block_k, causal=causal, text_mask=text_mask,
        dense_tail_tokens=dense_tail_tokens, key_padding_mask=key_padding_mask, device=q.device,
    )[:, None]
    cap = None
    if similarity is not None:
        sims = block_sims
        if sims is None:
            sims = block_similarity(k, block_k=block_k, key_padding_mask=key_padding_mask)
        cap = cap_from_similarity(sims, similarity).repeat_interleave(Hm // Hkv, dim=1)[:, :, None, :]  # per map head
    if mode == "budget":
        worst = block_min_sims
        if worst is None:
            worst = block_similarity(k, block_k=block_k, key_padding_mask=key_padding_mask, reduce="min")
        worst = worst.repeat_interleave(Hm // Hkv, dim=1)[:, :, None]  # [B, Hm, 1, nk, 3]
        fidelity = pooling_fidelity(worst, levels, cap)
        level_map = assign_budget(scores, visible, forced, fidelity, sparsity=target_sparsity,
                                  full_share=budget_full_share)
    else:
        level_map = assign_levels(scores, visible, mode=mode, levels=levels, thresholds=thresholds)
        if cap is not None:
            level_map = torch.where(level_map > 0, torch.minimum(level_map, cap), level_map)
    level_map = torch.where(forced & visible, torch.ones_like(level_map), level_map)

    # Keep at least ceil(min_full_fraction * n_visible) level-1 blocks per row: the blocks
    # already at level 1 rank first, then the highest scores.
    need = torch.ceil(min_full_fraction * visible.sum(-1, keepdim=True).float()).long()
    priority = torch.where(visible, scores.float(), torch.full_like(scores, -1.0, dtype=torch.float32))
    priority = torch.where(level_map == 1, torch.full_like(priority, float("inf")), priority)
    rank = torch.argsort(torch.argsort(priority, dim=-1, descending=True, stable=True), dim=-1)
    promote = visible & (rank < need)
    return torch.where(promote, torch.ones_like(level_map), level_map)
