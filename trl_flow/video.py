"""Video completions: how they are recognised, their frame rate, and how they are written out.

A video family's completion is the list of its frames (RGB PIL images), as diffusers' ``output_type="pil"`` returns
a video. Rewards get those lists and the frame rate as the keyword argument ``fps`` ([`reward_fps`]). Evaluation
videos are written as mp4 (imageio with the ffmpeg binary of the ``imageio-ffmpeg`` wheel: ``pip install
'trl-flow[video]'``), or as GIF (Pillow only) when ffmpeg is unavailable ([`write_video`]); a frame strip
([`frame_strip`]) shows a video in one PNG.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_FPS",
    "frame_strip",
    "frames_of",
    "is_video",
    "reward_fps",
    "video_data_url",
    "write_mp4_file",
    "write_video",
]

logger = logging.getLogger(__name__)

DEFAULT_FPS = 16.0
"""Frame rate of a video family whose adapter does not state one (Wan's examples export at 16 fps)."""


def is_video(completion: Any) -> bool:
    """Whether a completion is a video: a list (or tuple) of frames rather than one image."""
    return isinstance(completion, (list, tuple))


def frames_of(completion: Any) -> list[Any]:
    """The frames of a completion: a video's list of frames, or an image as a one-frame video."""
    return list(completion) if is_video(completion) else [completion]


def reward_fps(adapter: Any, completions: Sequence[Any]) -> float | None:
    """The ``fps`` keyword a reward call gets: the adapter's ``fps`` when it has one (a video family), else
    [`DEFAULT_FPS`] when the completions are videos; None (no keyword) for an image family."""
    fps = getattr(adapter, "fps", None)
    if fps is not None:
        return float(fps)
    if len(completions) > 0 and is_video(completions[0]):
        return DEFAULT_FPS
    return None


def _rgb_frames(frames: Sequence[Any]) -> list[Image.Image]:
    from reward_funcs._common import to_pil_rgb

    if len(frames) == 0:
        raise ValueError("a video needs at least one frame")
    return [to_pil_rgb(frame) for frame in frames]


def frame_strip(frames: Sequence[Any], max_frames: int = 8, min_height: int = 64) -> Image.Image:
    """One RGB image of up to ``max_frames`` evenly spaced frames side by side (first and last included); tiny frames
    are enlarged (nearest neighbour) to ``min_height`` so a 16 px test video stays visible."""
    from PIL import Image  # not at import: the reward server and remote rewards import this module

    images = _rgb_frames(frames)
    if len(images) > max_frames:
        picks = np.linspace(0, len(images) - 1, max_frames).round().astype(int)
        images = [images[i] for i in picks]
    width, height = images[0].size
    scale = max(1, -(-min_height // height))
    strip = Image.new("RGB", (width * scale * len(images), height * scale), "white")
    for index, image in enumerate(images):
        if scale > 1:
            image = image.resize((width * scale, height * scale), Image.NEAREST)
        strip.paste(image, (index * width * scale, 0))
    return strip


def _ffmpeg_available() -> bool:
    try:
        import imageio_ffmpeg

        return bool(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception:  # not installed, or no binary for this platform
        return False


def write_video(frames: Sequence[Any], path: str | os.PathLike[str], fps: float, prefer: str = "mp4") -> Path:
    """Write ``frames`` as ``path`` with the suffix ``.mp4`` (H.264 through imageio-ffmpeg) or, when ffmpeg is
    unavailable or ``prefer="gif"``, ``.gif`` (Pillow, looping). Returns the written file's path.

    The file appears complete or not at all (written under a temporary name, then renamed). Frames keep their size:
    no macro-block padding, so a 16 px test video stays 16 px (odd sizes are padded by one pixel for H.264's 4:2:0
    chroma).
    """
    if prefer not in ("mp4", "gif"):
        raise ValueError(f"prefer must be 'mp4' or 'gif', not {prefer!r}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    images = _rgb_frames(frames)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if prefer == "mp4" and _ffmpeg_available():
        destination = target.with_suffix(".mp4")
        partial = destination.with_name(destination.stem + ".partial.mp4")  # ffmpeg picks the muxer by suffix
        try:
            _write_mp4(images, partial, fps)
            os.replace(partial, destination)
            return destination
        except Exception as error:  # a broken ffmpeg must not lose the evaluation: GIF instead
            partial.unlink(missing_ok=True)
            logger.warning(f"writing {destination} with ffmpeg failed ({type(error).__name__}: {error}); GIF instead")
    destination = target.with_suffix(".gif")
    partial = destination.with_name(destination.name + ".partial")
    duration_ms = max(int(round(1000.0 / fps)), 20)  # GIF counts in 10 ms; browsers clamp below 20 ms
    images[0].save(
        partial, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0, disposal=1
    )
    os.replace(partial, destination)
    return destination


def _write_mp4(images: list[Image.Image], path: Path, fps: float) -> None:
    import imageio.v2 as imageio
    from PIL import Image

    width, height = images[0].size
    even = (width + width % 2, height + height % 2)  # yuv420p needs even sizes
    writer = imageio.get_writer(
        str(path), format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1, pixelformat="yuv420p"
    )
    try:
        for image in images:
            if image.size != even:
                padded = Image.new("RGB", even)
                padded.paste(image)
                image = padded
            writer.append_data(np.asarray(image))
    finally:
        writer.close()


def write_mp4_file(frames: Sequence[Any], path: str | os.PathLike[str], fps: float) -> Path:
    """Write ``frames`` as an mp4 at ``path`` (suffix ``.mp4``), for consumers that need that format.

    Raises:
        UserInputError: ffmpeg is unavailable (``pip install 'trl-flow[video]'``).
    """
    from .errors import UserInputError

    if not _ffmpeg_available():
        raise UserInputError(
            "sending videos as mp4 needs imageio and the ffmpeg binary of imageio-ffmpeg: "
            "pip install 'trl-flow[video]' (or send frame strips instead)"
        )
    written = write_video(frames, path, fps, prefer="mp4")
    if written.suffix != ".mp4":  # ffmpeg failed on these frames: write_video fell back to GIF
        written.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg could not encode {Path(path).with_suffix('.mp4')}")
    return written


def video_data_url(frames: Sequence[Any], fps: float) -> str:
    """A video as ``data:video/mp4;base64,...`` (the form OpenAI-compatible servers take in a ``video_url``)."""
    import base64
    import tempfile

    with tempfile.TemporaryDirectory(prefix="trl-flow-video-") as folder:
        path = write_mp4_file(frames, Path(folder) / "video.mp4", fps)
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
