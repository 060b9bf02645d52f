"""Load and faults of the reward server (`trl-flow serve-reward`), on loopback, bounded in count and time.

Load: `--clients` concurrent clients each send `--requests` requests, one 8x8 PNG each, to
`trl-flow serve-reward brightness --token ...` (a subprocess, as a user runs it). One request in `--invalid_every`
is hostile (no token, not JSON, length mismatch, bad base64, not an image, a 20000x20000 PNG bomb, too many images,
a too-long prompt, too-deep JSON) and must get its 4xx. The clients speak raw HTTP without retrying, as a
third-party client would, so every reset and 5xx is counted. A wrong answer is a valid request whose rewards
differ from `brightness` called directly, or a hostile one answered with another status.
Faults, with the training client (`remote_reward`, retrying): the server killed (SIGKILL) while clients are
mid-request, then restarted on the same port; a reward that hangs past the client timeout; a reward that raises
on every third batch. Each prints what the client did (retries, errors) and whether a failure became a reward.
Run: python -m benchmarks.reward_server [--clients 64] [--requests 400] [--max_seconds 300]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from reward_funcs._http import RemoteRewardError
from reward_funcs.rules import brightness
from trl_flow.errors import UserInputError
from trl_flow.rewards import call_reward_func, remote_reward

TOKEN = "bench-token"
ROOT = Path(__file__).resolve().parent.parent

FAULT_REWARDS = """
import os
import time

from reward_funcs.rules import brightness

CALLS = [0]


def slow(prompts, completions, **kwargs):
    time.sleep(0.2)
    return brightness(prompts, completions)


def hang(prompts, completions, **kwargs):
    time.sleep(3.0)  # past the client's 1 s timeout
    return brightness(prompts, completions)


def flaky(prompts, completions, **kwargs):
    CALLS[0] += 1
    if CALLS[0] % 3 == 0:
        raise RuntimeError(f"batch {CALLS[0]}: CUDA out of memory")
    return brightness(prompts, completions)
"""


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(spec: str, port: int, *flags: str) -> subprocess.Popen:
    """`trl-flow serve-reward SPEC --port PORT --token TOKEN FLAGS`, once it prints its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "trl_flow.cli", "serve-reward", spec, "--port", str(port), "--token", TOKEN, *flags],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = process.stdout.readline()
    if "serving reward" not in line:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return process


def stop_server(process: subprocess.Popen, timeout: float = 30) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def body(images: list[str], prompts: list[str] | None = None, **columns) -> bytes:
    prompts = ["an image"] * len(images) if prompts is None else prompts
    return json.dumps({"prompts": prompts, "images": images, "columns": columns}).encode()


def hostile_requests(tiny: str) -> list[tuple[str, bytes, bool, int]]:
    """(kind, body, send the token, expected status) of each hostile request."""
    bomb = png_base64(Image.new("L", (20000, 20000)))  # the image: 518 kB of base64
    deep: object = 0
    for _ in range(40):
        deep = [deep]
    return [
        ("no token", body([tiny]), False, 401),
        ("not JSON", b"{not json", True, 400),
        ("length mismatch", json.dumps({"prompts": ["a", "b"], "images": [tiny]}).encode(), True, 400),
        ("bad base64", body(["not base64!"]), True, 400),
        ("not an image", body([base64.b64encode(b"GIF89a garbage").decode()]), True, 400),
        ("20000x20000 PNG", body([bomb]), True, 413),
        ("257 images", body([tiny] * 257), True, 413),
        ("20000-char prompt", body([tiny], prompts=["x" * 20000]), True, 413),
        ("JSON 43 deep", body([tiny], meta=[deep]), True, 400),
    ]


