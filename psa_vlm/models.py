"""Loading models: the architectures the project knows, dtypes and devices, checkpoints.

``load_model`` takes a checkpoint folder or hub id of a Qwen2-VL, Qwen2.5-VL, Qwen3-VL or
Qwen3-VL-MoE model (the class follows the config's ``model_type``), a shape name (the real
architecture with random weights: no download), ``tiny`` (the offline test model), ``vniah``
(the trained V-NIAH model shipped with the package) or ``vniah-coverage`` (the shipped model
trained on the ``majority`` questions, whose answer needs the whole video). ``check_model_spec`` refuses what cannot load before any
slow work. ``TINY_MODEL_OVERRIDES`` are the preset fields a tiny model's short prompts need.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .families import DEFAULT_FAMILY, family

# The tiny model's prompts are a few hundred tokens: commands lower the presets' block sizes and
# minimum length for it so PSA really runs (real models keep the presets as they are).
TINY_MODEL_OVERRIDES = dict(block_q=64, block_k=32, min_seq_len=0)


# Architecture of the released checkpoints (their config.json), without the vocabulary: shapes
# use the tiny tokenizer, so the embedding and output layers are small; attention is unchanged.
# Each family's checkpoints share its vision tower and 3-D RoPE layout; they differ in the text tower.
_QWEN2_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, initializer_range=0.02)
_QWEN2_TEXT = dict(max_position_embeddings=32768, initializer_range=0.02,
                   rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]})
_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], initializer_range=0.02)
_QWEN25_TEXT = dict(_QWEN2_TEXT, head_dim=128, max_position_embeddings=128000)
_QWEN3_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304,
                     deepstack_visual_indexes=[8, 16, 24], initializer_range=0.02)
_QWEN3_SMALL_VISION = dict(_QWEN3_VISION, depth=24, hidden_size=1024, intermediate_size=4096,
                           deepstack_visual_indexes=[5, 11, 17])
_QWEN3_TEXT = dict(head_dim=128, max_position_embeddings=262144, initializer_range=0.02,
                   rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                    "mrope_interleaved": True})
SHAPES = {
    "qwen2-vl-7b": dict(family="qwen2_vl", vision_config=dict(_QWEN2_VISION),
                        text_config=dict(_QWEN2_TEXT, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                         num_attention_heads=28, num_key_value_heads=4)),
    "qwen2-vl-2b": dict(family="qwen2_vl", vision_config=dict(_QWEN2_VISION),
                        text_config=dict(_QWEN2_TEXT, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                         num_attention_heads=12, num_key_value_heads=2)),
    "qwen2.5-vl-7b": dict(family="qwen2_5_vl", vision_config=dict(_QWEN25_VISION),
                          text_config=dict(_QWEN25_TEXT, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                           num_attention_heads=28, num_key_value_heads=4)),
    "qwen2.5-vl-3b": dict(family="qwen2_5_vl", vision_config=dict(_QWEN25_VISION),
                          text_config=dict(_QWEN25_TEXT, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                           num_attention_heads=16, num_key_value_heads=2)),
    "qwen3-vl-8b": dict(family="qwen3_vl", vision_config=dict(_QWEN3_VISION),
                        text_config=dict(_QWEN3_TEXT, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                         num_attention_heads=32, num_key_value_heads=8)),
    "qwen3-vl-4b": dict(family="qwen3_vl", vision_config=dict(_QWEN3_SMALL_VISION),
                        text_config=dict(_QWEN3_TEXT, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                         num_attention_heads=32, num_key_value_heads=8)),
    "qwen3-vl-30b-a3b": dict(family="qwen3_vl_moe", vision_config=dict(_QWEN3_VISION),
                             text_config=dict(_QWEN3_TEXT, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                                              num_attention_heads=32, num_key_value_heads=4, moe_intermediate_size=768,
                                              num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1)),
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
    (the random test model) or a trained V-NIAH model shipped with the package (``vniah``,
    ``vniah-coverage``: :data:`CHECKPOINTS`).

    The model class follows the config's ``model_type`` (:data:`psa_vlm.families.FAMILIES`:
    Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE); another model type is a ValueError naming the
    supported ones. ``dtype="auto"``: the checkpoint's (shapes: bf16 on a GPU, fp32 elsewhere).
    ``device_map`` (e.g. ``"auto"``) spreads a checkpoint over the visible GPUs instead of moving
    it to ``device``.
    """
    from transformers import AutoConfig, AutoProcessor

    from .tiny import build_tiny_processor, tiny_model_config, tiny_model_dir

    if spec in SHAPES:
        if dtype == "auto":
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        config = tiny_model_config(**SHAPES[spec])
        with torch.device(device):
            model = family(config.model_type).model_cls()(config).to(dtype)
        # The released processor's per-frame range (preprocessor_config.json), no total budget.
        factor = family(config.model_type).factor
        processor = build_tiny_processor(family=config.model_type, cap_pixels_per_frame=False,
                                         video_pixels=(4 * factor * factor, 16384 * factor * factor))
        return model.eval(), processor
    path = tiny_model_dir() if spec == "tiny" else checkpoint_dir(spec) if spec in CHECKPOINTS else spec
    try:
        config = AutoConfig.from_pretrained(path)
        cls = family(config.model_type, f"--model {spec}").model_cls()
        if device_map is not None:
            model = cls.from_pretrained(path, dtype=dtype, device_map=device_map)
        else:
            model = cls.from_pretrained(path, dtype=dtype).to(device)
        processor = AutoProcessor.from_pretrained(path)
    except OSError as err:  # a missing folder, a hub id not cached offline: transformers says which
        raise FileNotFoundError(f"cannot load the model {spec!r}: {err} (pass a checkpoint folder, a hub id, "
                                f"one of {sorted(SHAPES)}, {', '.join(BUILT_IN_MODELS)})") from err
    return model.eval(), processor


