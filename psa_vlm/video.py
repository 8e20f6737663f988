"""Load local videos and images for Qwen-VL models by qwen-vl-utils' rules, with clear errors.

Qwen2.5-VL was trained on frames prepared by ``qwen_vl_utils``: a video is sampled at a
target frame rate (or to an exact frame count), the count is even (two frames make one
temporal patch) and bounded, and every frame is resized so that both sides are multiples
of 28 (a 14-pixel patch merged 2x2) within a per-frame pixel range that also shrinks as
the frame count grows (a total pixel budget for the whole video). Qwen3-VL's 16-pixel patches
make that 32 (``factor``; the pixel ranges are token counts times ``factor ** 2``, as
qwen-vl-utils' ``image_patch_size`` does); :func:`video_inputs` takes it from the processor. Reproducing those
rules exactly matters: a different frame count or size changes the number of visual
tokens, and a wrong sampled frame rate changes ``second_per_grid_ts``, which sets the
temporal positions of 3-D RoPE.

This module re-implements those rules (qwen-vl-utils 0.0.14, decord reader) and adds what
a benchmark run needs from a loader: errors that name the file and say what is wrong
(missing, not a video, truncated, no frames, a bad time range), frames read and resized a
chunk at a time instead of all at full size at once, and helpers that turn a
(video, question) pair into the inputs of a loaded ``Qwen2_5_VLProcessor``.

Where qwen-vl-utils fails, this module goes on where the intent is clear, with a warning:

* a video with a single frame gives that frame twice (one temporal patch) instead of
  failing, because it has no other way to become a valid input;
* ``nframes`` above the frames available is clamped to them (qwen-vl-utils raises; with
  ``fps`` it clamps, as here);
* decoding errors raise :class:`VideoError` instead of silently retrying with
  torchvision.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------- rules

PATCH_FACTOR = 28  # vision patch 14 x spatial merge 2: frame sides are multiples of this
FRAME_FACTOR = 2  # temporal patch: frame counts are multiples of this
MAX_ASPECT_RATIO = 200

DEFAULT_FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

# Per-frame pixel range for videos (128 to 768 merged tokens) and the whole-video budget
# (90% of a 128k-token context), as in qwen-vl-utils. The budget is written as the same
# floating-point expression so that edge cases round the same way.
VIDEO_MIN_TOKENS, VIDEO_MAX_TOKENS, VIDEO_TOTAL_TOKENS = 128, 768, 128000
VIDEO_MIN_PIXELS = VIDEO_MIN_TOKENS * PATCH_FACTOR * PATCH_FACTOR
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKENS * PATCH_FACTOR * PATCH_FACTOR
VIDEO_TOTAL_PIXELS = VIDEO_TOTAL_TOKENS * PATCH_FACTOR * PATCH_FACTOR * 0.9

IMAGE_MIN_PIXELS = 4 * PATCH_FACTOR * PATCH_FACTOR
IMAGE_MAX_PIXELS = 16384 * PATCH_FACTOR * PATCH_FACTOR

BACKENDS = ("decord", "pyav")

# Frames are decoded and resized this many at a time, so a long video never exists as one
# full-resolution array (768 frames of 1080p would be 4.8 GB).
_READ_CHUNK = 32


class MediaError(ValueError):
    """A video or image file that cannot be used; the message names the file and what to do."""

    def __init__(self, path, problem: str, advice: str = ""):
        self.path = str(path)
        self.problem = problem
        message = f"{self.path}: {problem}"
        if advice:
            message += f". {advice}"
        super().__init__(message)


class VideoError(MediaError):
    """A video file that is missing, unreadable, or does not fit the request."""


class ImageError(MediaError):
    """An image file that is missing or unreadable."""


class VideoWarning(UserWarning):
    """The request was adjusted to what the file allows (clamped frame count, repeated frame...)."""


_REENCODE = "Re-download the file, or re-encode it (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4)"

logger = logging.getLogger(__name__)
_muted = threading.local()


@contextlib.contextmanager
def _native_stderr_muted():
    """Keep what FFmpeg and decord write straight to the stderr file descriptor ("[mov,mp4,...]
    moov atom not found", "video_reader.cc:83: ERROR opening ...") off the terminal while they
    probe or decode a file: :class:`VideoError` says what is wrong, in one line. Only the C
    libraries' output is affected (Python exceptions pass through; Python warnings are raised
    outside these blocks); what they wrote is logged at DEBUG level.

    File descriptor 2 is shared by the whole process, so keep the blocks short: anything else
    written to it meanwhile (another thread's output) is diverted too."""
    if getattr(_muted, "active", False):  # nested (a diagnosis inside a failed open): already muted
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr descriptor: nothing to mute
        yield
        return
    sink = tempfile.TemporaryFile()
    try:
        os.dup2(sink.fileno(), 2)
        _muted.active = True
        yield
    finally:
        _muted.active = False
        os.dup2(saved, 2)
        os.close(saved)
        sink.seek(0)
        said = sink.read().decode(errors="replace").strip()
        sink.close()
        if said:
            logger.debug("FFmpeg/decord output: %s", said)


def smart_resize(height: int, width: int, *, min_pixels: float, max_pixels: float,
                 factor: int = PATCH_FACTOR) -> tuple[int, int]:
    """Size ``(height, width)`` so both sides are multiples of ``factor`` within a pixel range.

    Sides are first rounded to the nearest multiple (Python's round, half to even, as
    qwen-vl-utils does); if the area then leaves ``[min_pixels, max_pixels]``, both sides
    are scaled by one factor that keeps the aspect ratio, rounding towards the range.
    Unlike qwen-vl-utils, a side never shrinks below ``factor`` (it would be 0 there only
    for extreme aspect ratios, where its resize then fails).
    """
    if height < 1 or width < 1:
        raise ValueError(f"need a positive size, got {height}x{width}")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must be at least min_pixels ({min_pixels})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio:.1f} ({height}x{width})")
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w


