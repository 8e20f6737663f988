"""The trained V-NIAH model shipped in ``checkpoints/vniah``: small, loads offline through the
package, and still finds needles, with dense attention and with the default PSA preset.

The quality gate of issue 8: a few dozen fixed questions (the seeded test set of
``psa-vlm vniah``) at the length recorded in ``record.json``; the test fails when either
accuracy falls below the value recorded with the checkpoint minus ``MARGIN``. The same inputs
give the same answers on every machine up to floating-point ties, so a drop beyond the margin
means the model, the processor path or the attention changed, not noise.
"""

from __future__ import annotations

import json

import pytest
import torch

from psa_vlm import vniah
from psa_vlm.models import checkpoint_dir, load_model

#: Allowed drop below the recorded accuracy: 0.1 is 4 of 40 questions, beyond a few
#: near-tied answers flipping under another CPU's summation order, short of any real regression.
MARGIN = 0.10


@pytest.fixture(scope="module")
def checkpoint():
    return checkpoint_dir()


def test_checkpoint_is_small_and_complete(checkpoint):
    sizes = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
    assert sum(sizes.values()) < 15e6, sizes
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "training.json", "record.json"):
        assert name in sizes, f"{name} missing from {checkpoint}"
    training = json.loads((checkpoint / "training.json").read_text())
    # Trained up to at least 4,096 language tokens (128 frames of 224x224 at 64 tokens a temporal patch).
    assert training["best"]["frames"] >= 128 and training["best"]["accuracy"] >= 0.9, training["best"]


def test_loads_offline_as_a_real_qwen25_vl(checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_model("vniah", device="cpu")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert 4e6 < sum(p.numel() for p in model.parameters()) < 6e6
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:  # stored in fp16: half the size
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert vniah.letter_ids(processor.tokenizer)  # every option letter is one token


def test_dense_and_default_psa_keep_the_recorded_accuracy(monkeypatch):
    # The PyTorch reference path: the interpreter is for the kernels' own tests at small sizes.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    record = vniah.load_record()
    model, processor = load_model("vniah", device="cpu", dtype=torch.float32)
    preset = record["psa_preset"]
    attention = vniah.variants(presets=(preset,), sparsities=())
    assert list(attention) == ["sdpa", f"psa:{preset}"]
    report = vniah.evaluate(model, processor, frames=(record["frames"],), samples=record["samples"],
                            kinds=tuple(record["kinds"]), attention=attention, batch_size=8)
    rows = {r["variant"]: r for r in report["rows"]}
    dense, psa = rows["sdpa"], rows[f"psa:{preset}"]
    assert dense["samples"] == record["samples"] and dense["tokens"] >= 1024
    assert dense["accuracy"] >= record["dense_accuracy"] - MARGIN, (dense, record)
    assert psa["accuracy"] >= record["psa_accuracy"] - MARGIN, (psa, record)
    assert psa["sparsity"] is not None and psa["sparsity"] > 0, psa  # PSA really ran (min_seq_len 0)
