"""One error vocabulary for both daemons, rendered in one middleware.

The wire shapes are the Livepeer runner's, so existing clients can parse them:
``{"detail": {"msg": "..."}}`` for most errors and, for invalid fields (422),
``{"detail": [{"loc": ["body", "<field>"], "msg": "...", "type": "..."}]}``.

    APIError
    ├── BadRequest            400  malformed JSON, unknown model, LoRA that cannot be loaded
    ├── Unauthorized          401  missing or wrong bearer token
    ├── Forbidden             403  a key used beyond what it may (a model, an operator's endpoint)
    ├── NotFound              404  unknown route, unknown or expired image
    ├── UnsupportedMediaType  415  a body that is not declared as JSON
    ├── InvalidFields         422  one entry per offending field
    ├── TooManyRequests       429  a key over one of its limits (with Retry-After and x-ratelimit-*)
    ├── InternalError         500  generation failed (CUDA out of memory, ...)
    ├── BadGateway            502  the orchestrator holding an image cannot be reached
    ├── ServiceUnavailable    503  queue full, still loading, no orchestrator free (with Retry-After)
    └── GatewayTimeout        504  the request's deadline passed before any orchestrator answered

aiohttp's own HTTP errors (unknown route 404, wrong method 405, body too large 413) get the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

logger = logging.getLogger(__name__)


class APIError(Exception):
    status = 500

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"detail": {"msg": self.message}}


class BadRequest(APIError):
    status = 400


class Unauthorized(APIError):
    status = 401

    def __init__(self, message: str = "Missing or invalid 'Authorization: Bearer <token>' header.") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(APIError):
    status = 403


class NotFound(APIError):
    status = 404


class RequestTimeout(APIError):
    status = 408

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})  # what is left of the body is not read


class UnsupportedMediaType(APIError):
    status = 415


class TooManyRequests(APIError):
    status = 429


class InternalError(APIError):
    status = 500


class BadGateway(APIError):
    status = 502


class GatewayTimeout(APIError):
    status = 504


class ServiceUnavailable(APIError):
    status = 503

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


def join_problems(problems: Sequence[tuple[str, str]]) -> str:
    """``field: message`` pairs as one sentence: "width: Must be ..., got 100; height: Must be ..., got 90."."""
    return "; ".join(f"{field}: {msg.rstrip('.')}" for field, msg in problems) + "."


class InvalidFields(APIError):
    status = 422

    def __init__(self, problems: Sequence[tuple[str, str, str]]) -> None:
        """``problems`` holds one ``(field, message, type)`` per offending field."""
        super().__init__(join_problems([(field, msg) for field, msg, _ in problems]))
        self.problems = list(problems)

    def body(self) -> dict[str, Any]:
        return {"detail": [{"loc": ["body", field], "msg": msg, "type": kind} for field, msg, kind in self.problems]}


def error_response(error: APIError) -> web.Response:
    """The Livepeer shape (``{"detail": ...}``), which both daemons speak."""
    return web.json_response(error.body(), status=error.status, headers=error.headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Render = Callable[[APIError], web.Response]


def error_middleware_for(render_for: Callable[[web.Request], Render]) -> Middleware:
    """An error middleware that renders each failure in the wire shape of the API the request used."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Render every failure in the wire shape; nothing unexpected reaches a client as a traceback."""
        render = render_for(request)
        try:
            return await handler(request)
        except APIError as error:
            return render(error)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # aiohttp's own errors (unknown route, wrong method, body too large) in our shape.
            message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
            shaped = APIError(message, headers={k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")})
            shaped.status = exc.status
            return render(shaped)
        except Exception:
            logger.exception("unhandled error in %s %s", request.method, request.path)
            return render(InternalError("Internal server error; the log has the details."))

    return error_middleware


error_middleware = error_middleware_for(lambda request: error_response)
