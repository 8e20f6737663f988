"""The ``"psa"`` attention implementation for transformers.

``register()`` (run by ``import psa_vlm``) adds :func:`psa_attention_forward` to
``AttentionInterface`` and :func:`psa_mask` to ``AttentionMaskInterface``, so
``from_pretrained(..., attn_implementation="psa")`` and ``set_attn_implementation("psa")`` work.

The mask function hands the attention a compact ``[B, Lk]`` padding mask (or ``None``) rather
than a ``[B, 1, Lq, Lk]`` one: PSA reads only key padding plus the layer's causality, and a dense
mask would cost ``Lq * Lk`` bytes at exactly the lengths PSA is for. Patterns PSA does not read
(sliding windows, packed sequences, custom masks) get transformers' SDPA mask, and such calls run
dense.
"""

from __future__ import annotations

import logging
import os

import torch

import psa_kernels

from .runtime import ATTN_NAME, DECODE_REASON, layer_state, log_once
from .windows import attend_segments
#: Set to 1 to raise instead of falling back to dense attention when PSA fails (tests do).
STRICT_ENV = "PSA_VLM_STRICT"
_PSA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def psa_mask(*, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
             **kwargs):
    """Mask for the ``"psa"`` implementation: ``None`` or a bool ``[B, L]`` key padding mask.

    ``L < kv_length`` happens with a static cache: the keys beyond ``L`` are unfilled slots.
    """
    from transformers import masking_utils as mu

    plain = (mu.causal_mask_function, getattr(mu, "bidirectional_mask_function", None))
    if mask_function is not None and mask_function not in plain or kv_offset:
        return mu.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, **kwargs,
        )
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:].bool()
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            return None
        return attention_mask
    filled = int(q_offset) + q_length  # a static cache without a user mask: only mark the filled slots
    if filled < kv_length:
        device = kwargs.get("device")
        return torch.ones(batch_size, filled, dtype=torch.bool, device=device)
    return None