def sample_frame_count(total_frames: int, video_fps: float, *, fps: float | None = None, nframes: int | None = None,
                       min_frames: int = FPS_MIN_FRAMES, max_frames: int | None = None, source: str = "video") -> int:
    """How many frames to sample from ``total_frames`` frames playing at ``video_fps``.

    With ``nframes``: that count rounded to an even number. With ``fps`` (default 2): the
    frames that rate gives over the clip, kept within ``[min_frames, max_frames]`` (rounded
    up / down to even; ``max_frames`` defaults to 768) and the frames available, then
    rounded down to even. Always even and at least 2, so frames pair into temporal patches.

    A request for more frames than exist is clamped with a :class:`VideoWarning`. A
    1-frame clip gives 2 (the caller repeats the frame): there is no other valid input.
    """
    if total_frames < 1:
        raise ValueError(f"{source} has no frames")
    if fps is not None and nframes is not None:
        raise ValueError("give either fps or nframes, not both")
    if nframes is not None and nframes < FRAME_FACTOR:
        raise ValueError(f"nframes must be at least {FRAME_FACTOR} (one temporal patch), got {nframes}")
    fps = DEFAULT_FPS if fps is None and nframes is None else fps
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not video_fps > 0:
        raise ValueError(f"{source} has no usable frame rate ({video_fps})")
    if total_frames == 1:
        warnings.warn(f"{source} has a single frame; it is repeated to fill one temporal patch",
                      VideoWarning, stacklevel=3)
        return FRAME_FACTOR

    if nframes is not None:
        count = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
        available = total_frames // FRAME_FACTOR * FRAME_FACTOR
        if count > available:
            warnings.warn(f"{source}: asked for {nframes} frames but it has {total_frames}; using {available}",
                          VideoWarning, stacklevel=3)
            count = available
        return count

    lower = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    upper = min(FPS_MAX_FRAMES, total_frames) if max_frames is None else max_frames
    upper = math.floor(upper / FRAME_FACTOR) * FRAME_FACTOR
    wanted = total_frames / video_fps * fps
    if wanted > total_frames:
        warnings.warn(f"{source}: sampling at {fps:g} fps asks for {wanted:g} frames but it has {total_frames} "
                      f"(it plays at {video_fps:g} fps); using at most {total_frames}", VideoWarning, stacklevel=3)
    count = min(max(wanted, lower), upper, total_frames)
    count = math.floor(count / FRAME_FACTOR) * FRAME_FACTOR
    if count < FRAME_FACTOR:  # only when max_frames < 2 was asked for
        raise ValueError(f"{source}: max_frames={max_frames} leaves no frames to sample; use at least {FRAME_FACTOR}")
    return count


