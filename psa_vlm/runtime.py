"""Per-layer PSA state: which settings a layer uses, where the text is, and what PSA did.

The attention hook (:mod:`psa_vlm.attention`) stays one small function; everything it needs to
know about a layer lives in the :class:`LayerState` attached to the attention module, created
by :func:`configure` (or lazily with the default preset on the first call).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

import psa_kernels
from psa_kernels.utils import log_once as _log_once

from .config import PSAConfig, load_preset
from .windows import collapse_segments_hook

logger = logging.getLogger("psa_vlm")

ATTN_NAME = "psa"  # free of "flash", "sdpa", "flex_attention", "paged|" and "org/repo": transformers reads those
_STATE_ATTR = "_psa_state"
_SEGMENTS_HOOK_ATTR = "_psa_segments_hook"
_HOOK_ATTR = "_psa_text_hook"
def log_once(key: str, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` on the ``psa_vlm`` logger the first time ``key`` is seen in this process."""
    _log_once(logger, key, message, level)


# --------------------------------------------------------------------------------------------
# Where the text is
# --------------------------------------------------------------------------------------------


def forced_text(text: torch.Tensor, media_gap_tokens: int) -> torch.Tensor:
    """The tokens text-aware forcing keeps at full resolution (docs/semantics.md section 10):
    ``text [B, L]`` (True: a text token) less every run of at most ``media_gap_tokens`` text
    tokens with a media token on both sides.

    Such runs are the seams of the media, not the question: Qwen3-VL writes ``<t seconds>`` and
    ``<|vision_end|><|vision_start|>`` between every two frames, and forcing them would force
    nearly every key block of a video. A prompt's system text, question and answer stand before
    or after the media, or between two media spans at more than ``media_gap_tokens`` tokens, and
    stay text. Pure tensor work (no host synchronisation), so it costs nothing per forward.
    """
    if media_gap_tokens <= 0 or text.shape[1] == 0:
        return text
    media_before = (~text).cumsum(1)  # media tokens up to each position: constant along a text run
    runs = torch.zeros(text.shape[0], text.shape[1] + 1, dtype=media_before.dtype, device=text.device)
    run_length = runs.scatter_add_(1, media_before, text.to(runs.dtype)).gather(1, media_before)
    enclosed = (media_before > 0) & (media_before < media_before[:, -1:])
    return text & ~(enclosed & (run_length <= media_gap_tokens))


class TextPositions:
    """Text-token mask ``[B, L]`` of the sequence a model is processing, kept across cached steps.

    A forward pre-hook on the model reads ``mm_token_type_ids`` (0 = text) or, without it, the
    input ids (anything but image/video pads is text) and appends each step's tokens to what the
    cache already holds. Unknown (e.g. ``inputs_embeds`` only) clears it, so stale positions are
    never used. Layers read the tokens to force through :meth:`for_keys` (:func:`forced_text`).
    """

    def __init__(self, media_token_ids: tuple[int, ...]):
        self.media_token_ids = media_token_ids
        self.mask: torch.Tensor | None = None
        self._forced: dict[int, torch.Tensor] = {}  # per media_gap_tokens: layers share one forward's

    def update(self, input_ids, mm_token_type_ids, past_len: int) -> None:
        self._forced = {}
        current = input_ids.shape[1] if input_ids is not None else None
        text = None
        if mm_token_type_ids is not None and current is not None and mm_token_type_ids.shape[1] in (
            current,
            past_len + current,
        ):
            text = mm_token_type_ids == 0
        elif input_ids is not None and self.media_token_ids:
            media = torch.tensor(self.media_token_ids, device=input_ids.device)
            text = ~torch.isin(input_ids, media)
        if text is None:
            self.mask = None
        elif past_len == 0 or text.shape[1] == past_len + current:
            self.mask = text
        elif self.mask is not None and self.mask.shape == (text.shape[0], past_len):
            self.mask = torch.cat([self.mask, text], dim=1)
        else:
            self.mask = None

    def for_keys(self, batch: int, k_len: int, media_gap_tokens: int = 0) -> torch.Tensor | None:
        """The text tokens to force for keys ``[batch, k_len]``, or None where unknown."""
        if self.mask is None or tuple(self.mask.shape) != (batch, k_len):
            return None
        if media_gap_tokens not in self._forced:
            self._forced[media_gap_tokens] = forced_text(self.mask, media_gap_tokens)
        return self._forced[media_gap_tokens]


def _capture_text_hook(positions: TextPositions):
    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        # transformers 5 passes the cache as `cache` (generate) or the deprecated `past_key_values`
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        past_len = 0
        if past is not None and hasattr(past, "get_seq_length"):
            past_len = int(past.get_seq_length())
        positions.update(input_ids, kwargs.get("mm_token_type_ids"), past_len)

    return hook


