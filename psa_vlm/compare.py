"""What PSA is compared with: structured video-like attention inputs and the binary block-sparse
baseline at the same FLOPs. Shared by ``benchmarks/attention.py`` and the notebooks."""

from __future__ import annotations

import torch


def video_like(L: int, H: int, D: int, *, seed: int, device="cpu", dtype=torch.float32, text_tokens: int = 256,
               grid: int = 16) -> torch.Tensor:
    """``[1, H, L, D]``: video tokens as a smooth field over (frame, row, column) of a
    ``grid x grid`` frame, projected per head, plus 0.3 noise, then ``text_tokens`` random ones.

    Neighbouring tokens are similar (pooling is allowed, attention concentrates), as in real
    video tokens; i.i.d. random inputs have neither property.
    """
    g = torch.Generator().manual_seed(seed)
    n_video = max(0, L - text_tokens)
    idx = torch.arange(n_video)
    t, y, x = idx // (grid * grid), (idx // grid) % grid, idx % grid
    coords = torch.stack([t / 8.0, y / 4.0, x / 4.0], -1)  # slow in time, smooth in space
    freqs = torch.randn(3, 16, generator=g)
    phases = torch.rand(16, generator=g) * 6.28
    field = torch.sin(coords @ freqs + phases)  # [n_video, 16]
    basis = torch.randn(H, 16, D, generator=g) / 2
    video = torch.einsum("lf,hfd->hld", field, basis) + 0.3 * torch.randn(H, n_video, D, generator=g)
    text = torch.randn(H, L - n_video, D, generator=g)
    return torch.cat([video, text], 1)[None].to(device, dtype)


def video_like_qkv(L: int, Hq: int, Hkv: int, D: int, *, seed: int, device="cpu", dtype=torch.float32,
                   text_tokens: int = 256):
    """(q, k, v): video-like queries and keys (:func:`video_like`), random values."""
    q = video_like(L, Hq, D, seed=seed, device=device, dtype=dtype, text_tokens=text_tokens)
    k = video_like(L, Hkv, D, seed=seed + 1, device=device, dtype=dtype, text_tokens=text_tokens)
    v = torch.randn(1, Hkv, L, D, generator=torch.Generator().manual_seed(seed + 2)).to(device, dtype)
    return q, k, v


def binary_map_like(scores: torch.Tensor, visible: torch.Tensor, density, forced: torch.Tensor) -> torch.Tensor:
    """Binary block-sparse map (int8, 1 = read in full, 0 = skipped): per row, the top visible
    blocks by ``scores`` until ``density`` of the row's visible blocks, forced blocks first.

    With ``density`` = PSA's density (1 - sparsity) it reads the same FLOPs as PSA, all at full
    resolution: the paper's Figure 1 comparison.
    """
    n_vis = visible.sum(-1, keepdim=True)
    density = torch.as_tensor(density, dtype=torch.float32, device=scores.device)
    keep = torch.clamp(torch.round(density * n_vis.float()).long(), min=1)
    priority = torch.where(visible, scores.float(), torch.full_like(scores, -1.0, dtype=torch.float32))
    priority = torch.where(forced & visible, torch.full_like(priority, float("inf")), priority)
    rank = torch.argsort(torch.argsort(priority, dim=-1, descending=True, stable=True), dim=-1)
    return (visible & (rank < keep)).to(torch.int8)


def binary_map_at_same_flops(scores: torch.Tensor, density, *, q_len: int, k_len: int, block_q: int, block_k: int,
                             causal: bool, text_mask: torch.Tensor | None = None,
                             kv_heads: int | None = None) -> torch.Tensor:
    """The binary block-sparse baseline of a PSA call: :func:`binary_map_like` over the call's
    visible blocks, its forced ones (sink, diagonal, text) first, reading ``density`` of each
    row's visible blocks. ``scores [B, Hq, nq, nk]`` is the block importance the mask generator
    used; ``kv_heads`` sums it over each GQA group first (a preset with ``share_kv_group``)."""
    import psa_kernels

    batch = scores.shape[0]
    if kv_heads is not None:
        scores = scores.view(batch, kv_heads, -1, *scores.shape[-2:]).sum(2)
    geometry = dict(batch=batch, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k, causal=causal,
                    device=scores.device)
    visible = psa_kernels.block_visibility(**geometry)[:, None].expand_as(scores)
    forced = psa_kernels.forced_full_blocks(**geometry, text_mask=text_mask)[:, None].expand_as(scores)
    return binary_map_like(scores, visible, density, forced)


def row_density(level_map: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``[..., nq, 1]``: each query block's share of dense FLOPs under ``level_map`` (a pair at
    level p costs 1/p, skipped 0) among its visible blocks: the per-row budget for
    :func:`binary_map_like`, so forced rows (text) stay whole in the baseline too."""
    m = level_map.float()
    cost = torch.where(m > 0, 1.0 / m.clamp(min=1), torch.zeros_like(m)) * visible
    return cost.sum(-1, keepdim=True) / visible.sum(-1, keepdim=True).clamp(min=1)
