"""``psa-vlm eval``: the same tasks with several attentions, resumable, one comparison report.

For each variant (``sdpa``, ``psa:video_mme``, ``psa:fast``, ...) the model answers every task
through lm-eval (``simple_evaluate`` with the tasks of ``eval_tasks/``) and writes
``<output>/<variant>/predictions.jsonl`` as it goes (a rerun answers from it) and
``results.json``; then ``report.md`` and ``report.json`` put the variants side by side:
accuracy per task and category, the difference to the first variant, mean PSA sparsity and the
prefill latency p50/p90 over samples. The model is loaded once and switched between variants.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from importlib import resources
from pathlib import Path

from ..config import DEFAULT_PRESET
from ..variants import parse_variants
from .tasks import DATA_ENV

#: Benchmark of each task (which data folder it reads).
TASK_DATA = {"videomme": "videomme", "videomme_w_subtitle": "videomme", "mlvu_dev": "mlvu",
             "longvideobench_val": "longvideobench", "egoschema_subset": "egoschema"}


def tasks_dir() -> Path:
    """The folder of the lm-eval task files (``eval_tasks/``, installed as ``psa_vlm.eval_tasks``)."""
    try:
        return Path(str(resources.files("psa_vlm.eval_tasks")))
    except ModuleNotFoundError:  # a source tree that was not installed
        return Path(__file__).resolve().parents[2] / "eval_tasks"


def set_data_dirs(items) -> None:
    """``["videomme=PATH", ...]`` or ``["synthetic"]`` -> the tasks' environment variables."""
    for item in items or []:
        if item == "synthetic":
            for bench, env in DATA_ENV.items():
                os.environ[env] = str(tasks_dir() / "synthetic" / bench)
            continue
        bench, sep, path = item.partition("=")
        if not sep or bench not in DATA_ENV:
            raise ValueError(f"--data-dir takes BENCHMARK=PATH with BENCHMARK in {sorted(DATA_ENV)}, or 'synthetic'; "
                             f"got {item!r}")
        os.environ[DATA_ENV[bench]] = str(Path(path).expanduser().resolve())


def _percentile(values, q):
    values = sorted(values)
    if not values:
        return None
    pos = (len(values) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def sample_stats(records) -> dict:
    """Samples, errors, mean PSA sparsity and prefill p50/p90 over predictions records."""
    records = list(records)
    prefill = [r["prefill_ms"] for r in records if r.get("prefill_ms") is not None]
    sparsity = [r["sparsity"] for r in records if r.get("sparsity") is not None]
    not_run = Counter(r["psa_not_run"] for r in records if r.get("psa_not_run"))
    return dict(samples=len(records), errors=sum(1 for r in records if r.get("error")),
                mean_sparsity=sum(sparsity) / len(sparsity) if sparsity else None,
                # why PSA ran on no sample (the commonest reason), None when it ran on some
                psa_not_run=not_run.most_common(1)[0][0] if not_run and not sparsity else None,
                prefill_p50_ms=_percentile(prefill, 0.5), prefill_p90_ms=_percentile(prefill, 0.9),
                visual_tokens_mean=(sum(r["visual_tokens"] for r in records if "visual_tokens" in r)
                                    / max(1, sum(1 for r in records if "visual_tokens" in r))))


def run(model: str, tasks: list[str], variants, *, output, limit=None, batch_size: int = 1, device=None,
        dtype: str = "auto", device_map=None, overrides=None, max_new_tokens=None) -> dict | None:
    """Evaluate ``tasks`` with each attention ``variants`` (labels, :mod:`psa_vlm.variants`, or their
    parsed dict); returns the report (rank 0)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .lm import PSAQwenVL, read_predictions

    unknown = [t for t in tasks if t not in TASK_DATA]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {', '.join(TASK_DATA)}")
    if isinstance(variants, (str, list, tuple)):
        variants = parse_variants(variants, overrides=overrides)
    output = Path(output)
    manager = TaskManager(include_path=str(tasks_dir()))
    shared = None
    report = dict(model=model, tasks=tasks, limit=limit, variants={})
    for label, v in variants.items():
        attn, preset = v.attn, v.config if v.config is not None else DEFAULT_PRESET
        folder = output / label.replace(":", "_")
        predictions = folder / "predictions.jsonl"
        if shared is None:
            lm = PSAQwenVL(pretrained=model, attn=attn, preset=preset, overrides=overrides,
                           device=device, dtype=dtype, device_map=device_map, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, predictions=str(predictions))
            shared = (lm.model, lm.processor)
        else:
            lm = PSAQwenVL(pretrained=model, attn=attn, preset=preset, overrides=overrides,
                           batch_size=batch_size, max_new_tokens=max_new_tokens, predictions=str(predictions),
                           model=shared[0], processor=shared[1])
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                          bootstrap_iters=0, log_samples=False)
        if results is None:  # not rank 0 under accelerate
            continue
        folder.mkdir(parents=True, exist_ok=True)
        metrics = {task: {k.split(",")[0]: v for k, v in values.items()
                          if "," in k and "stderr" not in k and isinstance(v, (int, float))}
                   for task, values in results["results"].items()}
        records = [r for r in read_predictions(predictions).values() if r["task"] in tasks]
        per_task = {task: sample_stats(r for r in records if r["task"] == task) for task in tasks}
        (folder / "results.json").write_text(json.dumps(dict(metrics=metrics, stats=per_task), indent=1))
        report["variants"][label] = dict(attn=attn, preset=v.config.name if v.config is not None else None,
                                         metrics=metrics, stats=per_task,
                                         overall=sample_stats(records))
    if not report["variants"]:
        return None
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(report, indent=1))
    (output / "report.md").write_text(markdown(report))
    return report


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    """Accuracy per task and metric for each variant (and the change from the first), then speed."""
    labels = list(report["variants"])
    first = labels[0]
    lines = [f"# Evaluation: {report['model']}", "",
             f"Tasks: {', '.join(report['tasks'])}; limit: {report['limit'] or 'none'}.", "",
             "| task | metric | " + " | ".join(labels) + " | " + " | ".join(f"{l} - {first}" for l in labels[1:]) + " |",
             "|---|---|" + "---:|" * (2 * len(labels) - 1)]
    for task in report["tasks"]:
        metrics = report["variants"][first]["metrics"].get(task, {})
        for metric in metrics:
            values = [report["variants"][l]["metrics"].get(task, {}).get(metric) for l in labels]
            diffs = [None if v is None or values[0] is None else v - values[0] for v in values[1:]]
            lines.append(f"| {task} | {metric} | " + " | ".join(_fmt(v) for v in values) + " | "
                         + " | ".join("-" if d is None else f"{d:+.3f}" for d in diffs) + " |")
    lines += ["", "| variant | samples | errors | mean PSA sparsity | prefill p50 ms | prefill p90 ms | visual tokens |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        s = report["variants"][label]["overall"]
        lines.append(f"| {label} | {s['samples']} | {s['errors']} | {_fmt(s['mean_sparsity'])} | "
                     f"{_fmt(s['prefill_p50_ms'], 1)} | {_fmt(s['prefill_p90_ms'], 1)} | {_fmt(s['visual_tokens_mean'], 0)} |")
    # A PSA variant without sparsity: one line saying why, rather than a bare "-"
    notes = [f"- {label}: {report['variants'][label]['overall']['psa_not_run']}" for label in labels
             if report["variants"][label]["overall"].get("psa_not_run")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