def frame_pixel_range(nframes: int, *, min_pixels: float | None = None, max_pixels: float | None = None,
                      total_pixels: float | None = None, factor: int = PATCH_FACTOR) -> tuple[float, float]:
    """The per-frame pixel range for a video of ``nframes`` sampled frames.

    The upper bound is the smallest of 768 tokens' worth of pixels, an even share of
    ``total_pixels`` per temporal patch, and the caller's ``max_pixels`` (a larger request
    is capped with a warning, as in qwen-vl-utils); the share never drops below 1.05 x
    ``min_pixels``, so very long videos still get usable frames. The defaults are token counts
    times ``factor ** 2`` (the pixels of one merged token).
    """
    min_pixels = VIDEO_MIN_TOKENS * factor * factor if min_pixels is None else min_pixels
    total_pixels = VIDEO_TOTAL_TOKENS * factor * factor * 0.9 if total_pixels is None else total_pixels
    limit = max(min(VIDEO_MAX_TOKENS * factor * factor, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    if max_pixels is None:
        return min_pixels, limit
    if max_pixels > limit:
        warnings.warn(f"max_pixels={max_pixels} exceeds the per-frame limit {limit:g} for {nframes} frames; "
                      f"using {limit:g}", VideoWarning, stacklevel=3)
    return min_pixels, min(max_pixels, limit)


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True, eq=False)
class LoadedVideo:
    """Sampled, resized frames of one video and what the processor needs to know about them.

    ``frames`` is ``[T, 3, H, W]`` uint8 (the values qwen-vl-utils returns as floats),
    T even. ``metadata`` is a ``transformers.VideoMetadata``-style dict in qwen-vl-utils'
    convention: ``total_num_frames`` counts the frames of the selected time range, so the
    processor's ``sampled_fps`` (len(frames_indices) / total_num_frames * fps) is the rate
    the frames were actually sampled at; ``frames_indices`` are frame numbers in the file.
    """

    path: Path | None  # None for frames given as an array
    frames: torch.Tensor = field(repr=False)
    metadata: dict[str, Any] = field(repr=False)
    video_frames: int  # frames in the whole file
    video_size: tuple[int, int]  # (height, width) in the file

    @property
    def fps(self) -> float:
        """Frame rate of the file."""
        return float(self.metadata["fps"])

    @property
    def sample_fps(self) -> float:
        """Frames per second of video time in ``frames``: what the processor calls ``sampled_fps``."""
        return len(self.metadata["frames_indices"]) / self.metadata["total_num_frames"] * self.fps

    def second_per_grid_ts(self, temporal_patch_size: int = FRAME_FACTOR) -> float:
        """Seconds of video per temporal patch, as the Qwen2.5-VL processor will compute it."""
        return temporal_patch_size / self.sample_fps


def load_video(path, *, fps: float | None = None, nframes: int | None = None, min_frames: int = FPS_MIN_FRAMES,
               max_frames: int | None = None, start: float | None = None, end: float | None = None,
               min_pixels: float | None = None, max_pixels: float | None = None,
               total_pixels: float | None = None, backend: str = "decord", progress: bool = False,
               factor: int = PATCH_FACTOR) -> LoadedVideo:
    """Read a local video, sample and resize its frames by qwen-vl-utils' rules.

    Sampling: ``fps`` (default 2) or ``nframes`` (see :func:`sample_frame_count`), spread
    evenly over the clip, or over ``[start, end]`` seconds when given (an ``end`` past the
    end of the video means its end). Size: :func:`frame_pixel_range` then
    :func:`smart_resize` to multiples of ``factor`` (28; Qwen3-VL: 32), bicubic with
    antialiasing. ``backend``: ``"decord"`` (what
    qwen-vl-utils uses) or ``"pyav"`` (no decord needed; decodes the file sequentially).
    ``progress`` shows a progress bar (stderr) while frames are decoded.

    Raises :class:`VideoError`, naming the file, when it is missing, not a video,
    truncated or corrupt, has no decodable frame, or the time range is empty or starts
    past its end.
    """
    path = _local_path(path, VideoError)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, value in (("start", start), ("end", end)):
        if value is not None and not value >= 0:
            raise VideoError(path, f"{name}={value} seconds is negative", "Give times in seconds from the start")
    if start is not None and end is not None and start >= end:
        raise VideoError(path, f"start={start} s is not before end={end} s", "Give a start before the end")
    _check_is_file(path, VideoError, "video")

    reader = _DecordReader(path) if backend == "decord" else _PyAVReader(path)
    first, last = _frame_range(path, reader.total_frames, reader.fps, start, end)
    clip_frames = last - first + 1
    count = sample_frame_count(clip_frames, reader.fps, fps=fps, nframes=nframes, min_frames=min_frames,
                               max_frames=max_frames, source=str(path))
    indices = torch.linspace(first, last, count).round().long().tolist()
    low, high = frame_pixel_range(count, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels,
                                  factor=factor)
    height, width = smart_resize(reader.height, reader.width, min_pixels=low, max_pixels=high, factor=factor)
    frames = _read_resized(reader, indices, height, width, desc=path.name if progress else None)
    metadata = {"fps": reader.fps, "frames_indices": indices, "total_num_frames": clip_frames,
                "video_backend": backend}
    return LoadedVideo(path=path, frames=frames, metadata=metadata, video_frames=reader.total_frames,
                       video_size=(reader.height, reader.width))


def load_image(path, *, min_pixels: float | None = None, max_pixels: float | None = None):
    """Read a local image as RGB and resize it by Qwen's rules (sides multiples of 28).

    Transparent pixels are composited on white (qwen-vl-utils does so for RGBA images; here
    also for grey+alpha and palette transparency). Returns a PIL image.
    Raises :class:`ImageError`, naming the file, when it is missing, not an image, or
    truncated.
    """
    from PIL import Image, ImageFile, UnidentifiedImageError

    path = _local_path(path, ImageError)
    _check_is_file(path, ImageError, "image")
    # Other libraries (lmms-eval among them) set Pillow's process-wide LOAD_TRUNCATED_IMAGES, which
    # would fill a cut image with grey silently: a truncated image is refused whatever it says.
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(path) as opened:
            opened.load()
            image = _to_rgb(opened)
    except UnidentifiedImageError as error:
        raise ImageError(path, "is not an image file Pillow can read", "Check the path and the file type") from error
    except (OSError, SyntaxError) as error:  # Pillow reports truncated data as OSError
        raise ImageError(path, f"is truncated or corrupt ({error})", "Re-download or re-save the image") from error
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    min_pixels = IMAGE_MIN_PIXELS if min_pixels is None else min_pixels
    max_pixels = IMAGE_MAX_PIXELS if max_pixels is None else max_pixels
    height, width = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    return image.resize((width, height), Image.Resampling.BICUBIC)


def _to_rgb(image):
    """RGB copy of a PIL image; transparency becomes white, not black."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _local_path(path, error_type) -> Path:
    """A ``Path`` from a path or ``file://`` string; URLs are refused with a clear error."""
    if isinstance(path, str):
        if path.startswith("file://"):
            path = path[len("file://"):]
        elif "://" in path:
            raise error_type(path, "is a URL; only local files are supported", "Download it first")
    return Path(os.fspath(path))


def _check_is_file(path: Path, error_type, kind: str) -> None:
    if not path.exists():
        raise error_type(path, f"{kind} file not found", "Check the path")
    if not path.is_file():
        raise error_type(path, f"is not a file (a directory?), so it cannot be a {kind}", "Check the path")
    if path.stat().st_size == 0:
        raise error_type(path, "is empty (0 bytes)", f"The {kind} was not written or copied completely")


def _frame_range(path: Path, total_frames: int, video_fps: float, start, end) -> tuple[int, int]:
    """First and last frame (inclusive) of ``[start, end]`` seconds, qwen-vl-utils' way.

    The start rounds up and the end down to frame times, and the end is clamped to the
    last frame; a start at or past the end of the video, or a range of less than two
    frames, is an error rather than an empty input.
    """
    if start is None and end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    if start is not None and start >= duration:
        raise VideoError(path, f"start={start} s is at or past the end of the video ({duration:.3f} s, "
                               f"{total_frames} frames at {video_fps:g} fps)", "Give a start inside the video")
    first = 0 if start is None else math.ceil(start * video_fps)
    last = total_frames - 1 if end is None else min(math.floor(min(end, duration) * video_fps), total_frames - 1)
    if first >= last:
        raise VideoError(path, f"the range start={start} s, end={end} s holds fewer than 2 frames "
                               f"(frames {first} to {last} at {video_fps:g} fps)", "Widen the range")
    return first, last


def _read_resized(reader, indices: list[int], height: int, width: int, desc: str | None = None) -> torch.Tensor:
    """Decode ``indices`` a chunk at a time and resize each chunk to ``height x width`` (with a
    progress bar labelled ``desc`` when given)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    out = torch.empty((len(indices), 3, height, width), dtype=torch.uint8)
    bar = None
    if desc is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc=f"decoding {desc}", unit="frame")
    try:
        for begin in range(0, len(indices), _READ_CHUNK):
            chunk = indices[begin:begin + _READ_CHUNK]
            array = reader.read(chunk)
            frames = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
            out[begin:begin + len(chunk)] = tvf.resize(frames, [height, width],
                                                       interpolation=InterpolationMode.BICUBIC, antialias=True)
            if bar is not None:
                bar.update(len(chunk))
    except BaseException:
        if bar is not None:  # clear the half-drawn bar: the error is printed on a line of its own
            bar.leave = False
            bar.close()
        raise
    if bar is not None:
        bar.close()
    return out


# --------------------------------------------------------------------------- readers


class _ArrayReader:
    """Frames already in memory (``[T, H, W, 3]`` uint8), read like a file."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def read(self, indices: list[int]) -> np.ndarray:
        return self.array[indices]


class _DecordReader:
    """decord's ``VideoReader``, with its failures turned into :class:`VideoError`."""

    def __init__(self, path: Path):
        import decord

        self.path = path
        try:
            with _native_stderr_muted():
                self._reader = decord.VideoReader(str(path))
        except Exception as error:  # decord raises RuntimeError or DECORDError with C++ text
            raise _diagnose(path, error) from error
        self.total_frames = len(self._reader)
        if self.total_frames == 0:
            raise VideoError(path, "has no decodable video frames (truncated or corrupt)", _REENCODE)
        self.fps = float(self._reader.get_avg_fps())
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise VideoError(path, f"reports no usable frame rate ({self.fps})", _REENCODE)
        self.height, self.width = self.read([0]).shape[1:3]
        _warn_if_shorter_than_declared(path, self.total_frames, self.fps)

    def read(self, indices: list[int]) -> np.ndarray:
        try:
            with _native_stderr_muted():
                batch = self._reader.get_batch(indices)
        except Exception as error:
            raise VideoError(path=self.path, problem=f"is truncated or corrupt: decoding frames "
                             f"{indices[0]}..{indices[-1]} failed ({_first_line(error)})", advice=_REENCODE) from error
        return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)


