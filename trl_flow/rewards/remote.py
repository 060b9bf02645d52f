"""Use a reward served over HTTP (by `trl-flow serve-reward`, see `trl_flow.rewards.server`) in training.

A `reward_funcs` entry `http://host:port/NAME` (or `https://...`) resolves to [`remote_reward`], which sends each
batch in one request and returns the server's rewards. It is logged under `NAME`.

Protocol (JSON over HTTP), shared by this client and the server:

- `POST /<name>` with `{"prompts": [str, ...], "images": [base64 PNG, ...], "columns": {column: [value, ...]}}`
  answers `{"rewards": [float | null, ...]}`. `columns` carries the dataset's other columns (one
  JSON-serialisable value per image); TRL's extras (`trainer_state`, `completion_ids`, `log_extra`,
  `log_metric`) and values that are not JSON-serialisable are not sent.
- `GET /<name>` answers `{"name": <name>, "status": "ok"}` (a health check).
- Only the last path segment is checked, so a reverse proxy may serve the reward under a prefix
  (`https://proxy/rewards/<name>`).
- Errors answer `{"error": message}`: 400 malformed request (or JSON nested too deep), 401 missing or wrong
  token, 404 other path, 405 other method, 411 no Content-Length, 413 a size limit exceeded (body, images per
  request, pixels, prompt length; the message names the server's limit), 422 the reward function raised or
  returned something invalid, 503 the server is busy or stopping, with `Retry-After` (seconds): the client waits
  that long and retries.

Videos (completions that are lists of frames): the request still carries one image per sample, the video's frame
strip (up to `video_frames` evenly spaced frames side by side), and the columns gain `fps` (one value per video).
With `video="mp4_path"` each video is also written as an mp4 into `video_dir` (a folder the server can read: same
machine or shared storage) and its path sent in the column `video_path`, for rewards that read video files
(VideoAlign-style scorers). To score frames with an image reward on the server instead, resolve
`http://host:port/NAME@frames`: the frames then go out as images.

Authentication: with a token, every request must carry `Authorization: Bearer <token>`. The client reads the
token from its `token` argument or `$TRL_FLOW_REWARD_TOKEN`; the CLI server from `--token` or the same variable.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reward_funcs._http import RemoteRewardError, encode_image, post_json
from trl_flow.errors import UserInputError
from trl_flow.video import DEFAULT_FPS, frame_strip, is_video, write_mp4_file

__all__ = ["TOKEN_ENV", "RemoteReward", "RemoteRewardError", "remote_reward"]

TOKEN_ENV = "TRL_FLOW_REWARD_TOKEN"
"""Environment variable holding the bearer token, for the client and for the CLI server."""

TRL_EXTRAS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric"})
"""Keyword arguments TRL passes to reward functions that are not dataset columns: never sent."""


def check_reply(response: Any, expected: int) -> list[float | None]:
    """The rewards of a server's reply `{"rewards": [...]}`, checked: `expected` numbers or nulls.

    Raises:
        ValueError: the reply is not of that form (the client retries).
    """
    values = response.get("rewards") if isinstance(response, dict) else None
    if not isinstance(values, list) or len(values) != expected:
        raise ValueError(f"the server's reply has no list of {expected} rewards: {str(response)[:200]}")
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in values):
        raise ValueError(f"the server's rewards are not all numbers or null: {str(values)[:200]}")
    return [None if v is None else float(v) for v in values]


class RemoteReward:
    """Reward callable scoring through a reward server; see [`remote_reward`]."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int | None = None,
        name: str | None = None,
        video: str = "strip",
        video_dir: str | os.PathLike[str] | None = None,
        video_frames: int = 8,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        path_name = urllib.parse.unquote(parts.path.strip("/").rsplit("/", 1)[-1])
        if parts.scheme not in ("http", "https") or not parts.hostname or not path_name:
            raise UserInputError(
                f"reward '{url}' is not a reward server URL; write it as http://HOST:PORT/NAME "
                "(see `trl-flow serve-reward`)."
            )
        if timeout <= 0 or retries < 0 or (batch_size is not None and batch_size < 1):
            raise UserInputError(
                f"remote reward '{url}': need timeout > 0, retries >= 0 and batch_size >= 1 "
                f"(got {timeout}, {retries}, {batch_size})."
            )
        if video not in ("strip", "mp4_path"):
            raise UserInputError(f"remote reward '{url}': video must be 'strip' or 'mp4_path', got {video!r}.")
        if video == "mp4_path" and video_dir is None:
            raise UserInputError(
                f"remote reward '{url}': video='mp4_path' needs video_dir, a folder the reward server can read."
            )
        if isinstance(video_frames, bool) or not isinstance(video_frames, int) or video_frames < 1:
            raise UserInputError(f"remote reward '{url}': video_frames must be a positive integer, got {video_frames}.")
        self.video, self.video_frames = video, video_frames
        self.video_dir = None if video_dir is None else os.fspath(video_dir)
        self.url = url
        self.__name__ = name or path_name
        self.token = token
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"RemoteReward(name={self.__name__!r}, url={self.url!r})"

    def _headers(self) -> dict[str, str]:
        token = self.token if self.token is not None else os.environ.get(TOKEN_ENV)
        return {"Authorization": f"Bearer {token}"} if token else {}

    @staticmethod
    def _columns(kwargs: dict[str, Any], start: int, stop: int, num_images: int) -> dict[str, list[Any]]:
        columns = {}
        for key, values in kwargs.items():
            if key in TRL_EXTRAS or isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
                continue
            if len(values) != num_images:
                continue
            part = list(values[start:stop])
            try:
                json.dumps(part)
            except (TypeError, ValueError):
                continue  # not JSON-serialisable (e.g. tensors): a remote reward cannot use it
            columns[key] = part
        return columns

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Send the batch to the server (in chunks of `batch_size` if set) and return its rewards."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"remote reward '{self.__name__}': got {len(prompts)} prompts for {len(completions)} images"
            )
        headers = self._headers()
        if len(completions) > 0 and is_video(completions[0]):
            completions, kwargs = self._video_request(completions, kwargs)
        step = self.batch_size or max(len(completions), 1)
        rewards: list[float | None] = []
        for start in range(0, len(completions), step):
            stop = min(start + step, len(completions))
            payload = {
                "prompts": list(prompts[start:stop]),
                "images": [encode_image(image) for image in completions[start:stop]],
                "columns": self._columns(kwargs, start, stop, len(completions)),
            }
            expected = stop - start
            rewards.extend(
                post_json(
                    self.url,
                    payload,
                    what=f"remote reward '{self.__name__}'",
                    headers=headers,
                    timeout=self.timeout,
                    max_retries=self.retries,
                    backoff=self.backoff,
                    check=lambda response, expected=expected: check_reply(response, expected),
                )
            )
        return rewards

    def _video_request(self, videos: Sequence[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """The images (frame strips) and columns (`fps`, and `video_path` with mp4_path) sent for videos."""
        fps = float(kwargs.get("fps") or DEFAULT_FPS)
        columns = {**kwargs, "fps": [fps] * len(videos)}
        if self.video == "mp4_path":
            folder = Path(self.video_dir)
            paths = [write_mp4_file(v, folder / f"{uuid.uuid4().hex}.mp4", fps) for v in videos]
            columns["video_path"] = [str(path.resolve()) for path in paths]
        strips = [frame_strip(v, max_frames=self.video_frames, min_height=1) for v in videos]
        return strips, columns


def remote_reward(
    url: str,
    token: str | None = None,
    timeout: float = 300.0,
    retries: int = 3,
    backoff: float = 1.0,
    batch_size: int | None = None,
    name: str | None = None,
    video: str = "strip",
    video_dir: str | os.PathLike[str] | None = None,
    video_frames: int = 8,
) -> RemoteReward:
    """A reward function that scores through a reward server at `url` (`http://host:port/NAME`).

    Args:
        url: the server's URL, as printed by `trl-flow serve-reward`.
        token: bearer token; None reads `$TRL_FLOW_REWARD_TOKEN` at each call (unset: none sent).
        timeout: seconds to connect and for each read (scoring a big batch on a big model takes a while).
        retries: retries after a failed attempt (connection refused or reset, timeout, HTTP 5xx / 429), with
            exponential backoff from `backoff` seconds or as long as the server's `Retry-After` asks; then a
            `RemoteRewardError` is raised. 4xx answers (bad token, wrong name, a limit exceeded, the reward
            failed) raise at once. A failed request never becomes a reward.
        backoff: first pause between attempts, in seconds.
        batch_size: images per request; None sends each call's batch in one request.
        name: the reward's `__name__`; None means the last path segment of `url`.
        video: for video completions, "strip" (frame strips and `fps`) or "mp4_path" (also an mp4 per video in
            `video_dir`, its path in the column `video_path`).
        video_dir: where "mp4_path" writes the videos (a folder the server can read).
        video_frames: frames in each strip.

    Raises:
        UserInputError: `url` is not of the form http(s)://HOST:PORT/NAME, or bad numbers.
    """
    return RemoteReward(
        url,
        token=token,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        batch_size=batch_size,
        name=name,
        video=video,
        video_dir=video_dir,
        video_frames=video_frames,
    )
