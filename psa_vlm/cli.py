"""The ``psa-vlm`` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .config import DEFAULT_PRESET
from .families import DEFAULT_FAMILY, FAMILIES
from .models import SHAPES, TINY_MODEL_OVERRIDES, check_model_spec
from .timing import FirstTokenClock

DESCRIPTION = """\
psa-vlm: Pyramid Sparse Attention for long-video understanding with Qwen-VL models
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE).

New here? `psa-vlm demo` runs offline (no weights, no network) and shows dense and PSA
attention side by side. `psa-vlm COMMAND --help` explains a command and its options.
"""



def _cmd_presets(args) -> int:
    from .config import available_presets, load_preset

    for name in available_presets():
        print(f"{name:14s} {load_preset(name).description}")
    return 0


def _cmd_tiny_model(args) -> int:
    from .tiny import save_tiny_model

    path = save_tiny_model(args.directory, seed=args.seed, family=args.family)
    family = FAMILIES[args.family]
    print(f"wrote the tiny {family.label} to {path}")
    print(f"load it with {family.model_class}.from_pretrained({str(path)!r}, local_files_only=True), or pass it as "
          "--model to psa-vlm ask / eval")
    return 0


#: The demo's level-map picture runs PSA at this fixed sparsity: on the tiny model's random weights
#: the presets' energy thresholds keep nearly every block at level 1, which shows no pyramid.
PICTURE_SPARSITY = 0.8


def _run(model, processor, inputs, max_new_tokens, repeats):
    """Greedy generation, timed: (tokens, prefill s per run, decode s per token per run, answer).

    One untimed warm-up first (a first call pays one-time costs: lazy initialisation, allocator
    growth), then ``repeats`` timed runs. Prefill is the time to the first token's logits; decode
    is the rest of the same run divided by the tokens after the first, so no figure contains another.
    """
    import torch

    prefills, decodes = [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            clock = FirstTokenClock()
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, logits_processor=[clock])
            end = time.perf_counter()
            if i:  # run 0 is the warm-up
                prefills.append(clock.at - start)
                if max_new_tokens > 1:
                    decodes.append((end - clock.at) / (max_new_tokens - 1))
    new = out[0, inputs["input_ids"].shape[1]:]
    return new, prefills, decodes, processor.tokenizer.decode(new, skip_special_tokens=True)


def _cmd_demo(args) -> int:
    from statistics import median

    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from . import configure, load_preset, mean_sparsity, not_run_reason, reset_stats
    from .clips import make_video
    from .tiny import tiny_model_dir
    from .video import video_inputs

    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    torch.manual_seed(args.seed)
    preset = load_preset(args.preset)  # fail early on a bad preset name
    out_dir = Path(args.output or tempfile.mkdtemp(prefix="psa_demo_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = tiny_model_dir()
    print(f"[1/4] tiny Qwen2.5-VL (random weights, offline): {model_dir}", flush=True)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    video = make_video(out_dir / "demo.mp4", frames=args.frames, width=args.size, height=args.size, seed=args.seed)
    print(f"[2/4] generated video: {video} ({args.frames} frames, {args.size}x{args.size})", flush=True)
    inputs = video_inputs(processor, video, args.question, max_pixels=args.size * args.size)
    n_tokens = inputs["input_ids"].shape[1]
    n_visual = int((inputs["mm_token_type_ids"] != 0).sum())

    rows, map_png, unsteady, not_run = [], None, [], None
    for step, attn in ((3, "sdpa"), (4, "psa")):
        print(f"[{step}/4] {args.max_new_tokens} greedy tokens with attn_implementation={attn!r}: a warm-up, then "
              f"{args.repeats} timed run(s)", flush=True)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_dir, attn_implementation=attn, local_files_only=True, dtype=torch.float32
        ).eval()
        if attn == "psa":
            configure(model, preset, **TINY_MODEL_OVERRIDES)
        tokens, prefills, decodes, answer = _run(model, processor, inputs, args.max_new_tokens, args.repeats)
        if max(prefills) > 2 * min(prefills):
            unsteady.append(f"{attn} {min(prefills) * 1e3:.0f} to {max(prefills) * 1e3:.0f} ms")
        prefill, decode = median(prefills), median(decodes) if decodes else None
        sparsity = None
        if attn == "psa":
            reset_stats(model)
            with torch.no_grad():
                model(**inputs)  # the prefill alone: its sparsity, without the decode steps
            sparsity, not_run = mean_sparsity(model), not_run_reason(model)
            map_png = _save_level_map(model, preset, inputs, out_dir / "level_map.png")
        rows.append((attn, preset.name if attn == "psa" else "-", tokens, prefill, decode, sparsity, answer))

    agree = int((rows[0][2] == rows[1][2]).sum())
    print()
    print(f"{'attention':10s} {'preset':12s} {'tokens':>7s} {'visual':>7s} {'prefill ms':>11s} "
          f"{'decode ms/tok':>13s} {'sparsity':>9s}  answer")
    for attn, name, _, prefill, decode, sparsity, answer in rows:
        sp = "-" if sparsity is None else f"{sparsity:.3f}"
        dec = "-" if decode is None else f"{decode * 1e3:.1f}"
        print(f"{attn:10s} {name:12s} {n_tokens:7d} {n_visual:7d} {prefill * 1e3:11.1f} {dec:>13s} "
              f"{sp:>9s}  {answer!r}")
    if not_run is not None:
        print(not_run)
    print(f"\ngenerated tokens identical: {agree}/{args.max_new_tokens}")
    print(f"timings: median of {args.repeats} run(s) after a warm-up; prefill = time to the first token, decode "
          "ms/tok = each further token (a whole answer takes prefill + decode x the tokens after the first).")
    if unsteady:  # e.g. torch's threads contending with other processes for the cores
        print(f"note: the prefill varied more than 2x between runs ({'; '.join(unsteady)}): the CPU is busy, so "
              "compare the timings with care (OMP_NUM_THREADS=1 steadies a small run on a shared CPU).")
    print(f"PSA settings: preset {preset.name!r} with tiny-model overrides {TINY_MODEL_OVERRIDES}; "
          "mean text-layer sparsity of the prefill (1 - density, docs/semantics.md section 6).")
    print("The tiny model has random weights: its answers are noise; agreement and sparsity are the point.")
    if map_png is not None:
        print(f"level map of one text layer with PSA at a fixed sparsity {PICTURE_SPARSITY} (the preset keeps "
              f"almost every block at level 1 on random weights): {map_png}")
    print(f"generated video: {video}")
    return 0


def _blocks_holding(mask, start: int, length: int, block: int) -> list[bool]:
    """Per block of ``block`` tokens over ``mask[start:start + length]``: does it hold a True?"""
    return [bool(mask[start + i:start + min(i + block, length)].any()) for i in range(0, length, block)]


def _save_level_map(model, preset, inputs, path: Path) -> Path | None:
    """PNG of the middle text layer's level map (head 0) of one prefill with PSA at
    :data:`PICTURE_SPARSITY`, the causally invisible pairs grey and the text blocks marked; None
    if no layer ran PSA. Leaves the model configured that way."""
    import matplotlib.pyplot as plt
    import psa_kernels
    import torch

    from . import configure
    from .runtime import forced_text, level_maps
    from .viz import plot_level_map

    configure(model, preset.at_sparsity(PICTURE_SPARSITY), record_level_maps=True, **TINY_MODEL_OVERRIDES)
    with torch.no_grad():
        model(**inputs)
    maps = {layer: rec for (tower, layer), rec in level_maps(model).items() if tower == "text"}
    if not maps:
        return None
    layer = sorted(maps, key=lambda x: -1 if x is None else x)[len(maps) // 2]
    rec = maps[layer]
    q_len, k_len, block_q, block_k = rec["q_len"], rec["k_len"], rec["block_q"], rec["block_k"]
    visible = psa_kernels.block_visibility(batch=1, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k,
                                           causal=rec["causal"], key_padding_mask=rec.get("key_padding_mask"))[0]
    # the text PSA forces (0 = text, less the media's seams); the keys are the whole prompt
    text = forced_text(inputs["mm_token_type_ids"][:1] == 0, preset.media_gap_tokens)[0].cpu()
    fig = plot_level_map(rec["level_map"], block_q=block_q, block_k=block_k, visible=visible,
                         text_rows=_blocks_holding(text, k_len - q_len, q_len, block_q),
                         text_cols=_blocks_holding(text, 0, k_len, block_k),
                         title=f"text layer {layer}, head 0, prefill: PSA at fixed sparsity {PICTURE_SPARSITY:g}\n"
                               f"({preset.name}@{PICTURE_SPARSITY:g}; random weights leave the preset at level 1)")
    fig.set_size_inches(7.4, 5.6)  # room for the two-line title
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cmd_ask(args) -> int:
    import torch

    from . import mean_sparsity, not_run_reason, use_attention
    from .models import default_device, load_model, resolve_dtype, vision_factor
    from .video import load_video, video_inputs

    # Everything a user can mistype is checked before the video is decoded (minutes for a long one).
    check_model_spec(args.model)
    if args.nframes is not None:
        _check_frames("--nframes", args.nframes)
    device, dtype = default_device(args.device), resolve_dtype(args.dtype)
    preset = None
    if args.attn == "psa":
        overrides = dict(TINY_MODEL_OVERRIDES) if args.model == "tiny" else {}
        overrides.update(_overrides(args.override))
        preset = _preset(args.preset, overrides)
    elif args.override:
        print(f"psa-vlm ask: note: --override changes PSA presets; --attn {args.attn} ignores it", file=sys.stderr)
    sampling = {"nframes": args.nframes} if args.nframes is not None else {"fps": args.fps}
    # frames sized for the model's patches (Qwen3-VL: multiples of 32), read from its config alone
    video = load_video(args.video, max_pixels=args.max_pixels, progress=True, factor=vision_factor(args.model),
                       **sampling)
    print(f"video: {args.video}: {video.frames.shape[0]} frames of {video.frames.shape[3]}x{video.frames.shape[2]} "
          f"at {video.sample_fps:.3g} frames/s", flush=True)
    model, processor = load_model(args.model, device=device, dtype=dtype)
    use_attention(model, preset, dense=args.attn)
    inputs = video_inputs(processor, video, args.question).to(device)
    visual = int((inputs["mm_token_type_ids"] != 0).sum())

    def synced():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    # One generation, timed in two parts that do not overlap: the prefill (to the first token's
    # logits) and the decode steps after it. The sparsity is the prefill's, read at the first token.
    seen = {}

    def prefill_sparsity():
        if preset is not None:
            seen.update(sparsity=mean_sparsity(model), not_run=not_run_reason(model))

    clock = FirstTokenClock(device.startswith("cuda"), on_first=prefill_sparsity)
    with torch.no_grad():
        start = synced()
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, logits_processor=[clock])
        end = synced()
    new = out[0, inputs["input_ids"].shape[1]:]
    sparsity = seen.get("sparsity")
    decode = f"{(end - clock.at) * 1e3 / (len(new) - 1):.1f} ms per token after the first" if len(new) > 1 else "-"
    print(f"tokens: {inputs['input_ids'].shape[1]} ({visual} visual)")
    print(f"prefill: {(clock.at - start) * 1e3:.1f} ms (to the first token); decode: {decode} ({len(new)} tokens, "
          "first call: one-time start-up costs included)")
    if sparsity is not None:
        print(f"PSA sparsity (mean over text layers; preset {preset.name!r}): {sparsity:.3f}")
    elif seen.get("not_run"):  # rather than no sparsity at all
        print(f"{seen['not_run']} (preset {preset.name!r})")
    print(f"answer: {processor.tokenizer.decode(new, skip_special_tokens=True)}")
    return 0


def _check_frames(option: str, count: int) -> None:
    """Qwen-VL models read frames in pairs (a temporal patch of two): an odd count would change
    silently, so it is refused."""
    if count < 2 or count % 2:
        fix = "use 2" if count < 2 else f"use {count - 1} or {count + 1}"
        raise ValueError(f"{option} {count}: must be even and at least 2 (Qwen-VL models group frames in pairs, one "
                         f"temporal patch per two frames); {fix}")


def _preset(name, overrides: dict):
    """The preset with ``--override`` values applied; a bad field or value is a ValueError naming it."""
    from .config import load_preset

    preset = load_preset(name)
    try:
        return preset.replace(**overrides) if overrides else preset
    except ValueError as err:
        raise ValueError(f"--override: {err}") from None


def _overrides(items) -> dict:
    """``--override FIELD=VALUE`` pairs -> preset overrides (:func:`psa_vlm.config.parse_overrides`)."""
    from .config import parse_overrides

    try:
        return parse_overrides(items)
    except ValueError as err:
        raise ValueError(f"--{err}" if str(err).startswith("override") else f"--override: {err}") from None


def token_counts(text: str, flag: str) -> list[int]:
    """``"16k,32768"`` -> ``[16384, 32768]``: comma-separated token counts, ``k`` meaning 1024."""
    counts = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        digits, factor = (item[:-1], 1024) if item[-1:] in ("k", "K") else (item, 1)
        if not digits.isdigit() or int(digits) == 0:
            raise SystemExit(f"psa-vlm bench: error: {flag} takes positive token counts such as 16384 or 16k, "
                             f"got {item!r}")
        counts.append(int(digits) * factor)
    if not counts:
        raise SystemExit(f"psa-vlm bench: error: {flag} is empty; give token counts such as 16k,32k")
    return counts


def _cmd_bench(args) -> int:
    from .bench import run, table
    from .models import default_device, resolve_dtype

    check_model_spec(args.model)
    lengths = token_counts(args.lengths, "--lengths")
    device, dtype = default_device(args.device), resolve_dtype(args.dtype)
    overrides = dict(TINY_MODEL_OVERRIDES) if args.model == "tiny" else {}
    overrides.update(_overrides(args.override))
    only = [x.strip() for x in args.attentions.split(",") if x.strip()] if args.attentions else None
    report = run(args.model, lengths, preset=args.preset, overrides=overrides, sparsities=args.sparsity or (),
                 device=device, dtype=dtype, repeats=args.repeats, out_dir=args.output, only=only)
    print()
    print(table(report))
    if args.output:
        print(f"\nwrote {Path(args.output) / 'bench.json'}")
    return 0


def _cmd_eval(args) -> int:
    from .evaluation import runner
    from .variants import parse_variants

    check_model_spec(args.model)
    runner.set_data_dirs(args.data_dir)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    overrides = _overrides(args.override)
    # A bad label, preset or override fails now, not after loading the model.
    variants = parse_variants(args.attn, overrides=overrides)
    report = runner.run(args.model, tasks, variants, output=args.output, limit=args.limit,
                        batch_size=args.batch_size, device=args.device, dtype=args.dtype, device_map=args.device_map,
                        overrides=overrides, max_new_tokens=args.max_new_tokens)
    if report is not None:
        print()
        print(runner.markdown(report))  # says so where PSA did not run
        print(f"wrote {Path(args.output) / 'report.md'} and report.json; per-sample answers in "
              f"{Path(args.output)}/<variant>/predictions.jsonl")
    return 0


def _cmd_lm_eval(args) -> int:
    import sys

    from lm_eval.__main__ import cli_evaluate

    from .evaluation import lm  # noqa: F401  (registers psa-qwen2.5-vl, which plain lm_eval cannot see)
    from .evaluation.runner import tasks_dir

    rest = list(args.lm_eval_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if rest and not rest[0].startswith("-") and "--include_path" not in rest:
        rest += ["--include_path", str(tasks_dir())]
    sys.argv = ["lm_eval", *rest]
    cli_evaluate()
    return 0


def _vniah_kinds(args) -> list[str]:
    """``--kinds``, checked; by default the kinds in the model's ``record.json`` (a shipped
    V-NIAH model or a folder with one), else colour."""
    from .needles import KINDS
    from .vniah import recorded_kinds

    if args.kinds is None:
        return recorded_kinds(args.model)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"--kinds: unknown {unknown or args.kinds!r}; choose from {', '.join(KINDS)}")
    return kinds


def _cmd_vniah(args) -> int:
    from . import vniah
    from .models import default_device, load_model, resolve_dtype

    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in vniah.POLICIES]
    if unknown:
        raise ValueError(f"--policies: unknown {unknown}; choose from {', '.join(vniah.POLICIES)}")
    check_model_spec(args.model)
    frames = [int(x) for x in args.frames.split(",") if x]
    for n in frames:
        _check_frames("--frames", n)
    overrides = dict(TINY_MODEL_OVERRIDES) if args.model == "tiny" else {}
    overrides.update(_overrides(args.override))
    presets = [p for p in args.presets.split(",") if p]
    for preset in presets:  # a bad preset or override fails now, not after loading the model
        _preset(preset, overrides)
    sparsities = [float(x) for x in args.sparsity.split(",") if x]
    kinds = _vniah_kinds(args)
    height, width = (int(x) for x in args.size.lower().split("x"))
    device, dtype = default_device(args.device), resolve_dtype(args.dtype)
    model, processor = load_model(args.model, device=device, dtype=dtype)
    import torch

    meta = dict(model=args.model, overrides=overrides, device=torch.cuda.get_device_name(device)
                if str(device).startswith("cuda") else "cpu", dtype=str(next(model.parameters()).dtype),
                torch=torch.__version__)

    def save(report):  # after each length, so a long run that is stopped keeps what it measured
        if args.output:
            vniah.write({**report, **meta}, args.output)

    report = vniah.evaluate(model, processor, frames=frames, samples=args.samples,
                            kinds=kinds, size=(height, width), batch_size=args.batch_size, workers=args.workers,
                            progress=print, on_length=save,
                            attention=vniah.variants(presets, sparsities, overrides, policies=policies))
    report.update(meta)
    print()
    print(vniah.table(report))
    if args.output:
        print(f"\nwrote {vniah.write(report, args.output)}/vniah.{{json,txt,png}}")
    return 0


_SHAPE_NAMES = ", ".join(SHAPES)


def _device_and_dtype(parser, *, default: str = "auto", what: str = "model dtype") -> None:
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    shown = "auto, the checkpoint's" if default == "auto" else default
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default=default,
                        help=f"{what} (default: {shown})")


def _override_arg(parser, what: str, example: str) -> None:
    parser.add_argument("--override", action="append", metavar="FIELD=VALUE",
                        help=f"replace {what}, e.g. --override {example} (repeatable). VALUE is read as YAML "
                        "(0, true, null); the list fields (towers, levels, thresholds, similarity) take a comma list "
                        "or a YAML list: towers=text,vision or towers=[text,vision]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psa-vlm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # argparse lists the commands from their help texts (the description has no list of its own)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    demo = sub.add_parser("demo", help="offline end-to-end run: a tiny random Qwen2.5-VL answers a question "
                          "about a generated video with dense (sdpa) and PSA attention, side by side",
                          description="Build (or reuse) the offline tiny Qwen2.5-VL, generate a synthetic video, "
                          "and answer one question with attn_implementation='sdpa' and 'psa'. Prints tokens, "
                          "timings (medians of --repeats runs after a warm-up: the prefill, i.e. the time to the "
                          "first token, and the decode time of each further token), PSA sparsity and whether the "
                          "generated tokens agree, and writes a PNG of one text layer's level map with PSA at a "
                          "fixed sparsity of 0.8 (pooled levels, causally invisible pairs in grey, text blocks "
                          "marked). No network, no weights.")
    demo.add_argument("--preset", default=DEFAULT_PRESET, help=f"PSA preset name or YAML path (default: {DEFAULT_PRESET})")
    demo.add_argument("--question", default="What colour is the moving square?", help="question about the video")
    demo.add_argument("--frames", type=int, default=32, help="frames in the generated video (default: 32)")
    demo.add_argument("--size", type=int, default=224, help="frame width and height in pixels, even (default: 224)")
    demo.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens to generate (default: 8)")
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per attention after one warm-up; the "
                      "table shows their medians (default: 3)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the generated video (default: 0)")
    demo.add_argument("--output", help="folder for the generated video and the level-map PNG (default: a new "
                      "temporary folder)")
    demo.set_defaults(func=_cmd_demo)

    ask = sub.add_parser("ask", help="answer a question about a local video with a Qwen-VL model, PSA or dense",
                         description="Load a Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3-VL-MoE model (checkpoint "
                         "folder, hub id or built-in name; the class follows the config's model_type), sample "
                         "and resize the video by the Qwen rules (--fps or --nframes, --max-pixels per frame), and "
                         "answer the question greedily with PSA or dense attention. Prints the answer, the number of "
                         "(visual) tokens, the prefill time (to the first token), the decode time per further token "
                         "and the prefill's mean PSA sparsity, or why PSA did not run. --model, --preset, --override "
                         "and --nframes are checked before the video is decoded.")
    ask.add_argument("question", help="the question, e.g. \"What happens after the door opens?\"")
    ask.add_argument("--model", required=True, help="checkpoint folder (with config.json) or hub id, e.g. "
                     "Qwen/Qwen2.5-VL-7B-Instruct, or a built-in model: tiny (the offline test model, random "
                     f"weights), vniah or vniah-coverage (the trained V-NIAH models), or a shape ({_SHAPE_NAMES}: the architecture "
                     "with random weights)")
    ask.add_argument("--video", required=True, help="local video file (anything decord reads: mp4, mkv, avi, ...)")
    ask.add_argument("--attn", choices=("psa", "sdpa"), default="psa", help="attention implementation (default: psa)")
    ask.add_argument("--preset", default=DEFAULT_PRESET, help=f"PSA preset name or YAML path (default: {DEFAULT_PRESET})")
    _override_arg(ask, "a preset field", "min_seq_len=0")
    ask.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video (default: 2)")
    ask.add_argument("--nframes", type=int, help="sample exactly this many frames instead of --fps: even and at "
                     "least 2 (Qwen-VL models group frames in pairs, one temporal patch per two frames)")
    ask.add_argument("--max-pixels", type=int, default=360 * 420,
                     help="pixel budget per frame; sides become multiples of 28 (Qwen3-VL: 32) (default: 151200, "
                     "the Qwen video default)")
    ask.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens to generate (default: 64)")
    _device_and_dtype(ask)
    ask.set_defaults(func=_cmd_ask)

    bench = sub.add_parser("bench", help="end-to-end prefill benchmark (time to first token, vision and "
                           "language parts), sdpa vs psa, on generated videos sized to target token counts",
                           description="Time to first token of a Qwen-VL model on generated videos sized to each "
                           "target number of language tokens: the whole prefill (TTFT), the language model's "
                           "part of it (CUDA events) and the rest (the vision tower), peak GPU memory and the "
                           "mean PSA sparsity, for sdpa, psa-off (the psa path with every call dense: batched "
                           "vision windows only), psa (the preset) and psa@S per --sparsity. Median of --repeats "
                           "runs after a warm-up. Prints a table; --output writes bench.json.")
    bench.add_argument("--model", default="qwen2.5-vl-7b",
                       help="checkpoint folder or hub id (needs weights), or a shape with random weights and "
                       f"the real architecture: {_SHAPE_NAMES} (default: qwen2.5-vl-7b), or tiny (the test model)")
    bench.add_argument("--lengths", default="16k,32k,64k,128k",
                       help="comma-separated target language-token counts, k = 1024 (default: 16k,32k,64k,128k)")
    bench.add_argument("--preset", default=DEFAULT_PRESET, help=f"PSA preset name or YAML path (default: {DEFAULT_PRESET})")
    _override_arg(bench, "a preset field", "min_seq_len=4096")
    bench.add_argument("--sparsity", action="append", type=float, metavar="S",
                       help="also run PSA at a fixed sparsity S in [0, 1) (quantile mode, the preset's other "
                       "settings; repeatable). Random weights attend almost uniformly, so the energy thresholds "
                       "keep most blocks; a fixed sparsity reproduces the cost of a real model's level maps "
                       "(the paper's Qwen2.5-VL-7B on Video-MME: 0.65)")
    _device_and_dtype(bench, default="bf16", what="weights and activations")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default: 3)")
    bench.add_argument("--attentions", metavar="LABELS",
                       help="comma-separated subset of the attentions to run, e.g. psa-off,psa@0.9 (default: all: "
                       "sdpa, psa-off, psa and psa@S per --sparsity); sdpa's slow per-window vision tower takes "
                       "most of a long run")
    bench.add_argument("--output", help="folder for bench.json")
    bench.set_defaults(func=_cmd_bench)

    ev = sub.add_parser("eval", help="long-video QA benchmarks (Video-MME, MLVU, LongVideoBench, "
                        "EgoSchema) through lm-eval with several attentions, resumable, one comparison report",
                        description="Answer the eval_tasks/ benchmarks (Video-MME, MLVU dev, LongVideoBench val, "
                        "EgoSchema subset) with each attention variant through lm-eval, writing per-sample answers "
                        "as they come (OUTPUT/<variant>/predictions.jsonl: rerun the same command to resume) and a "
                        "comparison report (OUTPUT/report.md, report.json): accuracy per task and category, the "
                        "difference to the first variant, mean PSA sparsity and prefill latency p50/p90. Data "
                        "folders: --data-dir or the PSA_VLM_<BENCHMARK>_DIR variables (docs/evaluation.md). "
                        "Several GPUs: `accelerate launch -m psa_vlm.cli eval ...` shards the samples.")
    ev.add_argument("--model", default="tiny", help="checkpoint folder or hub id of a Qwen2-VL, Qwen2.5-VL, "
                    f"Qwen3-VL or Qwen3-VL-MoE model, a shape ({_SHAPE_NAMES}: random weights) or tiny (default: "
                    "tiny, the offline test model)")
    ev.add_argument("--tasks", default="videomme", help="comma-separated: videomme, videomme_w_subtitle, mlvu_dev, "
                    "longvideobench_val, egoschema_subset (default: videomme)")
    ev.add_argument("--attn", default="sdpa,psa:video_mme", help="comma-separated variants: sdpa, eager, psa:PRESET "
                    "(default: sdpa,psa:video_mme)")
    ev.add_argument("--limit", type=int, help="at most this many questions per task (default: all)")
    ev.add_argument("--output", default="psa-eval", help="output folder (default: ./psa-eval)")
    ev.add_argument("--data-dir", action="append", metavar="BENCHMARK=PATH",
                    help="local folder of a benchmark (videomme, mlvu, longvideobench, egoschema), repeatable; "
                    "'synthetic' points all four at the small generated benchmark shipped in eval_tasks/synthetic")
    ev.add_argument("--batch-size", type=int, default=1, help="questions per generate call, left-padded (default: 1)")
    _device_and_dtype(ev)
    ev.add_argument("--device-map", help="e.g. auto: spread a model larger than one GPU over the visible GPUs")
    _override_arg(ev, "a field of every PSA preset", "min_seq_len=4096")
    ev.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: the task's, 16)")
    ev.set_defaults(func=_cmd_eval)

    lme = sub.add_parser("lm-eval", help="lm-eval's own command line, with psa-qwen2.5-vl and eval_tasks/ available",
                         description="Runs lm-eval's command line (the same subcommands and flags, e.g. `psa-vlm "
                         "lm-eval run --model psa-qwen2.5-vl --model_args pretrained=PATH,attn=psa,preset=video_mme "
                         "--tasks videomme`) after registering the psa-qwen2.5-vl model, which a plain `lm_eval` "
                         "cannot find (lm-eval 0.4 has no plugin entry point for models). Adds --include_path "
                         "with this package's eval_tasks/ unless given.")
    lme.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval")
    lme.set_defaults(func=_cmd_lm_eval)

    vn = sub.add_parser("vniah", help="video needle-in-a-haystack: accuracy vs sparsity, PSA vs binary block-sparse",
                        description="Answer a fixed, seeded set of generated needle questions (psa_vlm.needles) at "
                        "each video length with dense attention, the PSA presets, PSA at fixed sparsities and binary "
                        "block-sparse attention at the same FLOPs; the answer is the option letter with the highest "
                        "logit after the prompt. Prints accuracy with 95% intervals and the sparsity reached; "
                        "--output writes vniah.json, vniah.txt and vniah.png. PSA keeps every block holding "
                        "text at level 1, so the question reads the whole video densely; --override "
                        "dense_text=false lets the question's rows go sparse too (a stress setting).")
    vn.add_argument("--model", default="vniah", help="vniah (default: the trained V-NIAH model shipped with the "
                    "package, docs/quality.md), vniah-coverage (the shipped model trained on the majority questions, "
                    "whose answer needs the whole video), a checkpoint folder, or tiny (random weights: chance "
                    "accuracy)")
    vn.add_argument("--frames", default="32", help="comma-separated video lengths in frames, each even and at "
                    "least 2 (Qwen2.5-VL groups frames in pairs; default: 32)")
    vn.add_argument("--samples", type=int, default=64, help="questions per length (default: 64)")
    vn.add_argument("--kinds", help="needle questions: colour, shape, position, order, majority (several squares "
                    "over the whole video: which colour is shown most often?); comma-separated, taken in turn "
                    "(default: the kinds in the model's record.json, e.g. majority for vniah-coverage, else colour)")
    vn.add_argument("--size", default="224x224", help="frame HEIGHTxWIDTH in pixels (default: 224x224)")
    vn.add_argument("--presets", default=f"{DEFAULT_PRESET},fast", help=f"PSA presets to run (default: {DEFAULT_PRESET},fast)")
    vn.add_argument("--sparsity", default="0.5,0.65,0.8,0.9",
                    help="fixed sparsities for PSA and binary block-sparse (default: 0.5,0.65,0.8,0.9)")
    vn.add_argument("--policies", default="quantile,budget",
                    help="PSA's level assignments at each fixed sparsity: quantile (psa@S: fixed level fractions "
                    "1:1:1:2), budget (budget@S: the levels that keep the most attention for the FLOPs); "
                    "comma-separated (default: both)")
    _override_arg(vn, "a field of every PSA variant", "block_q=64")
    vn.add_argument("--batch-size", type=int, default=8, help="questions per forward (default: 8)")
    vn.add_argument("--workers", type=int, help="processes rendering the videos ahead of the model (default: every "
                    "core but one on a GPU, none on a CPU)")
    _device_and_dtype(vn)
    vn.add_argument("--output", help="folder for vniah.json, vniah.txt, vniah.png")
    vn.set_defaults(func=_cmd_vniah)

    tiny = sub.add_parser("tiny-model", help="write an offline tiny Qwen-VL model (Qwen2.5-VL by default) to a folder",
                          description="Write a tiny randomly initialised Qwen-VL model of --family (GQA text tower, "
                          "the family's vision tower), its byte-level BPE tokenizer and the family's processors to "
                          "DIRECTORY. Load it with from_pretrained(DIRECTORY, local_files_only=True) or pass it as "
                          "--model to ask and eval.")
    tiny.add_argument("directory", help="output folder (created if missing)")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default: 0)")
    tiny.add_argument("--family", choices=list(FAMILIES), default=DEFAULT_FAMILY,
                      help=f"model family, by its transformers model_type (default: {DEFAULT_FAMILY})")
    tiny.set_defaults(func=_cmd_tiny_model)

    presets = sub.add_parser("presets", help="list the shipped PSA presets", description="List the PSA presets "
                             "in configs/ with their descriptions. Pass a name or a YAML path wherever a preset "
                             "is asked for.")
    presets.set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad user input (or a missing file): one clear line
        print(f"psa-vlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
