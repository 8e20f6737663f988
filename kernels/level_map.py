"""The compact level-map layout the kernels read.

A dense level map ``M [B, Hm, nq, nk]`` (values 0, 1, 2, 4, 8) is the interchange form; kernels
want, per query block, the list of key blocks to read at each level without scanning ``nk``
entries. :class:`LevelMap` keeps, in the spirit of FlexAttention's ``BlockMask``
(``kv_num_blocks`` + ``kv_indices``), one index list per level:

- ``counts [B, Hm, nq, 4]`` (int32): how many key blocks query block ``i`` reads at level
  ``p = 1, 2, 4, 8`` (columns 0..3).
- ``indices [B, Hm, nq, nk]`` (int32): the key block indices of row ``i``, grouped by level in
  the order 1, 2, 4, 8 and ascending within a level; the level-``p`` list of row ``i`` is
  ``indices[..., i, s_p : s_p + counts[..., i, p]]`` with ``s_p`` the sum of the counts of the
  finer levels. Entries past the total are the skipped blocks (ascending) and are never read.

``Hm`` is Hq (a map per query head) or Hkv (one map shared by a GQA group). Built on the device
with a handful of tensor ops (no host synchronisation), so it can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .validation import POOL_FACTORS

# Rank of a level value in the layout: 1 -> 0, 2 -> 1, 4 -> 2, 8 -> 3; 0 (skip) -> 4.
_RANK_OF_LEVEL = (4, 0, 1, 4, 2, 4, 4, 4, 3)


@dataclass(frozen=True)
class LevelMap:
    """Per-level key block lists of a level map (see the module docstring)."""

    counts: torch.Tensor  # [B, Hm, nq, 4] int32
    indices: torch.Tensor  # [B, Hm, nq, nk] int32
    block_q: int
    block_k: int
    # The dense map this layout encodes, when its builder had it (saves to_dense() a pass).
    dense: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dense(cls, level_map: torch.Tensor, *, block_q: int, block_k: int) -> "LevelMap":
        nk = level_map.shape[-1]
        table = torch.tensor(_RANK_OF_LEVEL, dtype=torch.int64, device=level_map.device)
        rank = table[level_map.long().clamp(0, 8)]  # out-of-range values read as skip (rank 4)
        key = rank * nk + torch.arange(nk, device=level_map.device)
        indices = torch.argsort(key, dim=-1).to(torch.int32)
        counts = torch.stack([(rank == r).sum(-1) for r in range(len(POOL_FACTORS))], dim=-1).to(torch.int32)
        return cls(counts=counts, indices=indices.contiguous(), block_q=block_q, block_k=block_k, dense=level_map)

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

    @property
    def shape(self) -> torch.Size:
        return self.indices.shape
