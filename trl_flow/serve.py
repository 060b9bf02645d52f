"""Serve a reward function over HTTP, and use a served reward in training.

Why: a big reward model (a VLM judge, a detector) can run on its own GPU or machine, shared by several
training runs, instead of inside every training process.

Server: [`serve_reward`] (or `trl-flow serve-reward NAME`) serves one reward, given like a recipe's
`reward_funcs` entry (built-in name, `module:function` or `file.py:function`), at `http://HOST:PORT/<name>`,
where `<name>` is the reward's `__name__`. It is a stdlib `ThreadingHTTPServer`; reward calls are serialised
(one at a time), so a GPU model sees one batch at a time.

Client: a `reward_funcs` entry `http://host:port/NAME` (or `https://...`) resolves to [`remote_reward`], which
sends each batch in one request and returns the server's rewards. It is logged under `NAME`.

Protocol (JSON over HTTP):

- `POST /<name>` with `{"prompts": [str, ...], "images": [base64 PNG, ...], "columns": {column: [value, ...]}}`
  answers `{"rewards": [float | null, ...]}`. `columns` carries the dataset's other columns (one
  JSON-serialisable value per image); TRL's extras (`trainer_state`, `completion_ids`, `log_extra`,
  `log_metric`) and values that are not JSON-serialisable are not sent.
- `GET /<name>` answers `{"name": <name>, "status": "ok"}` (a health check).
- Only the last path segment is checked, so a reverse proxy may serve the reward under a prefix
  (`https://proxy/rewards/<name>`).
- Errors answer `{"error": message}`: 400 malformed request, 401 missing or wrong token, 404 other path, 413
  body too large, 422 the reward function raised or returned something invalid.

Authentication: with a token, every request must carry `Authorization: Bearer <token>`. The client reads the
token from its `token` argument or `$TRL_FLOW_REWARD_TOKEN`; the CLI server from `--token` or the same variable.
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
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from reward_funcs._http import RemoteRewardError, encode_image, post_json
from trl_flow.errors import UserInputError

__all__ = [
    "TOKEN_ENV",
    "RemoteReward",
    "RemoteRewardError",
    "RewardServer",
    "main_serve_reward",
    "remote_reward",
    "serve_reward",
]

TOKEN_ENV = "TRL_FLOW_REWARD_TOKEN"
"""Environment variable holding the bearer token, for the client and for the CLI server."""

DEFAULT_PORT = 8765
"""Port of `trl-flow serve-reward` when `--port` is not given."""

MAX_BODY_BYTES = 1 << 30
"""Largest request body the server accepts (1 GiB)."""

_TRL_EXTRAS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric"})


# ------------------------------------------------------------------------------------------------ server


class RewardServer(ThreadingHTTPServer):
    """An HTTP server for one reward function; see the module docstring for the protocol.

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

        from trl_flow.rewards import call_reward_func, validate_rewards

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
            raw = call_reward_func(self.func, prompts, decoded, **columns)
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
    """Start serving a reward over HTTP in a background thread and return the server (see the module docstring).

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
    from trl_flow.rewards import resolve_reward_func, reward_func_name

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


# ------------------------------------------------------------------------------------------------ client


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
            if key in _TRL_EXTRAS or isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
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

            def check(response: Any, expected: int = expected) -> list[float | None]:
                values = response.get("rewards") if isinstance(response, dict) else None
                if not isinstance(values, list) or len(values) != expected:
                    raise ValueError(f"the server's reply has no list of {expected} rewards: {str(response)[:200]}")
                if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in values):
                    raise ValueError(f"the server's rewards are not all numbers or null: {str(values)[:200]}")
                return [None if v is None else float(v) for v in values]

            rewards.extend(
                post_json(
                    self.url,
                    payload,
                    what=f"remote reward '{self.__name__}'",
                    headers=headers,
                    timeout=self.timeout,
                    max_retries=self.retries,
                    backoff=self.backoff,
                    check=check,
                )
            )
        return rewards


def remote_reward(
    url: str,
    token: str | None = None,
    timeout: float = 300.0,
    retries: int = 3,
    backoff: float = 1.0,
    batch_size: int | None = None,
    name: str | None = None,
) -> RemoteReward:
    """A reward function that scores through a reward server at `url` (`http://host:port/NAME`).

    Args:
        url: the server's URL, as printed by `trl-flow serve-reward`.
        token: bearer token; None reads `$TRL_FLOW_REWARD_TOKEN` at each call (unset: none sent).
        timeout: seconds to connect and for each read (scoring a big batch on a big model takes a while).
        retries: retries after a failed attempt (connection refused, timeout, HTTP 5xx / 429), with exponential
            backoff from `backoff` seconds; then a `RemoteRewardError` is raised. 4xx answers (bad token,
            wrong name, the reward failed) raise at once.
        backoff: first pause between attempts, in seconds.
        batch_size: images per request; None sends each call's batch in one request.
        name: the reward's `__name__`; None means the last path segment of `url`.

    Raises:
        UserInputError: `url` is not of the form http(s)://HOST:PORT/NAME, or bad numbers.
    """
    return RemoteReward(
        url, token=token, timeout=timeout, retries=retries, backoff=backoff, batch_size=batch_size, name=name
    )
