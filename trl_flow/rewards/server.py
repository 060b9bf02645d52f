"""Serve a reward function over HTTP, for [`remote_reward`](trl_flow.rewards.remote) clients.

Why: a big reward model (a VLM judge, a detector) can run on its own GPU or machine, shared by several
training runs, instead of inside every training process.

[`serve_reward`] (or `trl-flow serve-reward NAME`) serves one reward, given like a recipe's `reward_funcs` entry
(built-in name, `module:function` or `file.py:function`), at `http://HOST:PORT/<name>`, where `<name>` is the
reward's `__name__`. The protocol is described in `trl_flow.rewards.remote`.

Load: it is a stdlib threading HTTP server, one thread per connection, at most `max_connections` at once; more
connections wait in the listen backlog (`backlog` deep), so none is refused or reset below that. Reward calls are
serialised (one at a time), so a GPU model sees one batch at a time, and the images of a request are decoded only
when its turn comes. At most `max_queue` requests wait for (or are in) the reward call; more are answered 503
with `Retry-After`, which the client honours.

Hostile input: the limits of [`ServerLimits`] (body size, images per request, pixels per image and per request,
prompt length, JSON depth) are checked before anything is decoded (an image's size is read from its PNG header)
and answered 4xx naming the limit; the checks live in `trl_flow.rewards.request_checks`. 500 means a bug in the server.

Stopping: `close()` (and SIGTERM / Ctrl-C for `trl-flow serve-reward`) stops accepting connections, lets the
requests in flight finish (up to `drain_timeout` seconds) and answers 503 to new requests on open connections.

Without a token anyone who can reach the port can use the server: keep it on 127.0.0.1 or a private network.
There is no TLS; put a reverse proxy in front for https.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import ipaddress
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from trl_flow.errors import UserInputError
from trl_flow.rewards.remote import TOKEN_ENV
from trl_flow.rewards.request_checks import RequestRejected, ServerLimits, check_request, decode_images, parse_body
from trl_flow.rewards.resolve import call_reward_func_named, resolve_reward_func, reward_func_name, validate_rewards

__all__ = ["DEFAULT_PORT", "RewardServer", "ServerLimits", "main_serve_reward", "serve_reward"]

DEFAULT_PORT = 8765
"""Port of `trl-flow serve-reward` when `--port` is not given."""

_LINGER_BYTES = 64 << 20  # after refusing a body unread, read and drop up to this much so the client sees the answer
_LINGER_SECONDS = 2.0


class RewardServer(ThreadingHTTPServer):
    """An HTTP server for one reward function; the protocol is described in `trl_flow.rewards.remote`.

    Create it with [`serve_reward`]. `url` is the address clients use; `close()` stops it.
    """

    daemon_threads = True
    block_on_close = False  # close() waits for requests in flight itself, bounded; idle connections are cut

    def __init__(
        self,
        address: tuple[str, int],
        func: Callable[..., Any],
        name: str,
        token: str | None,
        limits: ServerLimits | None = None,
    ) -> None:
        self.func = func
        self.name = name
        self.token = token
        self.limits = limits or ServerLimits()
        self.request_queue_size = self.limits.backlog  # read by server_activate's listen()
        self.call_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connection_slots = threading.Semaphore(self.limits.max_connections)
        self._queue_slots = threading.Semaphore(self.limits.max_queue)
        self._state = threading.Condition()
        self._in_flight = 0
        self._open: set[socket.socket] = set()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        """`http://host:port/<name>`, the `reward_funcs` entry that scores with this server."""
        host, port = self.server_address[:2]
        host = str(host)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/{urllib.parse.quote(self.name)}"

    @property
    def in_flight(self) -> int:
        """Requests being handled now."""
        return self._in_flight

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

    def close(self, drain_timeout: float | None = None) -> bool:
        """Stop accepting, let requests in flight finish, release the port, cut idle connections.

        Args:
            drain_timeout: seconds to wait for requests in flight (default: `limits.drain_timeout`).

        Returns:
            True if every request in flight finished in time.
        """
        self._stopping.set()
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()  # the listening socket: new connections are refused from here on
        wait = self.limits.drain_timeout if drain_timeout is None else drain_timeout
        with self._state:
            finished = self._state.wait_for(lambda: self._in_flight == 0, timeout=wait)
            connections = list(self._open)
        for connection in connections:  # idle keep-alive or stalled connections: wake their threads
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return finished

    def __enter__(self) -> RewardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections: at most max_connections threads; the others wait in the listen backlog

    def process_request(self, request: Any, client_address: Any) -> None:
        while not self._connection_slots.acquire(timeout=0.1):
            if self._stopping.is_set():
                self.shutdown_request(request)
                return
        with self._state:
            self._open.add(request)
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: Any) -> None:
        with self._state:
            self._open.discard(request)
        self._connection_slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return  # the client went away or stalled: nothing to report
        super().handle_error(request, client_address)

    @contextmanager
    def _request(self) -> Iterator[bool]:
        """Count a request in flight while it is handled; yields False (not counted) once the server is stopping."""
        with self._state:
            if self._stopping.is_set():
                accepted = False
            else:
                accepted = True
                self._in_flight += 1
        try:
            yield accepted
        finally:
            if accepted:
                with self._state:
                    self._in_flight -= 1
                    self._state.notify_all()

    # -- scoring

    def parse(self, body: bytes) -> Any:
        """Decode a request body as JSON, refusing nesting deeper than `limits.max_json_depth`."""
        return parse_body(body, self.limits)

    def score(self, payload: Any) -> list[float | None]:
        """Check a decoded request body, run the reward on it and return JSON-ready rewards (NaN becomes null).

        Raises:
            ValueError: malformed request or a limit exceeded (answered 400, or the 4xx of `RequestRejected`).
            UserInputError: the reward raised or returned something invalid (answered 422).
        """
        prompts, encoded, columns = check_request(payload, self.limits)
        with self.call_lock:  # one batch at a time; its images are decoded only now, to bound memory
            decoded = decode_images(encoded)
            raw = call_reward_func_named(self.name, self.func, prompts, decoded, **columns)
        rewards = validate_rewards(self.name, raw, len(decoded))
        return [None if math.isnan(value) else value for value in rewards]


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.limits.timeout  # StreamRequestHandler.setup applies it to the socket
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass  # keep training logs clean; errors reach the client

    def _send(self, status: HTTPStatus, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode("utf-8")
        close = close or self.close_connection or self.server._stopping.is_set()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", "Bearer")
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", str(self.server.limits.retry_after))
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, POST")
        if close:
            self.send_header("Connection", "close")  # also sets self.close_connection
        self.end_headers()
        self.wfile.write(data)

    def _refuse_unread(self, status: HTTPStatus, message: str) -> None:
        """Answer without reading the body and close; `finish` drains what the client still sends (see there)."""
        self._send(status, {"error": message}, close=True)
        self._linger = True

    def finish(self) -> None:
        """Before closing a connection whose request body was not read, read and drop what the client still sends
        (bounded): closing a socket with unread data resets it, and the client would see the reset, not the answer.
        """
        if getattr(self, "_linger", False):
            try:
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.2)
                deadline, drained = time.monotonic() + _LINGER_SECONDS, 0
                while drained < _LINGER_BYTES and time.monotonic() < deadline:
                    try:
                        chunk = self.connection.recv(1 << 16)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    drained += len(chunk)
            except OSError:
                pass
        super().finish()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors of the base class (bad request line, headers too long, unknown method) as JSON, and 405, not 501."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command!r} not allowed; use GET or POST"
        self.close_connection = True
        try:
            self._refuse_unread(HTTPStatus(code), message or HTTPStatus(code).phrase)
        except OSError:
            pass

    def _authorized(self) -> bool:
        token = self.server.token
        if not token:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def _path_error(self) -> str | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).strip("/")
        if path.rsplit("/", 1)[-1] == self.server.name:  # a reverse proxy may keep a path prefix
            return None
        return f"no reward at '/{path}'; this server serves '{self.server.name}' at '/{self.server.name}'"

    def _stopping_answer(self) -> tuple[HTTPStatus, str]:
        return HTTPStatus.SERVICE_UNAVAILABLE, "the reward server is stopping; retry later"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        with self.server._request() as accepted:
            if not accepted:
                self._refuse_unread(*self._stopping_answer())
            elif not self._authorized():
                self._refuse_unread(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
            elif error := self._path_error():
                self._refuse_unread(HTTPStatus.NOT_FOUND, error)
            else:
                self._send(HTTPStatus.OK, {"name": self.server.name, "status": "ok"})

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        with self.server._request() as accepted:
            if not accepted:
                self._refuse_unread(*self._stopping_answer())
            else:
                self._post()

    def _post(self) -> None:
        limits = self.server.limits
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._refuse_unread(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            return
        if length < 0:
            self._refuse_unread(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length}")
            return
        if length > limits.max_body_bytes:
            self._refuse_unread(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes, over the server's max_body_mb {limits.max_body_mb:g} "
                f"({limits.max_body_bytes} bytes); send fewer images per request (remote_reward's batch_size)",
            )
            return
        if not self._authorized():
            self._refuse_unread(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
            return
        if error := self._path_error():
            self._refuse_unread(HTTPStatus.NOT_FOUND, error)
            return
        body = self.rfile.read(length)
        if len(body) < length:  # the client went away mid-request
            self.close_connection = True
            return
        if not self.server._queue_slots.acquire(blocking=False):
            self._send(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {
                    "error": f"busy: {limits.max_queue} requests are already waiting for the reward (max_queue); "
                    f"retry in {limits.retry_after} s"
                },
            )
            return
        try:
            rewards = self.server.score(self.server.parse(body))
        except UserInputError as e:
            self._send(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(e)})
        except RequestRejected as e:
            self._send(e.status, {"error": str(e)})
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"bad request: {e}"})
        except Exception as e:  # a bug in the server: report it rather than drop the connection
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})
        else:
            self._send(HTTPStatus.OK, {"rewards": rewards})
        finally:
            self.server._queue_slots.release()


def serve_reward(
    name_or_spec: str | Callable[..., Any],
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    limits: ServerLimits | None = None,
) -> RewardServer:
    """Start serving a reward over HTTP in a background thread and return the server.

    Args:
        name_or_spec: a `reward_funcs` entry (built-in name, `module:function`, `file.py:function`) or a callable.
        host: interface to listen on (127.0.0.1: this machine only; 0.0.0.0: all interfaces).
        port: port to listen on; 0 picks a free one (read it from `server.url`).
        token: bearer token clients must send; None or "" accepts any client.
        base_dir: folder relative `file.py:function` paths are relative to (default: the current directory).
        limits: what requests may hold and how much load to take (default: [`ServerLimits`]()).

    Returns:
        The running [`RewardServer`]; `server.url` is its address, `server.close()` stops it.

    Raises:
        UserInputError: the reward cannot be resolved, or the address cannot be bound.
    """
    func = resolve_reward_func(name_or_spec, base_dir=base_dir)
    name = reward_func_name(func)
    try:
        server = RewardServer((host, int(port)), func, name, token or None, limits)
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


_LIMIT_HELP = {
    "max_body_mb": "largest request body, MiB",
    "max_images": "most images per request",
    "max_pixels": "most pixels (width x height) per image, read from the PNG header before decoding",
    "max_request_pixels": "most pixels of all images of a request",
    "max_prompt_chars": "longest prompt, characters",
    "max_json_depth": "deepest nesting of lists/objects in the body",
    "max_connections": "connections served at once; more wait in the listen backlog",
    "max_queue": "requests waiting for or in the reward call; more get 503 + Retry-After",
    "backlog": "listen backlog (capped by the OS's somaxconn)",
    "retry_after": "seconds a 503 answer asks clients to wait",
    "timeout": "seconds a connection may stall mid-request or idle between requests",
    "drain_timeout": "seconds SIGTERM / Ctrl-C waits for requests in flight",
}


def main_serve_reward(argv: list[str]) -> int:
    """`trl-flow serve-reward NAME [--host HOST] [--port PORT] [--token TOKEN] [limits]`: serve until stopped.

    Prints the URL to put in a recipe's `reward_funcs`. SIGTERM or Ctrl-C stops accepting, lets the requests in
    flight finish (up to `--drain_timeout` s) and returns 0. Returns 2 for a user error such as an unknown reward,
    a port in use or a bad limit.
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
    group = parser.add_argument_group("limits (a request over one is answered 4xx naming it)")
    for field in dataclasses.fields(ServerLimits):
        group.add_argument(
            f"--{field.name}",
            type=type(field.default),
            default=field.default,
            help=f"{_LIMIT_HELP[field.name]} (default: {field.default:g})"
            if isinstance(field.default, float)
            else f"{_LIMIT_HELP[field.name]} (default: {field.default})",
        )
    args = parser.parse_args(argv)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    try:
        limits = ServerLimits(**{field.name: getattr(args, field.name) for field in dataclasses.fields(ServerLimits)})
        server = serve_reward(args.reward, host=args.host, port=args.port, token=token, limits=limits)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not token and not _is_loopback(args.host):
        print(
            f"warning: serving on {args.host} without a token; anyone who can reach this port can use it. "
            f"Set --token or ${TOKEN_ENV}.",
            file=sys.stderr,
        )
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    print(f"serving reward '{server.name}' at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        in_flight = server.in_flight
        if in_flight:
            print(f"stopping: waiting up to {limits.drain_timeout:g} s for {in_flight} request(s)", file=sys.stderr)
        finished = server.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not finished:
        print(f"stopped with requests unfinished after {limits.drain_timeout:g} s", file=sys.stderr)
    return 0