def vision_factor(spec: str) -> int:
    """Frame sides the model of ``spec`` takes are multiples of this (28 for Qwen2/2.5-VL, 32 for
    Qwen3-VL), read from its config alone, so a video can be sized before the weights load."""
    if spec in SHAPES:
        return family(SHAPES[spec]["family"]).factor
    if spec in BUILT_IN_MODELS:
        return family(DEFAULT_FAMILY).factor
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec)
    except OSError as err:
        raise FileNotFoundError(f"cannot read the config of the model {spec!r}: {err}") from err
    return family(config.model_type, f"--model {spec}").factor


#: The trained V-NIAH models shipped with the package: ``--model`` name -> folder of
#: ``checkpoints/`` (``psa_vlm.checkpoints`` once installed).
CHECKPOINTS = {"vniah": "vniah", "vniah-coverage": "vniah_coverage"}


def checkpoint_dir(name: str = "vniah") -> Path:
    """A trained V-NIAH model shipped with the package (:data:`CHECKPOINTS`; ``checkpoints/vniah``
    in the repository is ``--model vniah`` on the command line): weights in fp16, tokenizer,
    processor, the training log (``training.json``) and the accuracy CI holds it to
    (``record.json``). Looked up in the installed package, then in the source tree this module
    is imported from (a checkout run without installing it)."""
    from importlib import resources

    if name not in CHECKPOINTS:
        raise ValueError(f"no shipped checkpoint {name!r}; choose from {', '.join(CHECKPOINTS)}")
    folder = CHECKPOINTS[name]
    candidates = []
    try:
        candidates.append(Path(str(resources.files("psa_vlm.checkpoints") / folder)))
    except ModuleNotFoundError:  # not installed: only the source tree
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "checkpoints" / folder)
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(f"the {name} checkpoint is missing from {candidates[0]}; reinstall psa-vlm, or train one "
                            "with `python -m psa_vlm.vniah_train --output DIR` and pass --model DIR")


BUILT_IN_MODELS = ("tiny", *CHECKPOINTS)
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
