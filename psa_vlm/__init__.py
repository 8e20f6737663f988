"""psa-vlm: Pyramid Sparse Attention for long-video understanding with vision-language models.

``import psa_vlm`` registers the ``"psa"`` attention implementation with transformers::

    import psa_vlm
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="psa")
    psa_vlm.configure(model, "video_mme")   # preset by name or YAML path; lets PSA see text tokens
    ...                                     # forward / generate as usual
    psa_vlm.stats(model)                    # per-layer, per-head sparsity of the calls so far
    psa_vlm.not_run_reason(model)           # None, or one line: why PSA served no text-layer call

The same holds for Qwen2-VL, Qwen3-VL and Qwen3-VL-MoE (their ``*ForConditionalGeneration``).
"""

from .attention import ATTN_NAME, psa_attention_forward, psa_mask, register
from .config import PSAConfig, available_presets, load_preset
from .runtime import (LayerStats, configure, level_maps, mean_sparsity, not_run_reason, reset_stats, stats,
                      use_attention)

__version__ = "0.1.0"

register()

__all__ = [
    "ATTN_NAME",
    "LayerStats",
    "PSAConfig",
    "available_presets",
    "configure",
    "use_attention",
    "level_maps",
    "load_preset",
    "mean_sparsity",
    "not_run_reason",
    "psa_attention_forward",
    "psa_mask",
    "register",
    "reset_stats",
    "stats",
]
