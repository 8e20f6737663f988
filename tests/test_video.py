"""``psa_vlm.video``: the loader must give exactly what qwen-vl-utils gives, and clear errors.

Videos are written here with PyAV (H.264 and MPEG-4, odd sizes, portrait, one frame) and
read both by ``load_video`` and by qwen-vl-utils' own ``fetch_video`` (decord reader) with
the same settings: frame counts, frame numbers, sizes, pixel values and the sampled frame
rate (hence ``second_per_grid_ts``) must agree. Broken files must raise ``VideoError``
naming the file.
"""

import math
import os
import random
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from psa_vlm import testing
from psa_vlm.video import (
    FPS_MAX_FRAMES,
    ImageError,
    LoadedVideo,
    VideoError,
    VideoWarning,
    frame_pixel_range,
    image_question_inputs,
    load_image,
    load_video,
    sample_frame_count,
    smart_resize,
    video_inputs,
)

qv = pytest.importorskip("qwen_vl_utils.vision_process")

# Small per-frame bounds (the tiny processor's) so frames stay small and tests stay fast;
# qwen-vl-utils' defaults (128..768 tokens a frame) are exercised by one case below.
SMALL = {"min_pixels": 56 * 56, "max_pixels": 224 * 224}


def write_video(path, *, frames, width, height, fps=4.0, codec="libx264", pix_fmt="yuv420p", seed=0,
                faststart=False):
    """Encode ``make_video_frames`` content; odd sizes need yuv444p for H.264 (yuv420p for MPEG-4 pads)."""
    import av

    options = {"movflags": "faststart"} if faststart else {}
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for index, image in enumerate(testing.make_video_frames(frames, height, width, seed=seed)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = index, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


# name: (codec, pix_fmt, width, height, frames, fps)
VIDEOS = {
    "h264_odd": ("libx264", "yuv444p", 97, 61, 23, 4.0),
    "mpeg4_odd": ("mpeg4", "yuv420p", 97, 61, 23, 4.0),
    "h264_portrait": ("libx264", "yuv420p", 60, 100, 30, 6.0),
    "mpeg4_portrait": ("mpeg4", "yuv420p", 60, 100, 17, 5.0),
    "h264_ntsc": ("libx264", "yuv420p", 64, 48, 45, 30000 / 1001),
    "one_frame": ("libx264", "yuv420p", 64, 48, 1, 4.0),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {
        name: write_video(folder / f"{name}.mp4", codec=codec, pix_fmt=pix_fmt, width=w, height=h, frames=n, fps=fps,
                          seed=index)
        for index, (name, (codec, pix_fmt, w, h, n, fps)) in enumerate(VIDEOS.items())
    }


@pytest.fixture(scope="module")
def qwen_fetch():
    """``fetch_video`` forced to its decord reader, returning (frames, metadata, sample_fps)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qv, "get_video_reader_backend", lambda: "decord")

        def fetch(path, **options):
            renamed = {"start": "video_start", "end": "video_end"}
            element = {"video": str(path), **{renamed.get(k, k): v for k, v in options.items()}}
            (frames, metadata), sample_fps = qv.fetch_video(element, return_video_metadata=True,
                                                            return_video_sample_fps=True)
            # On a decord failure fetch_video silently retries with torchvision: not a comparison.
            assert metadata["video_backend"] == "decord"
            return frames, metadata, sample_fps

        yield fetch


@pytest.fixture(scope="module")
def processor(tiny_processor):
    return tiny_processor


@pytest.fixture
def rng():
    """A fresh random generator per test; its seed is printed, and PSA_VLM_TEST_SEED replays one."""
    seed = int(os.environ.get("PSA_VLM_TEST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"random seed: {seed}")
    return random.Random(seed)


def assert_same_as_qwen(ours: LoadedVideo, theirs, context=""):
    frames, metadata, sample_fps = theirs
    assert tuple(ours.frames.shape) == tuple(frames.shape), context
    assert ours.frames.dtype == torch.uint8
    assert torch.equal(ours.frames.float(), frames), f"pixel values differ from qwen-vl-utils {context}"
    assert ours.metadata["frames_indices"] == list(metadata["frames_indices"]), context
    assert ours.metadata["total_num_frames"] == metadata["total_num_frames"], context
    assert ours.fps == pytest.approx(metadata["fps"], rel=1e-12), context
    assert ours.sample_fps == pytest.approx(sample_fps, rel=1e-12), context


# --------------------------------------------------------------------------- same as qwen-vl-utils

CASES = [
    ("h264_odd", {}),  # qwen-vl-utils' defaults: 2 fps, frames upscaled to >= 128 tokens
    ("h264_odd", {"fps": 2.0, **SMALL}),
    ("mpeg4_odd", {"fps": 1.0, **SMALL}),
    ("mpeg4_odd", {"nframes": 10, **SMALL}),
    ("h264_portrait", {"fps": 3.0, **SMALL}),
    ("mpeg4_portrait", {"nframes": 7, "min_pixels": 28 * 28, "max_pixels": 112 * 112}),
    ("h264_ntsc", {"fps": 2.0, "max_frames": 4, **SMALL}),
    ("h264_ntsc", {"fps": 8.0, "start": 0.2, "end": 1.05, **SMALL}),
    ("h264_portrait", {"fps": 2.0, "start": 1.0, **SMALL}),
    ("h264_portrait", {"fps": 2.0, "end": 2.5, **SMALL}),
    ("mpeg4_odd", {"fps": 4.0, "end": 100.0, **SMALL}),  # an end past the video means its end
    # a total pixel budget small enough to shrink every frame below max_pixels
    ("h264_odd", {"nframes": 12, "min_pixels": 28 * 28, "total_pixels": 12 * 28 * 56}),
]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'defaults'}"
                                                      for n, o in CASES])
def test_load_video_matches_qwen_vl_utils(videos, qwen_fetch, name, options):
    ours = load_video(videos[name], **options)
    assert_same_as_qwen(ours, qwen_fetch(videos[name], **options))
    count, _, height, width = ours.frames.shape
    assert count % 2 == 0 and height % 28 == 0 and width % 28 == 0
    assert ours.video_size == (VIDEOS[name][3], VIDEOS[name][2])


def test_random_settings_match_qwen_vl_utils(videos, qwen_fetch, rng):
    names = [name for name in VIDEOS if name != "one_frame"]
    for _ in range(6):
        name = rng.choice(names)
        total, native_fps = VIDEOS[name][4], VIDEOS[name][5]
        options = {"min_pixels": rng.choice([28 * 28, 56 * 56, 84 * 84])}
        # at least 56x56 more, so qwen-vl-utils never rounds a side down to 0 (ours keeps 28)
        options["max_pixels"] = options["min_pixels"] + rng.randrange(56 * 56, 200 * 200)
        if rng.random() < 0.5:
            options["nframes"] = rng.randrange(2, max(3, total // 8))  # fits any range drawn below
        else:
            options["fps"] = rng.uniform(0.3, native_fps)
            options["min_frames"] = rng.randrange(1, 8)
        if rng.random() < 0.5:
            duration = total / native_fps
            options["start"] = rng.uniform(0, duration / 3)
            options["end"] = rng.uniform(duration / 2, duration * 1.2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VideoWarning)
            ours = load_video(videos[name], **options)
        assert_same_as_qwen(ours, qwen_fetch(videos[name], **options), context=(name, options))


def test_reading_in_chunks_changes_nothing(videos, qwen_fetch, monkeypatch):
    """Frames are decoded and resized a chunk at a time; chunk edges must not show."""
    import psa_vlm.video as video

    monkeypatch.setattr(video, "_READ_CHUNK", 3)
    options = {"nframes": 16, **SMALL}
    ours = load_video(videos["mpeg4_odd"], **options)
    assert_same_as_qwen(ours, qwen_fetch(videos["mpeg4_odd"], **options))


def test_pyav_backend_agrees_with_decord(videos, monkeypatch):
    import psa_vlm.video as video

    monkeypatch.setattr(video, "_READ_CHUNK", 4)  # and chunk edges on the sequential decoder
    for name in ("h264_odd", "mpeg4_portrait", "h264_ntsc"):
        with_decord = load_video(videos[name], fps=3.0, **SMALL)
        with_pyav = load_video(videos[name], fps=3.0, backend="pyav", **SMALL)
        assert with_pyav.frames.shape == with_decord.frames.shape
        assert with_pyav.metadata["frames_indices"] == with_decord.metadata["frames_indices"]
        assert with_pyav.sample_fps == pytest.approx(with_decord.sample_fps)
        # Both decode with FFmpeg; only the YUV->RGB conversion may differ slightly.
        difference = (with_pyav.frames.float() - with_decord.frames.float()).abs().mean()
        assert difference < 3.0, f"{name}: mean pixel difference {difference:.2f}"


def test_frames_follow_the_video_in_time(videos):
    """Sampled frames are the ones at their frame numbers: later samples look like later frames."""
    path = videos["h264_portrait"]
    source = torch.from_numpy(testing.make_video_frames(30, 100, 60, seed=2)).permute(0, 3, 1, 2).float()
    loaded = load_video(path, nframes=6, min_pixels=56 * 112, max_pixels=56 * 112)  # 60x100 -> 56x112 (w x h)
    from torchvision.transforms.functional import resize

    reference = resize(source, list(loaded.frames.shape[-2:]), antialias=True)
    for position, index in enumerate(loaded.metadata["frames_indices"]):
        errors = (reference - loaded.frames[position].float()).abs().mean(dim=(1, 2, 3))
        assert int(errors.argmin()) == index


# --------------------------------------------------------------------------- the processor


def test_processor_inputs_have_the_right_second_per_grid_ts(videos, qwen_fetch, processor):
    options = {"fps": 8.0, "start": 0.2, "end": 1.05, **SMALL}
    inputs = video_inputs(processor, videos["h264_ntsc"], "What moves?", **options)
    frames, metadata, sample_fps = qwen_fetch(videos["h264_ntsc"], **options)

    temporal = processor.video_processor.temporal_patch_size
    assert inputs["second_per_grid_ts"] == pytest.approx([temporal / sample_fps])
    count, _, height, width = frames.shape
    grid = [math.ceil(count / temporal), height // 14, width // 14]
    assert inputs["video_grid_thw"].tolist() == [grid]
    video_token = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((inputs["input_ids"] == video_token).sum()) == math.prod(grid) // 4

    # Same pixels as qwen-vl-utils' float frames through the same processor.
    reference = processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[frames],
                          video_metadata=[metadata], do_sample_frames=False, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values_videos"], reference["pixel_values_videos"])
    assert reference["second_per_grid_ts"] == pytest.approx(inputs["second_per_grid_ts"])


def test_processor_inputs_from_a_loaded_video(videos, processor):
    loaded = load_video(videos["mpeg4_portrait"], nframes=4, **SMALL)
    inputs = video_inputs(processor, loaded, "Where does the disc go?", system_prompt="Be brief.")
    assert inputs["second_per_grid_ts"] == pytest.approx([loaded.second_per_grid_ts()])
    assert inputs["second_per_grid_ts"][0] == pytest.approx(2 / (4 / 17 * 5.0))  # 4 of 17 frames at 5 fps
    assert "Be brief." in processor.tokenizer.decode(inputs["input_ids"][0])
    with pytest.raises(ValueError, match="already loaded"):
        video_inputs(processor, loaded, "?", fps=1.0)


# --------------------------------------------------------------------------- frame counts


def test_one_frame_video_repeats_its_frame(videos, qwen_fetch):
    path = videos["one_frame"]
    with pytest.warns(VideoWarning, match="single frame"):
        loaded = load_video(path, **SMALL)
    assert loaded.frames.shape[0] == 2 and torch.equal(loaded.frames[0], loaded.frames[1])
    assert loaded.metadata["frames_indices"] == [0, 0]
    assert loaded.second_per_grid_ts() == pytest.approx(1 / 4.0)  # one patch spans the frame's 1/4 s
    with pytest.raises(Exception):  # qwen-vl-utils cannot sample an even count from one frame
        qwen_fetch(path, **SMALL)


def test_more_frames_than_exist_are_clamped_with_a_warning(videos, qwen_fetch):
    path = videos["mpeg4_portrait"]  # 17 frames at 5 fps
    with pytest.warns(VideoWarning, match="asked for 40 frames but it has 17"):
        loaded = load_video(path, nframes=40, **SMALL)
    assert loaded.frames.shape[0] == 16 and loaded.metadata["frames_indices"][-1] == 16

    # Asking for a rate above the video's: qwen-vl-utils also clamps, to the same frames.
    with pytest.warns(VideoWarning, match="asks for 68 frames but it has 17"):
        loaded = load_video(path, fps=20.0, **SMALL)
    assert_same_as_qwen(loaded, qwen_fetch(path, fps=20.0, **SMALL))


def test_sample_frame_count_matches_smart_nframes(rng):
    checked = 0
    while checked < 300:
        total, video_fps = rng.randrange(2, 3000), rng.uniform(1, 60)
        if rng.random() < 0.3:
            request = {"nframes": rng.randrange(2, total + 1)}
        else:
            request = {"fps": rng.uniform(0.1, 10), "min_frames": rng.randrange(1, 20)}
            if rng.random() < 0.3:
                request["max_frames"] = rng.randrange(2, 1000)
        try:
            expected = qv.smart_nframes(dict(request), total_frames=total, video_fps=video_fps)
        except ValueError:
            continue  # an odd nframes = total rounds up past the video: qwen-vl-utils raises, we clamp
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VideoWarning)  # rates above the video's: both clamp
            got = sample_frame_count(total, video_fps, **request)
        assert got == expected, (total, video_fps, request)
        checked += 1


def test_sample_frame_count_bounds():
    assert sample_frame_count(10_000, 30.0) == 666  # 2 fps for 333.3 s, rounded down to even
    assert sample_frame_count(30_000, 30.0) == FPS_MAX_FRAMES  # 2000 frames at 2 fps: capped
    assert sample_frame_count(3, 30.0) == 2  # fewer than min_frames: as many even frames as exist
    assert sample_frame_count(9, 1.0, fps=1.0, max_frames=5) == 4
    with pytest.raises(ValueError, match="either fps or nframes"):
        sample_frame_count(10, 1.0, fps=1.0, nframes=4)
    with pytest.raises(ValueError, match="nframes must be at least 2"):
        sample_frame_count(10, 1.0, nframes=1)
    with pytest.raises(ValueError, match="fps must be positive"):
        sample_frame_count(10, 1.0, fps=0.0)


# --------------------------------------------------------------------------- sizes


def test_smart_resize_matches_qwen_vl_utils(rng):
    for _ in range(2000):
        height, width = rng.randrange(1, 4000), rng.randrange(1, 4000)
        if max(height, width) / min(height, width) > 200:
            continue
        low = rng.randrange(1, 2000) * 28
        high = low + rng.randrange(0, 20000) * 28
        expected = qv.smart_resize(height, width, factor=28, min_pixels=low, max_pixels=high)
        if 0 in expected:
            continue  # qwen-vl-utils collapses a side to 0 here; ours keeps at least 28
        got = smart_resize(height, width, min_pixels=low, max_pixels=high)
        assert got == expected, (height, width, low, high)
        assert got[0] % 28 == 0 and got[1] % 28 == 0


def test_smart_resize_keeps_the_pixel_range_and_refuses_extremes(rng):
    for _ in range(500):
        height, width = rng.randrange(28, 3000), rng.randrange(28, 3000)
        if max(height, width) / min(height, width) > 50:
            continue
        low, high = 56 * 56, 448 * 448
        new_h, new_w = smart_resize(height, width, min_pixels=low, max_pixels=high)
        assert low <= new_h * new_w <= high, (height, width, new_h, new_w)
    assert smart_resize(20, 3000, min_pixels=28 * 28, max_pixels=28 * 28 * 4)[0] == 28  # qwen-vl-utils: 0
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100, min_pixels=28 * 28, max_pixels=10**6)
    with pytest.raises(ValueError, match="at least min_pixels"):
        smart_resize(100, 100, min_pixels=10**5, max_pixels=10**4)


def test_frame_pixel_range_shares_the_total_budget():
    assert frame_pixel_range(8) == (128 * 784, 768 * 784)  # short video: the per-frame cap
    _, share = frame_pixel_range(768)  # long video: an even share of 90% of 128k tokens per frame pair
    assert share == pytest.approx(128000 * 784 * 0.9 / 768 * 2)
    assert frame_pixel_range(10**6)[1] == int(128 * 784 * 1.05)  # never below 1.05 x min_pixels
    with pytest.warns(VideoWarning, match="exceeds the per-frame limit"):
        assert frame_pixel_range(8, max_pixels=10**7)[1] == 768 * 784


# --------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    good = write_video(folder / "good.mp4", frames=12, width=64, height=48).read_bytes()
    fast = write_video(folder / "fast.mp4", frames=12, width=64, height=48, faststart=True).read_bytes()
    files = {
        "missing": folder / "missing.mp4",
        "directory": folder,
        "empty": folder / "empty.mp4",
        "text": folder / "notes.mp4",
        "truncated": folder / "truncated.mp4",  # moov (the index) at the end: cut off
        "truncated_data": folder / "truncated_data.mp4",  # index first, frame data cut
        "no_frames": folder / "no_frames.mp4",  # index first, no frame data at all
        "audio_only": folder / "audio.mp4",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("This is a text file, not a video.\n" * 20)
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["truncated_data"].write_bytes(fast[: int(len(fast) * 0.7)])
    files["no_frames"].write_bytes(fast[: fast.index(b"mdat") + 4])
    _write_audio(files["audio_only"])
    return files


def _write_audio(path):
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


BAD = {
    "missing": "video file not found",
    "directory": "is not a file",
    "empty": "is empty",
    "text": "is not a video file",
    "truncated": "truncated or corrupt MP4",
    "truncated_data": "truncated or corrupt",
    "no_frames": "no decodable video frames",
    "audio_only": "no video stream",
}


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files_raise_a_clear_error(bad_files, kind, backend):
    path = bad_files[kind]
    with pytest.raises(VideoError, match=BAD[kind]) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoWarning)  # pyav may first warn that the file looks cut short
        load_video(path, backend=backend, **SMALL)
    assert str(path) in str(caught.value)
    assert caught.value.path == str(path)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_bad_files_leave_nothing_of_ffmpeg_or_decord_on_stderr(bad_files, backend, capfd):
    """FFmpeg and decord write to the stderr descriptor itself; only the VideoError may speak."""
    for kind in ("text", "truncated", "truncated_data", "no_frames"):
        with pytest.raises(VideoError), warnings.catch_warnings():
            warnings.simplefilter("ignore", VideoWarning)
            load_video(bad_files[kind], backend=backend, **SMALL)
        out, err = capfd.readouterr()
        assert err == "", (kind, err)


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_ask_on_a_bad_video_prints_one_line(bad_files, kind):
    """What a user sees: `psa-vlm ask` on a text file named .mp4 or a cut mp4 prints one line."""
    import subprocess
    import sys
    from pathlib import Path

    path = bad_files[kind]
    res = subprocess.run([sys.executable, "-m", "psa_vlm.cli", "ask", "--model", "tiny", "--video", str(path), "why?"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"psa-vlm ask: error: {path}: ") and BAD[kind] in lines[0]


@pytest.mark.parametrize("range_, message", [
    ({"start": 2.0, "end": 2.0}, "is not before end"),
    ({"start": 2.5, "end": 1.0}, "is not before end"),
    ({"start": 3.0}, "at or past the end of the video"),  # 12 frames at 4 fps: 3 s
    ({"start": 50.0, "end": 60.0}, "at or past the end of the video"),
    ({"start": 1.0, "end": 1.1}, "fewer than 2 frames"),
    ({"start": -1.0}, "negative"),
])
def test_bad_time_ranges_raise_a_clear_error(bad_files, range_, message):
    path = bad_files["directory"] / "good.mp4"
    with pytest.raises(VideoError, match=message) as caught:
        load_video(path, **range_, **SMALL)
    assert str(path) in str(caught.value)


def test_partly_readable_video_warns_that_it_is_truncated(tmp_path):
    """A cut Matroska file opens and just looks shorter; its header still tells the truth."""
    data = write_video(tmp_path / "full.mkv", frames=60, width=64, height=48).read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.warns(VideoWarning, match="probably truncated"):
        loaded = load_video(cut, **SMALL)
    assert 0 < loaded.video_frames < 60
    with warnings.catch_warnings():
        warnings.simplefilter("error", VideoWarning)
        load_video(tmp_path / "full.mkv", **SMALL)  # the complete file: no warning


def test_without_pyav_decord_still_reads_and_the_header_check_is_skipped(tmp_path, monkeypatch):
    """PyAV only serves the truncation check (and the fallback reader): a machine without it
    (seen on the GPU machine) must still load videos with decord."""
    import sys

    data = write_video(tmp_path / "full.mkv", frames=60, width=64, height=48).read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("error", VideoWarning)
        loaded = load_video(cut, backend="decord", **SMALL)
    assert 0 < loaded.video_frames < 60


def test_urls_are_refused_and_file_urls_accepted(videos):
    with pytest.raises(VideoError, match="only local files"):
        load_video("https://example.com/video.mp4")
    loaded = load_video(f"file://{videos['h264_odd']}", nframes=2, **SMALL)
    assert loaded.frames.shape[0] == 2


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    pixels = testing.make_video_frames(1, 61, 97, seed=7)[0]
    rgba = np.concatenate([pixels, np.random.default_rng(0).integers(0, 256, (61, 97, 1), dtype=np.uint8)], -1)
    files = {"png": folder / "odd.png", "jpeg": folder / "portrait.jpg", "rgba": folder / "alpha.png"}
    Image.fromarray(pixels).save(files["png"])
    Image.fromarray(pixels.transpose(1, 0, 2).copy()).save(files["jpeg"], quality=90)
    Image.fromarray(rgba).save(files["rgba"])
    data = files["png"].read_bytes()
    files["truncated"] = folder / "cut.png"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"] = folder / "notes.png"
    files["text"].write_text("not an image\n")
    return files


@pytest.mark.parametrize("kind", ["png", "jpeg", "rgba"])
@pytest.mark.parametrize("bounds", [{}, {"min_pixels": 56 * 56, "max_pixels": 112 * 112}])
def test_load_image_matches_qwen_vl_utils(images, kind, bounds):
    ours = load_image(images[kind], **bounds)
    theirs = qv.fetch_image({"image": str(images[kind]), **bounds})
    assert ours.mode == "RGB" and ours.size == theirs.size
    assert ours.size[0] % 28 == 0 and ours.size[1] % 28 == 0
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("kind, message", [("truncated", "truncated or corrupt"), ("text", "not an image file")])
def test_bad_images_raise_a_clear_error(images, kind, message):
    with pytest.raises(ImageError, match=message) as caught:
        load_image(images[kind])
    assert str(images[kind]) in str(caught.value)
    with pytest.raises(ImageError, match="not found"):
        load_image(images[kind].with_name("absent.png"))


def test_image_processor_inputs(images, processor):
    inputs = image_question_inputs(processor, images["png"], "What colour is the disc?",
                                   min_pixels=56 * 56, max_pixels=112 * 112)
    width, height = load_image(images["png"], min_pixels=56 * 56, max_pixels=112 * 112).size
    grid = [1, height // 14, width // 14]
    assert inputs["image_grid_thw"].tolist() == [grid]
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_token).sum()) == math.prod(grid) // 4
