"""The Qwen-VL model families PSA serves, by the ``model_type`` of their transformers config.

One table, read by the loader (:mod:`psa_vlm.models`: which class a checkpoint or shape builds),
the offline builders (:mod:`psa_vlm.tiny`: which config, model and processor classes) and the
video path (:mod:`psa_vlm.video`: frame sides are multiples of the vision patch times the
spatial merge). Everything else PSA needs is the same across the families: their attention
modules go through transformers' ``AttentionInterface`` (text layers with ``q_proj``, vision
blocks with ``qkv`` and ``cu_seqlens`` segments) and their processors return
``mm_token_type_ids`` (0 = text).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One Qwen-VL generation as transformers implements it."""

    model_type: str  # config.json's model_type
    label: str  # the name users know
    model_class: str  # transformers' *ForConditionalGeneration
    config_class: str
    processor_class: str
    video_processor_class: str
    patch_size: int  # vision patch side in pixels; a merged token covers 2 x 2 patches
    per_frame_timestamps: bool = False  # each frame preceded by "<t seconds>" text (Qwen3-VL)

    @property
    def factor(self) -> int:
        """Frame sides are multiples of this: the patch merged 2 x 2 into one language token."""
        return 2 * self.patch_size

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class)

    def config_cls(self):
        import transformers

        return getattr(transformers, self.config_class)


FAMILIES = {f.model_type: f for f in (
    Family("qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", "Qwen2VLProcessor",
           "Qwen2VLVideoProcessor", patch_size=14),
    Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
           "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", patch_size=14),
    Family("qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig", "Qwen3VLProcessor",
           "Qwen3VLVideoProcessor", patch_size=16, per_frame_timestamps=True),
    Family("qwen3_vl_moe", "Qwen3-VL-MoE", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig",
           "Qwen3VLProcessor", "Qwen3VLVideoProcessor", patch_size=16, per_frame_timestamps=True),
)}
DEFAULT_FAMILY = "qwen2_5_vl"


def family(model_type: str, source: str = "the model") -> Family:
    """The :class:`Family` of a ``model_type``; anything else is a ValueError naming what is supported."""
    if model_type not in FAMILIES:
        known = ", ".join(f"{f.model_type} ({f.label})" for f in FAMILIES.values())
        raise ValueError(f"{source} has model_type {model_type!r}, which psa-vlm does not load; supported: {known}")
    return FAMILIES[model_type]
