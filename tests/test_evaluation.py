"""The lm-eval runner: answer extraction, the benchmark loaders, scoring proven by an oracle and a
constant model, the tiny model end to end with both attentions, resume, and the lm-eval CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from psa_vlm import cli  # noqa: E402
from psa_vlm.evaluation import runner, scoring, synthetic, tasks  # noqa: E402
from psa_vlm.evaluation.lm import PSAQwenVL, read_predictions, request_key  # noqa: E402

SYNTHETIC = runner.tasks_dir() / "synthetic"
ALL_TASKS = ["videomme", "videomme_w_subtitle", "mlvu_dev", "longvideobench_val", "egoschema_subset"]


@pytest.fixture(autouse=True)
def synthetic_data(monkeypatch):
    for bench, env in tasks.DATA_ENV.items():
        monkeypatch.setenv(env, str(SYNTHETIC / bench))


_TASK_MANAGERS: dict = {}


@pytest.fixture(autouse=True)
def one_task_index(monkeypatch):
    """One lm-eval TaskManager per set of arguments in this process: building one indexes every
    task lm-eval ships (seconds each), and the runner builds one per run."""
    import lm_eval.tasks

    def shared(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in _TASK_MANAGERS:
            _TASK_MANAGERS[key] = TaskManager(*args, **kwargs)
        return _TASK_MANAGERS[key]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", shared)


# ---------------------------------------------------------------------------- answer extraction


@pytest.mark.parametrize("response, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), (" C\n", "C"), ("**D**", "D"),
    ("The answer is B", "B"), ("The answer is (b).", "B"), ("Answer: D", "D"), ("answer - c", "C"),
    ("Option B: the dog runs", "B"), ("B. The dog runs", "B"), ("(C) because it is blue", "C"),
    ("B because the square is green", "B"), ("I think (A) fits best", "A"),
    ("The best answer is: (A)", "A"), ("C) blue", "C"),
])
def test_extracts_the_letter_models_emit(response, letter):
    assert scoring.extract_letter(response, 4) == letter


@pytest.mark.parametrize("response", [
    "", "   ", "blue", "A man walks in", "B and C", "E", "The answer is E", "I cannot tell", "Z",
])
def test_no_letter_is_none_never_a_guess(response):
    assert scoring.extract_letter(response, 4) is None


def test_five_option_questions_accept_e():
    assert scoring.extract_letter("E", 5) == "E"
    assert scoring.extract_letter("The answer is E.", 5) == "E"


def test_prompt_follows_lmms_eval():
    prompt = scoring.mc_prompt("What colour?", ["red", "B. green", "blue", "yellow"], subtitles="Hello")
    lines = prompt.splitlines()
    assert lines[0] == "This video's subtitles are listed below:" and lines[1] == "Hello"
    assert lines[2].startswith("Select the best answer") and "(A, B, C, or D)" in lines[2]
    assert lines[3:8] == ["What colour?", "A. red", "B. green", "C. blue", "D. yellow"]
    assert lines[-1] == "Answer with the option's letter from the given choices directly."


# ---------------------------------------------------------------------------- loaders


def test_loaders_read_each_format():
    key = synthetic.answers(SYNTHETIC)
    assert all(len(v) >= 4 for v in key.values())
    ds = tasks.load_videomme()["test"]
    doc = ds[0]
    assert Path(doc["video"]).is_file() and doc["category"] in ("short", "medium", "long")
    assert doc["options"][0] == "Red." and doc["answer"] in "ABCD"  # the "A. " prefix is stripped
    assert tasks.load_videomme_subtitles()["test"][0]["subtitles"] == "Watch for the square."
    assert len(tasks.load_mlvu()["test"]) == 8
    assert len(tasks.load_egoschema()["test"][0]["options"]) == 5
    assert len(tasks.load_egoschema()["test"]) == 4  # the question without a public answer is left out
    options = json.loads(doc["video_options"])
    assert options["fps"] == 2.0 and options["max_frames"] == 768 and options["total_pixels"] == 24576 * 28 * 28


def test_missing_data_folder_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.delenv("PSA_VLM_MLVU_DIR")
    with pytest.raises(FileNotFoundError, match="PSA_VLM_MLVU_DIR"):
        tasks.load_mlvu()
    with pytest.raises(FileNotFoundError, match="lvb_val.json"):
        tasks.load_longvideobench(data_dir=tmp_path)


# ---------------------------------------------------------------------------- scoring


class _ScriptedLM(LM):
    MULTIMODAL = True

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def generate_until(self, requests, disable_tqdm=False):
        return [self.answer(r) for r in requests]

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


def _evaluate(model):
    out = lm_eval.simple_evaluate(model=model, tasks=ALL_TASKS, bootstrap_iters=0,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(runner.tasks_dir())))
    return {task: {k.split(",")[0]: v for k, v in values.items() if "," in k and "stderr" not in k}
            for task, values in out["results"].items()}


def test_oracle_scores_100_and_a_constant_answer_scores_chance():
    key = synthetic.answers(SYNTHETIC)
    oracle = _evaluate(_ScriptedLM(lambda r: f"The answer is {key[r.task_name][r.doc['doc_id']]}."))
    for task in ALL_TASKS:
        assert oracle[task]["acc"] == 1.0, (task, oracle[task])
    assert oracle["mlvu_dev"]["m_avg"] == 1.0
    constant = _evaluate(_ScriptedLM(lambda r: "A"))
    for task in ALL_TASKS:
        letters = list(key[task].values())
        assert constant[task]["acc"] == pytest.approx(letters.count("A") / len(letters)) and constant[task]["acc"] < 1
    # Per-category metrics score only their own questions.
    docs = list(tasks.load_videomme()["test"])
    short = [d["answer"] == "A" for d in docs if d["category"] == "short"]
    assert constant["videomme"]["acc_short"] == pytest.approx(sum(short) / len(short))
    unparseable = _evaluate(_ScriptedLM(lambda r: "no idea"))
    assert all(unparseable[t]["acc"] == 0.0 for t in ALL_TASKS)


# ---------------------------------------------------------------------------- the tiny model


def _cli_eval(out, *extra):
    return cli.main(["eval", "--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--output", str(out),
                     "--data-dir", "synthetic", *extra])


@pytest.mark.usefixtures("tiny_model_path", "kernels_path")
def test_runner_compares_sdpa_and_psa_on_the_tiny_model(tmp_path, capsys):
    assert _cli_eval(tmp_path, "--tasks", "videomme,mlvu_dev", "--attn", "sdpa,psa:video_mme", "--limit", "3") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["variants"]) == ["sdpa", "psa:video_mme"]
    for label, v in report["variants"].items():
        assert set(v["metrics"]) == {"videomme", "mlvu_dev"}
        assert 0 <= v["metrics"]["videomme"]["acc"] <= 1 and "acc_short" in v["metrics"]["videomme"]
        assert v["overall"]["samples"] == 6 and v["overall"]["errors"] == 0
        assert v["overall"]["prefill_p50_ms"] > 0 and v["overall"]["visual_tokens_mean"] > 0
    assert report["variants"]["psa:video_mme"]["overall"]["mean_sparsity"] > 0
    assert report["variants"]["sdpa"]["overall"]["mean_sparsity"] is None
    md = (tmp_path / "report.md").read_text()
    assert "psa:video_mme - sdpa" in md and "| videomme | acc |" in md
    assert "prefill p50 ms" in capsys.readouterr().out


@pytest.mark.usefixtures("tiny_model_path")
def test_interrupted_run_resumes_without_losing_or_repeating(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = PSAQwenVL._answer

    def crash_on_third(self, requests):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, requests)

    monkeypatch.setattr(PSAQwenVL, "_answer", crash_on_third)
    args = ("--tasks", "videomme,egoschema_subset", "--attn", "sdpa", "--limit", "3")
    with pytest.raises(KeyboardInterrupt):
        _cli_eval(tmp_path, *args)
    predictions = tmp_path / "sdpa" / "predictions.jsonl"
    before = predictions.read_text().splitlines()
    assert len(before) == 2
    with predictions.open("a") as f:
        f.write('{"key": "torn')  # a kill in the middle of a write
    monkeypatch.setattr(PSAQwenVL, "_answer", original)
    answered = []
    monkeypatch.setattr(PSAQwenVL, "_answer", lambda self, reqs: answered.extend(reqs) or original(self, reqs))
    assert _cli_eval(tmp_path, *args) == 0
    assert len(answered) == 4  # only the missing ones
    records = [json.loads(line) for line in predictions.read_text().splitlines() if line.startswith('{"key": "v')
               or line.startswith('{"key": "e')]
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == 6
    assert [json.loads(line) for line in before] == records[:2]
    assert [json.loads(line) for line in predictions.read_text().splitlines()] == records  # the torn line is gone
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["variants"]["sdpa"]["overall"]["samples"] == 6


def test_resume_rewrites_predictions_without_torn_lines(tmp_path):
    import random

    from psa_vlm.evaluation.lm import _drop_torn_lines

    rng = random.Random()
    records = [dict(key=f"videomme|{i}|{rng.getrandbits(32):08x}", task="videomme", doc_id=i,
                    response=rng.choice("ABCD")) for i in range(rng.randint(2, 6))]
    lines = [json.dumps(r) for r in records]
    torn = [json.dumps(r)[:rng.randint(1, 20)] for r in records[:2]]  # kills in the middle of writes
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join([lines[0], torn[0], *lines[1:], ""]) + torn[1])  # one inside, one at the end
    path.chmod(0o644)
    _drop_torn_lines(path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert path.read_text().endswith("\n") and (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.jsonl"]  # no temporary file left behind
    inode = path.stat().st_ino
    _drop_torn_lines(path)  # a whole file is left alone
    assert path.stat().st_ino == inode and read_predictions(path) == {r["key"]: r for r in records}


@pytest.mark.usefixtures("tiny_model_path")
def test_batches_left_pad_and_match_single_answers(tmp_path):
    def answers(batch):
        out = tmp_path / f"b{batch}"
        assert _cli_eval(out, "--tasks", "egoschema_subset", "--attn", "sdpa", "--batch-size", str(batch),
                         "--max-new-tokens", "4") == 0
        return {r["doc_id"]: (r["response"], r["batch"]) for r in read_predictions(out / "sdpa" / "predictions.jsonl").values()}

    single, batched = answers(1), answers(3)
    assert {b for _, b in batched.values()} == {3, 1}  # 4 questions: a batch of 3, then 1
    assert {k: r for k, (r, _) in single.items()} == {k: r for k, (r, _) in batched.items()}


@pytest.mark.usefixtures("tiny_model_path")
def test_a_missing_video_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    data = tmp_path / "ego"
    shutil.copytree(SYNTHETIC / "egoschema", data)
    (data / "videos" / "needle01.mp4").unlink()
    out = tmp_path / "out"
    assert _cli_eval(out, "--tasks", "egoschema_subset", "--attn", "sdpa", "--data-dir", f"egoschema={data}") == 0
    records = read_predictions(out / "sdpa" / "predictions.jsonl")
    errors = [r for r in records.values() if r.get("error")]
    assert len(records) == 4 and len(errors) == 1
    assert "needle01.mp4" in errors[0]["error"] and errors[0]["response"] == ""


@pytest.mark.usefixtures("tiny_model_path")
def test_loglikelihood_is_refused_clearly():
    lm = PSAQwenVL(pretrained="tiny", attn="sdpa", device="cpu", dtype="fp32")
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood([])
    assert request_key("t", 1, "x") != request_key("t", 1, "y")


def test_a_missing_data_folder_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["eval", "--data-dir", f"videomme={tmp_path / 'absent'}", "--output", str(tmp_path / "out"),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "psa-vlm eval: error:" in err and "absent" in err and "does not exist" in err


def test_bad_variants_and_data_dirs_are_refused():
    with pytest.raises(ValueError, match="only psa takes a preset"):
        runner.parse_variants("sdpa:fast")
    with pytest.raises(ValueError, match="repeat"):
        runner.parse_variants("psa,psa:video_mme")
    with pytest.raises(ValueError, match="BENCHMARK=PATH"):
        runner.set_data_dirs(["nonsense=/x"])


@pytest.mark.usefixtures("tiny_model_path", "kernels_path")
def test_lm_eval_command_line_runs_the_tasks(tmp_path):
    env = dict(os.environ, PSA_VLM_VIDEOMME_DIR=str(SYNTHETIC / "videomme"))
    result = subprocess.run(
        [sys.executable, "-m", "psa_vlm.cli", "lm-eval", "run", "--model", "psa-qwen2.5-vl", "--model_args",
         "pretrained=tiny,attn=psa,dtype=fp32", "--device", "cpu", "--tasks", "videomme", "--limit", "2",
         "--output_path", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "acc_short" in result.stdout and "videomme" in result.stdout
    assert list(tmp_path.rglob("results*.json"))


@pytest.mark.usefixtures("tiny_model_path")
def test_data_parallel_shards_the_questions_and_merges_the_report(tmp_path):
    """torchrun with two CPU processes (gloo): what `accelerate launch` does on GPUs."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this Python")
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "psa_vlm.cli", "eval", "--model", "tiny", "--device", "cpu",
         "--dtype", "fp32", "--data-dir", "synthetic", "--tasks", "egoschema_subset,videomme", "--attn", "sdpa",
         "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted((tmp_path / "sdpa").glob("predictions.rank*.jsonl"))
    assert [p.name for p in shards] == ["predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    per_rank = [len(p.read_text().splitlines()) for p in shards]
    assert per_rank == [4, 4]  # 8 questions, each answered once
    keys = [json.loads(line)["key"] for p in shards for line in p.read_text().splitlines()]
    assert len(set(keys)) == 8
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["variants"]["sdpa"]["overall"]["samples"] == 8


@pytest.mark.usefixtures("tiny_model_path")
def test_plain_lm_eval_runs_the_task_files(tmp_path):
    """`lm_eval` itself, given the task files: loading them imports eval_tasks/utils.py, which
    registers psa-qwen2.5-vl before lm-eval looks the model up."""
    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    if not lm_eval_bin.exists():
        pytest.skip("the lm_eval command is not installed next to this Python")
    env = dict(os.environ, PSA_VLM_EGOSCHEMA_DIR=str(SYNTHETIC / "egoschema"))
    result = subprocess.run(
        [str(lm_eval_bin), "run", "--model", "psa-qwen2.5-vl", "--model_args", "pretrained=tiny,attn=sdpa,dtype=fp32",
         "--device", "cpu", "--tasks", str(runner.tasks_dir() / "egoschema_subset.yaml"), "--limit", "2"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "egoschema_subset" in result.stdout and "acc" in result.stdout
