"""Per-block facts the level assignment needs, in one Triton launch.

One program per (block index ``t``, batch, kv head) computes:

- the similarity cap of key block ``t`` (paper appendix B.1, exactly
  :func:`psa_kernels.reference.similarity_cap`): for pooling factor ``p`` the mean cosine
  similarity of the token pairs ``(t*p, t*p + p - 1)`` of the block (pairs with both tokens
  real); ``p`` is allowed when it exceeds the factor's threshold, and the cap is the largest
  allowed factor (1 if none). One read of K per factor, fp32 arithmetic;
- on the first kv head only, the block flags of :func:`psa_kernels.blocks.forced_columns_and_rows`
  and :func:`psa_kernels.blocks.valid_key_blocks`: whether key block ``t`` holds text, some
  real token, only real tokens, and whether query block ``t`` holds text (queries sit at key
  positions ``Lk - Lq + i``). Without a text mask the last ``tail`` keys count as text.

Before this kernel, the cap was one launch and the flags a dozen small tensor ops per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import cdiv, int8_view, launch_kernel, next_pow2, on_device


@triton.jit
def _factor_similarity(K, PAD, b, block, Lk, stride_kn, offs_d, d_ok,
                       P: tl.constexpr, PAIRS: tl.constexpr, PAIRS_POW2: tl.constexpr, HAS_PAD: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Mean and least cosine similarity of the block's token pairs ``(t*P, t*P + P - 1)``; -inf
    without one."""
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
    least = tl.min(tl.where(ok, sim, float("inf")), 0)
    return tl.where(count > 0, mean, float("-inf")), tl.where(count > 0, least, float("-inf"))


