"""Tests for remote rewards: `trl_flow.rewards.server`, `trl_flow.rewards.remote` and `http://` reward specs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reward_funcs
from reward_funcs.rules import brightness, prompt_color
from trl_flow.errors import UserInputError
from trl_flow.rewards import call_reward_func, resolve_reward_func, resolve_reward_funcs, validate_rewards
from trl_flow.rewards.remote import TOKEN_ENV, RemoteReward, RemoteRewardError, remote_reward
from trl_flow.rewards.server import main_serve_reward, serve_reward

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
