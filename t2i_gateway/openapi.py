"""The public API's OpenAPI 3 document, generated from the marshmallow schemas that validate requests."""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields

from t2i_common import __version__
from t2i_common.schemas import Limits, build_request_schema


class MediaSchema(Schema):
    url = fields.String(required=True, metadata={"description": "Where to download the PNG (on this gateway)."})
    seed = fields.Integer(required=True, metadata={"description": "The image's seed."})
    nsfw = fields.Boolean(required=True, metadata={"description": "Flagged by the safety checker."})


class ImageResponseSchema(Schema):
    images = fields.List(fields.Nested(MediaSchema), required=True)


class HTTPErrorDetailSchema(Schema):
    msg = fields.String(required=True)


class HTTPErrorSchema(Schema):
    detail = fields.Nested(HTTPErrorDetailSchema, required=True)


class ValidationErrorSchema(Schema):
    loc = fields.List(fields.String(), required=True, metadata={"description": '["body", "<field>"]'})
    msg = fields.String(required=True)
    type = fields.String(required=True)


class HTTPValidationErrorSchema(Schema):
    detail = fields.List(fields.Nested(ValidationErrorSchema), required=True)


def _error(description: str, schema: str = "HTTPError") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build_openapi(limits: Limits, *, api_keys: bool) -> dict[str, Any]:
    spec = APISpec(
        title="t2i gateway",
        version=__version__,
        openapi_version="3.0.3",
        info={"description": "Text-to-image over the Livepeer AI API."},
        plugins=[MarshmallowPlugin()],
    )
    spec.components.schema("TextToImageParams", schema=build_request_schema(limits))
    spec.components.schema("ImageResponse", schema=ImageResponseSchema)
    spec.components.schema("HTTPError", schema=HTTPErrorSchema)
    spec.components.schema("HTTPValidationError", schema=HTTPValidationErrorSchema)
    security: list[dict[str, list[str]]] = []
    if api_keys:
        spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
        security = [{"bearer": []}]
    busy = _error("No orchestrator can take the request now; see Retry-After.")
    busy["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    spec.path(
        path="/text-to-image",
        operations={
            "post": {
                "summary": "Generate images from a text prompt.",
                "operationId": "genTextToImage",
                "security": security,
                "requestBody": {"required": True, "content": {"application/json": {"schema": "TextToImageParams"}}},
                "responses": {
                    "200": {
                        "description": "The generated images; with `Accept: text/event-stream`, live progress events "
                        "(queued, started, progress, retry) and then `result` (this body) or `error`.",
                        "content": {
                            "application/json": {"schema": "ImageResponse"},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    "400": _error("Malformed JSON, or a model or LoRA that no orchestrator offers."),
                    **({"401": _error("Missing or wrong API key.")} if api_keys else {}),
                    "413": _error("The body is too large."),
                    "415": _error("The body is not declared as JSON."),
                    "422": _error("Invalid fields.", "HTTPValidationError"),
                    "500": _error("Generation failed on the orchestrator."),
                    "503": busy,
                    "504": _error("The request's deadline passed."),
                },
            }
        },
    )
    spec.path(
        path="/stream/{token}/{name}.png",
        operations={
            "get": {
                "summary": "Download a generated image.",
                "operationId": "getImage",
                "parameters": [
                    {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "The PNG.", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                    "404": _error("Unknown, tampered or expired image."),
                    "502": _error("The orchestrator holding the image cannot be reached."),
                },
            }
        },
    )
    spec.path(
        path="/health",
        operations={
            "get": {
                "summary": "Whether at least one orchestrator is ready.",
                "operationId": "health",
                "responses": {
                    "200": {"description": "Ready.", "content": {"application/json": {"schema": {"type": "object"}}}},
                    "503": {"description": "No orchestrator is ready.", "content": {"application/json": {"schema": {"type": "object"}}}},
                },
            }
        },
    )
    return spec.to_dict()