# --------------------------------------------------------------------------------------------
# Layer state and statistics
# --------------------------------------------------------------------------------------------


@dataclass
class LayerState:
    """What one attention module needs to run PSA, and the record of what it did."""

    preset: PSAConfig
    tower: str
    layer: int | None
    text: TextPositions | None = None
    record_level_maps: bool = False
    psa_calls: int = 0
    dense_calls: Counter = field(default_factory=Counter)
    sparsity_sum: torch.Tensor | None = None  # per level-map head, summed over PSA calls
    last: dict[str, Any] | None = None  # the last PSA call's level map and geometry, if recorded
    segments: torch.Tensor | None = None  # the vision windows' cu_seqlens of the call under way (windows.py)

    @property
    def config(self) -> PSAConfig:
        return self.preset.for_layer(self.tower, self.layer)

    def record_dense(self, reason: str, count: int = 1) -> None:
        self.dense_calls[reason] += count

    def record_psa(self, layout: psa_kernels.LevelMap, count: int = 1) -> torch.Tensor:
        """Account one PSA call standing for ``count`` attentions (a batch of vision windows);
        returns its per-head sparsity ``[Hm]`` (mean over the batch).

        The sparsity comes from the layout's per-row cost (two small reductions, no decoding and
        no host synchronisation); the dense map is decoded only when level maps are recorded."""
        per_head = layout.sparsity().mean(0)
        weighted = per_head * count
        self.sparsity_sum = weighted if self.sparsity_sum is None else self.sparsity_sum + weighted
        self.psa_calls += count
        if self.record_level_maps:
            geometry = dict(causal=layout.causal, q_len=layout.q_len, k_len=layout.k_len, block_q=layout.block_q,
                            block_k=layout.block_k, key_padding_mask=layout.key_padding_mask)
            self.last = {"level_map": layout.to_dense().detach().cpu(), **_to_cpu(geometry)}
        return per_head

    def reset(self) -> None:
        self.psa_calls, self.dense_calls, self.sparsity_sum, self.last = 0, Counter(), None, None


def _to_cpu(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}


@dataclass
class LayerStats:
    """PSA statistics of one attention layer since the last reset."""

    tower: str
    layer: int | None
    psa_calls: int
    dense_calls: dict[str, int]
    sparsity: float | None  # mean over PSA calls and heads; None if PSA never ran
    head_sparsity: list[float] | None  # per level-map head (query or kv heads, see the preset)


def _tower_of(module) -> str:
    return "text" if getattr(module, "is_causal", True) else "vision"


def _attention_modules(model: torch.nn.Module):
    """Attention modules whose call reaches the registered attention function."""
    for name, module in model.named_modules():
        if hasattr(module, "is_causal") and hasattr(module, "config") and (
            hasattr(module, "q_proj") or hasattr(module, "qkv")
        ):
            yield name, module


def layer_state(module) -> LayerState:
    """The module's state; a module nobody configured gets the default preset (once)."""
    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        preset = load_preset(None)
        log_once(
            "unconfigured",
            f"PSA runs with the default preset {preset.name!r}; text positions are unknown, so the last "
            f"{preset.dense_tail_tokens} tokens count as text. Call psa_vlm.configure(model, preset) to "
            "choose the preset and let PSA see where the text is.",
        )
        state = LayerState(preset=preset, tower=_tower_of(module), layer=getattr(module, "layer_idx", None))
        _attach(module, state)  # the vision windows batch from the next forward on
    return state


def _attach(module, state: LayerState) -> None:
    """Give ``module`` its state and, on the vision tower, the hook that batches its windows."""
    setattr(module, _STATE_ATTR, state)
    old = getattr(module, _SEGMENTS_HOOK_ATTR, None)
    if old is not None:
        old.remove()
    if state.tower == "vision" and hasattr(module, "config"):  # one batched call per layer, not per window
        hook = collapse_segments_hook(state, functools.partial(_runs_psa, module.config))
        setattr(module, _SEGMENTS_HOOK_ATTR, module.register_forward_pre_hook(hook, with_kwargs=True))


