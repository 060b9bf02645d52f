"""Tests for remote rewards: `trl_flow.rewards.server`, `trl_flow.rewards.remote` and `http://` reward specs."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reward_funcs
from reward_funcs.rules import brightness, prompt_color
from trl_flow.errors import UserInputError
from trl_flow.rewards import call_reward_func, resolve_reward_func, resolve_reward_funcs, validate_rewards
from trl_flow.rewards.remote import TOKEN_ENV, RemoteReward, RemoteRewardError, remote_reward
from trl_flow.rewards.server import ServerLimits, main_serve_reward, serve_reward

USER_REWARDS = '''
def by_tag(prompts, completions, tag, **kwargs):
    """One reward per sample from the `tag` column; None where the tag is "skip"."""
    return [None if t == "skip" else float(len(t)) + completions[i].size[0] / 1000 for i, t in enumerate(tag)]


def broken(prompts, completions, **kwargs):
    raise RuntimeError("the reward model crashed")


def wrong_count(prompts, completions, **kwargs):
    return [0.0]
'''


def pictures(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (12 + i, 16, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "served_rewards.py"
    path.write_text(USER_REWARDS)
    return path


@pytest.fixture
def brightness_server() -> Iterator:
    with serve_reward("brightness", token="s3cret") as server:
        yield server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_remote_scores_equal_local(brightness_server) -> None:
    images = pictures()
    prompts = ["a", "b", "c", "d"]
    client = remote_reward(brightness_server.url, token="s3cret")
    assert brightness_server.url.startswith("http://127.0.0.1:") and brightness_server.url.endswith("/brightness")
    assert client.__name__ == "brightness"
    extras = {"completion_ids": [[1]] * 4, "trainer_state": object(), "log_extra": print, "log_metric": print}
    remote = client(prompts, images, **extras)
    assert remote == brightness(prompts, images)  # PNG is lossless: exactly equal
    chunked = remote_reward(brightness_server.url, token="s3cret", batch_size=3)(prompts, images)
    assert chunked == remote
    assert client([], []) == []


def test_http_spec_resolves_to_remote_reward(brightness_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    funcs = resolve_reward_funcs([brightness_server.url, "prompt_color"])
    assert isinstance(funcs[0], RemoteReward) and funcs[0].__name__ == "brightness"
    images = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    raw = call_reward_func(funcs[0], ["a red x", "a red y"], images, trainer_state=None)
    assert validate_rewards("brightness", raw, 2) == pytest.approx([1 / 3, 1 / 3])
    assert funcs[1] is prompt_color


def test_columns_and_none_round_trip(user_file: Path) -> None:
    with serve_reward(f"{user_file}:by_tag") as server:
        assert server.url.endswith("/by_tag")
        images = pictures(3)
        client = resolve_reward_func(server.url)
        # non-JSON columns (arrays, objects) are not sent; the reward only needs `tag`
        result = client(["p"] * 3, images, tag=["ab", "skip", "abcd"], array=[np.zeros(2)] * 3, trainer_state=object())
        assert result == [2.016, None, 4.016]


def test_health_check_and_wrong_path(brightness_server) -> None:
    request = urllib.request.Request(brightness_server.url, headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.loads(response.read()) == {"name": "brightness", "status": "ok"}
    wrong = brightness_server.url.rsplit("/", 1)[0] + "/aesthetic"
    with pytest.raises(RemoteRewardError, match="HTTP 404.*serves 'brightness' at '/brightness'"):
        remote_reward(wrong, token="s3cret", retries=0)(["a"], pictures(1))


def test_refused_token_is_a_clear_error(brightness_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="HTTP 401.*missing or wrong bearer token.*token"):
        remote_reward(brightness_server.url, retries=3)(["a"], pictures(1))
    with pytest.raises(RemoteRewardError, match="HTTP 401"):
        remote_reward(brightness_server.url, token="guess", retries=3)(["a"], pictures(1))
    assert time.monotonic() - start < 2  # refused requests are not retried
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(brightness_server.url, timeout=5)
    assert info.value.code == 401


def test_reward_errors_come_back_with_their_message(user_file: Path) -> None:
    for name, pattern in [
        ("broken", "HTTP 422.*'broken' raised RuntimeError: the reward model crashed"),
        ("wrong_count", "HTTP 422.*returned 1 values for 2 images"),
    ]:
        with serve_reward(f"{user_file}:{name}") as server:
            with pytest.raises(RemoteRewardError, match=pattern):
                remote_reward(server.url, retries=2, backoff=0.01)(["a", "b"], pictures(2))


def test_malformed_requests_get_400(brightness_server) -> None:
    def post(body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(
            brightness_server.url, data=body, headers={"Authorization": "Bearer s3cret"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    assert post(b"not json")[0] == 400
    status, body = post(json.dumps({"prompts": ["a"], "images": ["not base64!"]}).encode())
    assert status == 400 and "image 0 is not a base64-encoded image" in body["error"]
    status, body = post(json.dumps({"prompts": ["a", "b"], "images": []}).encode())
    assert status == 400 and "same length" in body["error"]


def test_server_down_is_a_clear_error_in_bounded_time() -> None:
    server = serve_reward("brightness")
    url = server.url
    server.close()
    client = remote_reward(url, retries=2, backoff=0.01, timeout=2)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="remote reward 'brightness'.*failed after 3 attempt.*cannot reach"):
        client(["a"], pictures(1))
    assert time.monotonic() - start < 5


def test_bad_specs_and_addresses(brightness_server) -> None:
    with pytest.raises(UserInputError, match="http://HOST:PORT/NAME"):
        resolve_reward_func("http://127.0.0.1:8000/")
    with pytest.raises(UserInputError, match="unknown reward 'nope'"):
        serve_reward("nope")
    port = int(brightness_server.url.split(":")[2].split("/")[0])
    with pytest.raises(UserInputError, match=f"cannot serve reward 'brightness' on 127.0.0.1:{port}"):
        serve_reward("brightness", port=port)


def test_main_serve_reward_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main_serve_reward(["no_such_reward", "--port", "0"]) == 2
    assert "unknown reward 'no_such_reward'" in capsys.readouterr().err


def test_main_serve_reward_help_shows_the_limits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main_serve_reward(["--help"])
    assert info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for flag, default in [("max_pixels", 16777216), ("max_images", 256), ("max_queue", 128), ("max_body_mb", 256)]:
        assert f"--{flag}" in shown and f"(default: {default})" in shown
    assert main_serve_reward(["brightness", "--max_queue", "0"]) == 2
    assert "limits must be positive: max_queue" in capsys.readouterr().err


def test_main_serve_reward_serves_until_stopped() -> None:
    root = Path(reward_funcs.__file__).resolve().parent.parent
    port = free_port()
    env = {**os.environ, TOKEN_ENV: "t0ken"}
    process = subprocess.Popen(  # the real console-script path: `trl-flow serve-reward brightness --port P`
        [sys.executable, "-m", "trl_flow.cli", "serve-reward", "brightness", "--port", str(port)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        url = f"http://127.0.0.1:{port}/brightness"
        assert line.strip() == f"serving reward 'brightness' at {url} (Ctrl-C to stop)"
        images = pictures(2)
        assert remote_reward(url, token="t0ken")(["a", "b"], images) == brightness(["a", "b"], images)
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()


# ------------------------------------------------------------------------------------ load and hostile input


def post_raw(url: str, body: bytes, token: str | None = "s3cret", timeout: float = 10) -> tuple[int, dict, dict]:
    """POST `body` as is; (status, decoded JSON answer, headers)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read()), dict(e.headers)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def request_body(images: list[str], prompts: list[str] | None = None, **columns) -> bytes:
    prompts = ["a"] * len(images) if prompts is None else prompts
    return json.dumps({"prompts": prompts, "images": images, "columns": columns}).encode()


