"""Fixtures for the tests and notebooks: the offline tiny Qwen2.5-VL and generated videos.

The builders live in :mod:`psa_vlm.tiny` (tokenizer, processor, configs, the tiny random model
and its cache) and :mod:`psa_vlm.clips` (synthetic frames and mp4 files); the one path from a
video to model inputs is :func:`psa_vlm.video.video_inputs`. Library code imports those
modules, never this one: it exists so that tests and notebooks have one place to take their
fixtures from.
"""

from __future__ import annotations

from .clips import make_video, make_video_frames, write_video
from .tiny import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TINY_MODEL_VERSION,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    build_tiny_model,
    build_tiny_processor,
    build_tiny_tokenizer,
    default_cache_dir,
    save_tiny_model,
    tiny_model_config,
    tiny_model_dir,
)

#: ``psa_vlm.video.video_inputs`` settings of the tiny model's tests: its processor's small pixel
#: range, and frame arrays that play at 4 frames per second (sampled at the default 2).
TINY_VIDEO = dict(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS, video_fps=4.0)

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TINY_MODEL_VERSION",
    "TINY_VIDEO",
    "VIDEO_MAX_PIXELS",
    "VIDEO_MIN_PIXELS",
    "build_tiny_model",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "default_cache_dir",
    "make_video",
    "make_video_frames",
    "save_tiny_model",
    "tiny_model_config",
    "tiny_model_dir",
    "write_video",
]
