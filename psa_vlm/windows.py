"""One batched attention call per vision layer instead of one call per window.

Qwen-VL vision towers attend within segments given by ``cu_seqlens``: Qwen2.5-VL within windows
of a frame group (whole frame groups in its full-attention layers), Qwen2-VL and Qwen3-VL within
whole frame groups. With any attention implementation
but flash-attention, transformers splits the sequence and calls the attention function once per
segment from a Python loop: about 4,000 windows per layer for a 16k-token video, so the vision
tower spends seconds launching kernels (FIELD_NOTES: 0.87 s vs 0.10 s batched).

A forward pre-hook on each vision attention module (installed by ``psa_vlm.configure``) hands the
module one segment spanning the whole sequence and keeps the real ``cu_seqlens`` in the layer's
state; the ``"psa"`` attention function then calls :func:`attend_segments`, which groups the
segments by length and hands each group back to it as one batch: batched SDPA for segments PSA
does not serve, one batched PSA call (one mask generation, one attention launch) for the frame
groups of a preset that runs on the vision tower.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Most tokens gathered into one batched call: bounds the extra memory of the gathered copies.
CHUNK_TOKENS = 1 << 17


def collapse_segments_hook(state, is_psa: Callable[[], bool]):
    """Forward pre-hook (``with_kwargs=True``) for a vision attention module: when the module
    runs ``"psa"``, keep ``cu_seqlens`` in ``state.segments`` and pass ``[0, N]`` instead."""

    def hook(module, args, kwargs):
        cu_seqlens = kwargs.get("cu_seqlens")
        if cu_seqlens is None or not is_psa() or cu_seqlens.numel() <= 2:
            state.segments = None
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        total = int(hidden.shape[0]) if hidden is not None else None
        if total is None or total != int(cu_seqlens[-1]):  # not the layout this hook understands
            state.segments = None
            return None
        state.segments = cu_seqlens
        kwargs = dict(kwargs, cu_seqlens=cu_seqlens.new_tensor([0, total]))
        return args, kwargs

    return hook


def length_groups(lengths: list[int]) -> dict[int, list[int]]:
    """Segment start offsets grouped by segment length (zero-length segments dropped)."""
    groups: dict[int, list[int]] = {}
    start = 0
    for n in lengths:
        if n:
            groups.setdefault(n, []).append(start)
        start += n
    return groups


def attend_segments(query, key, value, cu_seqlens, attend: Callable) -> torch.Tensor:
    """Bidirectional attention within each ``cu_seqlens`` segment of ``query/key/value
    [1, H, N, D]``; returns ``[1, N, H, D]`` (the layout attention functions return).

    Segments are grouped by length and each group runs as one batch ``[n, H, L, D]`` (at most
    :data:`CHUNK_TOKENS` tokens per call) through ``attend(q, k, v) -> [n, L, H, D]``: the
    ``"psa"`` attention function itself, which runs PSA on the batch where the preset serves
    it (one mask generation, one attention launch for all the frame groups of a video) and
    batched SDPA where it does not (windows shorter than a block, say).
    """
    if query.shape[0] != 1:
        raise ValueError(f"segmented attention takes one packed sequence, got batch {query.shape[0]}")
    # [N, H, D] views: the vision tower's q/k/v are transposes of this layout, so no copy.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = torch.empty_like(q)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if sum(lengths) != q.shape[0]:
        raise ValueError(f"cu_seqlens covers {sum(lengths)} tokens, the sequence has {q.shape[0]}")
    for length, starts in length_groups(lengths).items():
        per_chunk = max(1, CHUNK_TOKENS // length)
        offsets = torch.arange(length, device=q.device)
        for i in range(0, len(starts), per_chunk):
            first = torch.tensor(starts[i : i + per_chunk], device=q.device)
            index = (first[:, None] + offsets).reshape(-1)
            batch = [t.index_select(0, index).unflatten(0, (-1, length)).transpose(1, 2) for t in (q, k, v)]
            o = attend(*batch)  # [n, L, H, D]
            out.index_copy_(0, index, o.reshape(-1, *o.shape[2:]))
    return out.unsqueeze(0)
