"""PSA attention where the Triton kernels do not serve (a CPU without the interpreter, say).

The reference materialises a chunk's logits against every pooled key and then makes several
full-size elementwise passes over them (masking, bias, exponent, sums): at 4k tokens that is
about 70x the cost of dense attention on a CPU. Here each query block of ``block_q`` rows makes
one fused ``scaled_dot_product_attention`` call against the concatenated pyramid (original
keys, then the 2x/4x/8x means) with an additive mask: ``ln(count)`` where the block's level
map assigns that key's level and the key is visible, ``-inf`` elsewhere. Only the keys some
head of the block reads are passed, so sparser maps are cheaper. Same semantics as
:func:`psa_kernels.reference.psa_attention` (the tests compare the two on random inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import per_kv_head
from .reference import _acc_dtype, build_pyramid


def psa_attention_blockwise(
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
    """Arguments as :func:`psa_kernels.psa_attention` (inputs already checked, dense level map)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    scale = D**-0.5 if scale is None else float(scale)
    out = torch.zeros(B, Hkv, G, Lq, D, dtype=acc, device=q.device)
    if Lq == 0 or Lk == 0:
        return out.view(B, Hq, Lq, D).to(q.dtype)

    # The pyramid as one key list of T = sum_p ceil(Lk / p) entries, each with its level, its
    # key block, its softmax bias and whether (and from which query position) it is visible.
    pyramid = build_pyramid(k, v, key_padding_mask)
    keys = torch.cat([lvl.keys for lvl in pyramid.values()], dim=2)
    values = torch.cat([lvl.values for lvl in pyramid.values()], dim=2)
    arange = lambda n: torch.arange(n, device=q.device)  # noqa: E731
    factor = torch.cat([torch.full((lvl.keys.shape[2],), p, device=q.device) for p, lvl in pyramid.items()])
    block = torch.cat([arange(lvl.keys.shape[2]) * p // block_k for p, lvl in pyramid.items()])
    counts = torch.cat([lvl.counts for lvl in pyramid.values()], dim=1)  # [B, T]
    bias = torch.log(counts.clamp(min=1).to(acc))[:, None, None, None, :]
    present = (counts > 0)[:, None, None, None, :]
    last = torch.cat([lvl.last for lvl in pyramid.values()], dim=1)[:, None, None, None, :]

    levels = per_kv_head(level_map.long(), Hq, Hkv)  # [B, Hkv, G|1, nq, nk]
    assigned = (levels[..., block] == factor) & present  # [B, Hkv, G|1, nq, T]
    offset = Lk - Lq  # causal queries are bottom-right aligned: query r sits at offset + r
    for i in range(levels.shape[3]):
        r0, r1 = i * block_q, min(Lq, (i + 1) * block_q)
        reads = assigned[:, :, :, i : i + 1, :]  # [B, Hkv, G|1, 1, T]
        if causal:
            reads = reads & (last <= offset + r1 - 1)  # visible to the block's last row at least
        cols = reads.flatten(0, -2).any(0).nonzero().squeeze(1)  # keys some head of the block reads
        if cols.numel() == 0:
            continue  # no row of the block sees a key: output 0
        reads, col_last = reads[..., cols], last[..., cols]
        if causal:  # per row only here, on the block's own columns
            pos = (offset + torch.arange(r0, r1, device=q.device))[:, None]
            sees = reads & (col_last <= pos)  # [B, Hkv, G|1, R, C]
            first = torch.where(reads, col_last, Lk).amin(-1, keepdim=True)
            any_key = first <= pos  # [B, Hkv, G|1, R, 1]
        else:
            sees, any_key = reads, reads.any(-1, keepdim=True)
        mask = torch.where(sees, bias[..., cols], float("-inf"))
        mask = mask.expand(B, Hkv, G, *mask.shape[3:]).reshape(B, Hq, mask.shape[3], cols.numel())
        rows = F.scaled_dot_product_attention(q[:, :, r0:r1].to(acc), keys[:, :, cols], values[:, :, cols],
                                              attn_mask=mask, scale=scale, enable_gqa=G > 1)
        rows = rows.view(B, Hkv, G, r1 - r0, D)
        out[:, :, :, r0:r1] = torch.where(any_key, rows, 0.0)  # a row with no visible key: 0, not NaN
    return out.view(B, Hq, Lq, D).to(q.dtype)
