"""Video needle-in-a-haystack samples: long synthetic videos whose question needs a brief event.

Each video is a muted drifting texture with moving distractor discs (magenta, cyan, white,
orange: never a needle colour). A *needle* is shown for one temporal patch (two frames, so it
fills exactly one group of visual tokens) at a random time and place. Questions, four lettered
options each (answer uniformly distributed over A-D):

- ``colour``: "What colour was the square that appeared briefly?" (red, green, blue, yellow)
- ``shape``: "What shape was the red object that appeared briefly?" (square, circle, triangle, cross)
- ``position``: "Where did the red square appear?" (top left, top right, bottom left, bottom right)
- ``order``: two squares of different colours at different times: "Which colour appeared first?"
- ``majority`` (coverage): five squares, one in each fifth of the video, in different places; one
  colour is shown twice and each other colour once: "Which colour appears most often?" No one
  needle answers it: the answer needs every square, wherever it is in the video (missing one of
  the two squares of the answer's colour leaves a four-way tie).

Everything is deterministic from the seed. :func:`make_sample` renders in memory;
:func:`sample_inputs` sends the frames through the project's processor path (qwen-vl-utils'
sampling and resizing, the processor with the frames' metadata) so the benchmark exercises it;
:func:`write_mp4` writes a file for the video loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230), "yellow": (240, 220, 20)}
DISTRACTORS = ((220, 40, 220), (40, 220, 220), (240, 240, 240), (250, 140, 20))
SHAPES = ("square", "circle", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
KINDS = ("colour", "shape", "position", "order", "majority")
#: ``majority``: how often each colour is shown, the answer's first (five squares in all).
MAJORITY_COUNTS = (2, 1, 1, 1)
LETTERS = "ABCD"
QUESTIONS = {
    "colour": "A small square of one solid colour appears briefly in the video. What colour is it?",
    "shape": "A small red object appears briefly in the video. What shape is it?",
    "position": "A small red square appears briefly in the video. In which part of the frame does it appear?",
    "order": "Two small squares of different colours appear briefly, one after the other. Which colour appears first?",
    "majority": "Several small squares of solid colours appear briefly, one at a time, at different times and places. "
                "Which colour appears most often?",
}


@dataclass(frozen=True, eq=False)
class NeedleSample:
    """One question: frames ``[T, H, W, 3]`` uint8, the question, options, the answer letter,
    and where the needles are (``(frame, top, left, side)`` each) for checking and plots."""

    frames: np.ndarray = field(repr=False)
    kind: str
    question: str
    options: tuple[str, ...]
    answer: str
    needles: tuple[tuple[int, int, int, int], ...]
    seed: int

    @property
    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)]

    def prompt(self) -> str:
        """Question, lettered options and the instruction to answer with a letter."""
        from .evaluation.scoring import mc_prompt

        return mc_prompt(self.question, list(self.options))


def _background(rng, frames: int, height: int, width: int, distractors: int) -> np.ndarray:
    from .clips import bounce

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    freqs = rng.uniform(0.03, 0.12, size=(3, 2))
    phases = rng.uniform(0, 2 * np.pi, size=3)
    drift = rng.uniform(-1.0, 1.0, size=2)
    radius = rng.uniform(0.05, 0.09, size=distractors) * min(height, width)
    start = rng.uniform(0, 1, size=(distractors, 2)) * [height, width]
    speed = rng.uniform(-0.03, 0.03, size=(distractors, 2)) * [height, width]
    colour = rng.integers(0, len(DISTRACTORS), size=distractors)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        ys, xs = y + drift[0] * t, x + drift[1] * t
        texture = np.stack([np.sin(freqs[c, 0] * ys + freqs[c, 1] * xs + phases[c]) for c in range(3)], axis=-1)
        image = 120 + 25 * texture  # muted: never as saturated as a needle
        for k in range(distractors):
            cy, cx = bounce(start[k] + speed[k] * t, (height, width))
            image[(y - cy) ** 2 + (x - cx) ** 2 <= radius[k] ** 2] = DISTRACTORS[colour[k]]
        video[t] = np.clip(image, 0, 255).astype(np.uint8)
    return video


def _shape_mask(shape: str, side: int) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    c = side / 2
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return (y - c) ** 2 + (x - c) ** 2 <= c**2
    if shape == "triangle":  # apex up
        return np.abs(x - c) <= y / 2
    if shape == "cross":
        arm = side / 6
        return (np.abs(x - c) <= arm) | (np.abs(y - c) <= arm)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def make_sample(seed: int, *, frames: int = 64, size: tuple[int, int] = (224, 224), kind: str = "colour",
                distractors: int = 5) -> NeedleSample:
    """One deterministic needle question over a ``frames``-frame video of ``size`` (H, W)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if frames < 2 or frames % 2:
        raise ValueError(f"frames must be even and at least 2 (two per temporal patch), got {frames}")
    height, width = size
    if min(height, width) < 56:
        raise ValueError(f"frames must be at least 56 pixels on each side, got {height}x{width}")
    rng = np.random.default_rng(seed)
    video = _background(rng, frames, height, width, distractors)
    answer_index = int(rng.integers(4))
    side = int(rng.integers(20, 37) * min(height, width) / 224)
    patches = frames // 2

    def place(colour, shape="square", quadrant=None, patch=None):
        t = 2 * (int(rng.integers(patches)) if patch is None else patch)
        if quadrant is None:
            top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        else:  # inside the quadrant, away from the centre lines
            row, col = divmod(quadrant, 2)
            top = int(rng.integers(row * height // 2, (row + 1) * height // 2 - side))
            left = int(rng.integers(col * width // 2, (col + 1) * width // 2 - side))
        mask = _shape_mask(shape, side)
        for f in (t, t + 1):
            video[f, top : top + side, left : left + side][mask] = COLOURS[colour]
        return (t, top, left, side)

    names = list(COLOURS)
    if kind == "colour":
        needles = (place(names[answer_index]),)
        options = tuple(names)
    elif kind == "shape":
        needles = (place("red", SHAPES[answer_index]),)
        options = SHAPES
    elif kind == "position":
        needles = (place("red", quadrant=answer_index),)
        options = POSITIONS
    elif kind == "majority":
        needles = _place_spread(rng, video, side, [names[answer_index]] * MAJORITY_COUNTS[0] + [
            names[(answer_index + 1 + i) % 4] for i, n in enumerate(MAJORITY_COUNTS[1:]) for _ in range(n)])
        options = tuple(names)
    else:
        other = (answer_index + 1 + int(rng.integers(3))) % 4
        first, second = sorted(rng.choice(patches, size=2, replace=False).tolist())
        needles = (place(names[answer_index], patch=first), place(names[other], patch=second))
        options = tuple(names)
    return NeedleSample(frames=video, kind=kind, question=QUESTIONS[kind], options=tuple(options),
                        answer=LETTERS[answer_index], needles=needles, seed=seed)


def _place_spread(rng, video: np.ndarray, side: int, colours: list[str]) -> tuple:
    """Squares of ``colours`` in random order, the i-th in a random temporal patch of the i-th of
    ``len(colours)`` equal parts of the video (any patch when there are fewer patches than
    squares), each in its own cell of a 4x4 grid over the frame, so no two ever overlap."""
    frames, height, width = video.shape[:3]
    patches, n = frames // 2, len(colours)
    order = rng.permutation(n)
    cells = rng.choice(16, size=n, replace=False)
    cell_h, cell_w = height // 4, width // 4
    bounds = [i * patches // n for i in range(n + 1)]  # the parts' first patches
    needles = []
    for i, k in enumerate(order):
        patch = int(rng.integers(bounds[i], bounds[i + 1])) if patches >= n else int(rng.integers(patches))
        row, col = divmod(int(cells[i]), 4)
        top = row * cell_h + int(rng.integers(0, cell_h - side + 1))
        left = col * cell_w + int(rng.integers(0, cell_w - side + 1))
        video[2 * patch : 2 * patch + 2, top : top + side, left : left + side] = COLOURS[colours[k]]
        needles.append((2 * patch, top, left, side))
    return tuple(needles)


def sample_inputs(processor, samples, *, video_fps: float = 2.0, max_pixels: int | None = None):
    """Processor inputs (left-padded batch) for one sample or a list, every frame kept, through
    :func:`psa_vlm.video.video_inputs` (qwen-vl-utils' rules, the frames' metadata)."""
    from .video import video_inputs

    samples = [samples] if isinstance(samples, NeedleSample) else list(samples)
    frames = [s.frames for s in samples]
    pixels = max_pixels or max(f.shape[1] * f.shape[2] for f in frames)
    return video_inputs(processor, frames, [s.prompt() for s in samples], nframes=len(frames[0]),
                        video_fps=video_fps, min_pixels=min(56 * 56, pixels), max_pixels=pixels)


def render_batch(spec, processor=None):
    """One batch of questions as ``(answers, inputs)``: ``spec`` is ``(frames, [(seed, kind), ...],
    size)``; the inputs are :func:`sample_inputs`' tensors (a dict). The frames are dropped once
    the inputs exist."""
    frames, questions, size = spec
    samples = [make_sample(seed, frames=frames, size=tuple(size), kind=kind) for seed, kind in questions]
    return [s.answer for s in samples], dict(sample_inputs(processor or _WORKER_PROCESSOR, samples))


_WORKER_PROCESSOR = None  # a rendering worker's processor, set once per process


def _init_worker(processor) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = processor
    import torch

    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism


class _Here:
    """A batch rendered when asked for (no workers): the same interface as a pool's result."""

    def __init__(self, spec, processor):
        self.spec, self.processor = spec, processor

    def get(self):
        return render_batch(self.spec, self.processor)


class BatchRenderer:
    """Renders batches of needle questions (:func:`render_batch` specs) to processor inputs, in
    this process or ahead in ``workers`` spawned processes. Rendering a long video costs far more
    CPU time than the small V-NIAH model's forward on a GPU, so there the workers decide the
    speed. Spawned, not forked: the caller may hold a CUDA context. Use as a context manager."""

    def __init__(self, processor, workers: int = 0):
        if workers < 0:
            raise ValueError(f"workers must be 0 (render in this process) or more, got {workers}")
        self.processor, self.workers, self._pool = processor, workers, None

    def __enter__(self):
        if self.workers:
            import multiprocessing

            self._pool = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_init_worker,
                                                                  initargs=(self.processor,))
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def submit(self, spec):
        """Start rendering one batch; ``.get()`` on the result returns ``(answers, inputs)``."""
        if self._pool is None:
            return _Here(spec, self.processor)
        return self._pool.apply_async(render_batch, (spec,))

    def map(self, specs):
        """``(answers, inputs)`` for each spec, in order (rendered ahead when there are workers)."""
        if self._pool is None:
            return (render_batch(spec, self.processor) for spec in specs)
        return self._pool.imap(render_batch, specs)


def default_workers(device) -> int:
    """Rendering processes for a model on ``device``: on a GPU every core but one (the forward is
    cheap, rendering is not); on a CPU none (the forward needs the cores)."""
    import os

    import torch

    return max(0, (os.cpu_count() or 1) - 1) if torch.device(device).type == "cuda" else 0


def write_mp4(sample: NeedleSample, path, *, fps: float = 2.0):
    """Write the sample's frames as an H.264 file (for the video loader and ``psa-vlm ask``)."""
    from .clips import write_video

    return write_video(path, sample.frames, fps=fps)
