"""What a reward server accepts: its limits ([`ServerLimits`]), and reading a request body against them.

[`parse_body`] decodes the JSON body (refusing deep nesting), [`check_request`] checks its shape, counts, prompt
lengths and image sizes (read from each PNG header, so before anything is decoded) and [`decode_images`] decodes the
images once the request's turn for the reward comes. A request over a limit raises [`RequestRejected`] with the
4xx to answer and a message naming the limit; a malformed one raises `ValueError` (answered 400). The protocol is
described in `trl_flow.rewards.remote`; the HTTP server that uses this is `trl_flow.rewards.server`.

Imports only the standard library and `trl_flow.errors` at load (PIL when an image is read); not `server`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import struct
from http import HTTPStatus
from typing import Any

from trl_flow.errors import UserInputError

__all__ = ["RequestRejected", "ServerLimits", "check_request", "decode_images", "parse_body"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RESERVED_COLUMNS = frozenset({"prompts", "completions"})


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What a reward server accepts and how much load it takes; each is a `trl-flow serve-reward --flag`.

    A request over a limit is answered 4xx (413 for sizes, 400 for JSON depth) with a message naming it.
    """

    max_body_mb: float = 256.0
    """Largest request body, MiB (answered 413). Bigger batches: set the client's `batch_size`."""
    max_images: int = 256
    """Most images in one request (413)."""
    max_pixels: int = 4096 * 4096
    """Most pixels (width x height) of one image, read from its header before decoding (413). PIL refuses images
    over 2 x 89.5 Mpx as decompression bombs; this default (16.8 Mpx) is well under."""
    max_request_pixels: int = 1 << 28
    """Most pixels of all images of one request together (413); bounds the memory of decoded images."""
    max_prompt_chars: int = 10_000
    """Longest prompt, in characters (413)."""
    max_json_depth: int = 32
    """Deepest nesting of lists and objects in the body (400); the protocol itself needs 3."""
    max_connections: int = 256
    """Connections served at once (a thread each); more wait in the listen backlog."""
    max_queue: int = 128
    """Requests waiting for or in the reward call; more are answered 503 with Retry-After."""
    backlog: int = 1024
    """Listen backlog: connections the OS holds until they are accepted (capped by the OS, `somaxconn`)."""
    retry_after: int = 1
    """Seconds a 503 answer asks the client to wait (`Retry-After`)."""
    timeout: float = 60.0
    """Seconds a connection may stall while sending its request, or stay idle between requests."""
    drain_timeout: float = 30.0
    """Seconds `close()` / SIGTERM waits for the requests in flight to finish."""

    def __post_init__(self) -> None:
        bad = [f.name for f in dataclasses.fields(self) if not getattr(self, f.name) > 0]
        if bad:
            raise UserInputError(f"reward server limits must be positive: {', '.join(bad)}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


class RequestRejected(ValueError):
    """A request the server refuses with `status` (a 4xx) and a message naming the limit or the problem."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_body(body: bytes, limits: ServerLimits) -> Any:
    """Decode a request body as JSON, refusing nesting deeper than `limits.max_json_depth`."""
    limit = limits.max_json_depth
    too_deep = RequestRejected(
        HTTPStatus.BAD_REQUEST, f"the JSON body is nested more than {limit} levels deep (max_json_depth {limit})"
    )
    try:
        payload = json.loads(body)
    except RecursionError:
        raise too_deep from None
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            if depth > limit:
                raise too_deep
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return payload


def check_request(payload: Any, limits: ServerLimits) -> tuple[list[str], list[bytes], dict[str, list[Any]]]:
    """Check a decoded request body against `limits`, before any image is decoded.

    Returns:
        (prompts, encoded images as bytes, columns), ready for [`decode_images`] and the reward.

    Raises:
        ValueError: malformed request (answered 400), or a limit exceeded ([`RequestRejected`], its 4xx).
    """
    if not isinstance(payload, dict):
        raise ValueError("the request body must be a JSON object")
    prompts, images, columns = payload.get("prompts"), payload.get("images"), payload.get("columns") or {}
    if not isinstance(prompts, list) or not isinstance(images, list) or len(prompts) != len(images):
        raise ValueError("'prompts' and 'images' must be lists of the same length")
    if len(images) > limits.max_images:
        raise RequestRejected(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{len(images)} images in one request, over the server's max_images {limits.max_images}; "
            "send fewer per request (remote_reward's batch_size)",
        )
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        if len(prompt) > limits.max_prompt_chars:
            raise RequestRejected(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"prompt {i} is {len(prompt)} characters, over the server's max_prompt_chars {limits.max_prompt_chars}",
            )
    if not isinstance(columns, dict) or any(not isinstance(v, list) or len(v) != len(images) for v in columns.values()):
        raise ValueError("'columns' must map column names to lists with one value per image")
    reserved = sorted(_RESERVED_COLUMNS & columns.keys())
    if reserved:
        raise ValueError(f"'columns' may not be named {', '.join(reserved)}")
    encoded, total = [], 0
    for i, text in enumerate(images):
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, TypeError, ValueError) as e:
            raise ValueError(f"image {i} is not a base64-encoded image ({type(e).__name__}: {e})") from e
        width, height = _image_size(data, i)
        if width * height > limits.max_pixels:
            raise RequestRejected(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"image {i} is too large: {width}x{height} = {width * height} pixels, over the server's "
                f"max_pixels {limits.max_pixels}",
            )
        total += width * height
        if total > limits.max_request_pixels:
            raise RequestRejected(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the images of this request have over {limits.max_request_pixels} pixels together "
                f"(max_request_pixels); send fewer per request (remote_reward's batch_size)",
            )
        encoded.append(data)
    return prompts, encoded, columns


def decode_images(encoded: list[bytes]) -> list[Any]:
    """Decode the images [`check_request`] returned into PIL images (ValueError / RequestRejected if one is bad)."""
    return [_decode_image(data, i) for i, data in enumerate(encoded)]


def _image_size(data: bytes, index: int) -> tuple[int, int]:
    """(width, height) from an image's header, without decoding it (PNG: its IHDR chunk; other formats: PIL)."""
    if data.startswith(_PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ValueError(f"image {index} is not a base64-encoded image (a PNG without an IHDR chunk)")
        return struct.unpack(">II", data[16:24])
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return image.size
    except Image.DecompressionBombError as e:
        raise RequestRejected(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image {index} is too large: {e}") from e
    except Exception as e:  # PIL raises many types for garbage
        raise ValueError(f"image {index} is not a base64-encoded image ({type(e).__name__}: {e})") from e


def _decode_image(data: bytes, index: int) -> Any:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as e:
        raise RequestRejected(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image {index} is too large: {e}") from e
    except Exception as e:  # truncated or corrupt data
        raise ValueError(f"image {index} is not a base64-encoded image ({type(e).__name__}: {e})") from e
    return image