@triton.jit
def _key_blocks_kernel(
    K, PAD, TEXT, CAP, SIMS, MIN_SIMS, TEXT_COLS, TEXT_ROWS, ANY_VALID, ALL_VALID,
    thr2, thr4, thr8,
    stride_kb, stride_kh, stride_kn,
    Hkv, Lq, Lk, nq, nk, block_q, tail,
    USE2: tl.constexpr, USE4: tl.constexpr, USE8: tl.constexpr, SIMS_OUT: tl.constexpr, MIN_SIMS_OUT: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_TEXT: tl.constexpr, FLAGS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_K_POW2: tl.constexpr, BLOCK_Q_POW2: tl.constexpr, PAIRS2: tl.constexpr, PAIRS4: tl.constexpr, PAIRS8: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    if t < nk:
        if USE2 or USE4 or USE8 or SIMS_OUT or MIN_SIMS_OUT:
            offs_d = tl.arange(0, BLOCK_D)
            d_ok = offs_d < HEAD_DIM
            k = K + b * stride_kb + h * stride_kh
            sim2, least2 = _factor_similarity(k, PAD, b, t, Lk, stride_kn, offs_d, d_ok, 2, BLOCK_K // 2,
                                                PAIRS2, HAS_PAD, BLOCK_K)
            sim4, least4 = _factor_similarity(k, PAD, b, t, Lk, stride_kn, offs_d, d_ok, 4, BLOCK_K // 4,
                                                PAIRS4, HAS_PAD, BLOCK_K)
            sim8, least8 = _factor_similarity(k, PAD, b, t, Lk, stride_kn, offs_d, d_ok, 8, BLOCK_K // 8,
                                                PAIRS8, HAS_PAD, BLOCK_K)
            if SIMS_OUT:
                tl.store(SIMS + (bh * nk + t) * 3, sim2)
                tl.store(SIMS + (bh * nk + t) * 3 + 1, sim4)
                tl.store(SIMS + (bh * nk + t) * 3 + 2, sim8)
            if MIN_SIMS_OUT:
                tl.store(MIN_SIMS + (bh * nk + t) * 3, least2)
                tl.store(MIN_SIMS + (bh * nk + t) * 3 + 1, least4)
                tl.store(MIN_SIMS + (bh * nk + t) * 3 + 2, least8)
            if USE2 or USE4 or USE8:
                # Ascending factors: the largest allowed one wins, as in the reference.
                cap = 1
                if USE2:
                    if sim2 > thr2:
                        cap = 2
                if USE4:
                    if sim4 > thr4:
                        cap = 4
                if USE8:
                    if sim8 > thr8:
                        cap = 8
                tl.store(CAP + bh * nk + t, cap.to(tl.int8))
    if FLAGS:
        if h == 0:
            if t < nk:
                offs = tl.arange(0, BLOCK_K_POW2)
                pos = t * BLOCK_K + offs
                in_seq = (pos < Lk) & (offs < BLOCK_K)
                if HAS_TEXT:
                    text = tl.load(TEXT + b * Lk + pos, mask=in_seq, other=0) != 0
                else:
                    text = in_seq & (pos >= Lk - tail) & (tail > 0)
                tl.store(TEXT_COLS + b * nk + t, tl.max(text.to(tl.int8), 0))
                if HAS_PAD:
                    real = tl.load(PAD + b * Lk + pos, mask=in_seq, other=0) != 0
                    tl.store(ANY_VALID + b * nk + t, tl.max(real.to(tl.int8), 0))
                    # A block is whole when every key it spans (up to the block size) is real.
                    tl.store(ALL_VALID + b * nk + t, tl.min(tl.where(in_seq, real, True).to(tl.int8), 0))
            if t < nq:
                offs_q = tl.arange(0, BLOCK_Q_POW2)
                qi = t * block_q + offs_q
                kpos = Lk - Lq + qi  # the key position of query qi (bottom-right aligned)
                ok = (qi < Lq) & (kpos >= 0) & (offs_q < block_q)
                if HAS_TEXT:
                    text = tl.load(TEXT + b * Lk + kpos, mask=ok, other=0) != 0
                else:
                    text = ok & (kpos >= Lk - tail) & (tail > 0)
                tl.store(TEXT_ROWS + b * nq + t, tl.max(text.to(tl.int8), 0))


def key_blocks(k: torch.Tensor, *, q_len: int, block_q: int, block_k: int, thresholds: dict | None,
               text_mask: torch.Tensor | None = None, dense_tail_tokens: int = 512,
               key_padding_mask: torch.Tensor | None = None, flags: bool = True, sims: bool = False,
               min_sims: bool = False) -> dict:
    """``cap [B, Hkv, nk]`` (int8; None without thresholds), with ``sims`` the block similarities
    ``[B, Hkv, nk, 3]`` (fp32, :func:`psa_kernels.reference.block_similarity`), with ``min_sims``
    their least similar pair's (``reduce="min"``; the budget policy's fidelity) and, with
    ``flags``, the int8 block flags ``text_cols [B, nk]``, ``text_rows [B, nq]``, ``any_valid`` /
    ``all_valid [B, nk]`` (None without padding). ``thresholds`` maps factors (a subset of 2, 4,
    8) to thresholds. Inputs validated by the caller; ``block_k`` a multiple of 8."""
    B, H, Lk, D = k.shape
    nk, nq = cdiv(Lk, block_k), cdiv(q_len, block_q)
    device = k.device
    thresholds = thresholds or {}
    cap = torch.empty(B, H, nk, dtype=torch.int8, device=device) if thresholds else None
    out = dict(cap=cap, sims=torch.empty(B, H, nk, 3, dtype=torch.float32, device=device) if sims else None,
               min_sims=torch.empty(B, H, nk, 3, dtype=torch.float32, device=device) if min_sims else None,
               text_cols=None, text_rows=None, any_valid=None, all_valid=None)
    if flags:
        out.update(text_cols=torch.empty(B, nk, dtype=torch.int8, device=device),
                   text_rows=torch.empty(B, nq, dtype=torch.int8, device=device))
        if key_padding_mask is not None:
            out.update(any_valid=torch.empty(B, nk, dtype=torch.int8, device=device),
                       all_valid=torch.empty(B, nk, dtype=torch.int8, device=device))
    if not thresholds and not flags and not sims and not min_sims:
        return out
    k = k if k.stride(-1) == 1 else k.contiguous()
    pad = int8_view(key_padding_mask) if key_padding_mask is not None else None
    text = int8_view(text_mask) if text_mask is not None else None
    filler = next(t for t in (cap, out["sims"], out["min_sims"], out["text_cols"]) if t is not None)
    pairs = {p: next_pow2(max(1, block_k // p)) for p in (2, 4, 8)}
    grid = (max(nk, nq) if flags else nk, B * H)
    with on_device(k):
        launch_kernel(_key_blocks_kernel, grid,
            k, pad if pad is not None else filler, text if text is not None else filler, cap if cap is not None else filler,
            out["sims"] if sims else filler, out["min_sims"] if min_sims else filler,
            *(out[n] if out[n] is not None else filler for n in ("text_cols", "text_rows", "any_valid", "all_valid")),
            *(float(thresholds.get(p, 0.0)) for p in (2, 4, 8)),
            k.stride(0), k.stride(1), k.stride(2),
            H, q_len, Lk, nq, nk, block_q, int(dense_tail_tokens),
            USE2=2 in thresholds, USE4=4 in thresholds, USE8=8 in thresholds, SIMS_OUT=sims, MIN_SIMS_OUT=min_sims,
            HAS_PAD=pad is not None,
            HAS_TEXT=text is not None, FLAGS=flags, HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)),
            BLOCK_K=block_k, BLOCK_K_POW2=next_pow2(block_k),
            BLOCK_Q_POW2=next_pow2(block_q),
            PAIRS2=pairs[2], PAIRS4=pairs[4], PAIRS8=pairs[8],
            num_warps=4,
        )
    return out


def similarity_cap_triton(k: torch.Tensor, *, block_k: int, thresholds: dict,
                          key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Hkv, nk]`` int8 cap alone (the public :func:`psa_kernels.similarity_cap`)."""
    return key_blocks(k, q_len=k.shape[2], block_q=block_k, block_k=block_k, thresholds=thresholds,
                      key_padding_mask=key_padding_mask, flags=False)["cap"]


def padding_flags(key_padding_mask: torch.Tensor | None, k_len: int, block_k: int):
    """``(any_valid, all_valid)`` int8 ``[B, nk]``: key blocks holding some / only real tokens."""
    if key_padding_mask is None:
        return None, None
    nk = cdiv(k_len, block_k)
    blocks = F.pad(key_padding_mask, (0, nk * block_k - k_len), value=True).view(-1, nk, block_k)
    any_valid = F.pad(key_padding_mask, (0, nk * block_k - k_len)).view(-1, nk, block_k).any(-1)
    return any_valid.to(torch.int8), blocks.all(-1).to(torch.int8)
