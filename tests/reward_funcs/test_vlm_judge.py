"""Tests for the VLM-judge reward against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image

from reward_funcs.vlm_judge import RemoteRewardError, make_vlm_judge, parse_score
from trl_flow.errors import UserInputError


class FakeChatServer:
    """A /v1/chat/completions endpoint whose answer is decided by `reply(request_json) -> (status, body)`."""

    def __init__(self, reply: Callable[[dict[str, Any]], tuple[int, Any]]) -> None:
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.headers.append(dict(self.headers))
                status, answer = fake.reply(body) if self.path == "/v1/chat/completions" else (404, {"error": "nope"})
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def chat_answer(content: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def brightness_judge(request: dict[str, Any]) -> tuple[int, Any]:
    """Decode the image from the data URL and answer its mean brightness on a 0-10 scale."""
    parts = request["messages"][-1]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    header, _, data = url.partition(",")
    assert header == "data:image/png;base64"
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    return 200, chat_answer(f"Score: {np.asarray(image).mean() / 25.5:.2f}")


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[dict[str, Any]], tuple[int, Any]]], FakeChatServer]]:
    servers: list[FakeChatServer] = []

    def start(reply: Callable[[dict[str, Any]], tuple[int, Any]]) -> FakeChatServer:
        servers.append(FakeChatServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def grey(level: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (level, level, level))


def test_scores_parsed_and_normalized(serve) -> None:
    server = serve(brightness_judge)
    judge = make_vlm_judge(base_url=server.base_url, model="judge-1", api_key="k3y", max_concurrency=3)
    prompts = ["a", "b", "c", "d"]
    extras = {"completion_ids": None, "trainer_state": None, "log_extra": print, "log_metric": print}
    scores = judge(prompts, [grey(0), grey(255), grey(51), grey(102)], **extras)
    assert scores == pytest.approx([0.0, 1.0, 0.2, 0.4], abs=1e-3)
    assert all(type(s) is float for s in scores)
    assert len(server.requests) == 4
    request = server.requests[0]
    assert request["model"] == "judge-1" and request["temperature"] == 0.0
    assert server.headers[0]["Authorization"] == "Bearer k3y"
    texts = sorted(p["text"] for r in server.requests for p in r["messages"][-1]["content"] if p["type"] == "text")
    assert texts[0].startswith('On a scale from 0 to 10, how well does this image match the description "a"?')
    raw = make_vlm_judge(base_url=server.base_url + "/chat/completions", model="m", normalize=False)
    assert raw(["x"], [grey(255)]) == pytest.approx([10.0])


def test_template_columns_and_system_prompt(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(lambda request: (200, chat_answer("7")))
    monkeypatch.setenv("TRL_FLOW_VLM_BASE_URL", server.base_url)
    monkeypatch.setenv("TRL_FLOW_VLM_MODEL", "env-model")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = make_vlm_judge(prompt_template="Is there {count} {object} in {{this}} image ({prompt})?", system_prompt="S")
    assert judge(["p1", "p2"], [grey(0), grey(0)], count=[2, 3], object=["cats", "dogs"]) == [0.7, 0.7]
    texts = sorted(r["messages"][1]["content"][1]["text"] for r in server.requests)
    assert texts == ["Is there 2 cats in {this} image (p1)?", "Is there 3 dogs in {this} image (p2)?"]
    assert server.requests[0]["messages"][0] == {"role": "system", "content": "S"}
    assert server.requests[0]["model"] == "env-model" and "Authorization" not in server.headers[0]
    with pytest.raises(UserInputError, match="uses \\{object\\}, but the dataset has no column 'object'"):
        judge(["p"], [grey(0)], count=[1])
    with pytest.raises(UserInputError, match="must name its fields"):
        make_vlm_judge(prompt_template="rate {}")


def test_missing_model_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRL_FLOW_VLM_MODEL", raising=False)
    with pytest.raises(UserInputError, match="TRL_FLOW_VLM_MODEL"):
        make_vlm_judge(base_url="http://127.0.0.1:9/v1")(["p"], [grey(0)])


def test_transient_failures_are_retried(serve) -> None:
    answers = iter([(503, {"error": "loading"}), (200, chat_answer("no idea")), (200, chat_answer("8 out of 10"))])
    server = serve(lambda request: next(answers))
    judge = make_vlm_judge(base_url=server.base_url, model="m", max_retries=2, backoff=0.01)
    assert judge(["p"], [grey(0)]) == [0.8]
    assert len(server.requests) == 3


def test_failing_server_raises_after_bounded_retries(serve) -> None:
    server = serve(lambda request: (500, {"error": {"message": "CUDA out of memory"}}))
    judge = make_vlm_judge(base_url=server.base_url, model="m", max_retries=2, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="failed after 3 attempt.*HTTP 500.*CUDA out of memory"):
        judge(["p"], [grey(0)])
    assert time.monotonic() - start < 5 and len(server.requests) == 3


def test_unparseable_replies_raise(serve) -> None:
    server = serve(lambda request: (200, chat_answer("I cannot rate images.")))
    judge = make_vlm_judge(base_url=server.base_url, model="m", max_retries=1, backoff=0.01)
    with pytest.raises(RemoteRewardError, match="no score found"):
        judge(["p"], [grey(0)])
    assert len(server.requests) == 2


def test_client_errors_are_not_retried(serve) -> None:
    server = serve(lambda request: (401, {"error": {"message": "invalid api key"}}))
    judge = make_vlm_judge(base_url=server.base_url, model="m", max_retries=3, backoff=0.01)
    with pytest.raises(RemoteRewardError, match="HTTP 401.*invalid api key.*token"):
        judge(["p"], [grey(0)])
    assert len(server.requests) == 1


def test_server_down_raises_in_bounded_time() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = make_vlm_judge(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=2, backoff=0.01, timeout=2)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="after 3 attempt.*cannot reach the server"):
        judge(["p", "q"], [grey(0), grey(1)])
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("reply", "pattern", "expected"),
    [
        ("7", None, 7.0),
        ("Score: 8.5/10", None, 8.5),
        (" .5", None, 0.5),
        ("Reasoning: 1 cat. Final score: 6", r"score:\s*([\d.]+)", 6.0),
    ],
)
def test_parse_score(reply: str, pattern: str | None, expected: float) -> None:
    assert parse_score(reply, 10.0, pattern) == expected


@pytest.mark.parametrize("reply", ["", "none", "11", "-1"])
def test_parse_score_rejects(reply: str) -> None:
    with pytest.raises(ValueError):
        parse_score(reply, 10.0)


# ------------------------------------------------------------------------------------------------------------ videos
def test_videos_go_to_the_judge_as_a_frame_strip_or_an_mp4(serve, tmp_path) -> None:
    seen: list[dict[str, Any]] = []

    def judge_media(request: dict[str, Any]) -> tuple[int, Any]:
        (media, text) = request["messages"][-1]["content"]
        header, _, data = media[media["type"]]["url"].partition(",")
        seen.append({"type": media["type"], "header": header, "bytes": base64.b64decode(data), "text": text["text"]})
        return 200, chat_answer("7")

    server = serve(judge_media)
    video = [grey(level) for level in (0, 40, 80, 120, 160, 200, 240, 250, 255, 30)]  # 10 frames of 16x16
    strip = make_vlm_judge(base_url=server.base_url, model="m", prompt_template="{prompt} at {fps} fps?")
    assert strip(["p"], [video], fps=16.0) == [0.7]
    image = Image.open(io.BytesIO(seen[0]["bytes"]))
    assert (seen[0]["type"], seen[0]["header"], image.size) == ("image_url", "data:image/png;base64", (8 * 16, 16))
    assert image.convert("RGB").getpixel((0, 0)) == (0, 0, 0) and image.convert("RGB").getpixel((127, 0))[0] == 30
    assert seen[0]["text"] == "p at 16.0 fps?"

    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as imageio

    mp4 = make_vlm_judge(base_url=server.base_url, model="m", video="mp4")
    assert mp4(["p"], [video], fps=8.0) == [0.7]
    assert (seen[1]["type"], seen[1]["header"]) == ("video_url", "data:video/mp4;base64")
    (tmp_path / "sent.mp4").write_bytes(seen[1]["bytes"])
    reader = imageio.get_reader(str(tmp_path / "sent.mp4"), format="FFMPEG")
    try:
        assert len([frame for frame in reader]) == 10 and reader.get_meta_data()["fps"] == 8
    finally:
        reader.close()
    with pytest.raises(UserInputError, match="video must be 'strip' or 'mp4'"):
        make_vlm_judge(video="gif")
