"""The offline Qwen-VL models: everything needed to build a model and its processor without a hub.

Built locally and deterministically from a seed: a byte-level BPE tokenizer trained on a
built-in corpus, a processor around it (the family's image and video processors), model configs
(the tiny test model's, or any shape's: :mod:`psa_vlm.models` builds the real architectures
from them with random weights), the tiny randomly initialised model and its on-disk cache
(``tiny_model_dir``). Nothing is downloaded. Every builder takes ``family``, a ``model_type`` of
:data:`psa_vlm.families.FAMILIES` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE); the default
is Qwen2.5-VL, the model the project's measurements use.

The tiny models mimic the real ones where it matters for attention code: grouped-query
attention (4 query heads sharing 2 key/value heads), 3-D multimodal RoPE, the family's vision
tower (Qwen2.5-VL: windows with full-attention blocks; Qwen2-VL and Qwen3-VL: attention within
each frame group), and ``<|video_pad|>`` placeholders that the vision tower's merged patches
replace (Qwen3-VL: one ``<|vision_start|>`` ... ``<|vision_end|>`` group per frame group, after
its timestamp in text).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .families import DEFAULT_FAMILY, family as _family

# Versions the cached build in ``tiny_model_dir``: bump whenever anything below changes
# what ``save_tiny_model`` writes, so stale caches are not reused.
TINY_MODEL_VERSION = 1

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Pixel ranges are per frame and small, so a 112x84 video gives a handful of tokens per
# frame; both lie on multiples of 28 (patch 14 x merge 2).
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 224 * 224
VIDEO_MIN_PIXELS = 56 * 56
VIDEO_MAX_PIXELS = 224 * 224

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-style chat template, written so that Jinja's trim_blocks/lstrip_blocks (which
# transformers enables) cannot eat a wanted newline: every "\n" is followed by a tag or
# the end, never preceded by a block tag.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' or 'video' in item %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' or 'image' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the tokenizer. It covers the words the project's prompts use
# (multiple-choice video QA) so that prompts tokenize into a realistic number of pieces.
_CORPUS = """\
Select the best answer to the following multiple-choice question based on the video.
Respond with only the letter (A, B, C, or D) of the correct option.
Answer with the option's letter from the given choices directly.
You are a helpful assistant. What is happening in this video? Describe the video in detail.
Which colour is the square that appears in the middle of the clip? Where does the red disc go?
Options: A. red B. green C. blue D. yellow. The answer is A. The answer is B.
The answer is C. The answer is D. How many objects move to the left? How many seconds pass?

A short video is a sequence of frames. Each frame is a picture, and the frames are shown
one after another, a few times every second. The model looks at the frames in small
square patches; two frames that follow each other are joined into one temporal patch,
and four neighbouring patches are merged into one token for the language model.
Long videos therefore turn into many thousands of tokens, and attention over all of
them is the most expensive part of answering a question about the video.

Sparse attention keeps only the blocks of keys that matter for each block of queries.
A pyramid of pooled keys lets the attention look at distant parts of the video at a
coarse level while nearby parts keep their full detail. The goal is to skip most of the
work and still give the same answer as dense attention, with the same accuracy on the
benchmarks: Video-MME, MLVU, LongVideoBench and EgoSchema.

In the evening the children walked along the river. A small boat with a white sail moved
slowly past the old bridge, and a dog ran after a yellow ball on the green grass. The sky
turned orange, then purple, then dark blue, and the first stars appeared above the hills.
A man in a grey coat opened the door of the house, turned on the light in the kitchen,
and started to cook dinner for the family: soup, bread, cheese and fresh fruit.