def psa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (its argument order): ``query [B,Hq,Lq,D]``,
    ``key/value [B,Hkv,Lk,D]`` -> ``([B, Lq, Hq, D], None)``. PSA where it pays, dense attention
    (logged once) where it cannot. On the vision tower each batch entry is one window or frame
    group, and the statistics count them one by one."""
    state = layer_state(module)
    segments, state.segments = state.segments, None
    if segments is not None:  # the vision tower's windows, collapsed by psa_vlm.windows' hook
        out = attend_segments(query, key, value, segments, lambda q, k, v: psa_attention_forward(
            module, q, k, v, None, dropout=dropout, scaling=scaling, **kwargs)[0])
        return out, None
    calls = query.shape[0] if state.tower == "vision" else 1
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    padding = None
    if attention_mask is not None and attention_mask.dim() == 2:
        padding = attention_mask
        if padding.shape[1] < key.shape[2]:  # static cache: drop the unfilled slots
            key, value = key[:, :, : padding.shape[1]], value[:, :, : padding.shape[1]]
        if bool(padding.all()):
            padding = None

    config = state.config
    reason = _dense_reason(state, config, query.shape[2], key.shape[2], query.dtype, attention_mask, dropout)
    if reason is not None:
        _note_dense(state, reason, calls)
        if attention_mask is not None and attention_mask.dim() == 4 or dropout > 0:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        out = psa_kernels.dense_attention(query, key, value, causal=causal, scale=scaling, key_padding_mask=padding)
        return out.transpose(1, 2).contiguous(), None

    text = None if state.text is None else state.text.for_keys(query.shape[0], key.shape[2], config.media_gap_tokens)
    if query.dtype == torch.float32 and query.is_cuda:
        log_once("fp32-cuda", "fp32 PSA on CUDA: the kernels use three TF32 products per dot (about fp32 accuracy "
                 "on the tensor cores); bf16 is several times faster")
    starts = _left_padding_starts(padding) if causal else None
    try:
        if starts is None:
            out, layouts = _psa(state, config, query, key, value, causal, scaling, padding, text)
        else:  # each sample on its own real tokens: the block grid starts at its first one
            out, layouts = _psa_per_sample(state, config, query, key, value, scaling, starts, text)
    except Exception as err:  # noqa: BLE001 - a model must keep running; PSA_VLM_STRICT=1 makes it loud
        if os.environ.get(STRICT_ENV) == "1":
            raise
        reason = f"PSA failed ({type(err).__name__}: {err})"[:300]
        state.record_dense(reason, calls)
        log_once(f"failed:{type(err).__name__}", f"PSA -> dense attention: {reason}; set {STRICT_ENV}=1 to raise",
                 logging.WARNING)
        out = psa_kernels.dense_attention(query, key, value, causal=causal, scale=scaling, key_padding_mask=padding)
        return out.transpose(1, 2).contiguous(), None
    for layout in layouts:
        state.record_psa(layout, calls if starts is None else 1)
    return out.transpose(1, 2).contiguous(), None


def _psa(state, config, query, key, value, causal, scaling, padding, text):
    """One PSA call (mask generation + attention) on ``[B, H, L, D]`` tensors; returns the
    output ``[B, Hq, Lq, D]`` and the layouts it used."""
    mask_kwargs = config.mask_kwargs()
    if state.tower == "vision" or not config.dense_text:  # a frame group holds no text; or: force none
        text, mask_kwargs["dense_tail_tokens"] = None, 0
    elif text is None:
        log_once("text-unknown", f"text positions unknown: the last {config.dense_tail_tokens} tokens count as text")
    level_map = psa_kernels.build_level_map(
        query, key, causal=causal, scale=scaling, text_mask=text, key_padding_mask=padding, compact=True, **mask_kwargs
    )
    out = psa_kernels.psa_attention(query, key, value, level_map, causal=causal, scale=scaling,
                                    key_padding_mask=padding)
    return out, [level_map]


def _left_padding_starts(padding) -> list[int] | None:
    """Each sample's first real key when ``padding`` ``[B, Lk]`` is left padding (every row's
    real tokens a suffix); None otherwise."""
    if padding is None:
        return None
    real = padding.sum(1)
    starts = padding.shape[1] - real
    is_suffix = padding.flip(1).cumsum(1).gather(1, (real - 1).clamp(min=0)[:, None]).squeeze(1) == real
    if not bool(is_suffix.all()):
        return None  # holes or right padding: the mask is read as it is, the grid starts at 0
    return starts.tolist()


def _psa_per_sample(state, config, query, key, value, scaling, starts, text):
    """Causal PSA on a left-padded batch, sample by sample on its real tokens, so a sample's
    output is the one it gets alone: the block grid, the pyramid's pooling groups and the
    estimate's sampling all start at its first real token. Queries of padding see no real key
    (output 0, as the dense path gives them)."""
    Lq, Lk = query.shape[2], key.shape[2]
    out = query.new_zeros(query.shape)
    layouts = []
    for b, start in enumerate(starts):
        first_query = max(0, start - (Lk - Lq))  # queries sit at key positions Lk - Lq ... Lk - 1
        if first_query >= Lq:
            continue
        q, k, v = (t[b : b + 1, :, s:] for t, s in ((query, first_query), (key, start), (value, start)))
        t = None if text is None else text[b : b + 1, start:]
        reason = _dense_reason(state, config, q.shape[2], k.shape[2], q.dtype, None, 0.0)
        if reason is not None:  # this sample alone would run dense
            _note_dense(state, reason, 1)
            out[b : b + 1, :, first_query:] = psa_kernels.dense_attention(q, k, v, causal=True, scale=scaling)
            continue
        o, maps = _psa(state, config, q, k, v, True, scaling, None, t)
        out[b : b + 1, :, first_query:] = o
        layouts += maps
    return out, layouts


def _note_dense(state, reason: str, count: int = 1) -> None:
    state.record_dense(reason, count)
    log_once(f"{state.tower}:{reason}", f"PSA -> dense attention ({state.tower} tower): {reason}")


def _dense_reason(state, config, q_len, k_len, dtype, attention_mask, dropout) -> str | None:
    """Why this call runs dense attention, or None when PSA serves it."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return "a 4-D attention mask (a pattern PSA does not read: sliding window, packing or custom)"
    if dropout > 0:
        return "attention dropout (training)"
    if not config.runs_on(state.tower):
        return f"preset {config.name!r} does not run PSA on the {state.tower} tower"
    if q_len < config.block_q:
        return f"{DECODE_REASON} (decode step or short frame group; Lq < block_q = {config.block_q})"
    if k_len < config.min_seq_len:
        return (f"sequence shorter than min_seq_len = {config.min_seq_len} (the preset's break-even length; "
                "min_seq_len=0 runs PSA at any length)")
    if dtype not in _PSA_DTYPES:
        return f"unsupported dtype {dtype}"
    return None


def register() -> None:
    """Register ``"psa"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, psa_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, psa_mask)