class _PyAVReader:
    """Sequential PyAV decoding: counts packets to know the frame count, decodes on read.

    Frames must be read in increasing order (``load_video`` does), so one pass over the
    file serves all chunks.
    """

    def __init__(self, path: Path):
        import av

        self.path = path
        try:
            with _native_stderr_muted():
                container = av.open(str(path))
        except Exception as error:
            raise _diagnose(path, error) from error
        with container:
            if not container.streams.video:
                raise VideoError(path, "has no video stream (audio only?)", "Pass a file with a video track")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else 0.0
            try:
                with _native_stderr_muted():
                    self.total_frames = sum(1 for packet in container.demux(stream) if packet.size)
            except Exception as error:
                raise _diagnose(path, error) from error
        if self.total_frames == 0:
            raise VideoError(path, "has no decodable video frames (truncated or corrupt)", _REENCODE)
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise VideoError(path, f"reports no usable frame rate ({self.fps})", _REENCODE)
        first = self._frames()
        try:
            with _native_stderr_muted():
                self.height, self.width = next(first).shape[:2]
        except StopIteration:
            raise VideoError(path, "has no decodable video frames (truncated or corrupt)", _REENCODE) from None
        except Exception as error:
            raise VideoError(path, f"has no decodable video frames (truncated or corrupt: {_first_line(error)})",
                             _REENCODE) from error
        finally:
            with _native_stderr_muted():
                first.close()
        self._decoded = None  # generator positioned after frame self._next
        self._next = 0
        _warn_if_shorter_than_declared(path, self.total_frames, self.fps)

    def _frames(self):
        import av

        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")

    def read(self, indices: list[int]) -> np.ndarray:
        if self._decoded is None or indices[0] < self._next - 1:
            self._decoded, self._next, self._last = self._frames(), 0, None
        out = []
        try:
            for index in indices:
                while self._next <= index:
                    with _native_stderr_muted():
                        self._last = next(self._decoded)
                    self._next += 1
                out.append(self._last)
        except StopIteration:
            raise VideoError(self.path, f"is truncated or corrupt: frame {index} of {self.total_frames} could not "
                                        "be decoded", _REENCODE) from None
        except Exception as error:
            raise VideoError(self.path, f"is truncated or corrupt: decoding frame {index} failed "
                                        f"({_first_line(error)})", _REENCODE) from error
        return np.stack(out)


