"""Generated video clips: synthetic frames (a drifting texture with moving, bouncing shapes) and
their encoding to mp4 with PyAV. Deterministic from a seed; used by the demo, the benchmarks, the
V-NIAH needles and the synthetic evaluation data."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def make_video_frames(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Synthesise ``[frames, height, width, 3]`` uint8 RGB frames, deterministic from ``seed``.

    A muted sinusoidal texture drifts slowly while a few saturated discs and squares move
    and bounce, so consecutive frames differ, frames have spatial structure (not flat
    colour a codec would erase), and objects are easy to tell from the background.
    """
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"need a positive frame count and size, got {frames} frames of {height}x{width}")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    freqs = rng.uniform(0.03, 0.15, size=(3, 2))
    phases = rng.uniform(0, 2 * np.pi, size=3)
    drift = rng.uniform(-1.5, 1.5, size=2)

    n_shapes = 4
    colours = rng.integers(0, 2, size=(n_shapes, 3)) * 200 + 40
    colours[np.all(colours == colours[:, :1], axis=1), 0] = 240  # avoid grey: force some red
    radius = rng.uniform(0.08, 0.16, size=n_shapes) * min(height, width)
    start = rng.uniform(0, 1, size=(n_shapes, 2)) * [height, width]
    speed = rng.uniform(-0.08, 0.08, size=(n_shapes, 2)) * [height, width]
    is_square = rng.integers(0, 2, size=n_shapes).astype(bool)

    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        ys, xs = y + drift[0] * t, x + drift[1] * t
        background = np.stack(
            [np.sin(freqs[c, 0] * ys + freqs[c, 1] * xs + phases[c]) for c in range(3)], axis=-1
        )
        image = 110 + 40 * background
        for k in range(n_shapes):
            cy, cx = bounce(start[k] + speed[k] * t, (height, width))
            if is_square[k]:
                inside = (np.abs(y - cy) <= radius[k]) & (np.abs(x - cx) <= radius[k])
            else:
                inside = (y - cy) ** 2 + (x - cx) ** 2 <= radius[k] ** 2
            image[inside] = colours[k]
        video[t] = np.clip(image, 0, 255).astype(np.uint8)
    return video


def bounce(position: np.ndarray, size: tuple[int, int]) -> tuple[float, float]:
    """Reflect a free-moving point off the frame borders (a triangle wave per axis)."""
    out = []
    for p, n in zip(position, size):
        period = 2 * max(n - 1, 1)
        p = p % period
        out.append(p if p < n else period - p)
    return out[0], out[1]


_ENCODERS = {"h264": "libx264", "libx264": "libx264", "mpeg4": "mpeg4"}


def make_video(path, *, frames: int = 16, width: int = 112, height: int = 84, fps: float = 4.0,
               codec: str = "h264", seed: int = 0) -> Path:
    """Write a small synthetic video (``make_video_frames``) with PyAV and return its path.

    ``codec`` is ``"h264"`` (libx264) or ``"mpeg4"``; both use yuv420p, which every
    decoder reads, and which needs even width and height.
    """
    if width % 2 or height % 2:
        raise ValueError(f"yuv420p video needs an even width and height, got {width}x{height}")
    return write_video(path, make_video_frames(frames, height, width, seed), fps=fps, codec=codec)


def write_video(path, pixels: np.ndarray, *, fps: float = 4.0, codec: str = "h264") -> Path:
    """Encode uint8 frames ``[T, H, W, 3]`` (even H and W) to ``path`` with PyAV."""
    import av

    if codec not in _ENCODERS:
        raise ValueError(f"codec must be one of {sorted(_ENCODERS)}, got {codec!r}")
    _, height, width, _ = pixels.shape
    if width % 2 or height % 2:
        raise ValueError(f"yuv420p video needs an even width and height, got {width}x{height}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(_ENCODERS[codec], rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec != "mpeg4":
            stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        else:
            stream.codec_context.bit_rate = 2_000_000
        for index, image in enumerate(pixels):
            # Explicit pts: without them a second identical file written in the same process
            # came out with different bytes (PyAV's automatic timestamps).
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1) / stream.average_rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush delayed frames
    return path
