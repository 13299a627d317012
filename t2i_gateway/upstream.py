"""One attempt at a request on one orchestrator, and what its answer means for the gateway.

Every way an attempt can end is one of five outcomes:

- ``ok``: a well-formed image response;
- ``client_error``: 400 or 422, the client's fault: returned as is, not retried, node not blamed;
- ``busy``: 503 or 429, the node is full: try another, node not blamed;
- ``no_memory``: 507, the node ran out of device memory for this request's size: try another (a
  larger one may hold it), node not blamed;
- ``failed``: anything else (connection error, timeout, 5xx, a wrong secret, garbage): try another
  node, and count it against this one (``NodePool.failed``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from t2i_common import IMAGE_PATH
from t2i_common.schemas import TextToImageRequest
from t2i_common.sse import EVENT_STREAM, Notify, read_events

from .nodes import Node

Outcome = Literal["ok", "client_error", "busy", "no_memory", "failed"]


@dataclass(frozen=True, slots=True)
class Expected:
    """What a good answer holds: this many images, in this format, of this size."""

    images: int
    format: str = "png"
    width: int = 512
    height: int = 512

    @classmethod
    def of(cls, request: TextToImageRequest) -> Expected:
        return cls(request.num_images_per_prompt, request.output_format, request.width, request.height)


@dataclass(frozen=True, slots=True)
class AttemptResult:
    outcome: Outcome
    status: int = 0
    body: Any = None  # the parsed JSON body for ok and client_error
    reason: str = ""  # why it failed, for logs and the last error message
    unreachable: bool = False  # no connection could be made: the node, not the request


async def attempt(
    session: aiohttp.ClientSession,
    node: Node,
    payload: bytes,
    *,
    headers: dict[str, str],
    timeout: aiohttp.ClientTimeout,
    expected: Expected,
    on_event: Notify | None = None,
) -> AttemptResult:
    """POST the request to ``node``; gives up as soon as the node is found down.

    With ``on_event``, the node is asked for an event stream and its ``queued`` and ``progress``
    events are passed on as they come.
    """
    request = asyncio.ensure_future(_post(session, node, payload, headers, timeout, expected, on_event))
    down = asyncio.ensure_future(node.down.wait())
    try:
        done, _ = await asyncio.wait({request, down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        down.cancel()
        if not request.done():
            request.cancel()  # found down, or our own client went away
    if request in done:
        return request.result()
    await asyncio.wait({request})  # until our cancellation of it is done; a cancellation of ours propagates
    return AttemptResult("failed", reason="the node stopped answering its health probes")


async def _post(
    session: aiohttp.ClientSession,
    node: Node,
    payload: bytes,
    headers: dict[str, str],
    timeout: aiohttp.ClientTimeout,
    expected: Expected,
    on_event: Notify | None,
) -> AttemptResult:
    if on_event:
        headers = {**headers, "Accept": EVENT_STREAM}
    try:
        async with session.post(f"{node.url}/text-to-image", data=payload, headers=headers, timeout=timeout) as response:
            if on_event and response.status == 200 and response.content_type == EVENT_STREAM:
                return await _read_events(response, expected, on_event)
            raw = await response.read()
            status = response.status
    except TimeoutError:
        return AttemptResult("failed", reason="timed out")
    except aiohttp.ClientConnectorError as exc:
        return AttemptResult("failed", reason=f"{type(exc).__name__}: {exc}", unreachable=True)
    except aiohttp.ClientError as exc:
        return AttemptResult("failed", reason=f"{type(exc).__name__}: {exc}")
    except ValueError as exc:
        return AttemptResult("failed", reason=f"malformed event stream: {exc}")
    return _classify(status, _json_or_none(raw), expected)


async def _read_events(response: aiohttp.ClientResponse, expected: Expected, on_event: Notify) -> AttemptResult:
    async for event, data in read_events(response.content):
        if event == "result":
            return _classify(200, data, expected)
        if event == "error" and isinstance(data, dict) and isinstance(data.get("status"), int):
            return _classify(data["status"], data.get("body"), expected)
        if event in ("queued", "progress") and isinstance(data, dict):
            on_event(event, data)  # "started" the gateway announces itself, naming the node
    return AttemptResult("failed", reason="the event stream ended without a result")


def _classify(status: int, body: Any, expected: Expected) -> AttemptResult:
    if status in (400, 422):
        if not isinstance(body, dict) or "detail" not in body:
            body = {"detail": {"msg": f"The orchestrator refused the request ({status})."}}
        return AttemptResult("client_error", status, body)
    if status in (429, 503):
        return AttemptResult("busy", status, reason=f"busy ({status})")
    if status == 507:
        return AttemptResult("no_memory", status, reason="out of device memory for this request")
    if status != 200:
        return AttemptResult("failed", status, reason=f"answered {status}")
    problem = _check_images(body, expected)
    if problem:
        return AttemptResult("failed", status, reason=f"malformed answer: {problem}")
    return AttemptResult("ok", status, body)


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to be an answer
        return None


def _check_images(body: Any, expected: Expected) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("images"), list):
        return "no 'images' list"
    images = body["images"]
    if len(images) != expected.images:
        return f"{len(images)} images instead of {expected.images}"
    for image in images:
        if not (
            isinstance(image, dict)
            and isinstance(image.get("url"), str)
            and isinstance(image.get("seed"), int)
            and not isinstance(image.get("seed"), bool)
            and isinstance(image.get("nsfw"), bool)
        ):
            return "an image without a string url, an integer seed and a boolean nsfw"
        match = IMAGE_PATH.fullmatch(urlsplit(image["url"]).path)
        if match is None or match[3] != expected.format:
            return f"an image url that is not /stream/<id>/<name>.{expected.format}: {image['url'][:200]!r}"
    return None
