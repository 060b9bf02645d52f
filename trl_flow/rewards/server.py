"""Serve a reward function over HTTP, for [`remote_reward`](trl_flow.rewards.remote) clients.

Why: a big reward model (a VLM judge, a detector) can run on its own GPU or machine, shared by several
training runs, instead of inside every training process.

[`serve_reward`] (or `trl-flow serve-reward NAME`) serves one reward, given like a recipe's `reward_funcs` entry
(built-in name, `module:function` or `file.py:function`), at `http://HOST:PORT/<name>`, where `<name>` is the
reward's `__name__`. It is a stdlib `ThreadingHTTPServer`; reward calls are serialised (one at a time), so a GPU
model sees one batch at a time. The protocol is described in `trl_flow.rewards.remote`.

Without a token anyone who can reach the port can use the server: keep it on 127.0.0.1 or a private network.
There is no TLS; put a reverse proxy in front for https.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import io
import ipaddress
import json
import math
import os
import sys
import threading
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from trl_flow.errors import UserInputError
from trl_flow.rewards.remote import TOKEN_ENV
from trl_flow.rewards.resolve import call_reward_func_named, resolve_reward_func, reward_func_name, validate_rewards

__all__ = ["DEFAULT_PORT", "RewardServer", "main_serve_reward", "serve_reward"]

DEFAULT_PORT = 8765
"""Port of `trl-flow serve-reward` when `--port` is not given."""

MAX_BODY_BYTES = 1 << 30
"""Largest request body the server accepts (1 GiB)."""


class RewardServer(ThreadingHTTPServer):
    """An HTTP server for one reward function; the protocol is described in `trl_flow.rewards.remote`.

    Create it with [`serve_reward`]. `url` is the address clients use; `close()` stops it.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], func: Callable[..., Any], name: str, token: str | None) -> None:
        self.func = func
        self.name = name
        self.token = token
        self.call_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        """`http://host:port/<name>`, the `reward_funcs` entry that scores with this server."""
        host, port = self.server_address[:2]
        host = str(host)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/{urllib.parse.quote(self.name)}"

    def start(self) -> RewardServer:
        """Serve in a daemon thread and return at once."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.serve_forever,
                kwargs={"poll_interval": 0.1},  # how soon close() is noticed
                name=f"reward-server-{self.name}",
                daemon=True,
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (if started) and release the port."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> RewardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(self, payload: Any) -> list[float | None]:
        """Decode a request body, run the reward on it and return JSON-ready rewards (NaN becomes null).

        Raises:
            ValueError: malformed request (answered 400).
            UserInputError: the reward raised or returned something invalid (answered 422).
        """
        from PIL import Image

        if not isinstance(payload, dict):
            raise ValueError("the request body must be a JSON object")
        prompts, images, columns = payload.get("prompts"), payload.get("images"), payload.get("columns") or {}
        if not isinstance(prompts, list) or not isinstance(images, list) or len(prompts) != len(images):
            raise ValueError("'prompts' and 'images' must be lists of the same length")
        if not isinstance(columns, dict) or any(
            not isinstance(v, list) or len(v) != len(images) for v in columns.values()
        ):
            raise ValueError("'columns' must map column names to lists with one value per image")
        decoded = []
        for i, text in enumerate(images):
            try:
                image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
                image.load()
            except (binascii.Error, TypeError, OSError, ValueError) as e:
                raise ValueError(f"image {i} is not a base64-encoded image ({type(e).__name__}: {e})") from e
            decoded.append(image)
        with self.call_lock:
            raw = call_reward_func_named(self.name, self.func, prompts, decoded, **columns)
        rewards = validate_rewards(self.name, raw, len(decoded))
        return [None if math.isnan(value) else value for value in rewards]


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"
    timeout = 600  # seconds a connection may stall while sending its request

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass  # keep training logs clean; errors reach the client

    def _send(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        token = self.server.token
        if not token:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return True
        self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"})
        return False

    def _check_path(self) -> bool:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).strip("/")
        if path.rsplit("/", 1)[-1] == self.server.name:  # a reverse proxy may keep a path prefix
            return True
        self._send(
            HTTPStatus.NOT_FOUND,
            {"error": f"no reward at '/{path}'; this server serves '{self.server.name}' at '/{self.server.name}'"},
        )
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self._authorized() and self._check_path():
            self._send(HTTPStatus.OK, {"name": self.server.name, "status": "ok"})

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length header is required"})
            return
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            return
        body = self.rfile.read(length)
        if not (self._authorized() and self._check_path()):
            return
        try:
            payload = json.loads(body)
            rewards = self.server.score(payload)
        except UserInputError as e:
            self._send(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(e)})
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"bad request: {e}"})
        except Exception as e:  # a bug in the server: report it rather than drop the connection
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})
        else:
            self._send(HTTPStatus.OK, {"rewards": rewards})


def serve_reward(
    name_or_spec: str | Callable[..., Any],
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> RewardServer:
    """Start serving a reward over HTTP in a background thread and return the server.

    Args:
        name_or_spec: a `reward_funcs` entry (built-in name, `module:function`, `file.py:function`) or a callable.
        host: interface to listen on (127.0.0.1: this machine only; 0.0.0.0: all interfaces).
        port: port to listen on; 0 picks a free one (read it from `server.url`).
        token: bearer token clients must send; None or "" accepts any client.
        base_dir: folder relative `file.py:function` paths are relative to (default: the current directory).

    Returns:
        The running [`RewardServer`]; `server.url` is its address, `server.close()` stops it.

    Raises:
        UserInputError: the reward cannot be resolved, or the address cannot be bound.
    """
    func = resolve_reward_func(name_or_spec, base_dir=base_dir)
    name = reward_func_name(func)
    try:
        server = RewardServer((host, int(port)), func, name, token or None)
    except OSError as e:
        raise UserInputError(f"cannot serve reward '{name}' on {host}:{port}: {e.strerror or e}") from e
    return server.start()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main_serve_reward(argv: list[str]) -> int:
    """`trl-flow serve-reward NAME [--host HOST] [--port PORT] [--token TOKEN]`: serve a reward until interrupted.

    Prints the URL to put in a recipe's `reward_funcs`. Returns the exit status (0 after Ctrl-C, 2 for a user
    error such as an unknown reward or a port in use).
    """
    parser = argparse.ArgumentParser(
        prog="trl-flow serve-reward",
        description="Serve a reward function over HTTP; use it in a recipe as reward_funcs: [http://HOST:PORT/NAME].",
    )
    parser.add_argument("reward", help="built-in reward name, 'package.module:function' or 'path/to/file.py:function'")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0: any free)")
    parser.add_argument(
        "--token", default=None, help=f"bearer token clients must send (default: ${TOKEN_ENV}; unset: no check)"
    )
    args = parser.parse_args(argv)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    try:
        server = serve_reward(args.reward, host=args.host, port=args.port, token=token)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not token and not _is_loopback(args.host):
        print(
            f"warning: serving on {args.host} without a token; anyone who can reach this port can use it. "
            f"Set --token or ${TOKEN_ENV}.",
            file=sys.stderr,
        )
    print(f"serving reward '{server.name}' at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
