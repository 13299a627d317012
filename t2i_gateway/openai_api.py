"""OpenAI's Images API on the gateway: the same admission and dispatch as the Livepeer API, another wire shape.

``POST /v1/images/generations`` takes OpenAI's body, turns it into the Livepeer request that the
nodes speak, and answers ``{"created", "data": [{"url"} or {"b64_json"}]}``; ``GET /v1/models`` lists
the models on offer. Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
so that the official SDKs raise their usual exceptions with the gateway's message.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from marshmallow import RAISE, Schema, ValidationError, fields, validate

from t2i_common.errors import APIError, InvalidFields
from t2i_common.schemas import Limits, TextToImageRequest, build_request_schema, validate_request

PREFIX = "/v1/"
SIZE_AUTO = (512, 512)
# What OpenAI's clients may send, and what this gateway does with it (see the README).
QUALITIES = ("auto", "standard")  # the model's own steps and guidance
STYLES = ("natural",)  # the prompt as written: no rewriting
# Livepeer fields OpenAI lacks, taken as extra fields.
LIVEPEER_EXTRAS = ("seed", "negative_prompt", "num_inference_steps", "guidance_scale", "loras", "safety_check", "output_compression")

_ERROR_TYPES = {401: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error"}


def render_error(error: APIError) -> web.Response:
    """An ``APIError`` in OpenAI's shape, with the status OpenAI would use."""
    param = None
    if isinstance(error, InvalidFields) and error.problems:
        param = error.problems[0][0]
    status = 400 if error.status in (413, 415, 422) else error.status
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
    body = {"error": {"message": error.message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=error.headers)


def _image_generation_schema(limits: Limits) -> Schema:
    # The Livepeer fields OpenAI lacks come with the Livepeer schema's own types and bounds.
    livepeer = type(build_request_schema(limits)).__dict__["_declared_fields"]
    side = _sides(limits)

    class ImageGenerationSchema(Schema):
        class Meta:
            unknown = RAISE

        prompt = livepeer["prompt"]
        model = fields.String(load_default="", validate=validate.Length(max=256))
        n = fields.Integer(strict=True, load_default=1, validate=validate.Range(min=1, max=limits.max_images))
        size = fields.String(
            load_default="auto",
            validate=validate.Regexp(r"^(auto|[0-9]{1,5}x[0-9]{1,5})$", error="Must be 'auto' or WIDTHxHEIGHT such as '512x512'."),
            # The document states the real rule: each side a multiple of 8 within the limits (the
            # check above is looser, so that a wrong side gets a message that names it).
            metadata={
                "pattern": f"^(auto|{side}x{side})$",
                "description": f"'auto' or WIDTHxHEIGHT, each a multiple of 8 from {limits.min_size} to {limits.max_size}; "
                f"width x height x n at most {limits.max_pixels}.",
            },
        )
        response_format = fields.String(load_default="url", validate=validate.OneOf(("url", "b64_json")))
        quality = fields.String(
            load_default="auto", validate=validate.OneOf(QUALITIES, error=f"Only {', '.join(QUALITIES)} are supported here.")
        )
        style = fields.String(
            load_default=None, validate=validate.OneOf(STYLES, error="Only 'natural' is supported here: prompts are not rewritten.")
        )
        output_format = livepeer["output_format"]
        output_compression = livepeer["output_compression"]
        user = fields.String(load_default=None, validate=validate.Length(max=256))
        seed = livepeer["seed"]
        negative_prompt = livepeer["negative_prompt"]
        num_inference_steps = livepeer["num_inference_steps"]
        guidance_scale = livepeer["guidance_scale"]
        loras = livepeer["loras"]
        safety_check = livepeer["safety_check"]

    return ImageGenerationSchema()


def _sides(limits: Limits) -> str:
    """A regular expression for the multiples of 8 from min_size to max_size."""
    return "(" + "|".join(str(side) for side in range(-(-limits.min_size // 8) * 8, limits.max_size + 1, 8)) + ")"


def _parse_size(text: str) -> tuple[int, int] | None:
    width, _, height = text.partition("x")
    if not (width.isdigit() and height.isdigit()):
        return None
    return int(width), int(height)


class OpenAIRequests:
    """Turns OpenAI's request body into the Livepeer request the nodes speak."""

    def __init__(self, limits: Limits, livepeer_schema: Schema) -> None:
        self._schema = _image_generation_schema(limits)
        self._livepeer_schema = livepeer_schema

    def parse(self, data: dict[str, Any]) -> tuple[TextToImageRequest, str]:
        """The Livepeer request and the response format asked for; 400 (OpenAI's status) naming the field."""
        try:
            body = self._schema.load(data)
        except ValidationError as exc:
            raise InvalidFields([(name, _first(messages), "value_error") for name, messages in exc.normalized_messages().items()]) from None
        size = SIZE_AUTO if body["size"] == "auto" else _parse_size(body["size"])
        if size is None:  # "64x64\n" gets past the pattern's $
            raise InvalidFields([("size", "Must be 'auto' or WIDTHxHEIGHT such as '512x512'.", "value_error")])
        width, height = size
        livepeer = {
            "prompt": body["prompt"],
            "model_id": body["model"],
            "width": width,
            "height": height,
            "num_images_per_prompt": body["n"],
            "output_format": body["output_format"],
        }
        livepeer |= {name: data[name] for name in LIVEPEER_EXTRAS if name in data}  # as sent: checked with the rest below
        try:
            return validate_request(livepeer, self._livepeer_schema), body["response_format"]
        except InvalidFields as error:
            raise InvalidFields(_as_openai_names(error.problems)) from None


def _as_openai_names(problems: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Problems named as OpenAI names the field, where it has one; both sides of ``size`` in one message."""
    renamed = {"num_images_per_prompt": "n", "model_id": "model"}
    messages: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    for field, message, kind in problems:
        if field in ("width", "height"):  # "The width must be a multiple of 8, got 500."
            field, message = "size", f"The {field} {message[:1].lower()}{message[1:]}"
        field = renamed.get(field, field)
        messages.setdefault(field, []).append(message)
        kinds.setdefault(field, kind)
    return [(field, " ".join(messages[field]), kinds[field]) for field in messages]


def _first(messages: Any) -> str:
    return str(messages[0] if isinstance(messages, list) else messages)


def images_body(data: list[dict[str, str]]) -> dict[str, Any]:
    return {"created": int(time.time()), "data": data}


def models_body(model_ids: list[str]) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "t2i"} for model_id in model_ids]}
