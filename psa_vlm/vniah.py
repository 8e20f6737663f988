"""Video needle-in-a-haystack evaluation (``psa-vlm vniah``): accuracy vs attention sparsity.

A fixed, seeded test set of :mod:`psa_vlm.needles` questions per video length; each attention
variant answers every question with one prefill, the answer being the option letter with the
highest logit at the last prompt position (what the trained model learns to put there). Variants:

- ``sdpa``: dense attention;
- ``psa:<preset>``: the presets as shipped, except ``min_seq_len`` = 0 (short test videos);
- ``psa@S``: PSA in quantile mode at sparsity S (:meth:`PSAConfig.at_sparsity`);
- ``budget@S``: PSA with the budget-aware assignment at sparsity S (``mode: budget``), and
  ``topk@S``: the same budget spent on level-1 blocks only (binary top-k, the same FLOPs exactly);
- ``binary@S``: binary block-sparse attention at the same FLOPs: level 1 or skipped, the top
  ``1 - S`` of the blocks by the same importance (same forced blocks).

Reported per length and variant: accuracy with its 95% Wilson interval, the sample count, and
the sparsity achieved (mean over the text layers' PSA calls). JSON, a table and a plot.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .config import DEFAULT_PRESET
from .models import checkpoint_dir
from .variants import at_sparsities, parse_variants
from .needles import LETTERS, BatchRenderer, default_workers, make_sample

DEFAULT_SPARSITIES = (0.5, 0.65, 0.8, 0.9)
TEST_SEED = 1_000_000  # the test set's seeds start here (the trainer's validation sets start at 10_000_000)


def load_record(path=None, model: str = "vniah") -> dict:
    """The recorded CI accuracies (``record.json``) of the checkpoint folder ``path``, else of the
    shipped ``model`` (``vniah``, ``vniah-coverage``)."""
    file = (Path(path) if path else checkpoint_dir(model)) / "record.json"
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); restore the checkpoint's record.json") from None


def recorded_kinds(model: str) -> list[str]:
    """The question kinds a model is evaluated on by default: those in the ``record.json`` of a
    shipped V-NIAH model (``vniah``, ``vniah-coverage``) or of a checkpoint folder, else colour."""
    from .models import CHECKPOINTS

    folder = checkpoint_dir(model) if model in CHECKPOINTS else Path(model)
    if model != "tiny" and (folder / "record.json").is_file():
        return list(load_record(folder)["kinds"])
    return ["colour"]


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0 and 1, unlike the normal one)."""
    if total <= 0:
        return (float("nan"), float("nan"))
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


POLICIES = ("quantile", "budget")


def variants(presets=(DEFAULT_PRESET, "fast"), sparsities=DEFAULT_SPARSITIES, overrides=None,
             policies=POLICIES) -> dict:
    """``{label: PSAConfig or None}`` (:mod:`psa_vlm.variants`; None = dense ``sdpa``): the presets
    as shipped, then per sparsity and assignment policy PSA and the binary block-sparse attention
    that spends its FLOPs the same way (``psa@S`` / ``binary@S``: fixed fractions of the visible
    blocks, forced blocks on top; ``budget@S`` / ``topk@S``: a budget of ``1 - S`` of the visible
    blocks, forced blocks included). Every PSA variant runs from length 0 (``min_seq_len`` 0)."""
    labels = ["sdpa", *(f"psa:{name}" for name in presets), *at_sparsities(sparsities, policies)]
    chosen = parse_variants(labels, overrides={"min_seq_len": 0, **(overrides or {})})
    return {label: v.config for label, v in chosen.items()}


def letter_ids(tokenizer) -> list[int]:
    """Token ids of "A".."D"; each must be one token."""
    ids = []
    for letter in LETTERS:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the letter {letter!r} is {len(encoded)} tokens for this tokenizer; V-NIAH needs one")
        ids.append(encoded[0])
    return ids


def test_set(frames: int, samples: int, *, size=(224, 224), kinds=("colour",), seed: int = TEST_SEED):
    """The fixed questions at one length: seeds ``seed + i``, kinds in turn (rendered now; the
    evaluation renders them batch by batch instead, see :func:`evaluate`)."""
    return [make_sample(seed + i, frames=frames, size=size, kind=kinds[i % len(kinds)]) for i in range(samples)]


def batch_specs(frames: int, samples: int, *, size=(224, 224), kinds=("colour",), batch_size: int = 8,
                seed: int = TEST_SEED) -> list:
    """The test set at one length as :func:`psa_vlm.needles.render_batch` specs: the questions of
    :func:`test_set`, ``batch_size`` at a time."""
    return [(frames, [(seed + i, kinds[i % len(kinds)]) for i in range(j, min(j + batch_size, samples))], tuple(size))
            for j in range(0, samples, batch_size)]