At the market on Saturday morning people bought vegetables, flowers, fish and warm
coffee. A woman played the violin near the fountain while pigeons walked between the
tables. Later it began to rain, so everybody hurried under the roofs of the shops, and
the street became quiet except for the sound of water falling from the gutters.
During the football match the players kicked the ball across the field; the goalkeeper
jumped, caught it with both hands and threw it back towards the centre line.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 20 24 32 64 100 128 256 512 1024 2048 4096.
Times: 00:01, 00:15, 01:30, 12:45. Prices: $3.50, $12.99. Scores: 65.1%, 71.6%, 98.7%.
Punctuation: , . ; : ! ? ' " ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `
Letters: A B C D E F G H I J K L M N O P Q R S T U V W X Y Z a b c d e f g h i j k l m n o p
q r s t u v w x y z. First, second, third, fourth, last. Yes. No. Maybe.
"""


# --------------------------------------------------------------------------- tokenizer


def build_tiny_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on the built-in corpus and wrap it for transformers.

    Byte-level BPE (like Qwen's) can encode any text without unknown tokens, so tests can
    use arbitrary questions. The Qwen special tokens are added after training so that
    they get the last ids, as in Qwen, and are never split. Training is deterministic:
    the same corpus and settings give the same vocabulary and merges every time.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _special_token_ids(tokenizer) -> dict[str, int]:
    """Look up the ids of the Qwen special tokens, failing loudly if one is missing."""
    ids = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no special token {token!r}")
        ids[token] = token_id
    return ids


# --------------------------------------------------------------------------- processor


def build_tiny_processor(tokenizer=None, *, family: str = DEFAULT_FAMILY,
                         video_pixels=(VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), cap_pixels_per_frame=True):
    """Build the family's processor (``Qwen2_5_VLProcessor`` by default) for tiny images and videos.

    The pixel ranges are small so that a 112x84 video costs a few tokens per frame; the
    video processor's range contains qwen-vl-utils' output sizes, so frames that
    ``video_inputs`` already resized pass through without a second resize. ``video_pixels``
    (min, max per frame) and ``cap_pixels_per_frame`` (the total-video budget) let a benchmark
    feed frames as large and as many as a real model takes.
    """
    import transformers

    spec = _family(family)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS,
                                                         patch_size=spec.patch_size)
    video_cls = getattr(transformers, spec.video_processor_class)
    if spec.per_frame_timestamps:
        # Qwen3-VL's video processor bounds the pixels of the whole clip (frames x height x width):
        # at least one frame's minimum, at most the per-frame maximum for as many frames as a
        # video may have (768), so sizes within the per-frame range pass through unchanged.
        video_processor = video_cls(size={"shortest_edge": video_pixels[0], "longest_edge": video_pixels[1] * 768},
                                    cap_pixels_per_frame=False)
    else:
        video_processor = video_cls(
            min_pixels=video_pixels[0],
            max_pixels=video_pixels[1],
            # True: qwen-vl-utils' behaviour; also silences transformers' warning about the default.
            cap_pixels_per_frame=cap_pixels_per_frame,
        )
    return getattr(transformers, spec.processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------- model


def tiny_model_config(tokenizer=None, *, family: str = DEFAULT_FAMILY, **overrides):
    """Return a tiny config of ``family`` (``Qwen2_5_VLConfig`` by default) whose token ids match
    ``build_tiny_tokenizer``.

    Text tower: hidden 128, 4 layers, 4 query heads sharing 2 key/value heads (GQA),
    head_dim 32, ``mrope_section`` summing to head_dim / 2 (as 3-D RoPE needs; Qwen3-VL
    interleaves it); Qwen3-VL-MoE: 4 experts, 2 per token. Vision tower: depth 4, 4 heads
    (head_dim 16), output size = text hidden size; Qwen2.5-VL: 56-pixel windows (2x2 merged
    tokens) with full attention in blocks 1 and 3; Qwen3-VL: 16-pixel patches, an 8x8 learned
    position grid and one deepstack layer.

    ``overrides`` go to the top-level config; keys ``text_config`` / ``vision_config``
    given as dicts are merged into the defaults instead of replacing them.
    """
    spec = _family(family)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    ids = _special_token_ids(tokenizer)
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]},
        # Larger than the usual 0.02 so that random attention is peaky, not uniform.
        "initializer_range": 0.2,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 4,
        "num_heads": 4,
        "patch_size": spec.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "initializer_range": 0.2,
    }
    if family == "qwen2_vl":  # head_dim = hidden / heads; the vision width is embed_dim
        del text_config["head_dim"]
        vision_config.update(embed_dim=64, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        vision_config.update(hidden_size=64, intermediate_size=128, window_size=56, fullatt_block_indexes=[1, 3],
                             tokens_per_second=2)
    else:  # Qwen3-VL and its MoE
        text_config["rope_parameters"] = {"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [6, 5, 5], "mrope_interleaved": True}
        vision_config.update(hidden_size=64, intermediate_size=128, num_position_embeddings=64,
                             deepstack_visual_indexes=[1])
        if family == "qwen3_vl_moe":
            text_config.update(moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    text_config.update(overrides.pop("text_config", None) or {})
    vision_config.update(overrides.pop("vision_config", None) or {})
    # The vision tower's output feeds the text tower (Qwen2-VL calls that width hidden_size).
    vision_config["hidden_size" if family == "qwen2_vl" else "out_hidden_size"] = text_config["hidden_size"]
    _check_head_dims(text_config)

    settings = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }
    settings.update(overrides)
    return spec.config_cls()(text_config=text_config, vision_config=vision_config, **settings)


def _check_head_dims(text_config: dict) -> None:
    """Catch the config mistakes that otherwise fail deep inside RoPE with shape errors."""
    head_dim = text_config.get("head_dim") or text_config["hidden_size"] // text_config["num_attention_heads"]
    section = text_config["rope_parameters"]["mrope_section"]
    if 2 * sum(section) != head_dim:
        raise ValueError(f"mrope_section {section} must sum to head_dim / 2 = {head_dim // 2}")
    heads, kv_heads = text_config["num_attention_heads"], text_config["num_key_value_heads"]
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} must be a multiple of num_key_value_heads {kv_heads}")


def build_tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                     **config_overrides):
    """Build a randomly initialised tiny model (``Qwen2_5_VLForConditionalGeneration`` unless
    ``family=`` names another) in eval mode.

    The weights depend only on ``seed`` (and the config), so two calls give the same model;
    the seed is applied inside a forked RNG so the caller's random state is left alone.
    ``attn_implementation`` is set on the model, not stored in the config, so a saved model
    can be reloaded with any attention backend. ``config_overrides`` (``tokenizer=`` and
    ``family=`` too) go to ``tiny_model_config``.
    """
    from transformers import GenerationConfig

    config = tiny_model_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _family(config.model_type).model_cls()(config)
    model.set_attn_implementation(attn_implementation)
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=[text.eos_token_id, text.bos_token_id],
        pad_token_id=text.pad_token_id,
        do_sample=False,
    )
    return model.to(dtype).eval()


def save_tiny_model(directory, seed: int = 0, family: str = DEFAULT_FAMILY) -> Path:
    """Write the tiny model of ``family`` (safetensors), config, tokenizer and processor to ``directory``.

    The result loads like a hub checkpoint with ``local_files_only=True``, through the family's
    ``*ForConditionalGeneration.from_pretrained`` (or :func:`psa_vlm.models.load_model`) and
    ``AutoProcessor``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(seed=seed, tokenizer=tokenizer, family=family)
    model.save_pretrained(directory, safe_serialization=True)
    build_tiny_processor(tokenizer, family=family).save_pretrained(directory)
    _drop_attn_implementation(directory / "config.json")
    return directory