# --------------------------------------------------------------------------- diagnosis


def _first_line(error: BaseException) -> str:
    """The first line of an error's text, without decord's "[time] source.cc:line: " prefix."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: (Error: )?", "", lines[0])[:200]


def _container_format(head: bytes) -> str | None:
    """The video container the first bytes of a file announce, if any.

    Tells a damaged video (a known signature, but FFmpeg cannot read it) from a file that
    was never a video (a text file named .mp4).
    """
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):
        return "MP4/QuickTime"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:3] == b"FLV":
        return "FLV"
    if head[:4] == b"OggS":
        return "Ogg"
    if head[:4] == b"\x00\x00\x01\xba":
        return "MPEG program stream"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "MPEG transport stream"
    if head[:8] == b"\x30\x26\xb2\x75\x8e\x66\xcf\x11":
        return "ASF/WMV"
    return None


def _diagnose(path: Path, cause: BaseException) -> VideoError:
    """Find out with PyAV why a video could not be opened, and say it plainly.

    decord's own messages are C++ check failures ("Check failed: avfilter_graph_create_filter
    ...") that do not say whether the file is not a video, damaged, or empty.
    """
    import av

    detail = _first_line(cause)
    with open(path, "rb") as handle:
        head = handle.read(512)
    with _native_stderr_muted():
        return _diagnose_with(av, path, head, detail)


def _diagnose_with(av, path: Path, head: bytes, detail: str) -> VideoError:
    """:func:`_diagnose`'s probe of the file with PyAV (``head``: its first bytes)."""
    try:
        container = av.open(str(path))
    except Exception as error:
        container_format = _container_format(head)
        if container_format is None:
            return VideoError(path, f"is not a video file that FFmpeg can read ({_first_line(error)})",
                              "Check the path and the file type")
        return VideoError(path, f"is a truncated or corrupt {container_format} file: its header cannot be read "
                                f"({_first_line(error)})", _REENCODE)
    with container:
        if not container.streams.video:
            return VideoError(path, "has no video stream (audio only?)", "Pass a file with a video track")
        try:
            for _ in container.decode(video=0):
                break
            else:
                return VideoError(path, "has no decodable video frames (truncated or corrupt)", _REENCODE)
        except Exception:
            return VideoError(path, "has no decodable video frames (truncated or corrupt)", _REENCODE)
    return VideoError(path, f"is truncated or corrupt: it cannot be read ({detail})", _REENCODE)