def evaluate(model, processor, *, frames=(32,), samples: int = 64, kinds=("colour",), size=(224, 224),
             attention: dict | None = None, batch_size: int = 8, workers: int | None = None, progress=None,
             on_length=None) -> dict:
    """Accuracy of every variant at every length; returns the report.

    The questions are rendered one batch at a time (a 512-question set of 256-frame videos is
    tens of GB of pixels) and every variant answers each batch before the next is rendered.
    ``workers``: rendering processes (None: :func:`default_workers`). ``progress``: a callable
    given one line per (length, variant) result. ``on_length``: called with the report after
    each length (e.g. to save partial results of a long run)."""
    attention = attention if attention is not None else variants()
    device = next(model.parameters()).device
    workers = default_workers(device) if workers is None else workers
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    ids = torch.tensor(letter_ids(processor.tokenizer), device=device)
    report = dict(samples=samples, kinds=list(kinds), size=list(size), variants=list(attention), rows=[], seconds={})
    with BatchRenderer(processor, min(workers, -(-samples // batch_size))) as renderer:
        for n_frames in frames:
            started = time.perf_counter()
            row_of = _answer_every_batch(model, renderer, attention, ids, device,
                                         batch_specs(n_frames, samples, size=size, kinds=kinds, batch_size=batch_size),
                                         desc=f"V-NIAH {n_frames} frames", show=progress is not None)
            for label in attention:
                row = dict(frames=n_frames, **row_of[label])
                report["rows"].append(row)
                if progress:
                    sparsity = "-" if row["sparsity"] is None else format(row["sparsity"], ".3f")
                    progress(f"{n_frames:5d} frames {row['tokens']:6d} tokens  {label:16s} accuracy {row['accuracy']:.3f} "
                             f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]  sparsity {sparsity}")
            report["seconds"][str(n_frames)] = round(time.perf_counter() - started, 1)  # rendering + every variant
            if on_length:
                on_length(report)
    return report


def _answer_every_batch(model, renderer, attention, ids, device, specs, *, desc, show) -> dict:
    """Every variant answers each rendered batch before the next is taken; ``{label: row}``."""
    from tqdm.auto import tqdm

    from . import mean_sparsity, use_attention

    answers: list[str] = []
    predicted = {label: [] for label in attention}
    weighted = {label: [0.0, 0] for label in attention}  # sparsity x questions, questions measured
    tokens = None
    samples = sum(len(spec[1]) for spec in specs)
    with tqdm(total=samples, desc=desc, unit="q", disable=not show) as bar:
        for batch_answers, inputs in renderer.map(specs):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            tokens = tokens or int(inputs["input_ids"].shape[1])
            answers += batch_answers
            for label, config in attention.items():
                use_attention(model, config)  # also resets the PSA statistics: this batch's sparsity
                with torch.no_grad():
                    logits = model(**inputs, logits_to_keep=1).logits[:, -1]
                predicted[label] += [LETTERS[i] for i in logits[:, ids].argmax(-1).tolist()]
                sparsity = mean_sparsity(model) if config is not None else None
                if sparsity is not None:
                    weighted[label][0] += sparsity * len(batch_answers)
                    weighted[label][1] += len(batch_answers)
            bar.update(len(batch_answers))
    rows = {}
    for label, config in attention.items():
        correct = sum(p == a for p, a in zip(predicted[label], answers))
        low, high = wilson_interval(correct, samples)
        total, measured = weighted[label]
        rows[label] = dict(tokens=tokens, variant=label, correct=correct, samples=samples, accuracy=correct / samples,
                           ci_low=low, ci_high=high,
                           sparsity=total / measured if measured else (0.0 if config is None else None))
    return rows


def table(report: dict) -> str:
    lines = [f"{'frames':>6s} {'tokens':>7s} {'variant':16s} {'accuracy':>8s} {'95% interval':>15s} {'n':>5s} {'sparsity':>8s}"]
    for r in report["rows"]:
        sp = "-" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
        lines.append(f"{r['frames']:6d} {r['tokens']:7d} {r['variant']:16s} {r['accuracy']:8.3f} "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] {r['samples']:5d} {sp:>8s}")
    return "\n".join(lines)


def plot(report: dict):
    """Accuracy vs sparsity, one panel per length: PSA, binary block-sparse, presets, dense."""
    import matplotlib.pyplot as plt

    lengths = sorted({r["frames"] for r in report["rows"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        rows = [r for r in report["rows"] if r["frames"] == n]
        for prefix, style, name in (("psa@", "-o", "PSA (quantile)"), ("binary@", "-s", "binary block-sparse"),
                                    ("budget@", "-^", "PSA (budget)"), ("topk@", "-v", "binary top-k (budget)")):
            sel = sorted((r for r in rows if r["variant"].startswith(prefix)), key=lambda r: r["sparsity"] or 0)
            if sel:
                ax.errorbar([r["sparsity"] for r in sel], [r["accuracy"] for r in sel],
                            yerr=[[r["accuracy"] - r["ci_low"] for r in sel], [r["ci_high"] - r["accuracy"] for r in sel]],
                            fmt=style, capsize=3, label=name)
        for r in rows:
            if r["variant"].startswith("psa:"):
                ax.plot([r["sparsity"]], [r["accuracy"]], "D", label=r["variant"])
            if r["variant"] == "sdpa":
                ax.axhline(r["accuracy"], color="k", lw=1, label="dense")
        ax.axhline(0.25, color="grey", ls=":", lw=1, label="chance")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("sparsity (1 - density)")
        ax.set_ylabel(f"accuracy ({report['samples']} questions, 95% interval)")
        changed = ", ".join(f"{k}={v}" for k, v in (report.get("overrides") or {}).items())
        ax.set_title(f"V-NIAH, {n} frames ({rows[0]['tokens']} tokens)" + (f"\n{changed}" if changed else ""))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write(report: dict, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vniah.json").write_text(json.dumps(report, indent=1))
    (out / "vniah.txt").write_text(table(report) + "\n")
    plot(report).savefig(out / "vniah.png", dpi=120)
    return out
