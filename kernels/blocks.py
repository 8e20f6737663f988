"""Block geometry: which (query block, key block) pairs are visible, whole or forced, and what a
level map costs (docs/semantics.md sections 2, 6 and 7.5).

Shared by the reference (the definition of the attention and the mask generator), the layout
writer and the statistics; the Triton kernels compute the same facts in their own way and are
tested against these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import num_blocks


def valid_keys(key_padding_mask: torch.Tensor | None, batch: int, k_len: int, device) -> torch.Tensor:
    """``[B, Lk]`` bool: the real keys (all of them without a padding mask)."""
    if key_padding_mask is None:
        return torch.ones(batch, k_len, dtype=torch.bool, device=device)
    return key_padding_mask


def per_kv_head(level_map: torch.Tensor, q_heads: int, kv_heads: int) -> torch.Tensor:
    """View a level map as ``[B, Hkv, G or 1, nq, nk]`` so it broadcasts against grouped queries."""
    B, Hm, nq, nk = level_map.shape
    if Hm == q_heads:
        return level_map.view(B, kv_heads, q_heads // kv_heads, nq, nk)
    return level_map.view(B, kv_heads, 1, nq, nk)


def block_visibility(
    *,
    batch: int,
    q_len: int,
    k_len: int,
    block_q: int,
    block_k: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """``[B, nq, nk]`` bool: the pairs that can hold a visible key.

    Causal: key block ``j`` is visible to query block ``i`` iff ``j*block_k`` is at most the last
    absolute position of block ``i``. Key blocks holding no valid (unpadded) token are invisible.
    """
    nq, nk = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    vis = torch.ones(batch, nq, nk, dtype=torch.bool, device=device)
    if causal:
        last_pos = (k_len - q_len) + torch.clamp(torch.arange(1, nq + 1, device=device) * block_q, max=q_len) - 1
        vis = vis & ((torch.arange(nk, device=device) * block_k)[None, :] <= last_pos[:, None])[None]
    if key_padding_mask is not None:
        vis = vis & valid_key_blocks(key_padding_mask, k_len, block_k)[:, None, :]
    return vis


def density(
    level_map,
    *,
    causal: bool | None = None,
    q_len: int | None = None,
    k_len: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute density ``rho`` per ``[B, Hm]``: the mean of ``1/p`` (0 when skipped) over visible pairs.

    ``1 - rho`` is the sparsity of a binary block-sparse method with the same FLOPs (the paper's
    definition of PSA's sparsity). A head with no visible pair has density 1 (nothing skipped).
    A :class:`~psa_kernels.LevelMap` carries its geometry (pass nothing else); a dense map
    needs ``causal``, ``q_len``, ``k_len``, ``block_q``, ``block_k`` (and the padding mask).
    """
    geometry = dict(causal=causal, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k)
    if not isinstance(level_map, torch.Tensor) and hasattr(level_map, "plan"):  # a LevelMap
        if any(v is not None for v in geometry.values()) or key_padding_mask is not None:
            raise ValueError("a LevelMap carries its geometry: call density(layout) / sparsity(layout) alone")
        return level_map.density()
    missing = [name for name, value in geometry.items() if value is None]
    if missing:
        raise ValueError(f"the density of a dense level map needs {', '.join(missing)}")
    B = level_map.shape[0]
    vis = block_visibility(
        batch=B, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k, causal=causal,
        key_padding_mask=key_padding_mask, device=level_map.device,
    )[:, None]
    lm = level_map.float()
    cost = torch.where(lm > 0, 1.0 / lm.clamp(min=1), torch.zeros_like(lm))
    n_vis = vis.sum((-1, -2)).float()
    rho = (cost * vis).sum((-1, -2)) / n_vis.clamp(min=1)
    return torch.where(n_vis > 0, rho, torch.ones_like(rho))


def sparsity(level_map, **kwargs) -> torch.Tensor:
    """``1 - density(level_map, **kwargs)``, per ``[B, Hm]``."""
    return 1.0 - density(level_map, **kwargs)


def valid_key_blocks(key_padding_mask: torch.Tensor, k_len: int, block_k: int) -> torch.Tensor:
    """``[B, nk]`` bool: the key blocks holding at least one valid (unpadded) token."""
    nk = num_blocks(k_len, block_k)
    return F.pad(key_padding_mask, (0, nk * block_k - k_len)).view(key_padding_mask.shape[0], nk, block_k).any(-1)


