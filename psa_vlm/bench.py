"""End-to-end prefill benchmark: time to first token with ``"sdpa"`` vs ``"psa"`` (``psa-vlm bench``).

For each target number of language tokens, a synthetic video is sized so that its visual tokens
reach the target (square frames of side ``28 * ceil(sqrt(L / 256))``, 32 for Qwen3-VL's patches,
two frames per temporal patch), and the same inputs are run through the model with each attention:

- ``ttft_ms``: the whole prefill forward (vision + language, logits of the last token only), i.e.
  the time to the first token (median wall time of ``--repeats`` runs after a warm-up);
- ``language_ms``: the language model's forward inside those runs (CUDA events around
  ``model.model.language_model``: its GPU time, median);
- ``vision_ms``: ``ttft_ms - language_ms``, the vision encoder and everything before the
  language model;
- peak GPU memory of the prefill and the mean PSA sparsity of the text layers.

The attentions compared (:func:`attention_variants`) are ``sdpa`` (transformers' own path),
``psa-off`` (the ``"psa"`` hook with every call dense), ``psa`` with the preset, and ``psa@S`` at
each fixed sparsity given (``--sparsity``). Under ``"psa"`` the vision tower attends in one
batched call per layer instead of one call per window (:mod:`psa_vlm.windows`), which is the
whole difference between ``sdpa`` and ``psa-off``; ``language_ratio`` isolates sparse attention.

Shapes use the released processors' own video pixel limits (4 to 16,384 merged tokens per frame)
without the total-video budget, so a video can reach 128k tokens.

``--model`` is a local checkpoint, a hub id (needs the weights) or a shape of
:data:`psa_vlm.models.SHAPES` (``qwen2.5-vl-7b``, ``qwen2-vl-7b``, ``qwen3-vl-8b``, ...): the real
architecture (layers, heads, hidden sizes, vision tower) with random weights and the offline tiny
tokenizer, so it runs on a machine without weights;
``tiny`` is the test model. Random weights give meaningless answers and real dense cost, but
their attention is nearly uniform, so energy thresholds keep most blocks: the ``psa@S`` rows give
the cost at the sparsity a trained model reaches.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .config import DEFAULT_PRESET
from .variants import PSA_OFF, parse_variants

def frames_for_tokens(tokens: int, factor: int = 28) -> tuple[int, int]:
    """(frame side in pixels, number of frames) whose visual tokens reach ``tokens``, for frame
    sides in multiples of ``factor`` (one merged token: 28 pixels, Qwen3-VL 32)."""
    if tokens < 64:
        raise ValueError(f"target token count must be at least 64, got {tokens}")
    side = factor * max(8, math.ceil(math.sqrt(tokens / 256)))
    per_group = (side // factor) ** 2  # merged tokens per temporal patch of two frames
    return side, 2 * math.ceil(tokens / per_group)


class _LanguageClock:
    """Times each forward of the language model inside a whole-model forward: CUDA events on a
    GPU (the language prefill's own GPU time, whatever the vision tower's Python loop costs),
    the wall clock on a CPU."""

    def __init__(self, language_model, cuda: bool):
        self.cuda, self.spans, self._start = cuda, [], None
        self._handles = [language_model.register_forward_pre_hook(self._begin),
                         language_model.register_forward_hook(self._end)]

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _begin(self, module, args):
        self._start = self._mark()

    def _end(self, module, args, output):
        self.spans.append((self._start, self._mark()))

    def take_ms(self) -> float:
        """Milliseconds of the last language forward; forgets all."""
        start, end = self.spans[-1]
        self.spans.clear()
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def close(self):
        for handle in self._handles:
            handle.remove()


def _timed_prefill(model, inputs, clock: _LanguageClock, device: str, repeats: int) -> tuple[float, float]:
    """Median (TTFT ms, language ms) of ``repeats`` prefills after one warm-up."""
    runs = []
    for i in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        total = (time.perf_counter() - start) * 1e3
        language = clock.take_ms()
        if i:
            runs.append((total, language))
    ttft = sorted(t for t, _ in runs)[len(runs) // 2]
    language = sorted(lang for _, lang in runs)[len(runs) // 2]
    return ttft, language


def attention_variants(preset=DEFAULT_PRESET, overrides=None, sparsities=()) -> dict:
    """``{label: PSAConfig or None}`` (:mod:`psa_vlm.variants`): ``sdpa`` (None, transformers' own
    path), ``psa-off`` (the ``"psa"`` hook running every call dense: separates the batched vision
    windows from sparse attention), ``psa`` with the preset (plus ``overrides``), and ``psa@S``
    for each fixed sparsity S."""
    labels = ["sdpa", PSA_OFF, "psa", *(f"psa@{s:g}" for s in sparsities)]
    return {label: v.config for label, v in parse_variants(labels, preset=preset, overrides=overrides).items()}


def run(spec: str, lengths, *, preset=DEFAULT_PRESET, overrides=None, sparsities=(), device="cuda",
        dtype=torch.bfloat16, repeats: int = 3, out_dir=None, progress=print, only=None) -> dict:
    """Benchmark ``spec`` at each target length; returns (and writes, with ``out_dir``) the report.

    ``only`` (labels of :func:`attention_variants`) runs a subset; an unknown label is a
    ``ValueError`` naming the available ones, raised before the model is built.

    Each row holds one entry per attention variant (see :func:`attention_variants`) with
    ``vision_ms``, ``ttft_ms``, ``language_ms``, ``peak_mb``, ``sparsity`` and, for PSA variants,
    ``ttft_ratio``, ``language_ratio`` and ``peak_ratio`` against ``sdpa``.
    """
    from . import mean_sparsity, reset_stats, use_attention
    from .clips import make_video_frames
    from .video import patch_factor, video_inputs

    variants = attention_variants(preset, overrides, sparsities)  # fails early on a bad preset
    if only is not None:
        unknown = [label for label in only if label not in variants]
        if unknown:
            raise ValueError(f"unknown attention(s) {unknown}; available: {', '.join(variants)} "
                             "(psa@S needs --sparsity S)")
        variants = {label: config for label, config in variants.items() if label in only}
    from .models import load_model

    model, processor = load_model(spec, device=device, dtype=dtype)
    cuda = device.startswith("cuda")
    report = dict(model=spec, device=torch.cuda.get_device_name() if cuda else device,
                  dtype=str(dtype).replace("torch.", ""), preset=preset, overrides=overrides or {},
                  attentions=list(variants), configs={k: v and v.to_dict() for k, v in variants.items()}, rows=[])
    for target in lengths:
        side, n_frames = frames_for_tokens(target, patch_factor(processor))
        progress(f"target {target} tokens: {n_frames} frames of {side}x{side}")
        frames = make_video_frames(n_frames, side, side, seed=0)
        inputs = video_inputs(processor, frames, "Describe the video.", nframes=n_frames, video_fps=2.0,
                              min_pixels=side * side, max_pixels=side * side).to(device)
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
        row = dict(target_tokens=target, tokens=int(inputs["input_ids"].shape[1]),
                   visual_tokens=int((inputs["mm_token_type_ids"] != 0).sum()), frames=n_frames, frame_side=side)
        for label, config in variants.items():
            use_attention(model, config)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if config is not None:
                reset_stats(model)
            clock = _LanguageClock(model.model.language_model, cuda)
            try:
                with torch.no_grad():
                    ttft_ms, language_ms = _timed_prefill(model, inputs, clock, device, repeats)
            finally:
                clock.close()
            vision_ms = ttft_ms - language_ms
            r = row[label] = dict(vision_ms=vision_ms, ttft_ms=ttft_ms, language_ms=language_ms,
                                  peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"),
                                  sparsity=None if config is None else mean_sparsity(model))
            if config is not None and "sdpa" in row:  # against transformers' own path
                base = row["sdpa"]
                r.update(ttft_ratio=ttft_ms / base["ttft_ms"], language_ratio=r["language_ms"] / base["language_ms"],
                         peak_ratio=r["peak_mb"] / base["peak_mb"])
            if config is not None and label != PSA_OFF and PSA_OFF in row:  # same vision path: PSA's own gain
                r.update(ttft_vs_off=ttft_ms / row[PSA_OFF]["ttft_ms"],
                         language_vs_off=r["language_ms"] / row[PSA_OFF]["language_ms"])
            progress(f"  {label:9s} vision {vision_ms:9.1f} ms  language {r['language_ms']:9.1f} ms  "
                     f"TTFT {ttft_ms:9.1f} ms  peak {r['peak_mb']:8.0f} MB  sparsity "
                     f"{'-' if r['sparsity'] is None else format(r['sparsity'], '.3f')}")
        report["rows"].append(row)
        if out_dir is not None:  # after every length: a run cut short keeps what it measured
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "bench.json").write_text(json.dumps(report, indent=1))
    return report


def table(report: dict) -> str:
    """The report as a plain-text table: ratios to ``sdpa`` (TTFT, language, peak memory) and to
    ``psa-off`` (TTFT, language: the same vision path, so sparse attention's own gain)."""
    keys = ("ttft_ratio", "language_ratio", "peak_ratio", "ttft_vs_off", "language_vs_off")
    heads = ("TTFT/sdpa", "lang/sdpa", "peak/sdpa", "TTFT/off", "lang/off")
    lines = [f"{'tokens':>7s} {'visual':>7s} {'attention':10s} {'vision ms':>10s} {'language ms':>12s} "
             f"{'TTFT ms':>10s} {'peak MB':>9s} {'sparsity':>8s} " + " ".join(f"{h:>9s}" for h in heads)]
    for row in report["rows"]:
        for label in report["attentions"]:
            if label not in row:
                continue
            r = row[label]
            sp = "-" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
            ratios = " ".join(f"{r[k]:9.3f}" if k in r else " " * 9 for k in keys)
            lines.append(f"{row['tokens']:7d} {row['visual_tokens']:7d} {label:10s} {r['vision_ms']:10.1f} "
                         f"{r['language_ms']:12.1f} {r['ttft_ms']:10.1f} {r['peak_mb']:9.0f} {sp:>8s} {ratios}")
    return "\n".join(lines)
