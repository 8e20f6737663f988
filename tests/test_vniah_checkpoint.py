"""The trained V-NIAH models shipped in ``checkpoints/``: small, load offline through the package,
and still answer, with dense attention and with the default PSA preset. ``vniah`` finds one
needle (``colour``); ``vniah-coverage`` answers ``majority`` questions, whose answer needs every
square over the whole video (issue 15). Every test runs for each model (:data:`MODELS`).

The quality gate of issue 8: fixed questions (the seeded test set of ``psa-vlm vniah``) at the
length recorded in ``record.json``; a test fails when an accuracy falls below the value recorded
with the checkpoint minus ``MARGIN``. The same inputs give the same answers on every machine up
to floating-point ties, so a drop beyond the margin means the model, the processor path or the
attention changed, not noise.

Two sizes of the gate (issue 17: the whole set costs minutes of CPU per attention):

- ``vniah``: every run asks the first ``GATE_SAMPLES`` = 16 of the recorded questions, dense and PSA as two
  tests. Each must keep ``ceil(16 x (recorded - MARGIN))`` = 14 of 16 right. Why that is a
  meaningful gate: the shipped checkpoint answers all 16 right with both attentions, each by a
  logit gap of at least 4.5 between the best and the second letter (measured with this test's
  settings: no near tie to flip), so an unchanged model passes with two answers to spare; read
  as 16 questions drawn at random, a model as accurate as recorded (0.975) falls below 14 with
  probability 0.7%, while one that dropped to 0.7 still passes with 9.9%, to 0.6 with 1.8%, to
  chance (0.25) with 3e-7;
- ``vniah-coverage``: every run asks the first 8 recorded questions (one batch, both attentions
  in one test: one model load and one rendering, the suite stays under its time), each attention
  keeping ``ceil(8 x (recorded - MARGIN))`` right: dense 6 and PSA 5 of 8 (recorded 0.75 and
  0.70 on 40 questions). The checkpoint answers exactly that many: every right answer by a logit
  gap of 3.1 or more (dense 4.3), every wrong one a near tie (0.28-0.39) that another CPU could
  only turn right. So an unchanged model passes however the ties fall, and one lost answer fails
  the gate; a model at chance passes the dense half with probability 0.4%;
- the whole recorded set (both attentions, ``slow``; ``.ci/run`` runs it), where a colour model
  at 0.7 passes with 0.9%.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from psa_vlm import vniah
from psa_vlm.models import checkpoint_dir, load_model

#: Allowed drop below the recorded accuracy: 0.1 is 4 of 40 questions, beyond a few
#: near-tied answers flipping under another CPU's summation order, short of any real regression.
MARGIN = 0.10
#: Per shipped model: the questions every run asks (the first of the recorded set, the same
#: seeds), whether dense and PSA are one test or two, and what training.json must show: the
#: longest curriculum length trained (128 frames: 4,096 visual tokens of 224x224 video) with at
#: least this validation accuracy there (the coverage model's third stage reached 128 frames on a
#: GPU: its training.json).
MODELS = {
    "vniah": dict(gate_samples=16, split=True, frames=128, trained=0.9),
    "vniah-coverage": dict(gate_samples=8, split=False, frames=128, trained=0.75),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model_name(request):
    return request.param


def test_checkpoint_is_small_and_complete(model_name):
    checkpoint = checkpoint_dir(model_name)
    sizes = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
    assert sum(sizes.values()) < 15e6, sizes
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "training.json", "record.json"):
        assert name in sizes, f"{name} missing from {checkpoint}"
    training = json.loads((checkpoint / "training.json").read_text())
    record = vniah.load_record(model=model_name)
    spec = MODELS[model_name]
    assert training["best"]["frames"] >= spec["frames"] and training["best"]["accuracy"] >= spec["trained"], training["best"]
    assert training["kinds"] == record["kinds"], (training["kinds"], record["kinds"])  # tested on what it learned
    assert record["frames"] >= 128 and record["samples"] > spec["gate_samples"], record


def test_loads_offline_as_a_real_qwen25_vl(model_name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_model(model_name, device="cpu")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert 4e6 < sum(p.numel() for p in model.parameters()) < 6e6
    from safetensors import safe_open

    with safe_open(str(checkpoint_dir(model_name) / "model.safetensors"), "pt") as f:  # stored in fp16: half the size
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert vniah.letter_ids(processor.tokenizer)  # every option letter is one token


def _evaluate(monkeypatch, model_name: str, samples: int | None, variants: tuple[str, ...]) -> tuple[dict, dict]:
    """(record, {"sdpa" / "psa": report row}) of ``model_name`` on the first ``samples`` recorded
    questions (None: all of them)."""
    # The PyTorch reference path: the interpreter is for the kernels' own tests at small sizes.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    record = vniah.load_record(model=model_name)
    samples = record["samples"] if samples is None else samples
    model, processor = load_model(model_name, device="cpu", dtype=torch.float32)
    preset = record["psa_preset"]
    attention = vniah.variants(presets=(preset,), sparsities=())
    assert list(attention) == ["sdpa", f"psa:{preset}"]
    labels = {"sdpa": "sdpa", "psa": f"psa:{preset}"}
    attention = {labels[v]: attention[labels[v]] for v in variants}
    report = vniah.evaluate(model, processor, frames=(record["frames"],), samples=samples,
                            kinds=tuple(record["kinds"]), attention=attention, batch_size=8)
    rows = {r["variant"]: r for r in report["rows"]}
    return record, {v: rows[labels[v]] for v in variants}


def _least_correct(recorded: float, samples: int) -> int:
    """The fewest right answers of ``samples`` that keep ``recorded - MARGIN`` (14 of 16 at 0.975)."""
    return math.ceil((recorded - MARGIN) * samples - 1e-9)


def _check_ran(variant: str, row: dict) -> None:
    if variant == "psa":
        assert row["sparsity"] is not None and row["sparsity"] > 0, row  # PSA really ran (min_seq_len 0)
    else:
        assert row["sparsity"] == 0


#: The fast gate's tests: (model, the attentions one test asks).
FAST_GATES = [pytest.param(name, variants, id=f"{name}-{'+'.join(variants)}")
              for name, spec in MODELS.items()
              for variants in ([("sdpa",), ("psa",)] if spec["split"] else [("sdpa", "psa")])]


@pytest.mark.parametrize("model_name, variants", FAST_GATES)
def test_keeps_the_recorded_accuracy_on_the_first_questions(model_name, variants, monkeypatch):
    gate = MODELS[model_name]["gate_samples"]
    record, rows = _evaluate(monkeypatch, model_name, gate, variants)
    for variant, row in rows.items():
        assert gate < record["samples"] and row["samples"] == gate and row["tokens"] >= 1024
        recorded = record["dense_accuracy" if variant == "sdpa" else "psa_accuracy"]
        assert row["correct"] >= _least_correct(recorded, gate), (variant, row, record)
        _check_ran(variant, row)


@pytest.mark.slow
def test_dense_and_default_psa_keep_the_recorded_accuracy(model_name, monkeypatch):
    record, rows = _evaluate(monkeypatch, model_name, None, ("sdpa", "psa"))
    dense, psa = rows["sdpa"], rows["psa"]
    assert dense["samples"] == record["samples"] and dense["tokens"] >= 1024
    assert dense["accuracy"] >= record["dense_accuracy"] - MARGIN, (dense, record)
    assert psa["accuracy"] >= record["psa_accuracy"] - MARGIN, (psa, record)
    _check_ran("psa", psa)
