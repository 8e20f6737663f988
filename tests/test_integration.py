"""``attn_implementation="psa"`` on the offline tiny Qwen2.5-VL, against ``"sdpa"``.

The model tests run their PSA calls on the PyTorch path a CPU user gets, and again in Triton's
interpreter under ``-m slow`` (the ``kernels_path`` fixture of conftest.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

import psa_kernels
import psa_vlm
from psa_vlm import testing
from psa_vlm.video import video_inputs

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What colour is the moving square?", "Where is the disc at the end of the clip, left or right?"]
# The PSA path must really run: blocks small enough for the tiny model's few hundred tokens.
SMALL_BLOCKS = dict(block_q=64, block_k=32, min_seq_len=0)


@pytest.fixture(scope="module")
def model_dir(tiny_model_path):
    return tiny_model_path


@pytest.fixture(scope="module")
def processor(model_dir):
    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    # 224x224 frames: a full-attention frame group of 256 patches, so the vision tower runs PSA too.
    return testing.make_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames=16, width=224, height=224)


@pytest.fixture(scope="module")
def single(processor, video):
    return video_inputs(processor, video, QUESTIONS[0], **{**testing.TINY_VIDEO, "max_pixels": 224 * 224})


@pytest.fixture(scope="module")
def batch(processor, video):
    return video_inputs(processor, [video, video], QUESTIONS, **{**testing.TINY_VIDEO, "max_pixels": 224 * 224})


def load(model_dir, attn="sdpa", preset=None, **overrides):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, attn_implementation=attn, local_files_only=True, dtype=torch.float32
    ).eval()
    if preset is not None:
        psa_vlm.configure(model, preset, **overrides)
    return model


@pytest.fixture(scope="module")
def sdpa_model(model_dir):
    return load(model_dir)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def assert_psa_ran(model, towers=("text", "vision")):
    by_tower = {}
    for s in psa_vlm.stats(model):
        by_tower[s.tower] = by_tower.get(s.tower, 0) + s.psa_calls
    for tower in towers:
        assert by_tower.get(tower, 0) > 0, f"PSA never ran on the {tower} tower: {psa_vlm.stats(model)}"


@pytest.mark.usefixtures("kernels_path")
def test_dense_preset_reproduces_sdpa_single_prompt(model_dir, sdpa_model, single):
    psa = load(model_dir, "psa", "dense", **SMALL_BLOCKS)
    ref, out = logits(sdpa_model, single), logits(psa, single)
    assert single["input_ids"].shape[1] > 2 * SMALL_BLOCKS["block_q"]
    assert (out - ref).abs().max().item() < 1e-4
    assert_psa_ran(psa)
    assert all(s.sparsity == 0 for s in psa_vlm.stats(psa) if s.psa_calls)


@pytest.mark.usefixtures("kernels_path")
def test_dense_preset_reproduces_sdpa_left_padded_batch(model_dir, sdpa_model, batch):
    mask = batch["attention_mask"].bool()
    assert not mask.all(), "the two prompts should differ in length (left padding)"
    psa = load(model_dir, "psa", "dense", **SMALL_BLOCKS)
    ref, out = logits(sdpa_model, batch), logits(psa, batch)
    assert torch.isfinite(out).all()
    # Padded positions carry no meaning; every real token must match.
    assert (out[mask] - ref[mask]).abs().max().item() < 1e-4
    assert_psa_ran(psa)


@pytest.mark.usefixtures("kernels_path")
def test_dense_preset_generates_the_same_tokens(model_dir, sdpa_model, batch):
    psa = load(model_dir, "psa", "dense", **SMALL_BLOCKS)
    kwargs = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        ref = sdpa_model.generate(**batch, **kwargs)
        out = psa.generate(**batch, **kwargs)
    assert out.shape[1] == batch["input_ids"].shape[1] + 8
    assert torch.equal(out, ref)
    decode = [r for s in psa_vlm.stats(psa) for r in s.dense_calls if r.startswith("query shorter than one block")]
    assert decode, "decode steps should run dense"


@pytest.mark.usefixtures("kernels_path")
def test_static_cache_generation_matches(model_dir, sdpa_model, single):
    psa = load(model_dir, "psa", "dense", **SMALL_BLOCKS)
    kwargs = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6, cache_implementation="static")
    with torch.no_grad():
        ref = sdpa_model.generate(**single, **kwargs)
        out = psa.generate(**single, **kwargs)
    assert torch.equal(out, ref)


@pytest.mark.usefixtures("kernels_path")
def test_per_tower_dict_form_and_set_attn_implementation(model_dir, sdpa_model, single):
    mixed = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32,
        attn_implementation={"text_config": "psa", "vision_config": "sdpa"},
    ).eval()
    psa_vlm.configure(mixed, "dense", **SMALL_BLOCKS)
    assert (logits(mixed, single) - logits(sdpa_model, single)).abs().max().item() < 1e-4
    assert_psa_ran(mixed, towers=("text",))
    assert all(s.psa_calls == 0 and not s.dense_calls for s in psa_vlm.stats(mixed) if s.tower == "vision")

    switched = load(model_dir)
    switched.set_attn_implementation("psa")
    psa_vlm.configure(switched, "dense", **SMALL_BLOCKS)
    assert (logits(switched, single) - logits(sdpa_model, single)).abs().max().item() < 1e-4
    assert_psa_ran(switched)


@pytest.mark.usefixtures("kernels_path")
def test_sparse_preset_generates_and_reports_the_density_of_its_level_maps(model_dir, batch, single):
    psa = load(model_dir, "psa")
    psa_vlm.configure(psa, "video_mme", record_level_maps=True, **SMALL_BLOCKS)
    with torch.no_grad():
        out = psa.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]
    psa_vlm.reset_stats(psa)
    logits(psa, batch)  # a left-padded prefill runs sample by sample: one PSA call per sample and text layer
    assert all(s.psa_calls == batch["input_ids"].shape[0] for s in psa_vlm.stats(psa) if s.tower == "text")
    psa_vlm.reset_stats(psa)
    batch = single
    logits(psa, batch)  # one prompt: one PSA call per text layer, its level map recorded
    text_stats = [s for s in psa_vlm.stats(psa) if s.tower == "text"]
    assert text_stats and all(s.psa_calls == 1 for s in text_stats)
    assert psa_vlm.mean_sparsity(psa) > 0
    maps = psa_vlm.level_maps(psa)
    for s in text_stats:
        rec = maps[("text", s.layer)]
        geometry = {k: rec[k] for k in ("causal", "q_len", "k_len", "block_q", "block_k", "key_padding_mask")}
        recomputed = psa_kernels.sparsity(rec["level_map"], **geometry).mean(0)
        assert recomputed.tolist() == pytest.approx(s.head_sparsity, abs=1e-6)
        assert rec["causal"] and rec["q_len"] == batch["input_ids"].shape[1]
        # The question (text) at the end of the prompt: its query blocks read every visible block at level 1.
        lm = rec["level_map"]
        assert torch.all(lm[:, :, -1, 1:] == 1)
    # Some pairs are pooled or skipped, and the mask kept the text where the model input put it.
    assert any((maps[("text", s.layer)]["level_map"] != 1).any() for s in text_stats)


@pytest.mark.usefixtures("kernels_path")
def test_dense_text_false_lets_the_question_rows_go_sparse(model_dir, batch):
    """The stress setting of V-NIAH: no text block forced to level 1, so the question's own
    query blocks are assigned like any other (the default keeps them dense, test above)."""
    with pytest.raises(ValueError, match="dense_text"):
        psa_vlm.load_preset("video_mme").replace(dense_text="no")
    psa = load(model_dir, "psa")
    config = psa_vlm.load_preset("video_mme").at_sparsity(0.9).replace(dense_text=False)
    psa_vlm.configure(psa, config, record_level_maps=True, **SMALL_BLOCKS)
    logits(psa, batch)
    maps = [rec["level_map"] for (tower, _), rec in psa_vlm.level_maps(psa).items() if tower == "text"]
    assert maps and any((lm[:, :, -1, 1:] != 1).any() for lm in maps)


def test_fallbacks_are_logged_once_and_keep_running(model_dir, single, caplog):
    psa = load(model_dir, "psa", "video_mme")  # min_seq_len 8192: the tiny prompts all run dense
    with caplog.at_level(logging.INFO, logger="psa_vlm"):
        with torch.no_grad():
            out = psa.generate(**single, max_new_tokens=3, do_sample=False)
            psa.generate(**single, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == single["input_ids"].shape[1] + 3
    short = [r for r in caplog.records if "min_seq_len" in r.getMessage()]
    assert len(short) == 1, [r.getMessage() for r in caplog.records]
    reasons = {r for s in psa_vlm.stats(psa) for r in s.dense_calls}
    assert any("min_seq_len" in r for r in reasons)


@pytest.mark.usefixtures("kernels_path")
def test_unconfigured_model_uses_the_default_preset(model_dir, single, caplog, monkeypatch):
    monkeypatch.setenv("PSA_VLM_PRESET", "dense")
    psa = load(model_dir, "psa")
    with caplog.at_level(logging.INFO, logger="psa_vlm"):
        out = logits(psa, single)
    assert torch.isfinite(out).all()
    assert all(s.tower in ("text", "vision") for s in psa_vlm.stats(psa))
    assert sum(s.psa_calls for s in psa_vlm.stats(psa)) > 0 or any(
        "default preset" in r.getMessage() for r in caplog.records
    )


@pytest.mark.usefixtures("kernels_path")
def test_half_precision_and_cpu_run(model_dir, single):
    psa = load(model_dir, "psa", "video_mme", **SMALL_BLOCKS).to(torch.bfloat16)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in single.items()}
    out = logits(psa, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _kernels_probe(cwd, preload):
    code = ("import psa_vlm, psa_kernels\n" if preload else "") + (
        "from transformers.utils import is_kernels_available\nprint(is_kernels_available())"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_hf_kernels_probe_is_unchanged(tmp_path):
    baseline = _kernels_probe(tmp_path, preload=False)
    assert _kernels_probe(tmp_path, preload=True) == baseline
    assert _kernels_probe(REPO, preload=False) == baseline  # the repo's kernels/ folder on sys.path
    assert _kernels_probe(REPO, preload=True) == baseline


def test_repo_kernels_folder_does_not_shadow_hugging_face_kernels():
    """From the checkout's root (``python -c``/``python -m`` put it on sys.path) ``import kernels``
    must give Hugging Face's package where it is installed (transformers 5.25 imports names from
    it when its modeling code loads), and an empty module where it is not: never this repo's ops."""
    code = ("import importlib.metadata as md, os\n"
            "try:\n    md.version('kernels'); installed = True\n"
            "except md.PackageNotFoundError:\n    installed = False\n"
            "import transformers.modeling_utils, kernels\n"
            "mine = os.path.abspath(os.path.join('kernels', '__init__.py'))\n"
            "print(installed, getattr(kernels, '__file__', None) == mine, hasattr(kernels, 'psa_attention'))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    installed, is_mine, has_ops = res.stdout.split()
    assert has_ops == "False"
    assert is_mine == ("False" if installed == "True" else "True")


def test_psa_kernels_imports_from_anywhere(tmp_path):
    for cwd in (tmp_path, REPO):
        res = subprocess.run([sys.executable, "-c", "import psa_kernels, psa_vlm; print(psa_kernels.psa_attention)"],
                             cwd=cwd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "psa_attention" in res.stdout, res.stderr


@pytest.mark.usefixtures("kernels_path")
def test_a_failing_psa_call_falls_back_to_dense_and_says_why(model_dir, sdpa_model, single, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(psa_kernels, "psa_attention", broken)
    monkeypatch.setenv("PSA_VLM_STRICT", "0")
    psa = load(model_dir, "psa", "dense", **SMALL_BLOCKS)
    with caplog.at_level(logging.WARNING, logger="psa_vlm"):
        out = logits(psa, single)
    assert (out - logits(sdpa_model, single)).abs().max().item() < 1e-4
    assert any("kernel exploded" in r.getMessage() for r in caplog.records)
    assert any("kernel exploded" in reason for s in psa_vlm.stats(psa) for reason in s.dense_calls)
    monkeypatch.setenv("PSA_VLM_STRICT", "1")
    with pytest.raises(RuntimeError, match="kernel exploded"):
        logits(load(model_dir, "psa", "dense", **SMALL_BLOCKS), single)