def _drop_attn_implementation(config_path: Path) -> None:
    """Remove any saved attention choice so that loading picks the caller's backend."""
    config = json.loads(config_path.read_text())
    changed = False
    for section in (config, config.get("text_config", {}), config.get("vision_config", {})):
        for key in ("attn_implementation", "_attn_implementation"):
            changed |= section.pop(key, None) is not None
    if changed:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


_COMPLETE_MARKER = ".psa_vlm_complete"


def default_cache_dir() -> Path:
    """``$PSA_VLM_CACHE``, else ``$XDG_CACHE_HOME/psa_vlm``, else ``~/.cache/psa_vlm``."""
    if os.environ.get("PSA_VLM_CACHE"):
        return Path(os.environ["PSA_VLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "psa_vlm"


def tiny_model_dir(cache_dir=None, *, seed: int = 0, family: str = DEFAULT_FAMILY) -> Path:
    """Return a directory holding the saved tiny model of ``family``, building it on first use.

    The build goes to a temporary sibling directory which is renamed into place only after
    a marker file is written last, so an aborted or concurrent build never leaves a
    half-written directory behind; a complete one is reused as it is.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _family(family)  # an unknown family fails here, not in a subprocess
    kind = "" if family == DEFAULT_FAMILY else f"-{family}"
    final = cache_dir / f"tiny{kind}-v{TINY_MODEL_VERSION}-seed{seed}"
    if (final / _COMPLETE_MARKER).is_file():
        return final

    cache_dir.mkdir(parents=True, exist_ok=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under an initialized process group (accelerate launch, torchrun) transformers'
        # save_pretrained writes only on rank 0, so another rank would stage an empty folder:
        # build in a fresh process instead (every rank may; the rename below settles the race).
        import subprocess
        import sys

        code = ("import sys; from psa_vlm.tiny import tiny_model_dir; "
                "tiny_model_dir(sys.argv[1], seed=int(sys.argv[2]), family=sys.argv[3])")
        subprocess.run([sys.executable, "-c", code, str(cache_dir), str(seed), family], check=True)
        return final
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache_dir))
    try:
        save_tiny_model(staging, seed=seed, family=family)
        (staging / _COMPLETE_MARKER).write_text(json.dumps({"version": TINY_MODEL_VERSION, "seed": seed}) + "\n")
        if final.exists() and not (final / _COMPLETE_MARKER).is_file():
            shutil.rmtree(final)  # left by something other than this function: not trustworthy
        try:
            staging.rename(final)
        except OSError:
            if not (final / _COMPLETE_MARKER).is_file():  # lost a race to a complete build: fine
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final
