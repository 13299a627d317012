"""Server-Sent Events: live progress of a text-to-image request, on both daemons.

A client that sends ``Accept: text/event-stream`` gets, instead of one JSON body, a stream of events:
``queued`` (``{"position": n}``), ``started`` (``{"node": ...}``), ``progress`` (``{"step": i, "steps": n}``),
``retry`` (gateway only: ``{"attempt": n, "reason": ...}``), then one final ``result`` (exactly the body
the plain call returns) or ``error`` (``{"status": code, "body": <the error body>}``). A request that is
refused before any work starts (invalid fields, unknown model, full queue) gets the plain HTTP error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from .errors import APIError, InternalError

logger = logging.getLogger(__name__)

Notify = Callable[[str, dict[str, Any]], None]
EVENT_STREAM = "text/event-stream"


def wants_events(request: web.Request) -> bool:
    return EVENT_STREAM in request.headers.get("Accept", "")


def encode(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def respond_with_events(
    request: web.Request, work: Callable[[Notify], Awaitable[dict[str, Any]]], *, first: tuple[str, dict[str, Any]] | None = None
) -> web.StreamResponse:
    """Run ``work(notify)`` and stream what it notifies, then its result (or its APIError) as the last event.

    If the client goes away, ``work`` is cancelled (which stops a generation at its next step).
    """
    response = web.StreamResponse(headers={"Content-Type": EVENT_STREAM, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    if first:
        events.put_nowait(first)
    task = asyncio.ensure_future(work(lambda event, data: events.put_nowait((event, data))))
    waiter: asyncio.Future[tuple[str, dict[str, Any]]] | None = None
    try:
        while True:
            waiter = asyncio.ensure_future(events.get())
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                waiter.cancel()
            else:
                await response.write(encode(*waiter.result()))
            while not events.empty():
                await response.write(encode(*events.get_nowait()))
            if task.done():
                break
        try:
            await response.write(encode("result", task.result()))
        except APIError as error:
            await response.write(encode("error", {"status": error.status, "body": error.body()}))
        except Exception:
            logger.exception("unhandled error in %s %s (event stream)", request.method, request.path)
            internal = InternalError("Internal server error; the server's log has the details.")
            await response.write(encode("error", {"status": internal.status, "body": internal.body()}))
        await response.write_eof()
    finally:
        if waiter is not None:
            waiter.cancel()  # else, when the client leaves, "Task was destroyed but it is pending!"
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, APIError):
                await task
    return response


async def read_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, Any]]:
    """Parse an event stream into ``(event, data)`` pairs (data decoded from JSON)."""
    event, data = "message", list[str]()
    async for raw in content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                try:
                    decoded = json.loads("\n".join(data))
                except RecursionError:
                    raise ValueError("an event's data is nested too deeply") from None
                yield event, decoded
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
