"""Qwen2-VL, Qwen3-VL and Qwen3-VL-MoE through the same ``"psa"`` registration as Qwen2.5-VL.

Tiny random models of each family (2 text layers, 2 vision blocks; prompts of 170 and 500
tokens) built once per session: the dense preset reproduces ``sdpa`` on a video prompt and on a left-padded
batch, with the vision tower's frame groups batched into one call; a sparse preset generates;
the loader and the command line pick the class from the config; and text-aware forcing leaves
Qwen3-VL's per-frame timestamps to the video (docs/semantics.md section 10).

What these tests check is the model plumbing (text positions, batched frame groups, loading),
not the kernels: the kernels run on their CPU path (blockwise SDPA and the reference mask
builder, what a CPU without Triton runs) rather than in Triton's interpreter, which spends
seconds per launch. test_kernels and test_reference hold the Triton kernels to that same
reference, and test_integration runs them interpreted inside the tiny Qwen2.5-VL.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import psa_vlm
from psa_vlm import cli, testing
from psa_vlm.families import FAMILIES
from psa_vlm.runtime import forced_text
from psa_vlm.video import patch_factor, video_inputs

NEW_FAMILIES = ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe"]
# Blocks small enough that PSA runs on a few hundred tokens (real models keep the presets' sizes).
SMALL_BLOCKS = dict(block_q=64, block_k=32, min_seq_len=0)
SMALL_MODEL = dict(text_config={"num_hidden_layers": 2}, vision_config={"depth": 2})
# A fixed sparsity (quantile mode, no similarity cap): on random weights the energy thresholds keep
# almost every block of a 500-token prompt at level 1, which would test nothing.
SPARSE = psa_vlm.load_preset("video_mme").at_sparsity(0.5)
QUESTIONS = ["What colour is the moving square?", "Where is the disc at the end of the clip, left or right?"]


@pytest.fixture(autouse=True)
def kernels_on_the_cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read per call (psa_kernels.utils.interpreting)


@pytest.fixture(scope="session")
def tokenizer():
    return testing.build_tiny_tokenizer()


def _inputs(processor, tokens_per_side: int, questions):
    """16 frames (8 frame groups, played and sampled at 2 fps) of ``tokens_per_side`` merged
    tokens a side: 28 or 32 (Qwen3-VL) pixels each."""
    side = tokens_per_side * patch_factor(processor)
    frames = testing.make_video_frames(16, side, side, seed=0)
    return video_inputs(processor, frames, questions,  # one video shared by a list of questions
                        video_fps=2.0, min_pixels=testing.VIDEO_MIN_PIXELS, max_pixels=side * side)


@pytest.fixture(scope="session", params=NEW_FAMILIES)
def family(request, tokenizer):
    """(family, model, processor, single prompt, left-padded batch, long prompt), built once.

    The single prompt and the batch have frames of 4 x 4 merged tokens: frame groups of 64
    patches, one query block, so the dense preset runs PSA on the vision tower too (about 170
    language tokens). The long prompt has 8 x 8 (about 550 tokens): room for a sparse level map."""
    name = request.param
    model = testing.build_tiny_model(seed=0, tokenizer=tokenizer, family=name, **SMALL_MODEL)
    processor = testing.build_tiny_processor(tokenizer, family=name)
    return (name, model, processor, _inputs(processor, 4, QUESTIONS[0]), _inputs(processor, 4, QUESTIONS),
            _inputs(processor, 8, QUESTIONS[0]))


def _logits(model, inputs, preset=None, **overrides):
    """Logits with ``sdpa`` (no preset) or ``psa`` configured with ``preset``."""
    psa_vlm.use_attention(model, preset, **overrides)
    with torch.no_grad():
        return model(**inputs).logits


def _psa_calls(model) -> dict[str, int]:
    calls = {"text": 0, "vision": 0}
    for s in psa_vlm.stats(model):
        calls[s.tower] += s.psa_calls
    return calls


def test_tiny_models_have_their_familys_classes(family):
    name, model, processor, single, _, long = family
    assert type(model).__name__ == FAMILIES[name].model_class
    assert type(processor).__name__ == FAMILIES[name].processor_class
    assert single["input_ids"].shape[1] > 2 * SMALL_BLOCKS["block_q"]
    assert long["input_ids"].shape[1] > 6 * SMALL_BLOCKS["block_q"]
    # frames were sized for the family's patches (112 px: 8 patches of 14; Qwen3-VL 128 px: 8
    # of 16), so the processor did not resize them again
    assert single["video_grid_thw"].tolist() == [[8, 8, 8]]


def test_dense_preset_equals_sdpa_on_a_video_prompt(family):
    name, model, _, single, _, _ = family
    ref = _logits(model, single)
    out = _logits(model, single, "dense", **SMALL_BLOCKS)
    assert (out - ref).abs().max().item() < 1e-4
    calls = _psa_calls(model)
    # every text layer once; the vision tower's 8 frame groups per block, batched into one call each
    assert calls["text"] == model.config.text_config.num_hidden_layers
    assert calls["vision"] == 8 * model.config.vision_config.depth


def test_dense_preset_equals_sdpa_on_a_left_padded_batch(family):
    name, model, _, _, batch, _ = family
    mask = batch["attention_mask"].bool()
    assert not mask.all(), "the two prompts should differ in length (left padding)"
    ref = _logits(model, batch)
    out = _logits(model, batch, "dense", **SMALL_BLOCKS)
    assert torch.isfinite(out).all()
    assert (out[mask] - ref[mask]).abs().max().item() < 1e-4  # padded positions carry no meaning
    # a left-padded batch runs sample by sample (batch invariance), each counted as a call
    assert _psa_calls(model)["text"] == mask.shape[0] * model.config.text_config.num_hidden_layers


def test_sparse_preset_generates_with_sparsity(family):
    name, model, processor, _, _, long = family
    psa_vlm.use_attention(model, SPARSE, **SMALL_BLOCKS)
    with torch.no_grad():
        out = model.generate(**long, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    assert out.shape[1] == long["input_ids"].shape[1] + 3
    assert psa_vlm.mean_sparsity(model) > 0
    assert psa_vlm.not_run_reason(model) is None


# ---------------------------------------------------------------------------- text-aware forcing


def _text(pattern: str) -> torch.Tensor:
    """A text mask from a picture: ``t`` text, ``v`` a media token."""
    return torch.tensor([[c == "t" for c in pattern]])


def _picture(mask: torch.Tensor) -> str:
    return "".join("t" if x else "." for x in mask[0].tolist())


def test_forcing_leaves_short_runs_between_media_to_the_media():
    #            system+header   frame  ts  frame  ts  frame  question
    text = _text("tttttttt" + "vvvv" + "ttt" + "vvvv" + "ttt" + "vvvv" + "tttttt")
    got = _picture(forced_text(text, media_gap_tokens=3))
    assert got == "tttttttt" + "." * 4 + "." * 3 + "." * 4 + "." * 3 + "." * 4 + "tttttt"
    # runs longer than the gap stay text: a question between two videos is still the question
    assert _picture(forced_text(text, media_gap_tokens=2)) == _picture(text).replace("v", ".")
    assert torch.equal(forced_text(text, 0), text)  # 0: every text token is text


def test_forcing_per_row_of_a_left_padded_batch():
    # padding counts as text by token type; it is never enclosed, so it stays (and is masked anyway)
    text = torch.cat([_text("ppttvvttvvtt".replace("p", "t")), _text("ttttvvttttvv")])
    got = forced_text(text, media_gap_tokens=2)
    assert _picture(got[:1]) == "tttt" + "." * 6 + "tt"
    assert _picture(got[1:]) == "tttt" + ".." + "tttt" + ".."  # 4 > 2 tokens: still text


def test_qwen3_timestamps_are_not_forced_and_the_question_is(family):
    name, model, processor, _, _, long = family
    text = long["mm_token_type_ids"][0] == 0
    media = (~text).nonzero()[:, 0]
    first, last = int(media[0]), int(media[-1])
    forced = forced_text(text[None], psa_vlm.load_preset("video_mme").media_gap_tokens)[0]
    assert not forced[first:last + 1].any(), "nothing between the first and the last video token is forced"
    assert forced[last + 1:].all() and forced[:first].all()  # the question and the system prompt are
    seams = int(text[first:last + 1].sum())  # Qwen3-VL: <|vision_end|><t seconds><|vision_start|> x 3
    assert (seams > 0) == FAMILIES[name].per_frame_timestamps
    if FAMILIES[name].per_frame_timestamps:
        # Forcing every timestamp would force every key block of the video: no sparsity at all.
        psa_vlm.use_attention(model, SPARSE, **SMALL_BLOCKS, media_gap_tokens=0)
        with torch.no_grad():
            model(**long)
        assert psa_vlm.mean_sparsity(model) == 0
        psa_vlm.use_attention(model, SPARSE, **SMALL_BLOCKS)
        with torch.no_grad():
            model(**long)
        assert psa_vlm.mean_sparsity(model) > 0.1


# ---------------------------------------------------------------------------- loading, commands


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    return testing.save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3") / "model", family="qwen3_vl")


def test_load_model_picks_the_class_from_model_type(qwen3_dir, tmp_path):
    from psa_vlm.models import load_model, vision_factor

    model, processor = load_model(str(qwen3_dir), device="cpu", dtype=torch.float32)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert vision_factor(str(qwen3_dir)) == 32 and vision_factor("tiny") == 28
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2', which psa-vlm does not load; supported: qwen2_vl"):
        load_model(str(other), device="cpu")


# Parameters of the released checkpoints (their model cards) and their vocabulary (151,936 or 152,064)
@pytest.mark.parametrize("shape, released, vocab", [("qwen3-vl-8b", 8.77e9, 151936), ("qwen2-vl-7b", 8.29e9, 152064),
                                                    ("qwen3-vl-30b-a3b", 31.1e9, 151936)])
def test_shapes_build_the_real_architecture(shape, released, vocab):
    """The shapes `psa-vlm bench --model` takes: the released architecture (here on the meta
    device: no memory) with the tiny tokenizer's vocabulary in the embedding and output layers."""
    from psa_vlm.families import family
    from psa_vlm.models import SHAPES, check_model_spec
    from psa_vlm.tiny import tiny_model_config

    check_model_spec(shape)
    config = tiny_model_config(**SHAPES[shape])
    with torch.device("meta"):
        model = family(config.model_type).model_cls()(config)
    per_token = 2 * config.text_config.hidden_size  # an embedding row and an output row
    count = sum(p.numel() for p in model.parameters()) + (vocab - config.text_config.vocab_size) * per_token
    assert count == pytest.approx(released, rel=0.01)


def test_ask_says_why_psa_did_not_run(qwen3_dir, tmp_path, capsys):
    """Below the default preset's min_seq_len (8192) PSA runs no call: ask says so and why."""
    video = testing.make_video(tmp_path / "clip.mp4", frames=8, width=112, height=112)
    assert cli.main(["ask", "--model", str(qwen3_dir), "--video", str(video), "--max-new-tokens", "2",
                     "--device", "cpu", "--dtype", "fp32", "What colour is the square?"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("PSA did not run"))
    assert "sequence shorter than min_seq_len = 8192" in line and "min_seq_len=0" in line
    assert "PSA sparsity" not in out and "answer:" in out
    assert re.search(r"tokens: \d+ \(\d+ visual\)", out)
