"""The offline tiny Qwen2.5-VL of ``psa_vlm.testing``: builds, saves, reloads, runs on video."""

import json

import numpy as np
import pytest
import torch

from psa_vlm import testing
from psa_vlm.video import video_inputs

QUESTION = "What happens in the video?"
LONG_QUESTION = "Which colour is the square in the middle of the clip, and where does it move?"


@pytest.fixture(scope="module")
def processor(tiny_processor):
    return tiny_processor


@pytest.fixture(scope="module")
def model():
    return testing.build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return testing.make_video(tmp_path_factory.mktemp("video") / "clip.mp4", codec="h264")


@pytest.fixture(scope="module")
def inputs(processor, video):
    return video_inputs(processor, video, QUESTION, **testing.TINY_VIDEO)


def _video_token_id(processor):
    return processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")


def test_tokenizer_is_deterministic_and_renders_video_chat():
    first, second = testing.build_tiny_tokenizer(), testing.build_tiny_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert 1000 <= len(first) <= 2000
    ids = [first.convert_tokens_to_ids(token) for token in testing.SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids) and None not in ids

    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi?"}]}]
    text = first.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Hi?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Arbitrary text round-trips (byte-level BPE has no unknown token).
    sample = "Zebra 42 -> ünïcödé?"
    assert first.decode(first(sample)["input_ids"]) == sample


def test_config_matches_tokenizer_and_mrope():
    tokenizer = testing.build_tiny_tokenizer()
    config = testing.tiny_model_config(tokenizer)
    text, vision = config.text_config, config.vision_config
    assert text.vocab_size == len(tokenizer)
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert 2 * sum(text.rope_parameters["mrope_section"]) == text.head_dim
    assert text.num_attention_heads > text.num_key_value_heads  # GQA
    assert vision.out_hidden_size == text.hidden_size
    with pytest.raises(ValueError, match="mrope_section"):
        testing.tiny_model_config(tokenizer, text_config={"head_dim": 64})


def test_save_and_reload_offline(tmp_path, model):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    directory = testing.save_tiny_model(tmp_path / "tiny", seed=0)
    assert "attn_implementation" not in (directory / "config.json").read_text()
    assert (directory / "model.safetensors").is_file()

    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, local_files_only=True)
    expected = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.tokenizer.convert_tokens_to_ids("<|video_pad|>") == reloaded.config.video_token_id
    assert processor.video_processor.size["longest_edge"] == testing.VIDEO_MAX_PIXELS


def test_video_inputs_have_rope_fields_and_matching_pads(processor, inputs):
    for key in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw",
                "second_per_grid_ts", "mm_token_type_ids"):
        assert key in inputs, key
    grid = inputs["video_grid_thw"]
    assert grid.tolist() == [[4, 6, 8]]  # 16 frames at 4 fps sampled at 2 fps; 84x112 px
    assert inputs["second_per_grid_ts"].tolist() == [1.0]
    pads = int((inputs["input_ids"] == _video_token_id(processor)).sum())
    assert pads == int(grid.prod()) // 4
    assert inputs["pixel_values_videos"].shape[0] == int(grid.prod())


def test_forward_gives_finite_varied_logits(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits[0].argmax(-1).unique().numel() > 5  # not a degenerate, constant model


def test_generate_returns_new_tokens(model, inputs):
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    assert new_tokens.numel() == 8
    assert new_tokens.unique().numel() > 1


def test_left_padded_batch_matches_single_runs(model, processor, video):
    batch = video_inputs(processor, video, [QUESTION, LONG_QUESTION], **testing.TINY_VIDEO)
    mask = batch["attention_mask"]
    assert mask.shape[0] == 2 and not mask[0, 0] and mask[:, -1].all()  # left padding
    assert batch["video_grid_thw"].shape[0] == 2
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
        for row, question in enumerate([QUESTION, LONG_QUESTION]):
            single = model(**video_inputs(processor, video, question, **testing.TINY_VIDEO)).logits[0, -1]
            torch.testing.assert_close(last[row], single, atol=1e-4, rtol=1e-4)
    output = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert output.shape == (2, batch["input_ids"].shape[1] + 4)


def test_in_memory_frames_and_nframes(processor):
    frames = testing.make_video_frames(16, 84, 112, seed=0)
    inputs = video_inputs(processor, frames, QUESTION, **{**testing.TINY_VIDEO, "nframes": 4, "video_fps": 4.0})
    assert inputs["video_grid_thw"].tolist() == [[2, 6, 8]]
    assert inputs["second_per_grid_ts"].tolist() == [2.0]  # 4 of 16 frames at 4 fps: 1 fps


def test_make_video_is_deterministic_and_decodable(tmp_path):
    import decord

    first = testing.make_video(tmp_path / "a.mp4", frames=8, codec="mpeg4", seed=3)
    second = testing.make_video(tmp_path / "b.mp4", frames=8, codec="mpeg4", seed=3)
    assert first.read_bytes() == second.read_bytes()
    reader = decord.VideoReader(str(first))
    assert len(reader) == 8 and reader.get_avg_fps() == pytest.approx(4.0)
    decoded = reader.get_batch(list(range(8))).asnumpy().astype(np.int16)
    expected = testing.make_video_frames(8, 84, 112, seed=3).astype(np.int16)
    assert np.abs(decoded - expected).mean() < 12  # lossy, but the same picture
    with pytest.raises(ValueError, match="even"):
        testing.make_video(tmp_path / "odd.mp4", width=113)


def test_tiny_model_dir_builds_once(tmp_path, monkeypatch):
    from psa_vlm import tiny

    calls = []
    real_save = tiny.save_tiny_model

    def counting_save(directory, seed=0, **kwargs):
        calls.append(directory)
        return real_save(directory, seed=seed, **kwargs)

    monkeypatch.setattr(tiny, "save_tiny_model", counting_save)
    first = testing.tiny_model_dir(tmp_path)
    second = testing.tiny_model_dir(tmp_path)
    assert first == second and len(calls) == 1
    assert json.loads((first / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    leftovers = [p.name for p in tmp_path.iterdir() if p != first]
    assert leftovers == []  # the staging directory was renamed away


def test_tiny_model_dir_builds_on_every_rank_of_a_process_group(tmp_path):
    """Under torchrun / accelerate launch transformers saves only on rank 0: the tiny model must
    still be built whole when another rank gets there first (found on two GPUs: rank 1 failed)."""
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this Python")
    script = tmp_path / "build.py"
    script.write_text(
        "import sys, torch.distributed as dist\n"
        "from psa_vlm import testing\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "if rank == 0:\n"
        "    dist.barrier()  # rank 1 builds first, under the process group\n"
        "path = testing.tiny_model_dir(sys.argv[1])\n"
        "if rank == 1:\n"
        "    dist.barrier()\n"
        "assert (path / 'config.json').is_file() and (path / 'model.safetensors').is_file(), sorted(path.iterdir())\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n"
    )
    cache = tmp_path / "cache"
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), str(cache)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    built = [p.name for p in cache.iterdir()]
    assert built == [f"tiny-v{testing.TINY_MODEL_VERSION}-seed0"]  # no staging folder left behind
