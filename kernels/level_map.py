"""The compact level-map layout the attention kernel reads, which knows its own geometry.

A dense level map ``M [B, Hm, nq, nk]`` (values 0, 1, 2, 4, 8) is the interchange form. Like
FlexAttention's ``BlockMask`` (``kv_num_blocks`` + ``kv_indices``, plus the lengths it was built
for), :class:`LevelMap` keeps per query block one key-block list per level, the geometry those
lists were planned for, and what the kernel needs to walk them without looking at ``nk``
entries:

- ``counts [B, Hm, nq, 4]`` (int32): how many key blocks query block ``i`` lists at level
  ``p = 1, 2, 4, 8`` (columns 0..3).
- ``indices [B, Hm, nq, nk]`` (int16, int32 beyond 32,767 blocks): the key blocks of row ``i``
  grouped by level in the order 1, 2, 4, 8; the level-``p`` list of row ``i`` is
  ``indices[..., i, s_p : s_p + counts[..., i, p]]`` with ``s_p`` the sum of the counts of the
  finer levels. Inside a level, the *whole* blocks come first (every key real and, when causal,
  at or before the block's first query: read without masks), then the others, each part
  ascending. Entries past the total are the skipped blocks and are never read.
- ``plan [B, Hm, nq, 8]`` (int32): per level, how many listed blocks to read (columns 0..3;
  when causal, blocks starting after the query block's last query are listed but never read:
  they trail the list) and how many of those are whole (columns 4..7).
- ``cost [B, Hm, nq]`` (fp32): the row's compute, the sum of ``1/p`` over its visible pairs;
  ``visible [B, Hm, nq]`` (int32): its visible pairs. Density and sparsity come from these two
  without decoding the map (:meth:`density`).
- the geometry: ``block_q``, ``block_k``, ``q_len``, ``k_len``, ``causal`` and the key padding
  mask the plan was made for.

``Hm`` is Hq (a map per query head) or Hkv (one map shared by a GQA group). Where Triton serves
(CUDA, or the interpreter), layouts are written by one kernel (:mod:`psa_kernels.layout`), with
no host synchronisation, so they can be captured in a CUDA graph; elsewhere by tensor ops that
produce the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .blocks import block_flags
from .utils import index_dtype, kernels_available
from .validation import POOL_FACTORS, num_blocks

# Rank of a level value in the layout: 1 -> 0, 2 -> 1, 4 -> 2, 8 -> 3; 0 (skip) -> 4.
_RANK_OF_LEVEL = (4, 0, 1, 4, 2, 4, 4, 4, 3)


@dataclass(frozen=True)
class LevelMap:
    """Per-level key block lists of a level map, planned for one call's geometry."""

    counts: torch.Tensor  # [B, Hm, nq, 4] int32
    indices: torch.Tensor  # [B, Hm, nq, nk] int16 / int32
    plan: torch.Tensor  # [B, Hm, nq, 8] int32: blocks to read per level, then whole ones per level
    cost: torch.Tensor  # [B, Hm, nq] fp32: sum of 1/p over visible pairs
    visible: torch.Tensor  # [B, Hm, nq] int32: visible pairs
    block_q: int
    block_k: int
    q_len: int
    k_len: int
    causal: bool
    key_padding_mask: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # The dense map this layout encodes, when its builder kept it (saves to_dense() a pass).
    dense: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dense(cls, level_map: torch.Tensor, *, block_q: int, block_k: int, q_len: int | None = None,
                   k_len: int | None = None, causal: bool = False,
                   key_padding_mask: torch.Tensor | None = None) -> "LevelMap":
        """The layout of a dense map, planned for a call with these lengths (default: whole
        blocks), causality and key padding. Values other than 0, 1, 2, 4, 8 read as 0 (skip)."""
        nq, nk = level_map.shape[-2:]
        q_len = nq * block_q if q_len is None else q_len
        k_len = nk * block_k if k_len is None else k_len
        if (num_blocks(q_len, block_q), num_blocks(k_len, block_k)) != (nq, nk):
            raise ValueError(f"a level map of {nq} x {nk} blocks does not cover q_len {q_len} and k_len {k_len} "
                             f"with blocks of {block_q} x {block_k}")
        geometry = dict(block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, causal=causal,
                        key_padding_mask=key_padding_mask)
        if kernels_available(level_map.device):
            from .layout import compact_triton

            return cls(**geometry, **compact_triton(level_map, **geometry))
        return _compact_torch(level_map, **geometry)

    def planned_for(self, *, q_len: int, k_len: int, causal: bool, key_padding_mask) -> bool:
        """Whether this layout's plan fits a call with this geometry (else it must be re-planned)."""
        return (self.q_len, self.k_len, self.causal) == (q_len, k_len, causal) and (
            self.key_padding_mask is key_padding_mask
        )

    def replanned(self, *, q_len: int, k_len: int, causal: bool, key_padding_mask) -> "LevelMap":
        if self.planned_for(q_len=q_len, k_len=k_len, causal=causal, key_padding_mask=key_padding_mask):
            return self
        return LevelMap.from_dense(self.to_dense(), block_q=self.block_q, block_k=self.block_k, q_len=q_len,
                                   k_len=k_len, causal=causal, key_padding_mask=key_padding_mask)

    @classmethod
    def for_call(cls, level_map: "torch.Tensor | LevelMap", *, block_q: int, block_k: int, q_len: int, k_len: int,
                 causal: bool, key_padding_mask) -> "LevelMap":
        """A dense map or a layout, as the layout planned for a call with this geometry (the
        attention kernels' input)."""
        geometry = dict(q_len=q_len, k_len=k_len, causal=causal, key_padding_mask=key_padding_mask)
        if isinstance(level_map, LevelMap):
            return level_map.replanned(**geometry)
        return cls.from_dense(level_map, block_q=block_q, block_k=block_k, **geometry)

    def to_dense(self) -> torch.Tensor:
        """The ``int8`` map ``[B, Hm, nq, nk]`` this layout encodes."""
        if self.dense is not None:
            return self.dense.to(torch.int8)
        nk = self.indices.shape[-1]
        ends = self.counts.long().cumsum(-1)  # [B, Hm, nq, 4]
        position = torch.arange(nk, device=self.indices.device)
        # The level of list position s is the first level whose cumulative count exceeds s.
        rank = (position[..., None] >= ends[..., None, :]).sum(-1)  # [B, Hm, nq, nk], 4 = skipped
        values = torch.tensor((*POOL_FACTORS, 0), dtype=torch.int8, device=self.indices.device)[rank]
        out = torch.empty_like(values)
        return out.scatter_(-1, self.indices.long(), values)

    def density(self) -> torch.Tensor:
        """Compute density per ``[B, Hm]``: the mean of ``1/p`` (0 when skipped) over the visible
        pairs (1 for a head with none), as :func:`psa_kernels.blocks.density`."""
        n_vis = self.visible.sum(-1).float()
        return torch.where(n_vis > 0, self.cost.sum(-1) / n_vis.clamp(min=1), torch.ones_like(n_vis))

    def sparsity(self) -> torch.Tensor:
        """``1 - density()``: the sparsity of a binary block-sparse method with the same FLOPs."""
        return 1.0 - self.density()

    @property
    def shape(self) -> torch.Size:
        return self.indices.shape