def post(port: int, data: bytes, token: bool, timeout: float) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", "Connection": "close"}
        if token:
            headers["Authorization"] = f"Bearer {TOKEN}"
        connection.request("POST", "/brightness", body=data, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def load(
    args: argparse.Namespace, hostile: list, server_flags: list[str], clients: int, requests: int
) -> dict[str, float]:
    """One load run against a fresh server; returns the figures of one table row."""
    rng = np.random.default_rng(0)
    pool = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(64)]
    valid = [(body([png_base64(image)]), brightness(["an image"], [image])) for image in pool]
    port = free_port()
    server = start_server("brightness", port, *server_flags)
    counts = {"ok": 0, "refused as expected": 0, "reset": 0, "other connection error": 0, "5xx": 0, "503": 0}
    counts["wrong"] = 0
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)
    deadline = [0.0]

    def client(index: int) -> None:
        barrier.wait()
        for n in range(requests):
            if time.monotonic() > deadline[0]:
                return
            number = index * requests + n
            if number % args.invalid_every == args.invalid_every - 1:
                kind, data, token, expected = hostile[(number // args.invalid_every) % len(hostile)]
            else:
                kind, (data, rewards), token, expected = "valid", valid[number % len(valid)], True, 200
            start = time.perf_counter()
            try:
                status, answer = post(port, data, token, args.timeout)
            except ConnectionResetError:
                outcome = "reset"
            except (OSError, http.client.HTTPException):
                outcome = "other connection error"
            else:
                if status >= 500:
                    outcome = "503" if status == 503 else "5xx"
                elif status != expected:
                    outcome = "wrong"
                elif kind == "valid":
                    outcome = "ok" if json.loads(answer)["rewards"] == rewards else "wrong"
                else:
                    outcome = "refused as expected"
            with lock:
                counts[outcome] += 1
                if kind == "valid" and outcome == "ok":
                    latencies.append(time.perf_counter() - start)

    try:
        with ThreadPoolExecutor(clients) as executor:
            deadline[0] = time.monotonic() + args.max_seconds
            start = time.perf_counter()
            for future in [executor.submit(client, i) for i in range(clients)]:
                future.result()
            elapsed = time.perf_counter() - start
    finally:
        exit_code = stop_server(server)
    done = sum(counts.values())
    p50, p99 = (np.percentile(latencies, [50, 99]) * 1000) if latencies else (float("nan"), float("nan"))
    return {
        "clients": clients,
        "requests": done,
        "planned": clients * requests,
        "seconds": elapsed,
        "rps": done / elapsed,
        "p50": p50,
        "p99": p99,
        "exit": exit_code,
        **counts,
    }


class RetryCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retry" in record.getMessage():
            self.retries += 1


def fault_kill_and_restart(reward_file: Path, counter: RetryCounter) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/slow"
    server = start_server(f"{reward_file}:slow", port)
    rng = np.random.default_rng(1)
    batches = [[Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(2)] for _ in range(4)]
    recorded, errors = [], []
    counter.retries = 0

    def training_client(batch: list[Image.Image]) -> None:
        reward = remote_reward(url, token=TOKEN, timeout=5, retries=4, backoff=0.5)
        for _ in range(3):
            try:
                recorded.append((batch, reward(["p", "q"], batch)))
            except RemoteRewardError as e:
                errors.append(str(e))

    with ThreadPoolExecutor(len(batches)) as executor:
        futures = [executor.submit(training_client, batch) for batch in batches]
        time.sleep(0.3)  # the first requests are in the reward's 0.2 s sleep, or queued behind it
        server.kill()
        server.wait()
        server.stdout.close()
        killed_at = time.monotonic()
        time.sleep(1.0)
        server = start_server(f"{reward_file}:slow", port)
        restarted_after = time.monotonic() - killed_at
        for future in futures:
            future.result()
    stop_server(server)
    wrong = sum(rewards != brightness(["p", "q"], batch) for batch, rewards in recorded)
    print(
        f"server SIGKILLed mid-request, restarted {restarted_after:.1f} s later on the same port: "
        f"{len(batches)} clients x 3 calls: {len(recorded)} scored, {counter.retries} retries, {len(errors)} errors, "
        f"{wrong} wrong rewards"
    )
    reward = remote_reward(url, token=TOKEN, timeout=2, retries=2, backoff=0.2)
    start = time.monotonic()
    try:
        call_reward_func(reward, ["p"], batches[0][:1])
        print("server gone for good: the call returned (unexpected)")
    except UserInputError as e:
        print(f"server gone for good: raised after {time.monotonic() - start:.1f} s, nothing recorded: {e}")


def fault_hang(reward_file: Path, counter: RetryCounter) -> None:
    port = free_port()
    server = start_server(f"{reward_file}:hang", port, "--drain_timeout", "1")
    reward = remote_reward(f"http://127.0.0.1:{port}/hang", token=TOKEN, timeout=1, retries=2, backoff=0.2)
    counter.retries = 0
    start = time.monotonic()
    try:
        call_reward_func(reward, ["p"], [Image.new("RGB", (8, 8))])
        print("reward hanging past the client timeout: the call returned (unexpected)")
    except UserInputError as e:
        print(
            f"reward hanging 3 s, client timeout 1 s: {counter.retries} retries, raised after "
            f"{time.monotonic() - start:.1f} s, nothing recorded: {e}"
        )
    stop_server(server)


def fault_flaky(reward_file: Path, counter: RetryCounter) -> None:
    port = free_port()
    server = start_server(f"{reward_file}:flaky", port)
    reward = remote_reward(f"http://127.0.0.1:{port}/flaky", token=TOKEN, retries=3, backoff=0.2)
    counter.retries = 0
    images = [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(2)]
    recorded, errors = [], []
    for _ in range(9):
        try:
            recorded.append(call_reward_func(reward, ["p", "q"], images))
        except UserInputError as e:
            errors.append(str(e))
    stop_server(server)
    wrong = sum(rewards != brightness(["p", "q"], images) for rewards in recorded)
    print(
        f"reward raising on every 3rd batch: 9 calls: {len(recorded)} scored, {len(errors)} errors at once "
        f"({counter.retries} retries: a 422 is not retried), {wrong} wrong rewards; the error: "
        + (errors[0] if errors else "-")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=400, help="requests per client")
    parser.add_argument("--invalid_every", type=int, default=4, help="one hostile request in this many")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, s")
    parser.add_argument("--max_seconds", type=float, default=300.0, help="stop each load run after this long")
    parser.add_argument("--overload", action="store_true", help="also a run past the server's bounds (503s)")
    parser.add_argument("--no_faults", action="store_true")
    args = parser.parse_args()
    counter = RetryCounter()
    logging.getLogger("reward_funcs._http").addHandler(counter)
    logging.getLogger("reward_funcs._http").propagate = False

    print(f"machine: {machine()}")
    runs = [("defaults", [], args.clients, args.requests)]
    if args.overload:
        runs.append(("--max_connections 16 --max_queue 4", ["--max_connections", "16", "--max_queue", "4"], 64, 50))
    tiny = png_base64(Image.new("RGB", (8, 8)))
    hostile = hostile_requests(tiny)
    rows = [(name, load(args, hostile, flags, clients, requests)) for name, flags, clients, requests in runs]
    print(
        f"{'server':36} {'clients':>7} {'requests':>9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'resets':>6} {'5xx':>4} {'503':>4} {'wrong':>5} {'4xx ok':>6} {'exit':>4}"
    )
    for name, r in rows:
        stopped = "" if r["requests"] == r["planned"] else f" (of {r['planned']}: time limit)"
        print(
            f"{name:36} {r['clients']:>7} {r['requests']:>9} {r['rps']:>7.0f} {r['p50']:>7.1f} {r['p99']:>7.1f} "
            f"{r['reset'] + r['other connection error']:>6} {r['5xx']:>4} {r['503']:>4} {r['wrong']:>5} "
            f"{r['refused as expected']:>6} {r['exit']:>4}{stopped}"
        )
    if args.no_faults:
        return
    with tempfile.TemporaryDirectory() as folder:
        reward_file = Path(folder) / "fault_rewards.py"
        reward_file.write_text(FAULT_REWARDS)
        fault_kill_and_restart(reward_file, counter)
        fault_hang(reward_file, counter)
        fault_flaky(reward_file, counter)


if __name__ == "__main__":
    main()
