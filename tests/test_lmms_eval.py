"""The lmms-eval model ``psa_qwen2_5_vl`` runs lmms-eval's own ``videomme`` task offline.

lmms-eval's ``videomme`` reads its questions from the hub and its videos from
``$HF_HOME/videomme/data``; here a task that includes lmms-eval's own YAML reads the synthetic
benchmark shipped in ``eval_tasks/synthetic/videomme`` (the same Video-MME layout) instead. The
answers must equal those of ``psa-vlm eval``'s model (:class:`PSAQwenVL`) given the same
questions, frames, pixels, system prompt and attention.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

from psa_vlm import testing  # noqa: E402
from psa_vlm.models import TINY_MODEL_OVERRIDES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "eval_tasks" / "synthetic" / "videomme"
# The synthetic clips are small (24 visual tokens to 137 of text): without dense_text the
# question's rows may go sparse, so PSA has something to skip at this size.
OVERRIDES = ";".join(f"{k}={v}" for k, v in {**TINY_MODEL_OVERRIDES, "dense_text": "false"}.items())
VIDEO = dict(max_num_frames=4, min_pixels=testing.VIDEO_MIN_PIXELS, max_pixels=testing.VIDEO_MAX_PIXELS)


@pytest.fixture
def videomme_offline(tmp_path, monkeypatch):
    """An include path holding ``videomme_synthetic``: lmms-eval's videomme on local data."""
    import lmms_eval.tasks

    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    (hf_home / "videomme").symlink_to(SYNTHETIC, target_is_directory=True)  # where videomme looks for data/
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # lmms-eval hands the relative cache_dir to datasets as its cache
    own = Path(lmms_eval.tasks.__file__).parent / "videomme" / "videomme.yaml"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "videomme_synthetic.yaml").write_text(
        f"include: {own}\n"
        "task: videomme_synthetic\n"
        "dataset_path: parquet\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {SYNTHETIC / 'videomme' / 'test-00000-of-00001.parquet'}}}\n"
        "  cache_dir: videomme\n"
        "  video: true\n"
    )
    return tasks


def test_lmms_eval_finds_the_model_through_its_entry_point():
    from lmms_eval.models import get_model

    from psa_vlm.evaluation.lmms import PSAQwen2_5_VL

    assert get_model("psa_qwen2_5_vl") is PSAQwen2_5_VL


@pytest.mark.parametrize("first", ["psa_vlm.evaluation.lmms", "lmms_eval.models"])
def test_the_model_is_found_whichever_module_is_imported_first(first):
    """lmms-eval builds its registry once per process, when ``lmms_eval.models`` is first imported.
    Importing the model's module first used to make that happen half-way through it, and the model
    was missing for the rest of the process (a test failed when another ran before it in the same
    worker). A fresh interpreter per order."""
    code = (f"import {first}\n"
            "from lmms_eval.models import get_model\n"
            "from psa_vlm.evaluation.lmms import PSAQwen2_5_VL\n"
            "assert get_model('psa_qwen2_5_vl') is PSAQwen2_5_VL\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unknown_model_arguments_and_attentions_are_refused_before_loading():
    from psa_vlm.evaluation.lmms import PSAQwen2_5_VL

    with pytest.raises(ValueError, match="unknown model arguments"):
        PSAQwen2_5_VL(pretrained="/nowhere", attn_implementation="psa")
    with pytest.raises(ValueError, match="unknown attention"):
        PSAQwen2_5_VL(pretrained="/nowhere", attn="psa@x")


def test_lmms_eval_videomme_answers_equal_psa_vlm_evals(videomme_offline, tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from psa_vlm.evaluation.lm import PSAQwenVL, read_predictions

    from psa_kernels import ops

    # The model's plumbing is under test, not the kernels (tests/test_kernels.py): the CPU paths.
    monkeypatch.setattr(ops, "kernels_available", lambda device: False)
    model_dir = testing.tiny_model_dir()
    predictions = tmp_path / "lmms.jsonl"
    args = dict(pretrained=str(model_dir), attn="psa@0.8", overrides=OVERRIDES, dtype="fp32", device="cpu",
                predictions=str(predictions), max_new_tokens=4, **VIDEO)
    manager = TaskManager(include_path=str(videomme_offline), model_name="psa_qwen2_5_vl")
    # The --model_args string a user would type.
    model_args = ",".join(f"{k}={v}" for k, v in args.items())
    results = simple_evaluate(model="psa_qwen2_5_vl", model_args=model_args, tasks=["videomme_synthetic"],
                              task_manager=manager, limit=3, log_samples=True, bootstrap_iters=0,
                              process_docs_parallel=1)
    samples = results["samples"]["videomme_synthetic"]
    assert len(samples) == 3
    score = results["results"]["videomme_synthetic"]
    assert any(k.startswith("videomme_perception_score") for k in score)
    records = list(read_predictions(predictions).values())
    assert len(records) == 3 and all(r["sparsity"] is not None and r["sparsity"] > 0 for r in records)
    assert all(r["prefill_ms"] > 0 and r["visual_tokens"] > 0 for r in records)

    # psa-vlm eval's model, asked the same questions about the same videos with the same settings.
    class Request:
        def __init__(self, doc_id, context, video):
            self.task_name, self.doc_id = "same", doc_id
            visual = {"type": "video", "video": video, "fps": 2.0, "max_frames": VIDEO["max_num_frames"],
                      "min_pixels": VIDEO["min_pixels"], "max_pixels": VIDEO["max_pixels"]}
            self.args = (context, {"max_gen_toks": 16, "until": []}, {"visual": [visual]})

    from psa_vlm.variants import variant

    at_08 = variant("psa@0.8").config
    reference = PSAQwenVL(pretrained=str(model_dir), attn="psa", preset=at_08, overrides=OVERRIDES,
                          dtype="fp32", device="cpu", max_new_tokens=4, system_prompt="You are a helpful assistant.")
    requests = [Request(s["doc_id"], s["arguments"][0][0] if isinstance(s["arguments"][0], (list, tuple))
                        else s["arguments"][0], str(SYNTHETIC / "data" / f"{s['doc']['videoID']}.mp4"))
                for s in samples]
    expected = reference.generate_until(requests)
    got = [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples]
    assert got == expected, json.dumps(dict(got=got, expected=expected))[:500]
