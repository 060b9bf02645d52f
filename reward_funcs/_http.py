"""Small HTTP client helpers (stdlib only) for rewards computed elsewhere: JSON POST with bounded retries.

Used by the `vlm_judge` reward and by trl-flow's remote-reward client (`trl_flow.rewards.remote.remote_reward`).
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

__all__ = ["RemoteRewardError", "encode_image", "post_json"]

_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
"""HTTP statuses worth retrying (timeouts, rate limits, transient server errors)."""

logger = logging.getLogger(__name__)


class RemoteRewardError(RuntimeError):
    """A reward computed over HTTP could not be obtained (server down, refused, or gave a bad answer).

    Raised instead of returning a made-up score, so that training stops with the cause rather than learning from
    zeros.
    """


class _Retryable(Exception):
    """An attempt failed in a way that another attempt may fix; `retry_after`: the server's wait, in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    """Seconds from a `Retry-After` header (delay-seconds or an HTTP date), or None if absent or unreadable."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError, OverflowError):
        return None


def encode_image(image: Any, image_format: str = "PNG") -> str:
    """An image as base64 text of its PNG (lossless; default) or JPEG (quality 95) encoding."""
    from reward_funcs._common import to_pil_rgb

    buffer = io.BytesIO()
    if image_format.upper() in ("JPEG", "JPG"):
        to_pil_rgb(image).save(buffer, format="JPEG", quality=95)
    else:
        to_pil_rgb(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_body(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read().decode("utf-8", errors="replace")
    except Exception:
        return ""
    finally:
        error.close()  # release the connection now, not when the error is collected
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and "error" in parsed:
            detail = parsed["error"]
            body = detail.get("message", str(detail)) if isinstance(detail, dict) else str(detail)
    except (json.JSONDecodeError, TypeError):
        pass
    return body.strip()[:500]


def post_json(
    url: str,
    payload: dict[str, Any],
    *,
    what: str,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    max_retries: int = 3,
    backoff: float = 1.0,
    max_backoff: float = 30.0,
    check: Callable[[Any], Any] | None = None,
) -> Any:
    """POST `payload` as JSON to `url` and return `check(response_json)` (or the JSON itself).

    Connection errors (refused, reset), timeouts, HTTP 408/425/429/5xx, replies that are not JSON and replies
    `check` rejects by raising `ValueError` are retried up to `max_retries` times, sleeping `backoff * 2**attempt`
    seconds in between, or as long as the answer's `Retry-After` header asks (a busy server's 503), at most
    `max_backoff`. Each retry is logged as a warning (logger `reward_funcs._http`). Other HTTP errors (400, 401,
    404, 413, 422, ...) are not retried.

    Args:
        url: the endpoint.
        payload: a JSON-serialisable dict.
        what: what is being asked, for error messages (e.g. "reward 'vlm_judge'").
        headers: extra request headers (e.g. Authorization).
        timeout: seconds for connecting and for each read from the socket.
        max_retries: retries after the first attempt (0: a single attempt).
        backoff: first pause between attempts, in seconds.
        max_backoff: longest pause.
        check: validates / converts the decoded response; raise `ValueError` to retry.

    Raises:
        RemoteRewardError: the last failure, once attempts are exhausted or at once for a non-retryable error.
    """
    data = json.dumps(payload).encode("utf-8")
    request_headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    attempts = max(int(max_retries), 0) + 1
    last_error, retry_after = "no attempt made", None
    for attempt in range(attempts):
        if attempt:
            delay = backoff * 2 ** (attempt - 1) if retry_after is None else retry_after
            delay = min(delay, max_backoff)
            logger.warning("%s: %s; retry %d of %d in %.1f s", what, last_error, attempt, attempts - 1, delay)
            time.sleep(delay)
        request = urllib.request.Request(url, data=data, headers=request_headers, method="POST")
        try:
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    body = response.read()
            except urllib.error.HTTPError as e:
                detail = _error_body(e)
                message = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
                if e.code in _RETRY_STATUS:
                    raise _Retryable(message, _retry_after(e.headers)) from e
                hint = " (wrong or missing token?)" if e.code in (401, 403) else ""
                raise RemoteRewardError(f"{what}: {url} answered {message}{hint}") from e
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, truncated replies
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                raise _Retryable(f"cannot reach the server ({type(reason).__name__}: {reason})") from e
            try:
                decoded = json.loads(body)
            except json.JSONDecodeError as e:
                raise _Retryable(f"the reply is not JSON: {body[:200]!r}") from e
            if check is None:
                return decoded
            try:
                return check(decoded)
            except ValueError as e:
                raise _Retryable(str(e)) from e
        except _Retryable as e:
            last_error, retry_after = str(e), e.retry_after
    raise RemoteRewardError(f"{what}: request to {url} failed after {attempts} attempt(s); last error: {last_error}")