def _compact_torch(level_map: torch.Tensor, *, block_q, block_k, q_len, k_len, causal, key_padding_mask):
    """Tensor-op twin of the Triton layout writer (devices the kernels do not serve)."""
    B, Hm, nq, nk = level_map.shape
    device = level_map.device
    table = torch.tensor(_RANK_OF_LEVEL, dtype=torch.int64, device=device)
    rank = table[level_map.long().clamp(0, 8)]  # out-of-range values read as skip (rank 4)
    readable, visible, whole = (t[:, None] for t in block_flags(q_len, k_len, block_q, block_k, causal,
                                                                key_padding_mask, device))
    j = torch.arange(nk, device=device)
    key = (rank * 2 + (~whole).long()) * nk + j
    indices = torch.argsort(key, dim=-1).to(index_dtype(nk))
    at = [rank == r for r in range(len(POOL_FACTORS))]
    counts = torch.stack([m.sum(-1) for m in at], dim=-1).to(torch.int32)
    n_read = torch.stack([(m & readable).sum(-1) for m in at], dim=-1)
    n_whole = torch.stack([(m & whole).sum(-1) for m in at], dim=-1)
    plan = torch.cat([n_read, n_whole], dim=-1).to(torch.int32)
    lm = level_map.float()
    valid_level = torch.isin(level_map, torch.tensor(POOL_FACTORS, device=device, dtype=level_map.dtype))
    cost = torch.where(valid_level & visible, 1.0 / lm.clamp(min=1), torch.zeros_like(lm)).sum(-1)
    n_vis = visible.sum(-1, dtype=torch.int32).expand(B, Hm, nq).contiguous()
    clean = torch.where(valid_level, level_map, torch.zeros_like(level_map)).to(torch.int8)
    return LevelMap(counts=counts, indices=indices.contiguous(), plan=plan, cost=cost.contiguous(), visible=n_vis,
                    block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, causal=causal,
                    key_padding_mask=key_padding_mask, dense=clean)
