"""Loading models: the architectures the project knows, dtypes and devices, checkpoints.

``load_model`` takes a checkpoint folder or hub id, a shape name (the real architecture with
random weights: no download), ``tiny`` (the offline test model) or ``vniah`` (the trained
V-NIAH model shipped with the package). ``check_model_spec`` refuses what cannot load before any
slow work. ``TINY_MODEL_OVERRIDES`` are the preset fields a tiny model's short prompts need.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# The tiny model's prompts are a few hundred tokens: commands lower the presets' block sizes and
# minimum length for it so PSA really runs (real models keep the presets as they are).
TINY_MODEL_OVERRIDES = dict(block_q=64, block_k=32, min_seq_len=0)


# Architecture of the released checkpoints (their config.json), without the vocabulary: shapes
# use the tiny tokenizer, so the embedding and output layers are small; attention is unchanged.
# Both checkpoints share the vision tower and the 3-D RoPE layout; they differ in the text tower.
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
               fullatt_block_indexes=[7, 15, 23, 31], initializer_range=0.02)
_TEXT = dict(head_dim=128, max_position_embeddings=128000, initializer_range=0.02,
             rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]})
SHAPES = {
    "qwen2.5-vl-7b": dict(
        text_config=dict(_TEXT, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4),
        vision_config=dict(_VISION),
    ),
    "qwen2.5-vl-3b": dict(
        text_config=dict(_TEXT, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2),
        vision_config=dict(_VISION),
    ),
}


#: dtype names the command lines and lm-eval model arguments take ("auto": the checkpoint's).
DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(name: str):
    """A torch dtype (or ``"auto"``) from one of :data:`DTYPES`' names."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_device(device: str | None = None) -> str:
    """``device``, else ``cuda`` when there is a GPU, else ``cpu``."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(spec: str, *, device: str, dtype="auto", device_map: str | None = None):
    """(model, processor) for a checkpoint path / hub id, a shape name of :data:`SHAPES`, ``tiny``
    (the random test model) or ``vniah`` (the trained V-NIAH model shipped with the package).

    ``dtype="auto"``: the checkpoint's (shapes: bf16 on a GPU, fp32 elsewhere). ``device_map``
    (e.g. ``"auto"``) spreads a checkpoint over the visible GPUs instead of moving it to ``device``.
    """
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from .tiny import build_tiny_processor, tiny_model_config, tiny_model_dir

    if spec in SHAPES:
        if dtype == "auto":
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        config = tiny_model_config(**SHAPES[spec])
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
        # The released processor's per-frame range (preprocessor_config.json), no total budget.
        return model.eval(), build_tiny_processor(video_pixels=(56 * 56, 28 * 28 * 16384), cap_pixels_per_frame=False)
    path = tiny_model_dir() if spec == "tiny" else checkpoint_dir() if spec == "vniah" else spec
    try:
        if device_map is not None:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=device_map)
        else:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
        processor = AutoProcessor.from_pretrained(path)
    except OSError as err:  # a missing folder, a hub id not cached offline: transformers says which
        raise FileNotFoundError(f"cannot load the model {spec!r}: {err} (pass a checkpoint folder, a hub id, "
                                f"one of {sorted(SHAPES)}, tiny or vniah)") from err
    return model.eval(), processor


def checkpoint_dir() -> Path:
    """The trained V-NIAH model shipped with the package (``checkpoints/vniah`` in the repository;
    ``--model vniah`` on the command line): weights in fp16, tokenizer, processor, the training
    log (``training.json``) and the accuracy CI holds it to (``record.json``)."""
    from importlib import resources

    path = Path(str(resources.files("psa_vlm.checkpoints") / "vniah"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the V-NIAH checkpoint is missing from {path}; reinstall psa-vlm, or train one with "
                                "`python -m psa_vlm.vniah_train --output DIR` and pass --model DIR")
    return path


BUILT_IN_MODELS = ("tiny", "vniah")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as on the Hugging Face hub


def check_model_spec(spec: str) -> None:
    """Refuse a ``--model`` that cannot be loaded before any slow work: a checkpoint folder must
    hold config.json; anything else must be a hub id (owner/name) or a built-in name."""
    names = ", ".join([*SHAPES, *BUILT_IN_MODELS])
    if spec in SHAPES or spec in BUILT_IN_MODELS:
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {spec}: the folder has no config.json, so it is not a checkpoint; pass "
                                    "the folder that holds config.json and the weights")
        return
    if path.exists():
        raise ValueError(f"--model {spec}: is a file; pass a checkpoint folder (with config.json), a hub id "
                         f"(owner/name) or one of {names}")
    if not _HUB_ID.fullmatch(spec):
        raise FileNotFoundError(f"--model {spec}: no such folder, and not a hub id (owner/name, e.g. "
                                f"Qwen/Qwen2.5-VL-7B-Instruct) or one of {names}; check the path")
