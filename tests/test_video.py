"""Video completions: the fps keyword rewards get, mp4 / GIF files read back, frame strips, and the evaluation samples
of a video family (strips in samples/, videos beside them, wandb.Video from the file)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from trl_flow import video
from trl_flow.callbacks import EvalSample, EvalSamplesCallback, log_samples_to_trackers
from trl_flow.rewards import validated_reward_func


def make_video(num_frames: int, size: tuple[int, int] = (16, 12)) -> list[Image.Image]:
    """Frames whose red channel steps up by 20 per frame (distinct, so a dropped frame would show)."""
    return [Image.new("RGB", size, (20 * i, 100, 255 - 20 * i)) for i in range(num_frames)]


# ------------------------------------------------------------------------------------------------------ fps keyword
def test_a_video_reward_gets_fps_from_the_adapter_or_the_default():
    seen = []

    def reward(prompts, completions, **kwargs):
        seen.append(kwargs.get("fps"))
        return [0.0] * len(completions)

    videos, images = [make_video(3), make_video(3)], [Image.new("RGB", (4, 4))] * 2
    validated_reward_func(reward, SimpleNamespace(fps=24))(["a", "b"], videos)
    validated_reward_func(reward, SimpleNamespace())(["a", "b"], videos)  # a video family without an fps property
    validated_reward_func(reward, SimpleNamespace())(["a", "b"], images)  # an image family: no fps keyword
    validated_reward_func(reward, SimpleNamespace(fps=8.0))(["a", "b"], videos, fps=30.0)  # an explicit one wins
    assert seen == [24.0, video.DEFAULT_FPS, None, 30.0]
    assert isinstance(seen[0], float)


# ----------------------------------------------------------------------------------------------------- video files
def test_mp4_is_a_valid_file_with_every_frame(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as imageio

    frames = make_video(9, size=(15, 11))  # odd sizes: padded to even for H.264, not to 16
    path = video.write_video(frames, tmp_path / "clip", fps=8)
    assert path.suffix == ".mp4" and path.read_bytes()[4:8] == b"ftyp"
    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        decoded = [frame for frame in reader]
        assert reader.get_meta_data()["fps"] == 8
    finally:
        reader.close()
    assert len(decoded) == 9 and decoded[0].shape == (12, 16, 3)
    # The frames survive encoding in order (lossy, so only roughly): the red channel climbs 20 per frame.
    reds = [float(frame[:11, :15, 0].mean()) for frame in decoded]
    np.testing.assert_allclose(reds, [20 * i for i in range(9)], atol=8)
    assert not list(path.parent.glob("*partial*"))


def test_gif_fallback_when_ffmpeg_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(video, "_ffmpeg_available", lambda: False)
    path = video.write_video(make_video(5), tmp_path / "clip", fps=10)
    assert path.suffix == ".gif"
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (16, 12)
        assert gif.info["duration"] == 100
        gif.seek(4)
        assert gif.convert("RGB").getpixel((0, 0))[0] == pytest.approx(80, abs=4)
    with pytest.raises(ValueError, match="at least one frame"):
        video.write_video([], tmp_path / "empty", fps=10)


def test_frame_strip_samples_frames_evenly_and_keeps_first_and_last():
    strip = video.frame_strip(make_video(9), max_frames=3, min_height=24)  # frames 0, 4, 8, enlarged x2
    assert strip.size == (3 * 32, 24)
    assert [strip.getpixel((32 * i + 1, 1))[0] for i in range(3)] == [0, 80, 160]


# ------------------------------------------------------------------------------------------- evaluation samples
class _FakeWandb:
    def __init__(self):
        self.run, self.logged = object(), []

    def Image(self, image, caption=None):  # noqa: N802 - wandb's spelling
        return ("image", image.size, caption)

    def Video(self, path, caption=None):  # noqa: N802 - wandb's spelling
        return ("video", path, caption)

    def log(self, data, **kwargs):
        self.logged.append(data)


def test_video_samples_are_written_as_strips_and_videos_and_logged(tmp_path, monkeypatch):
    wandb = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setattr(video, "_ffmpeg_available", lambda: False)  # GIFs: fast, and readable with Pillow alone
    samples = [EvalSample(f"prompt {i}", make_video(4), 0.5 * i, {"motion": 0.5 * i}) for i in range(2)]
    trainer = SimpleNamespace(eval_samples=samples, callback_handler=SimpleNamespace(callbacks=[]), adapter=None)
    args = SimpleNamespace(output_dir=str(tmp_path), report_to=["wandb"], logging_dir=str(tmp_path))
    EvalSamplesCallback(trainer).on_evaluate(args, SimpleNamespace(global_step=3, is_world_process_zero=True), None)

    grid = tmp_path / "samples" / "eval_step_000003.png"
    with Image.open(grid) as png:  # one strip per row: 4 frames of 16x12 enlarged x6 to 64 px high (>= 128 wide)
        assert png.size == (4 * 16 * 6, 2 * 12 * 6)
    listing = json.loads(grid.with_suffix(".json").read_text())["samples"]
    assert [entry["video"] for entry in listing] == ["eval_step_000003/sample_00.gif", "eval_step_000003/sample_01.gif"]
    for entry in listing:
        with Image.open(grid.parent / entry["video"]) as gif:
            assert gif.n_frames == 4
            assert abs(gif.info["duration"] - 1000 / video.DEFAULT_FPS) <= 10  # GIF counts in 10 ms
    (logged,) = wandb.logged
    assert [item[0] for item in logged["eval/samples"]] == ["image", "image"]
    assert logged["eval/videos"] == [
        ("video", str(grid.parent / listing[i]["video"]), samples[i].caption()) for i in range(2)
    ]


class _FakeWriter:
    def __init__(self):
        self.calls = []

    def add_image(self, tag, array, step, dataformats):
        self.calls.append(("image", tag, array.shape))

    def add_text(self, tag, text, step):
        self.calls.append(("text", tag))

    def add_video(self, tag, clip, step, fps):
        self.calls.append(("video", tag, tuple(clip.shape), fps))


def test_tensorboard_gets_add_video_only_where_moviepy_imports(monkeypatch, tmp_path):
    samples = [EvalSample("p", make_video(3), 1.0)]
    grid = video.frame_strip(samples[0].image)
    files = [tmp_path / "v.gif"]
    writer = _FakeWriter()
    monkeypatch.setitem(sys.modules, "moviepy", None)  # an import of moviepy fails
    assert log_samples_to_trackers(samples, grid, 1, ["tensorboard"], writer, videos=files, fps=8.0) == ["tensorboard"]
    assert [call[0] for call in writer.calls] == ["image", "text"]
    monkeypatch.setitem(sys.modules, "moviepy", SimpleNamespace())
    writer.calls.clear()
    log_samples_to_trackers(samples, grid, 1, ["tensorboard"], writer, videos=files, fps=8.0)
    assert writer.calls[-1] == ("video", "eval/videos/0", (1, 3, 3, 12, 16), 8)