def _warn_if_shorter_than_declared(path: Path, frames: int, fps: float) -> None:
    """Warn when the readable frames cover much less time than the file's header declares.

    Some containers (Matroska) open fine when cut short and just report fewer frames, so a
    truncated download would otherwise pass silently as a shorter video. A warning, not an
    error: headers are sometimes wrong, and the frames that are there are valid. Skipped where
    PyAV is not installed (a declared dependency, but decord alone reads the frames).
    """
    try:
        import av
    except ImportError:
        return

    try:
        with _native_stderr_muted(), av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                declared = float(stream.duration * stream.time_base)
            elif container.duration is not None:  # Matroska keeps it per file (audio included)
                declared = container.duration / av.time_base
            else:
                return
    except Exception:
        return
    readable = frames / fps
    if readable < declared - max(1.0, 0.1 * declared):
        warnings.warn(f"{path}: its header declares {declared:.2f} s of video but only {frames} frames "
                      f"({readable:.2f} s) can be read; the file is probably truncated. {_REENCODE}",
                      VideoWarning, stacklevel=4)


# --------------------------------------------------------------------------- processor inputs


def question_messages(question: str, media: str = "video", system_prompt: str | None = None) -> list[dict]:
    """A single-turn chat: optional system prompt, then the video (or image) and the question."""
    if media not in ("video", "image"):
        raise ValueError(f"media must be 'video' or 'image', got {media!r}")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": [{"type": media}, {"type": "text", "text": question}]})
    return messages


