"""The long-video QA benchmarks as lm-eval tasks: loading local downloads, prompts, scoring.

``eval_tasks/*.yaml`` point here through ``eval_tasks/utils.py``. Each loader reads a benchmark's
public annotation format from a local folder (the layouts are in ``docs/evaluation.md``) and
turns it into the same document fields:

``doc_id``, ``video`` (absolute path), ``question``, ``options`` (texts), ``answer`` (a letter),
``category`` (Video-MME duration, MLVU task type, LongVideoBench duration group), ``subtitles``
and ``video_options`` (JSON: how to sample and size the frames, from the task's ``metadata``).

The folder comes from the loader's ``data_dir`` argument (``dataset_kwargs`` or ``--metadata``)
or the task's environment variable (:data:`DATA_ENV`). Videos are not checked here: a missing
one is reported for its sample when the model reads it, and the run goes on.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

from .scoring import LETTERS, accuracy, extract_letter, mc_prompt, mean_of_categories

logger = logging.getLogger("psa_vlm.eval")

#: Environment variable holding each benchmark's local folder.
DATA_ENV = {
    "videomme": "PSA_VLM_VIDEOMME_DIR",
    "mlvu": "PSA_VLM_MLVU_DIR",
    "longvideobench": "PSA_VLM_LONGVIDEOBENCH_DIR",
    "egoschema": "PSA_VLM_EGOSCHEMA_DIR",
}
#: Frame sampling and sizing for every task unless its YAML says otherwise: the Qwen2.5-VL
#: report's video setting (2 fps, at most 768 frames and 24,576 video tokens in all).
VIDEO_DEFAULTS = dict(fps=2.0, max_frames=768, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28,
                      total_pixels=24576 * 28 * 28)
_VIDEO_KEYS = ("fps", "nframes", "max_frames", "min_pixels", "max_pixels", "total_pixels")


def find_data_dir(benchmark: str, given=None) -> Path:
    """The benchmark's local folder: ``given``, else its environment variable; a clear error otherwise."""
    env = DATA_ENV[benchmark]
    path = given or os.environ.get(env)
    if not path:
        raise FileNotFoundError(
            f"no data folder for {benchmark}: set {env}=/path/to/{benchmark} (or `psa-vlm eval --data-dir "
            f"{benchmark}=PATH`); the expected layout is in docs/evaluation.md"
        )
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{benchmark} data folder {path} (from {env} or --data-dir) does not exist")
    return path


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}; the expected layout is in docs/evaluation.md")
    return path


def _video_options(metadata: dict) -> str:
    options = dict(VIDEO_DEFAULTS)
    options.update({k: metadata[k] for k in _VIDEO_KEYS if metadata.get(k) is not None})
    if "nframes" in options:
        options.pop("fps", None)
    return json.dumps(options, sort_keys=True)


def _dataset(docs: list[dict]):
    import datasets

    if not docs:
        raise ValueError("the annotations hold no question")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def _doc(doc_id, video: Path, question, options, answer_letter, category, options_json, subtitles=""):
    options = [re.sub(r"^[A-E][.)]\s*", "", str(o)).strip() for o in options]
    if answer_letter not in LETTERS[: len(options)]:
        raise ValueError(f"question {doc_id}: answer {answer_letter!r} is not one of its {len(options)} options")
    return dict(doc_id=str(doc_id), video=str(video), question=str(question), options=options, answer=answer_letter,
                category=str(category), subtitles=subtitles, video_options=options_json)


# ---------------------------------------------------------------------------------- loaders


