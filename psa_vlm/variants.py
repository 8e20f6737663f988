"""Attention variants: one label scheme for every command that compares attentions.

``bench``, ``vniah``, ``eval`` and the V-NIAH trainer name what they run with the same labels:

- ``sdpa``, ``eager``, ``flash_attention_2`` (any transformers implementation): dense attention;
- ``psa``: the ``"psa"`` implementation with the base preset (``--preset``, default
  ``video_mme``); ``psa:NAME``: with preset NAME (a name from ``configs/`` or a YAML path);
- ``psa-off``: the ``"psa"`` hook with every call dense (its batched vision windows without
  sparse attention: what separates the two);
- ``psa@S``: PSA at sparsity S with fixed level fractions (:meth:`PSAConfig.at_sparsity`);
  ``budget@S``: the budget-aware assignment at S (``mode: budget``);
- ``binary@S``: binary block-sparse attention spending its FLOPs as ``psa@S`` does (the top
  ``1 - S`` of the blocks, forced blocks on top); ``topk@S``: the one spending them as
  ``budget@S`` does (the budget policy with level 1 only).

Overrides (``--override``) apply to every PSA variant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import DEFAULT_PRESET, PSAConfig, load_preset

#: The ``"psa"`` hook with PSA switched off: dense SDPA everywhere, vision windows batched.
PSA_OFF = "psa-off"
_AT_SPARSITY = re.compile(r"(psa|budget|binary|topk)@([0-9.]+)")


@dataclass(frozen=True)
class Variant:
    """One attention to run: a PSA config for the ``"psa"`` implementation, or None and the
    name of a dense implementation."""

    label: str
    config: PSAConfig | None = None
    dense: str = "sdpa"

    @property
    def attn(self) -> str:
        """The ``attn_implementation`` this variant sets."""
        from .runtime import ATTN_NAME

        return ATTN_NAME if self.config is not None else self.dense


def variant(label: str, *, preset=DEFAULT_PRESET, overrides=None) -> Variant:
    """The :class:`Variant` a label names (the module docstring lists them); ``preset`` is the
    base of ``psa``, ``psa-off`` and the fixed-sparsity variants; ``overrides`` apply to all."""
    label = label.strip()
    overrides = dict(overrides or {})
    base = load_preset(preset)

    def with_overrides(config: PSAConfig) -> PSAConfig:
        return config.replace(**overrides) if overrides else config

    if label == "psa":
        return Variant(label, with_overrides(base))
    if label.startswith("psa:"):
        return Variant(label, with_overrides(load_preset(label[4:] or preset)))
    if label == PSA_OFF:
        return Variant(label, with_overrides(base).replace(min_seq_len=1 << 40, overrides=()))
    match = _AT_SPARSITY.fullmatch(label)
    if match:
        kind, value = match.group(1), float(match.group(2))
        base = with_overrides(base)
        if kind == "psa":
            return Variant(label, base.at_sparsity(value))
        if kind == "budget":
            return Variant(label, base.at_sparsity(value, "budget"))
        if kind == "binary":
            return Variant(label, base.replace(name=label, mode="quantile", levels=[1], thresholds=[1.0 - value],
                                               similarity=None, overrides=()))
        return Variant(label, base.at_sparsity(value, "budget").replace(name=label, levels=[1]))
    if ":" in label:
        raise ValueError(f"unknown attention {label!r}: only psa takes a preset (psa:NAME)")
    if "@" in label or not re.fullmatch(r"[A-Za-z_][\w-]*", label):
        raise ValueError(f"unknown attention {label!r}: use sdpa, eager, psa, psa:PRESET, psa-off, or psa@S, "
                         "budget@S, binary@S, topk@S with S a sparsity in [0, 1)")
    return Variant(label, None, dense=label)


def parse_variants(labels, *, preset=DEFAULT_PRESET, overrides=None) -> dict[str, Variant]:
    """``"sdpa,psa:video_mme"`` (or a list of labels) -> ``{label: Variant}`` in order; refuses
    repeats and an empty list."""
    if isinstance(labels, str):
        labels = labels.split(",")
    labels = [label.strip() for label in labels if label.strip()]
    if not labels:
        raise ValueError("no attention variant given, e.g. sdpa,psa:video_mme")
    if len(set(labels)) != len(labels):
        raise ValueError(f"attention variants repeat: {labels}")
    out = {label: variant(label, preset=preset, overrides=overrides) for label in labels}
    seen: dict = {}
    for label, v in out.items():  # psa and psa:NAME of the base preset are one attention
        key = v.dense if v.config is None else v.config.replace(name="-")
        if key in seen:
            raise ValueError(f"attention variants repeat: {seen[key]} and {label} are the same attention")
        seen[key] = label
    return out


def at_sparsities(sparsities, policies=("quantile", "budget")) -> list[str]:
    """Labels of PSA and its binary counterpart at each sparsity, per assignment policy:
    ``psa@S`` / ``binary@S`` (quantile) and ``budget@S`` / ``topk@S`` (budget)."""
    pairs = {"quantile": ("psa", "binary"), "budget": ("budget", "topk")}
    unknown = [p for p in policies if p not in pairs]
    if unknown:
        raise ValueError(f"unknown assignment policies {unknown}; choose from {', '.join(pairs)}")
    return [f"{name}@{s:g}" for s in sparsities for policy in policies for name in pairs[policy]]


def use_variant(model, v: Variant, **configure_kwargs):
    """Switch a loaded model to ``v`` (see :func:`psa_vlm.runtime.use_attention`); returns it."""
    from .runtime import use_attention

    return use_attention(model, v.config, dense=v.dense, **configure_kwargs)