def frames_from_array(frames, *, video_fps: float = DEFAULT_FPS, fps: float | None = None,
                      nframes: int | None = None, min_pixels: float | None = None, max_pixels: float | None = None,
                      total_pixels: float | None = None, factor: int = PATCH_FACTOR) -> LoadedVideo:
    """Sample and resize in-memory frames (uint8 ``[T, H, W, 3]`` playing at ``video_fps``) by the
    same rules as :func:`load_video` (:func:`sample_frame_count`, :func:`frame_pixel_range`,
    :func:`smart_resize`, bicubic with antialiasing). ``path`` of the result is None."""
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"frames must be a uint8 array [T, H, W, 3], got {array.dtype} {array.shape}")
    total, height, width = array.shape[:3]
    count = sample_frame_count(total, video_fps, fps=fps, nframes=nframes, source="frame array")
    indices = torch.linspace(0, total - 1, count).round().long().tolist()
    low, high = frame_pixel_range(count, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels,
                                  factor=factor)
    new_h, new_w = smart_resize(height, width, min_pixels=low, max_pixels=high, factor=factor)
    resized = _read_resized(_ArrayReader(array), indices, new_h, new_w)
    metadata = {"fps": float(video_fps), "frames_indices": indices, "total_num_frames": total,
                "video_backend": "ndarray"}
    return LoadedVideo(path=None, frames=resized, metadata=metadata, video_frames=total, video_size=(height, width))