def forced_full_blocks(
    *,
    batch: int,
    q_len: int,
    k_len: int,
    block_q: int,
    block_k: int,
    causal: bool,
    text_mask: torch.Tensor | None = None,
    dense_tail_tokens: int = 512,
    key_padding_mask: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """``[B, nq, nk]`` bool: the pairs that must stay at level 1 (section 7.4).

    Key block 0 (the attention sink; with left padding also the block of the first real token),
    the diagonal blocks when causal (every key block overlapping the query block's absolute
    positions), and every row and column holding text. ``text_mask [B, Lk]`` marks text keys
    (queries are the last ``Lq`` of them); without it the last ``dense_tail_tokens`` count as text.
    """
    nq, nk = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    offset = k_len - q_len
    cols, rows = forced_columns_and_rows(batch=batch, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k,
                                         text_mask=text_mask, dense_tail_tokens=dense_tail_tokens,
                                         key_padding_mask=key_padding_mask, device=device)
    forced = cols[:, None, :] | rows[:, :, None]
    if causal:
        starts = offset + torch.arange(nq, device=device) * block_q
        ends = offset + torch.clamp(torch.arange(1, nq + 1, device=device) * block_q, max=q_len) - 1
        j = torch.arange(nk, device=device)
        forced |= ((j[None, :] >= (starts // block_k)[:, None]) & (j[None, :] <= (ends // block_k)[:, None]))[None]
    return forced


def forced_columns_and_rows(
    *,
    batch: int,
    q_len: int,
    k_len: int,
    block_q: int,
    block_k: int,
    text_mask: torch.Tensor | None = None,
    dense_tail_tokens: int = 512,
    key_padding_mask: torch.Tensor | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of :func:`forced_full_blocks` that are whole columns and rows: ``[B, nk]`` (the
    sink, the first real token's block, text keys) and ``[B, nq]`` (text queries)."""
    nq, nk = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    offset = k_len - q_len
    cols = torch.zeros(batch, nk, dtype=torch.bool, device=device)
    cols[:, 0] = True
    if key_padding_mask is not None:
        first_real = torch.argmax(key_padding_mask.int(), dim=-1) // block_k  # [B]
        cols |= torch.arange(nk, device=device)[None, :] == first_real[:, None]
    if text_mask is None:
        text_mask = torch.zeros(batch, k_len, dtype=torch.bool, device=device)
        text_mask[:, max(0, k_len - dense_tail_tokens) :] = dense_tail_tokens > 0
    elif tuple(text_mask.shape) != (batch, k_len):
        raise ValueError(f"text_mask must have shape [B, Lk] = {(batch, k_len)}, got {tuple(text_mask.shape)}")
    cols |= F.pad(text_mask, (0, nk * block_k - k_len)).view(batch, nk, block_k).any(-1)
    # Query i sits at key position offset + i (bottom-right aligned); with more queries than
    # keys the first -offset queries have no key position and are not text.
    text_q = text_mask[:, offset:] if offset >= 0 else F.pad(text_mask, (-offset, 0))
    rows = F.pad(text_q, (0, nq * block_q - q_len)).view(batch, nq, block_q).any(-1)
    return cols, rows


def block_flags(q_len: int, k_len: int, block_q: int, block_k: int, causal: bool, key_padding_mask, device):
    """Per pair ``[B, nq, nk]``: readable (not past the causal diagonal), visible (readable and
    holding a real key) and whole (read without masks) - the geometry a plan is made of."""
    nq, nk = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    j = torch.arange(nk, device=device)
    i = torch.arange(nq, device=device)
    offset = k_len - q_len
    block_end = (j + 1) * block_k
    readable = torch.ones(nq, nk, dtype=torch.bool, device=device)
    whole = (block_end <= k_len)[None, :].expand(nq, nk)
    if causal:
        last_pos = offset + torch.clamp((i + 1) * block_q, max=q_len) - 1
        readable = (j[None, :] * block_k <= last_pos[:, None])
        whole = whole & (block_end[None, :] - 1 <= (offset + i * block_q)[:, None])
    B = 1 if key_padding_mask is None else key_padding_mask.shape[0]
    readable, whole = readable[None].expand(B, nq, nk), whole[None].expand(B, nq, nk)
    visible = readable
    if key_padding_mask is not None:
        blocks = torch.nn.functional.pad(key_padding_mask, (0, nk * block_k - k_len)).view(B, nk, block_k)
        any_valid, all_valid = blocks.any(-1), blocks.all(-1)
        visible = visible & any_valid[:, None, :]
        whole = whole & all_valid[:, None, :]
    return readable, visible, whole
