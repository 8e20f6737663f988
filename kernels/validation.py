"""Input checks shared by every implementation of the PSA ops.

The reference and the Triton kernels accept exactly the same inputs; keeping the checks in one
place means a user gets the same error message whichever path serves the call.
"""

from __future__ import annotations

import math

import torch

#: Values a level map may hold: 0 skips a (query block, key block) pair, p > 0 reads its keys
#: mean-pooled over groups of p tokens (1 = full resolution).
LEVEL_VALUES = (0, 1, 2, 4, 8)
#: Pooling factors of the KV pyramid, finest first.
POOL_FACTORS = (1, 2, 4, 8)


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of ``block`` tokens covering ``length`` tokens (the last may be short)."""
    return math.ceil(length / block)


def check_block_sizes(block_q: int, block_k: int) -> None:
    if not isinstance(block_q, int) or block_q <= 0:
        raise ValueError(f"block_q must be a positive int, got {block_q!r}")
    if not isinstance(block_k, int) or block_k <= 0 or block_k % 8:
        raise ValueError(
            f"block_k must be a positive multiple of 8 (pooled groups of 8 tokens may not cross "
            f"a key block), got {block_k!r}"
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes ``q [B,Hq,Lq,D]``, ``k, v [B,Hkv,Lk,D]`` with ``Hq % Hkv == 0``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, L, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch (dim 0) and head_dim (dim 3)"
        )
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(
            f"the number of query heads ({Hq}) must be a multiple of the number of kv heads ({Hkv})"
        )
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_key_padding_mask(mask: torch.Tensor | None, batch: int, k_len: int, device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError("key_padding_mask must be a bool tensor [B, Lk] (True = real token)")
    if tuple(mask.shape) != (batch, k_len):
        raise ValueError(f"key_padding_mask must have shape [B, Lk] = {(batch, k_len)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device}, the keys on {device}")


def _is_layout(level_map) -> bool:
    """A :class:`LevelMap` (duck-typed: this module sits below level_map.py)."""
    return not isinstance(level_map, torch.Tensor) and hasattr(level_map, "plan")


def check_level_map(
    level_map: torch.Tensor,
    *,
    batch: int,
    q_heads: int,
    kv_heads: int,
    n_q_blocks: int,
    n_k_blocks: int,
    check_values: bool = True,
) -> None:
    """``level_map [B, Hm, nq, nk]`` with ``Hm`` in ``{Hq, Hkv}`` and values in ``LEVEL_VALUES``
    (a :class:`LevelMap`'s shape is its index lists'; its values were written by a builder)."""
    if _is_layout(level_map):
        level_map, check_values = level_map.indices, False
    if not isinstance(level_map, torch.Tensor) or level_map.is_floating_point() or level_map.dtype == torch.bool:
        raise ValueError("level_map must be an integer tensor [B, Hm, nq, nk] with values in {0, 1, 2, 4, 8}")
    if level_map.dim() != 4:
        raise ValueError(f"level_map must have shape [B, Hm, nq, nk], got {tuple(level_map.shape)}")
    B, Hm, nq, nk = level_map.shape
    if B != batch or (nq, nk) != (n_q_blocks, n_k_blocks):
        raise ValueError(
            f"level_map has shape {tuple(level_map.shape)}, expected [{batch}, Hm, {n_q_blocks}, {n_k_blocks}] "
            f"(nq = ceil(Lq / block_q), nk = ceil(Lk / block_k))"
        )
    if Hm not in (q_heads, kv_heads):
        raise ValueError(
            f"level_map has {Hm} heads; it must have one per query head ({q_heads}) or per kv head ({kv_heads})"
        )
    if check_values and level_map.numel():
        allowed = torch.tensor(LEVEL_VALUES, device=level_map.device, dtype=level_map.dtype)
        bad = ~torch.isin(level_map, allowed)
        if bool(bad.any()):
            raise ValueError(
                f"level_map holds values outside {LEVEL_VALUES}: {sorted(set(level_map[bad].tolist()))[:8]}"
            )


def check_attention_inputs(q, k, v, level_map, *, block_q, block_k, key_padding_mask, check_values=True):
    """All the checks of ``psa_attention``; returns ``(nq, nk)``."""
    check_qkv(q, k, v)
    check_block_sizes(block_q, block_k)
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    check_key_padding_mask(key_padding_mask, B, Lk, k.device)
    nq, nk = num_blocks(Lq, block_q), num_blocks(Lk, block_k)
    check_level_map(
        level_map, batch=B, q_heads=Hq, kv_heads=Hkv, n_q_blocks=nq, n_k_blocks=nk, check_values=check_values
    )
    device = level_map.indices.device if _is_layout(level_map) else level_map.device
    if device != q.device:
        raise ValueError(f"level_map is on {device}, q on {q.device}")
    return nq, nk