def configure(model: torch.nn.Module, preset=None, *, record_level_maps: bool = False, **overrides):
    """Choose the PSA preset of ``model`` and let PSA see the text positions of its inputs.

    ``preset`` is a name from ``configs/``, a YAML path, a mapping or a :class:`PSAConfig`
    (default: ``$PSA_VLM_PRESET`` or ``video_mme``); keyword ``overrides`` replace preset fields
    (e.g. ``min_seq_len=0``). ``record_level_maps`` keeps each layer's last level map for
    inspection (:func:`level_maps`). Statistics start from zero. Returns the model.
    """
    config = load_preset(preset)
    if overrides:
        config = config.replace(**overrides)
    root_config = getattr(model, "config", None)
    media = tuple(
        int(i) for i in (getattr(root_config, "image_token_id", None), getattr(root_config, "video_token_id", None))
        if i is not None
    )
    positions = TextPositions(media)
    old = getattr(model, _HOOK_ATTR, None)
    if old is not None:
        old.remove()
    setattr(model, _HOOK_ATTR, model.register_forward_pre_hook(_capture_text_hook(positions), with_kwargs=True))

    counters: Counter = Counter()
    found = 0
    for _, module in _attention_modules(model):
        tower = _tower_of(module)
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            layer = counters[tower]
        counters[tower] += 1
        state = LayerState(config, tower, layer, text=positions if tower == "text" else None,
                           record_level_maps=record_level_maps)
        _attach(module, state)
        found += 1
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention module PSA can serve (no q_proj/qkv projections)")
    logger.info("PSA preset %r on %d attention layers (%s)", config.name, found, dict(counters))
    return model


def use_attention(model: torch.nn.Module, config: PSAConfig | None = None, *, dense: str = "sdpa",
                  **configure_kwargs) -> torch.nn.Module:
    """Switch a loaded model between attentions: ``config=None`` sets ``dense`` (``"sdpa"``,
    ``"eager"``, ...), a preset (name, path or :class:`PSAConfig`) sets ``"psa"`` and
    :func:`configure` s it. Returns the model."""
    if config is None:
        model.set_attn_implementation(dense)
        return model
    model.set_attn_implementation(ATTN_NAME)
    return configure(model, config, **configure_kwargs)


def _runs_psa(config) -> bool:
    return getattr(config, "_attn_implementation", None) == ATTN_NAME


def _states(model: torch.nn.Module):
    for _, module in _attention_modules(model):
        state = getattr(module, _STATE_ATTR, None)
        if state is not None:
            yield state


def stats(model: torch.nn.Module) -> list[LayerStats]:
    """Per-layer, per-head PSA statistics since :func:`configure` or :func:`reset_stats`."""
    out = []
    for s in _states(model):
        head = None if s.sparsity_sum is None else (s.sparsity_sum / s.psa_calls).float().cpu().tolist()
        out.append(
            LayerStats(
                tower=s.tower,
                layer=s.layer,
                psa_calls=s.psa_calls,
                dense_calls=dict(s.dense_calls),
                sparsity=None if head is None else sum(head) / len(head),
                head_sparsity=head,
            )
        )
    return out


def mean_sparsity(model: torch.nn.Module, tower: str | None = "text") -> float | None:
    """Mean sparsity over the layers (of ``tower``, or all) where PSA ran; None if it never did."""
    values = [s.sparsity for s in stats(model) if s.sparsity is not None and tower in (None, s.tower)]
    return sum(values) / len(values) if values else None


#: The dense reason of decode steps (psa_vlm.attention): always dense, so never why PSA did not run.
DECODE_REASON = "query shorter than one block"


def not_run_reason(model: torch.nn.Module, tower: str = "text") -> str | None:
    """One line saying why PSA served none of ``tower``'s attention calls since :func:`configure`
    or :func:`reset_stats`, from the layers' fallback counts; None when it served at least one.

    Decode steps (one query) run dense by design, so they are named only when nothing else ran."""
    layers = [s for s in _states(model) if s.tower == tower]
    if not layers:
        return f"PSA did not run: the model has no {tower}-tower attention layer configured for PSA"
    if any(s.psa_calls for s in layers):
        return None
    reasons: Counter = Counter()
    for s in layers:
        reasons.update(s.dense_calls)
    if not reasons:
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
        return (f"PSA did not run: no {tower}-tower attention call reached the {ATTN_NAME!r} implementation "
                f"(the model runs {implementation!r}; load it with attn_implementation={ATTN_NAME!r})")
    named = [r for r in reasons if not r.startswith(DECODE_REASON)] or list(reasons)
    named.sort(key=lambda r: -reasons[r])
    return f"PSA did not run: every {tower}-tower attention call fell back to dense: " + "; ".join(named)


def level_maps(model: torch.nn.Module) -> dict[tuple[str, int | None], dict[str, Any]]:
    """The last recorded level map of each layer (``configure(..., record_level_maps=True)``),
    with the geometry needed to interpret it (``q_len``, ``k_len``, blocks, ``causal``)."""
    return {(s.tower, s.layer): s.last for s in _states(model) if s.last is not None}


def reset_stats(model: torch.nn.Module) -> None:
    for s in _states(model):
        s.reset()