def test_bomb_image_is_refused_from_its_header(brightness_server) -> None:
    bomb = png_base64(Image.new("1", (20000, 20000)))  # 400 Mpx: PIL itself would raise DecompressionBombError
    status, body, _ = post_raw(brightness_server.url, request_body([png_base64(pictures(1)[0]), bomb]))
    assert status == 413
    assert body["error"] == (
        "image 1 is too large: 20000x20000 = 400000000 pixels, over the server's max_pixels 16777216"
    )
    images = pictures(1)
    assert remote_reward(brightness_server.url, token="s3cret")(["a"], images) == brightness(["a"], images)


def test_limits_of_size_and_depth_get_4xx_naming_them() -> None:
    limits = ServerLimits(max_body_mb=16 / 1024, max_images=2, max_prompt_chars=10, max_json_depth=5)
    image = png_base64(pictures(1)[0])
    with serve_reward("brightness", token="s3cret", limits=limits) as server:
        status, body, _ = post_raw(server.url, request_body([image], prompts=["x" * 20000]))  # 20 kB > 16 KiB
        assert status == 413 and "over the server's max_body_mb 0.015625 (16384 bytes)" in body["error"]
        status, body, _ = post_raw(server.url, request_body([image] * 3))
        assert status == 413 and "3 images in one request, over the server's max_images 2" in body["error"]
        status, body, _ = post_raw(server.url, request_body([image], prompts=["x" * 11]))
        assert status == 413 and "prompt 0 is 11 characters, over the server's max_prompt_chars 10" in body["error"]
        nested: object = 0
        for _ in range(5):
            nested = [nested]
        status, body, _ = post_raw(server.url, request_body([image], meta=[nested]))  # depth 1 + 2 + 5
        assert status == 400 and "nested more than 5 levels deep (max_json_depth 5)" in body["error"]
        status, body, _ = post_raw(server.url, request_body([image], meta=[{"k": "v"}]))  # depth 4 is fine
        assert status == 200 and len(body["rewards"]) == 1
    with serve_reward("brightness", token="s3cret") as server:  # deeper than Python's recursion limit
        status, body, _ = post_raw(server.url, b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and "max_json_depth 32" in body["error"]


def test_not_an_image_wrong_method_and_a_stalled_client(brightness_server) -> None:
    not_image = base64.b64encode(b"hello, not a picture").decode()
    status, body, _ = post_raw(brightness_server.url, request_body([not_image]))
    assert status == 400 and "image 0 is not a base64-encoded image" in body["error"]
    request = urllib.request.Request(brightness_server.url, data=b"{}", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 405
    info.value.close()
    host, port = brightness_server.server_address[:2]
    with socket.create_connection((host, port)) as stalled:  # sends half a request, then nothing
        stalled.sendall(b"POST /brightness HTTP/1.1\r\nContent-Length: 1000\r\nAuthorization: Bearer s3cret\r\n\r\n{")
        start = time.monotonic()
        images = pictures(2)
        scored = remote_reward(brightness_server.url, token="s3cret")(["a", "b"], images)
        assert scored == brightness(["a", "b"], images)
        assert time.monotonic() - start < 2


def test_busy_server_answers_503_with_retry_after_and_the_client_waits_and_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entered, release = threading.Event(), threading.Event()

    def held(prompts, completions, **kwargs):
        entered.set()
        release.wait(10)
        return brightness(prompts, completions)

    images = pictures(2)
    expected = brightness(["a", "b"], images)
    with serve_reward(held, limits=ServerLimits(max_queue=1, retry_after=1)) as server:
        first = ThreadPoolExecutor(2)
        holding = first.submit(remote_reward(server.url, retries=0), ["a", "b"], images)
        assert entered.wait(5)
        status, body, headers = post_raw(server.url, request_body([png_base64(images[0])]), token=None)
        assert status == 503 and headers["Retry-After"] == "1" and "max_queue" in body["error"]
        start = time.monotonic()
        with caplog.at_level("WARNING", logger="reward_funcs._http"):
            retried = first.submit(remote_reward(server.url, retries=3, backoff=0.01), ["a", "b"], images)
            deadline = time.monotonic() + 5
            while not any("retry 1 of 3 in 1.0 s" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the client did not retry"
                time.sleep(0.01)
            release.set()
            assert retried.result(timeout=10) == expected
        assert time.monotonic() - start >= 0.9  # it waited Retry-After (1 s), not its own backoff (0.01 s)
        assert holding.result(timeout=10) == expected
        (record,) = [r for r in caplog.records if "retry" in r.getMessage()]
        assert "HTTP 503" in record.getMessage()
        first.shutdown()


SLOW_REWARD = """
import pathlib
import time

from reward_funcs.rules import brightness

def slow(prompts, completions, **kwargs):
    pathlib.Path(MARKER).write_text("scoring")
    time.sleep(1.0)
    return brightness(prompts, completions)
"""


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(tmp_path: Path) -> None:
    marker = tmp_path / "scoring"
    reward_file = tmp_path / "slow_reward.py"
    reward_file.write_text(f"MARKER = {str(marker)!r}\n" + SLOW_REWARD)
    root = Path(reward_funcs.__file__).resolve().parent.parent
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "trl_flow.cli", "serve-reward", f"{reward_file}:slow", "--port", str(port)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "serving reward 'slow'" in process.stdout.readline()
        images = pictures(2)
        client = ThreadPoolExecutor(1)
        answer = client.submit(remote_reward(f"http://127.0.0.1:{port}/slow", retries=0), ["a", "b"], images)
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < deadline, "the request never reached the reward"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert answer.result(timeout=10) == brightness(["a", "b"], images)
        assert process.wait(timeout=10) == 0
        assert "stopping: waiting up to 30 s for 1 request(s)" in process.stderr.read()
        client.shutdown()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


USER_VIDEO_REWARDS = """
from PIL import Image


def reads_videos(prompts, completions, fps, video_path=None, **kwargs):
    # what the server's reward got: strip widths, the fps column and, with mp4_path, files it can open
    import imageio.v2 as imageio

    frames = [len(imageio.mimread(path, format="FFMPEG")) if video_path else 0 for path in (video_path or prompts)]
    return [strip.size[0] + f + n * 1000 for strip, f, n in zip(completions, fps, frames)]
"""


def test_videos_reach_a_served_reward_as_strips_fps_and_mp4_paths(tmp_path: Path) -> None:
    pytest.importorskip("imageio_ffmpeg")
    path = tmp_path / "video_rewards.py"
    path.write_text(USER_VIDEO_REWARDS)
    videos = [[Image.new("RGB", (16, 16), (i * 20, 0, 0)) for i in range(n)] for n in (3, 12)]
    with serve_reward(f"{path}:reads_videos") as server:
        strips = remote_reward(server.url)(["a", "b"], videos, fps=8.0)
        assert strips == [3 * 16 + 8.0, 8 * 16 + 8.0]  # strips of at most 8 frames; fps per video
        folder = tmp_path / "shared"
        with_files = remote_reward(server.url, video="mp4_path", video_dir=folder)(["a", "b"], videos, fps=8.0)
        assert with_files == [3 * 16 + 8.0 + 3000, 8 * 16 + 8.0 + 12000]  # the server read every frame back
        assert len(list(folder.glob("*.mp4"))) == 2
    with pytest.raises(UserInputError, match="needs video_dir"):
        remote_reward(server.url, video="mp4_path")
