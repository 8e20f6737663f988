"""The ``psa-vlm`` command line and the package as a built wheel."""

from __future__ import annotations

import os
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from psa_vlm import cli
from psa_vlm.models import TINY_MODEL_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    commands = build_commands()
    assert {"ask", "demo", "bench", "eval", "lm-eval", "vniah", "tiny-model", "presets"} <= set(commands)
    for command in commands:  # listed once: a line that starts with the name, then its help
        assert len(re.findall(rf"^ +{re.escape(command)}( |$)", text, re.M)) == 1, (command, text)


def build_commands() -> list[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return list(sub.choices)


def test_presets_command_lists_every_preset(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("video_mme", "fast", "block_sparse", "dense"):
        assert re.search(rf"^{name}\s", out, re.M)


def test_tiny_model_command_writes_a_loadable_model(tmp_path, capsys):
    target = tmp_path / "tiny"
    assert cli.main(["tiny-model", str(target)]) == 0
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(target, local_files_only=True,
                                                               attn_implementation="psa")
    processor = AutoProcessor.from_pretrained(target, local_files_only=True)
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
    assert processor.tokenizer.convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id


@pytest.mark.usefixtures("kernels_path")
def test_demo_prints_the_side_by_side_table(tmp_path, capsys, monkeypatch):
    import numpy as np
    import psa_kernels
    from psa_vlm import viz

    monkeypatch.setenv("PSA_VLM_CACHE", str(tmp_path / "cache"))
    generated, figures = [], []
    generate, plot = Qwen2_5_VLForConditionalGeneration.generate, viz.plot_level_map
    def counted(self, *args, **kwargs):
        generated.append(self.config._attn_implementation)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "generate", counted)
    monkeypatch.setattr(viz, "plot_level_map", lambda *a, **k: figures.append(plot(*a, **k)) or figures[-1])
    repeats = 1  # a warm-up and one timed run per attention: the test stays short
    assert cli.main(["demo", "--frames", "16", "--max-new-tokens", "2", "--repeats", str(repeats),
                     "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("sdpa ", "psa "))}
    assert set(rows) == {"sdpa", "psa"}
    assert rows["sdpa"][2] == rows["psa"][2] and int(rows["psa"][2]) > 200  # same prompt, in tokens
    assert float(rows["psa"][6]) > 0  # PSA really ran sparse
    assert re.search(r"generated tokens identical: \d/2", out)
    # Each attention is warmed up, then timed `repeats` times; prefill and decode come from the same runs.
    assert generated == ["sdpa"] * (repeats + 1) + ["psa"] * (repeats + 1)
    assert "prefill ms" in out and "decode ms/tok" in out and f"median of {repeats} run(s) after a warm-up" in out
    assert all(float(rows[a][4]) > 0 and float(rows[a][5]) > 0 for a in rows)
    assert (tmp_path / "out" / "demo.mp4").stat().st_size > 0
    png = tmp_path / "out" / "level_map.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert str(png) in out

    # The picture's data: the pyramid (pooled levels), the causal upper triangle as its own class, text marked.
    (fig,) = figures
    ax, bar = fig.axes
    shown = np.asarray(ax.images[0].get_array())
    names = [t.get_text() for t in bar.get_yticklabels()]
    rank = {v: names.index(viz.LEVEL_NAMES[v]) for v in viz.LEVEL_ORDER}
    assert np.isin(shown, [rank[2], rank[4], rank[8]]).any()
    tokens, bq, bk = int(rows["psa"][2]), TINY_MODEL_OVERRIDES["block_q"], TINY_MODEL_OVERRIDES["block_k"]
    visible = psa_kernels.block_visibility(batch=1, q_len=tokens, k_len=tokens, block_q=bq, block_k=bk,
                                           causal=True)[0].numpy()
    assert shown.shape == visible.shape and (~visible).any()
    assert np.array_equal(shown == names.index("not visible (causal)"), ~visible)
    assert f"sparsity {cli.PICTURE_SPARSITY:g}" in ax.get_title()
    text_rows, text_cols = (c.get_offsets() for c in ax.collections)
    nq, nk = shown.shape
    assert nq - 1 in text_rows[:, 1] and 0 < len(text_rows) < nq  # the question ends the prompt; video between
    assert nk - 1 in text_cols[:, 0] and 0 < len(text_cols) < nk


def test_demo_rejects_a_bad_preset_with_one_clear_line(capsys):
    assert cli.main(["demo", "--preset", "no_such_preset"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'no_such_preset'" in err and "video_mme" in err


def test_wheel_contains_both_packages_and_the_presets(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)], capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("psa_vlm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "psa_kernels/__init__.py" in names and "psa_kernels/reference.py" in names
    assert "psa_vlm/presets/video_mme.yaml" in names
    for folder in ("vniah", "vniah_coverage"):
        assert f"psa_vlm/checkpoints/{folder}/model.safetensors" in names and f"psa_vlm/checkpoints/{folder}/record.json" in names
    assert not any(n.startswith("kernels/") for n in names), "the import name must not be `kernels`"
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "psa-vlm = psa_vlm.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()

    # Installed from the wheel alone (not the checkout), the presets load and the op runs.
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    code = (
        "import psa_vlm, psa_kernels, torch\n"
        f"assert psa_vlm.__file__.startswith({str(site)!r}), psa_vlm.__file__\n"
        f"assert psa_kernels.__file__.startswith({str(site)!r}), psa_kernels.__file__\n"
        "print(psa_vlm.load_preset('video_mme').name)\n"
        "from psa_vlm.models import checkpoint_dir\n"
        f"assert str(checkpoint_dir()).startswith({str(site)!r}) and (checkpoint_dir() / 'config.json').is_file()\n"
        f"assert str(checkpoint_dir('vniah-coverage')).startswith({str(site)!r})\n"
        "q = torch.randn(1, 2, 40, 32); k = torch.randn(1, 1, 40, 32)\n"
        "lm = torch.ones(1, 1, 1, 2, dtype=torch.int8)\n"
        "print(psa_kernels.psa_attention(q, k, k, lm, block_q=64, block_k=32).shape)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "video_mme" in res.stdout and "torch.Size([1, 2, 40, 32])" in res.stdout


def test_reference_accepts_fp32_cpu_and_half_inputs():
    import psa_kernels

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k = torch.randn(1, 2, 40, 32, dtype=dtype), torch.randn(1, 1, 40, 32, dtype=dtype)
        lm = psa_kernels.build_level_map(q, k, causal=True, block_q=64, block_k=32)
        out = psa_kernels.psa_attention(q, k, k, lm, causal=True, block_q=64, block_k=32)
        assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.usefixtures("kernels_path")
@pytest.mark.usefixtures("tiny_model_path")
def test_bench_runs_both_attentions_on_the_tiny_model(tmp_path, capsys):
    """The benchmark's plumbing on CPU (its timings mean nothing here): the video reaches the
    target token count, both attentions run, PSA reports a sparsity, JSON is written."""
    assert cli.main(["bench", "--model", "tiny", "--lengths", "256", "--device", "cpu", "--dtype", "fp32",
                     "--repeats", "1", "--sparsity", "0.7", "--override", "stride=16",
                     "--output", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["attentions"] == ["sdpa", "psa-off", "psa", "psa@0.7"]
    assert report["configs"]["psa"]["stride"] == 16 and report["configs"]["psa@0.7"]["mode"] == "quantile"
    (row,) = report["rows"]
    assert row["visual_tokens"] >= 256 and row["tokens"] > row["visual_tokens"]
    assert row["sdpa"]["sparsity"] is None and row["psa-off"]["sparsity"] is None  # no PSA call ran
    for label in ("psa", "psa@0.7"):
        assert 0 < row[label]["sparsity"] < 1
        assert row[label]["ttft_ms"] > row[label]["language_ms"] > 0 and row[label]["vision_ms"] > 0
        assert row[label]["ttft_ratio"] == pytest.approx(row[label]["ttft_ms"] / row["sdpa"]["ttft_ms"])
    # Forced blocks (sink, diagonal, text) only add to the fixed fractions: at most the target.
    assert row["psa@0.7"]["sparsity"] <= 0.7 + 1e-6
    out = capsys.readouterr().out
    assert row["psa"]["ttft_vs_off"] == pytest.approx(row["psa"]["ttft_ms"] / row["psa-off"]["ttft_ms"])
    assert "TTFT/sdpa" in out and "psa@0.7" in out


@pytest.mark.usefixtures("kernels_path")
@pytest.mark.usefixtures("tiny_model_path")
def test_bench_runs_the_attentions_asked_for_and_names_unknown_ones(tmp_path, capsys):
    assert cli.main(["bench", "--model", "tiny", "--lengths", "256", "--attentions", "psa-off,psa@0.5",
                     "--device", "cpu"]) == 2  # psa@0.5 without --sparsity 0.5
    assert "psa@0.5" in capsys.readouterr().err
    assert cli.main(["bench", "--model", "tiny", "--lengths", "256", "--device", "cpu", "--dtype", "fp32",
                     "--repeats", "1", "--sparsity", "0.5", "--attentions", "psa-off,psa@0.5",
                     "--output", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["attentions"] == ["psa-off", "psa@0.5"]
    (row,) = report["rows"]
    assert "sdpa" not in row and row["psa@0.5"]["ttft_vs_off"] > 0


@pytest.mark.usefixtures("kernels_path")
def test_ask_answers_about_a_video_with_the_tiny_model(tmp_path, capsys, tiny_model_path):
    from psa_vlm.testing import make_video

    model = tiny_model_path  # a checkpoint folder, as a user passes one
    video = make_video(tmp_path / "clip.mp4", frames=12, width=112, height=84)
    assert cli.main(["ask", "--model", str(model), "--video", str(video), "--max-new-tokens", "3", "--device", "cpu",
                     "--dtype", "fp32", "--override", "block_q=64", "--override", "block_k=32",
                     "--override", "min_seq_len=0", "What colour is the square?"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tokens: \d+ \(\d+ visual\)", out) and "answer:" in out
    sparsity = float(re.search(r"PSA sparsity .*: ([0-9.]+)", out).group(1))
    assert 0 <= sparsity < 1
    # Prefill and decode are two parts of one generation, not a total that repeats the prefill.
    assert re.search(r"prefill: [0-9.]+ ms \(to the first token\); decode: [0-9.]+ ms per token after the first "
                     r"\(3 tokens", out)


def test_ask_names_a_missing_video(tmp_path, capsys):
    assert cli.main(["ask", "--model", "tiny", "--video", str(tmp_path / "nope.mp4"), "why?"]) == 2
    assert "nope.mp4" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/no/such/model"], "no such folder, and not a hub id"),
    (["--model", "{tmp}"], "has no config.json"),
    (["--model", "tiny", "--nframes", "3"], "--nframes 3: must be even"),
    (["--model", "tiny", "--nframes", "0"], "use 2"),
    (["--model", "tiny", "--override", "towers=text,audio"], "field 'towers'"),
    (["--model", "tiny", "--override", "nonsense=1"], "unknown field(s) ['nonsense']"),
    (["--model", "tiny", "--override", "thresholds=[0.5,"], "not valid YAML"),
    (["--model", "tiny", "--preset", "no_such_preset"], "unknown preset"),
])
def test_ask_checks_its_arguments_before_decoding_the_video(tmp_path, capsys, args, message):
    """The video does not exist: an error naming anything else was found before the video was read."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert cli.main(["ask", *args, "--video", str(tmp_path / "nope.mp4"), "why?"]) == 2
    err = capsys.readouterr().err
    assert message in err and "nope.mp4" not in err
    assert len(err.splitlines()) == 1 and err.startswith("psa-vlm ask: error: ")


def test_vniah_refuses_odd_frame_counts_before_loading_a_model(capsys):
    assert cli.main(["vniah", "--model", "tiny", "--frames", "32,7", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--frames 7: must be even" in err and "use 6 or 8" in err


def test_vniah_kinds_default_to_the_model_record_and_unknown_kinds_are_one_line(capsys, tmp_path):
    import argparse
    import json

    kinds = {m: cli._vniah_kinds(argparse.Namespace(kinds=None, model=m)) for m in ("vniah", "vniah-coverage", "tiny")}
    assert kinds == {"vniah": ["colour"], "vniah-coverage": ["majority"], "tiny": ["colour"]}
    (tmp_path / "record.json").write_text(json.dumps({"kinds": ["order", "shape"]}))
    assert cli._vniah_kinds(argparse.Namespace(kinds=None, model=str(tmp_path))) == ["order", "shape"]
    assert cli._vniah_kinds(argparse.Namespace(kinds="majority,colour", model="vniah")) == ["majority", "colour"]
    assert cli.main(["vniah", "--model", "tiny", "--kinds", "colour,count", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--kinds: unknown ['count']" in err and "majority" in err and len(err.splitlines()) == 1
    (tmp_path / "record.json").write_text("{not json")  # a corrupt record names its file and the fix
    with pytest.raises(ValueError, match=r"record\.json is not valid JSON .*restore the checkpoint's record\.json"):
        cli._vniah_kinds(argparse.Namespace(kinds=None, model=str(tmp_path)))


def test_override_takes_comma_lists_and_yaml_lists():
    from psa_vlm import load_preset

    comma = cli._overrides(["towers=text,vision", "thresholds=0.5, 0.6,0.7,0.8", "similarity=0.7,0.6,0.6"])
    yaml_lists = cli._overrides(["towers=[text, vision]", "thresholds=[0.5, 0.6, 0.7, 0.8]",
                                 "similarity=[0.7, 0.6, 0.6]"])
    assert comma == yaml_lists
    preset = load_preset("video_mme").replace(**comma)
    assert preset.towers == ("text", "vision") and preset.thresholds == (0.5, 0.6, 0.7, 0.8)
    assert preset.similarity == (0.7, 0.6, 0.6)
    assert cli._overrides(["towers=vision", "similarity=null", "min_seq_len=0"]) == dict(
        towers=["vision"], similarity=None, min_seq_len=0)  # one item is a list; null still turns the cap off
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        cli._overrides(["towers"])
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["ask"].format_help()
    assert "towers=text,vision" in help_text and "towers=[text,vision]" in help_text


def test_bench_lengths_take_k_suffixes_and_reject_the_rest(capsys):
    """``--lengths 32k`` is what the help's default shows, so it parses (k = 1024); anything else
    is refused in one line before a model is built."""
    assert cli.token_counts("16k,32768, 2K", "--lengths") == [16384, 32768, 2048]
    for bad in ("12x", "0", "-5k", ""):
        with pytest.raises(SystemExit, match="--lengths"):
            cli.token_counts(bad, "--lengths")
    with pytest.raises(SystemExit, match="16k"):
        cli.main(["bench", "--model", "tiny", "--lengths", "1.5k", "--device", "cpu"])
