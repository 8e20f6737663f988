"""The needle-in-a-haystack generator: deterministic, the needle is where and when it says, the
answer follows from the video, and the frames go through the processor path."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from psa_vlm import needles


def _seed():
    return int(np.random.default_rng().integers(2**31))


@pytest.mark.parametrize("kind", needles.KINDS)
def test_same_seed_same_sample(kind):
    seed = _seed()
    a, b = needles.make_sample(seed, frames=8, size=(112, 112), kind=kind), needles.make_sample(
        seed, frames=8, size=(112, 112), kind=kind)
    assert np.array_equal(a.frames, b.frames) and a.answer == b.answer and a.needles == b.needles
    c = needles.make_sample(seed + 1, frames=8, size=(112, 112), kind=kind)
    assert not np.array_equal(a.frames, c.frames)


def _colour_pixels(frames, colour):
    return np.all(frames == np.array(needles.COLOURS[colour], dtype=np.uint8), axis=-1)


@pytest.mark.parametrize("kind", needles.KINDS)
def test_the_needle_is_shown_for_one_temporal_patch_only(kind):
    s = needles.make_sample(_seed(), frames=16, size=(112, 140), kind=kind)
    colours = [s.answer_text] if kind == "colour" else ["red"] if kind in ("shape", "position") else list(needles.COLOURS)
    shown = np.zeros(len(s.frames), dtype=bool)
    for colour in colours:
        shown |= _colour_pixels(s.frames, colour).any(axis=(1, 2))
    expected = np.zeros(len(s.frames), dtype=bool)
    for t, top, left, side in s.needles:
        assert t % 2 == 0  # aligned to a temporal patch of two frames
        expected[t : t + 2] = True
    assert np.array_equal(shown, expected)


def test_answers_follow_from_the_video():
    for seed in range(12):
        s = needles.make_sample(seed, frames=8, size=(112, 112), kind="colour")
        (t, top, left, side), = s.needles
        patch = s.frames[t, top : top + side, left : left + side]
        assert np.all(patch == np.array(needles.COLOURS[s.answer_text], dtype=np.uint8))
        p = needles.make_sample(seed, frames=8, size=(112, 112), kind="position")
        (t, top, left, side), = p.needles
        quadrant = 2 * (top + side / 2 >= 56) + (left + side / 2 >= 56)
        assert needles.POSITIONS[quadrant] == p.answer_text
        o = needles.make_sample(seed, frames=8, size=(112, 112), kind="order")
        (t1, y1, x1, s1), (t2, _, _, _) = o.needles
        assert t1 < t2 and np.all(o.frames[t1, y1, x1] == np.array(needles.COLOURS[o.answer_text], dtype=np.uint8))
        h = needles.make_sample(seed, frames=8, size=(112, 112), kind="shape")
        (t, top, left, side), = h.needles
        red = _colour_pixels(h.frames[t, top : top + side, left : left + side], "red")
        assert np.array_equal(red, needles._shape_mask(h.answer_text, side))


@pytest.mark.parametrize("frames, size", [(128, (224, 224)), (16, (112, 140)), (2, (56, 56))])
def test_majority_needs_every_square_over_the_whole_video(frames, size):
    """Five squares: the answer's colour twice, each other colour once, read back from the
    pixels; each in its own place, and (with enough temporal patches) one in each fifth."""
    letters = Counter()
    for seed in range(8):
        s = needles.make_sample(seed, frames=frames, size=size, kind="majority")
        letters[s.answer] += 1
        assert s.options == tuple(needles.COLOURS) and "most often" in s.question
        shown = Counter()
        boxes = []
        for t, top, left, side in s.needles:
            patch = s.frames[t, top : top + side, left : left + side]
            colour = next(c for c in needles.COLOURS if np.all(_colour_pixels(patch, c)))
            assert np.array_equal(s.frames[t + 1, top : top + side, left : left + side], patch)
            shown[colour] += 1
            boxes.append((top, left, side))
        assert shown[s.answer_text] == 2 and sorted(shown.values()) == [1, 1, 1, 2], shown
        for i, (y1, x1, a) in enumerate(boxes):  # never overlapping, whatever the times
            for y2, x2, b in boxes[i + 1:]:
                assert y1 + a <= y2 or y2 + b <= y1 or x1 + a <= x2 or x2 + b <= x1
        if frames // 2 >= 5:
            patches = frames // 2
            fifths = [max(i for i in range(5) if i * patches // 5 <= t // 2) for t, *_ in s.needles]
            assert sorted(fifths) == [0, 1, 2, 3, 4], fifths
    if frames == 2:
        letters = Counter(needles.make_sample(seed, frames=2, size=(56, 56), kind="majority").answer
                          for seed in range(200))
        assert set(letters) == set("ABCD") and min(letters.values()) >= 30


def test_answer_letters_are_balanced_and_shapes_differ():
    letters = Counter(needles.make_sample(seed, frames=4, size=(56, 56)).answer for seed in range(200))
    assert set(letters) == set("ABCD") and min(letters.values()) >= 30
    masks = [needles._shape_mask(shape, 24) for shape in needles.SHAPES]
    assert all(not np.array_equal(a, b) for i, a in enumerate(masks) for b in masks[i + 1:])


def test_prompt_and_processor_path(tiny_processor):
    s = needles.make_sample(_seed(), frames=8, size=(224, 224), kind="order")
    assert "Which colour appears first?" in s.prompt().splitlines()[1]
    assert "A. red" in s.prompt() and "D. yellow" in s.prompt()
    inputs = needles.sample_inputs(tiny_processor, [s, needles.make_sample(1, frames=8, size=(224, 224))])
    assert inputs["video_grid_thw"].tolist() == [[4, 16, 16], [4, 16, 16]]  # every frame kept, 2 per patch
    assert ((inputs["mm_token_type_ids"] != 0).sum(1) == 4 * 64).all()


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="kind"):
        needles.make_sample(0, kind="size")
    with pytest.raises(ValueError, match="majority"):  # the message lists the kinds
        needles.make_sample(0, kind="count")
    with pytest.raises(ValueError, match="even"):
        needles.make_sample(0, frames=7)
    with pytest.raises(ValueError, match="56 pixels"):
        needles.make_sample(0, size=(40, 80))


def test_wilson_interval():
    from psa_vlm.vniah import wilson_interval

    low, high = wilson_interval(0, 20)
    assert low == 0 and 0.1 < high < 0.2
    low, high = wilson_interval(45, 50)
    assert low < 0.9 < high < 1
    assert wilson_interval(10, 20)[0] == pytest.approx(1 - wilson_interval(10, 20)[1])


@pytest.mark.usefixtures("tiny_model_path")
def test_vniah_runs_every_variant_and_matches_binary_flops(tmp_path, capsys, monkeypatch):
    import json

    from psa_vlm import cli

    # The evaluation's logic, on the PyTorch reference: the kernels have their own tests, and
    # Triton's interpreter would take minutes over six variants.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    assert cli.main(["vniah", "--model", "tiny", "--frames", "8", "--samples", "6", "--batch-size", "3", "--presets",
                     "video_mme", "--sparsity", "0.5,0.8", "--device", "cpu", "--dtype", "fp32",
                     "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "vniah.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["sdpa", "psa:video_mme", "psa@0.5", "binary@0.5", "budget@0.5", "topk@0.5", "psa@0.8",
                          "binary@0.8", "budget@0.8", "topk@0.8"]
    for r in rows.values():
        assert r["samples"] == 6 and 0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1
        assert r["correct"] == round(r["accuracy"] * 6)
    assert rows["sdpa"]["sparsity"] == 0
    for s in ("0.5", "0.8"):  # the same FLOPs: forced blocks count alike
        assert abs(rows[f"binary@{s}"]["sparsity"] - rows[f"psa@{s}"]["sparsity"]) < 0.06
        assert abs(rows[f"topk@{s}"]["sparsity"] - rows[f"budget@{s}"]["sparsity"]) < 0.02  # the same budget
    assert rows["psa@0.8"]["sparsity"] > rows["psa@0.5"]["sparsity"] > 0
    assert (tmp_path / "vniah.png").stat().st_size > 10_000
    assert "95% interval" in capsys.readouterr().out


@pytest.mark.usefixtures("tiny_model_path")
def test_vniah_renders_the_same_questions_in_worker_processes(monkeypatch):
    """The GPU path renders batches ahead in spawned processes: same questions, same order, same
    answers and sparsity as rendering them one by one here; the set is built batch by batch."""
    import torch

    from psa_vlm import vniah
    from psa_vlm.models import load_model

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, processor = load_model("tiny", device="cpu", dtype=torch.float32)
    attention = vniah.variants(presets=(), sparsities=(0.8,))
    kwargs = dict(frames=(8,), samples=5, batch_size=2, attention=attention)
    here = vniah.evaluate(model, processor, workers=0, **kwargs)
    spawned = vniah.evaluate(model, processor, workers=2, **kwargs)
    assert here["rows"] == spawned["rows"]
    assert [r["samples"] for r in here["rows"]] == [5] * len(attention)
    spec = vniah.batch_specs(8, 5, batch_size=3)[1]
    answers, inputs = needles.render_batch(spec, processor)
    assert answers == [q.answer for q in vniah.test_set(8, 5)[3:]] and inputs["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="workers"):
        vniah.evaluate(model, processor, workers=-1, **kwargs)


def test_training_smoke_run_saves_a_small_checkpoint_vniah_can_read(tmp_path, monkeypatch):
    """A few CPU steps of the V-NIAH training recipe: keep-best saves an fp16 checkpoint with its
    processor, and `psa-vlm vniah` evaluates it (the real run: docs/quality.md)."""
    import json

    from psa_vlm import cli, vniah_train

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    summary = vniah_train.train(tmp_path / "ckpt", minutes=5, max_frames=4, tokens=256, max_steps=4, eval_every=2,
                                val_samples=4, device="cpu", progress=lambda line: None)
    assert summary["steps"] == 4 and len(summary["history"]) == 2 and summary["best"]["level"] == 0
    weights = tmp_path / "ckpt" / "model.safetensors"
    assert weights.stat().st_size < 15 * 2**20
    assert json.loads((tmp_path / "ckpt" / "training.json").read_text())["best"] == summary["best"]
    assert cli.main(["vniah", "--model", str(tmp_path / "ckpt"), "--frames", "4", "--samples", "4", "--presets", "",
                     "--sparsity", "0.5", "--device", "cpu", "--dtype", "fp32"]) == 0


def test_training_with_rendering_workers_trains_on_the_same_batches(tmp_path, monkeypatch):
    """The trainer's GPU default renders batches ahead in worker processes: with one curriculum
    level (no promotion to race with) the run is the same as rendering here, loss for loss."""
    import torch
    from safetensors.torch import load_file

    from psa_vlm import vniah_train

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        summary = vniah_train.train(out, minutes=5, max_frames=2, tokens=128, max_steps=3, eval_every=3, val_samples=4,
                                    device="cpu", workers=workers, progress=lambda line: None)
        runs[workers] = summary, load_file(out / "model.safetensors")
    (here, w_here), (ahead, w_ahead) = runs[0], runs[2]
    assert [h["loss"] for h in here["history"]] == pytest.approx([h["loss"] for h in ahead["history"]], rel=1e-5)
    assert [h["val_accuracy"] for h in here["history"]] == [h["val_accuracy"] for h in ahead["history"]]
    assert all(torch.allclose(w_here[k].float(), w_ahead[k].float(), atol=1e-3) for k in w_here)


def test_training_stops_at_the_target_accuracy_of_the_longest_length(tmp_path, monkeypatch):
    import json

    from psa_vlm import vniah_train

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # One curriculum length (2 frames): the first validation is at the longest length, and any
    # accuracy reaches a target of 0.
    summary = vniah_train.train(tmp_path, minutes=5, max_frames=2, tokens=256, max_batch=2, eval_every=2,
                                val_samples=2, target=0.0, max_steps=50, device="cpu", progress=lambda line: None)
    assert summary["steps"] == 2 and len(summary["history"]) == 1
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["settings"]["target"] == 0.0 and saved["settings"]["max_batch"] == 2 and saved["steps"] == 2


def test_vniah_names_a_model_it_cannot_load_in_one_line(tmp_path, capsys):
    from psa_vlm import cli

    assert cli.main(["vniah", "--model", str(tmp_path / "no_such_model"), "--samples", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "no_such_model" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1  # checked before the model (or anything slow) is loaded


def test_training_can_start_from_a_checkpoint_at_a_later_length(tmp_path, monkeypatch):
    """--init / --min-frames / --kinds majority (the coverage model's recipe): the run starts from
    the shipped needle model's weights, its curriculum from the given length."""
    from safetensors.torch import load_file

    from psa_vlm import vniah_train
    from psa_vlm.models import checkpoint_dir

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    init = checkpoint_dir("vniah")
    summary = vniah_train.train(tmp_path, minutes=5, min_frames=4, max_frames=4, tokens=256, max_batch=2, max_steps=1,
                                eval_every=1, val_samples=2, kinds=("majority",), init=init, lr=1e-9, warmup=1,
                                device="cpu", progress=lambda line: None)
    assert summary["levels"] == [4] and summary["kinds"] == ["majority"]
    assert summary["settings"]["init"] == str(init) and summary["settings"]["min_frames"] == 4
    before, after = load_file(init / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert all(torch_allclose(before[k], after[k]) for k in before)  # lr 1e-9: still the initial weights
    with pytest.raises(ValueError, match="kinds"):
        vniah_train.train(tmp_path, kinds=("count",), max_steps=1, device="cpu")
    with pytest.raises(ValueError, match="no curriculum length"):
        vniah_train.train(tmp_path, min_frames=64, max_frames=32, max_steps=1, device="cpu")


def torch_allclose(a, b):
    import torch

    return torch.allclose(a.float(), b.float(), atol=1e-3)
