"""A tiny synthetic long-video QA benchmark in each real benchmark's own file format.

Each video is the project's moving-shapes clip with a "needle": a solid square of one of four
colours shown for two frames at a random time. The question asks its colour; the options are
the four colours. :func:`write_benchmark` writes the same questions as Video-MME (parquet),
MLVU (json per task type), LongVideoBench (``lvb_val.json``) and EgoSchema (questions plus
subset answers, five options), so the loaders, the tasks and the runner are tested end to end
offline. ``eval_tasks/synthetic/`` holds the copy the tests and ``psa-vlm eval --data-dir
synthetic`` use; ``python -m psa_vlm.evaluation.synthetic DIR`` rewrites it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230), "yellow": (240, 220, 20)}
QUESTION = "A small square of one solid colour appears briefly. What colour is it?"
DURATIONS = ("short", "medium", "long")


def needle_video(seed: int, *, frames: int = 16, size: tuple[int, int] = (84, 112)):
    """(frames ``[T, H, W, 3]`` uint8, colour name): the clip with the needle painted in."""
    from ..clips import make_video_frames

    rng = np.random.default_rng(seed)
    height, width = size
    pixels = make_video_frames(frames, height, width, seed=seed)
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    side = max(8, min(height, width) // 3)
    t = int(rng.integers(0, frames - 1))
    y, x = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
    pixels[t : t + 2, y : y + side, x : x + side] = COLOURS[colour]
    return pixels, colour


def write_benchmark(root, *, videos: int = 4, seed: int = 0, fps: float = 4.0, frames: int = 16,
                    size: tuple[int, int] = (84, 112)) -> Path:
    """Write ``root/{videomme,mlvu,longvideobench,egoschema}``; returns ``root``."""
    import pandas as pd

    from ..clips import write_video

    root = Path(root)
    names = list(COLOURS)
    items = []
    for i in range(videos):
        pixels, colour = needle_video(seed + i, frames=frames, size=size)
        items.append(dict(name=f"needle{i:02d}", pixels=pixels, answer=names.index(colour)))

    def put(path: Path, item) -> None:
        write_video(path, item["pixels"], fps=fps)

    vm = root / "videomme"
    rows = []
    for i, item in enumerate(items):
        put(vm / "data" / f"{item['name']}.mp4", item)
        # Real Video-MME domain names: lmms-eval's videomme task scores by them.
        rows.append(dict(video_id=f"{i:03d}", duration=DURATIONS[i % 3], domain="Life Record", sub_category="Daily Life",
                         url="", videoID=item["name"], question_id=f"{i:03d}-1", task_type="Object Recognition",
                         question=QUESTION, options=[f"{l}. {n.capitalize()}." for l, n in zip("ABCD", names)],
                         answer="ABCD"[item["answer"]]))
        (vm / "subtitle").mkdir(parents=True, exist_ok=True)
        (vm / "subtitle" / f"{item['name']}.srt").write_text(
            "1\n00:00:00,000 --> 00:00:02,000\nWatch for the square.\n\n2\n00:00:02,000 --> 00:00:04,000\n"
            "Watch for the square.\n")
    (vm / "videomme").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(vm / "videomme" / "test-00000-of-00001.parquet", index=False)

    ml = root / "mlvu"
    for task in ("1_plotQA", "2_needle"):
        entries = []
        for item in items:
            put(ml / "video" / task / f"{item['name']}.mp4", item)
            entries.append(dict(video=f"{item['name']}.mp4", duration=4.0, question=QUESTION,
                                candidates=[n for n in names], answer=names[item["answer"]],
                                question_type=task.split("_", 1)[1]))
        (ml / "json").mkdir(parents=True, exist_ok=True)
        (ml / "json" / f"{task}.json").write_text(json.dumps(entries, indent=1))

    lvb = root / "longvideobench"
    entries = []
    for i, item in enumerate(items):
        put(lvb / "videos" / f"{item['name']}.mp4", item)
        entries.append(dict(id=f"lvb{i:03d}", video_id=item["name"], video_path=f"{item['name']}.mp4",
                            question=QUESTION, candidates=names + ["none of them"], correct_choice=item["answer"],
                            duration_group=(15, 60, 600, 3600)[i % 4], question_category="S2E", duration=4.0))
    (lvb / "lvb_val.json").write_text(json.dumps(entries, indent=1))

    ego = root / "egoschema"
    questions, answer_key = [], {}
    for item in items:
        put(ego / "videos" / f"{item['name']}.mp4", item)
        q = dict(q_uid=item["name"], question=QUESTION)
        q.update({f"option {k}": text for k, text in enumerate(names + ["none of them"])})
        questions.append(q)
        answer_key[item["name"]] = item["answer"]
    questions.append(dict(q_uid="unscored", question=QUESTION, **{f"option {k}": "x" for k in range(5)}))
    (ego / "questions.json").write_text(json.dumps(questions, indent=1))
    (ego / "subset_answers.json").write_text(json.dumps(answer_key, indent=1))
    return root


def answers(root) -> dict[str, dict[str, str]]:
    """``{task: {doc_id: letter}}`` read back through the loaders (the oracle's answer key)."""
    from . import tasks

    root = Path(root)
    loaded = {
        "videomme": tasks.load_videomme(root / "videomme"),
        "mlvu_dev": tasks.load_mlvu(root / "mlvu"),
        "longvideobench_val": tasks.load_longvideobench(root / "longvideobench"),
        "egoschema_subset": tasks.load_egoschema(root / "egoschema"),
    }
    key = {name: {d["doc_id"]: d["answer"] for d in ds["test"]} for name, ds in loaded.items()}
    key["videomme_w_subtitle"] = key["videomme"]
    return key


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m psa_vlm.evaluation.synthetic",
                                     description="Write the synthetic needle benchmark in the four formats.")
    parser.add_argument("directory", help="output folder (replaced)")
    parser.add_argument("--videos", type=int, default=4, help="questions per benchmark (default: 4)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video (default: 16)")
    parser.add_argument("--size", default="84x112", help="HEIGHTxWIDTH, even (default: 84x112)")
    parser.add_argument("--fps", type=float, default=4.0, help="frame rate of the files (default: 4)")
    args = parser.parse_args(argv)
    height, width = (int(x) for x in args.size.lower().split("x"))
    out = Path(args.directory)
    if out.exists():
        shutil.rmtree(out)
    write_benchmark(out, videos=args.videos, frames=args.frames, size=(height, width), fps=args.fps)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