def _as_list(value, kind: str) -> list:
    """One item or a list/tuple of items -> a list (an array of frames counts as one video)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"no {kind} given")
        return list(value)
    return [value]


def video_inputs(processor, videos, questions, *, fps: float | None = None, nframes: int | None = None,
                 video_fps: float = DEFAULT_FPS, min_pixels: float | None = None, max_pixels: float | None = None,
                 total_pixels: float | None = None, system_prompt: str | None = None, return_tensors: str = "pt",
                 **load_options):
    """Model inputs for (video, question) pairs as one left-padded batch: the one path from a video
    to a Qwen-VL model's inputs (``ask``, the demo, the benchmarks, V-NIAH and the lm-eval model).

    ``videos``: a path (read with :func:`load_video`, ``load_options`` passed on), a
    :class:`LoadedVideo`, a uint8 ``[T, H, W, 3]`` frame array playing at ``video_fps``
    (:func:`frames_from_array`), or a list of them; ``questions``: a string or a list (one video
    with several questions is shared by all of them). Frames are sampled at ``fps`` (default 2)
    or exactly ``nframes`` and sized by qwen-vl-utils' rules for the processor's patches
    (:func:`patch_factor`); a ``max_pixels`` below the default ``min_pixels`` lowers it too. The frames go in with their metadata and
    ``do_sample_frames=False``, so the processor neither resamples them nor guesses
    ``second_per_grid_ts``.

    Returns the processor's ``BatchFeature`` (``input_ids``, ``attention_mask``,
    ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``,
    ``mm_token_type_ids``), ready for ``model(**inputs)`` or ``model.generate(**inputs)``.
    """
    factor = patch_factor(processor)
    if max_pixels is not None and min_pixels is None:
        min_pixels = min(frame_pixel_range(FRAME_FACTOR, factor=factor)[0], max_pixels)
    video_list, question_list = _as_list(videos, "videos"), _as_list(questions, "questions")
    if len(video_list) == 1 and len(question_list) > 1:
        video_list = video_list * len(question_list)
    if len(video_list) != len(question_list):
        raise ValueError(f"got {len(video_list)} videos for {len(question_list)} questions")
    sizing = dict(fps=fps, nframes=nframes, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels)
    resize = dict(sizing, factor=factor)
    loaded = []
    for video in video_list:
        if isinstance(video, LoadedVideo):
            if load_options or any(v is not None for v in sizing.values()):
                raise ValueError("sampling or size options given with an already loaded video")
            loaded.append(video)
        elif isinstance(video, (str, os.PathLike)):
            loaded.append(load_video(video, **resize, **load_options))
        else:
            loaded.append(frames_from_array(video, video_fps=video_fps, **resize))
    texts = [processor.apply_chat_template(question_messages(q, "video", system_prompt), tokenize=False,
                                           add_generation_prompt=True) for q in question_list]
    return processor(text=texts, videos=[v.frames for v in loaded], video_metadata=[v.metadata for v in loaded],
                     do_sample_frames=False, padding=True, padding_side="left", return_tensors=return_tensors)


def patch_factor(processor) -> int:
    """Frame sides ``processor`` takes without resizing again: its patch merged 2 x 2 (28 for
    Qwen2/2.5-VL, 32 for Qwen3-VL)."""
    video = getattr(processor, "video_processor", None)
    patch, merge = getattr(video, "patch_size", None), getattr(video, "merge_size", None)
    return int(patch * merge) if patch and merge else PATCH_FACTOR


def image_question_inputs(processor, image, question: str, *, system_prompt: str | None = None,
                          return_tensors: str = "pt", **load_options):
    """Processor inputs for one (image, question) pair; ``image`` is a path or a PIL image."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = load_image(image, **load_options)
    elif load_options:
        raise ValueError(f"load options {sorted(load_options)} given with an already loaded image")
    text = processor.apply_chat_template(question_messages(question, "image", system_prompt), tokenize=False,
                                         add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors=return_tensors)


__all__ = [
    "BACKENDS",
    "ImageError",
    "LoadedVideo",
    "MediaError",
    "VideoError",
    "VideoWarning",
    "frame_pixel_range",
    "image_question_inputs",
    "load_image",
    "load_video",
    "patch_factor",
    "question_messages",
    "frames_from_array",
    "sample_frame_count",
    "smart_resize",
    "video_inputs",
]