def load_videomme(data_dir=None, subtitles: bool = False, **metadata):
    """Video-MME (``lmms-lab/Video-MME``): ``videomme/test-*.parquet``, videos in ``data/``,
    subtitles in ``subtitle/<videoID>.srt``."""
    import pandas as pd

    root = find_data_dir("videomme", data_dir)
    files = sorted((root / "videomme").glob("test-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no videomme/test-*.parquet under {root}; the layout is in docs/evaluation.md")
    table = pd.concat([pd.read_parquet(f) for f in files])
    options_json = _video_options(metadata)
    docs = []
    for row in table.to_dict("records"):
        video = root / "data" / f"{row['videoID']}.mp4"
        text = _srt_text(root / "subtitle" / f"{row['videoID']}.srt") if subtitles else ""
        docs.append(_doc(row["question_id"], video, row["question"], list(row["options"]), str(row["answer"]).strip(),
                         row["duration"], options_json, text))
    return _dataset(docs)


load_videomme_subtitles = functools.partial(load_videomme, subtitles=True)


def load_mlvu(data_dir=None, **metadata):
    """MLVU dev (``MLVU/MVLU``): ``json/<n>_<type>.json`` and videos in ``video/<n>_<type>/``;
    the multiple-choice task types only (open-ended ones have no options)."""
    root = find_data_dir("mlvu", data_dir)
    files = sorted((root / "json").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no json/*.json under {root}; the layout is in docs/evaluation.md")
    options_json = _video_options(metadata)
    docs = []
    for file in files:
        for i, item in enumerate(json.loads(file.read_text())):
            candidates = item.get("candidates")
            if not candidates:
                continue
            answer = LETTERS[candidates.index(item["answer"])]
            docs.append(_doc(f"{file.stem}/{i}", root / "video" / file.stem / item["video"], item["question"],
                             candidates, answer, item.get("question_type", file.stem.split("_", 1)[-1]),
                             options_json))
    return _dataset(docs)


def load_longvideobench(data_dir=None, **metadata):
    """LongVideoBench val (``longvideobench/LongVideoBench``): ``lvb_val.json``, videos in ``videos/``."""
    root = find_data_dir("longvideobench", data_dir)
    items = json.loads(_require(root / "lvb_val.json", "lvb_val.json").read_text())
    options_json = _video_options(metadata)
    docs = [
        _doc(item["id"], root / "videos" / item["video_path"], item["question"], item["candidates"],
             LETTERS[int(item["correct_choice"])], item.get("duration_group", "all"), options_json)
        for item in items
    ]
    return _dataset(docs)


def load_egoschema(data_dir=None, **metadata):
    """EgoSchema subset: ``questions.json``, ``subset_answers.json`` (the 500 scorable
    questions) and videos ``videos/<q_uid>.mp4``."""
    root = find_data_dir("egoschema", data_dir)
    questions = json.loads(_require(root / "questions.json", "questions.json").read_text())
    answers = json.loads(_require(root / "subset_answers.json", "subset_answers.json").read_text())
    options_json = _video_options(metadata)
    docs = [
        _doc(q["q_uid"], root / "videos" / f"{q['q_uid']}.mp4", q["question"], [q[f"option {i}"] for i in range(5)],
             LETTERS[int(answers[q["q_uid"]])], "all", options_json)
        for q in questions if q["q_uid"] in answers
    ]
    return _dataset(docs)


def _srt_text(path: Path) -> str:
    """The text lines of an .srt file, in order, without numbers, timestamps and repeats."""
    if not path.is_file():
        return ""
    lines, seen = [], set()
    for line in path.read_text(errors="replace").splitlines():
        line = re.sub(r"<[^>]+>", "", line).strip()
        if not line or line.isdigit() or "-->" in line or line in seen:
            continue
        seen.add(line)
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- task functions


def doc_to_text(doc) -> str:
    return mc_prompt(doc["question"], doc["options"], subtitles=doc.get("subtitles") or None)


def doc_to_visual(doc) -> list[dict]:
    """The request's visual: the video path and how to sample it (qwen-vl-utils' message keys)."""
    return [{"type": "video", "video": doc["video"], **json.loads(doc["video_options"])}]


def _scorer(*metrics):
    def process_results(doc, results) -> dict:
        """One record per metric: whether the extracted letter is the answer, and the category."""
        response = results[0] if results else ""
        letter = extract_letter(response, len(doc["options"]))
        if letter is None:
            logger.warning("no option letter in the answer to %s: %r (counted wrong)", doc["doc_id"], response[:200])
        record = dict(doc_id=doc["doc_id"], category=doc["category"], parsed=letter, correct=letter == doc["answer"])
        return {name: record for name in metrics}

    return process_results


process_results = _scorer("acc")
process_results_videomme = _scorer("acc", "acc_short", "acc_medium", "acc_long")
process_results_mlvu = _scorer("acc", "m_avg")


def category_accuracy(category: str, records) -> float:
    return accuracy(r for r in records if r["category"] == category)


acc_short = functools.partial(category_accuracy, "short")
acc_medium = functools.partial(category_accuracy, "medium")
acc_long = functools.partial(category_accuracy, "long")
m_avg = mean_of_categories
