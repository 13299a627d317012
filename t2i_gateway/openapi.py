"""The public API's OpenAPI 3 document, generated from the marshmallow schemas that validate requests."""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields

from t2i_common import IMAGE_FORMATS, __version__
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


class OpenAIImageSchema(Schema):
    url = fields.String(metadata={"description": "With response_format url: where to download the PNG (on this gateway)."})
    b64_json = fields.String(metadata={"description": "With response_format b64_json: the PNG, base64."})


class OpenAIImagesResponseSchema(Schema):
    created = fields.Integer(required=True)
    data = fields.List(fields.Nested(OpenAIImageSchema), required=True)


class OpenAIModelSchema(Schema):
    id = fields.String(required=True)
    object = fields.String(required=True)
    created = fields.Integer(required=True)
    owned_by = fields.String(required=True)


class OpenAIModelListSchema(Schema):
    object = fields.String(required=True)
    data = fields.List(fields.Nested(OpenAIModelSchema), required=True)


class OpenAIErrorDetailSchema(Schema):
    message = fields.String(required=True)
    type = fields.String(required=True)
    param = fields.String(allow_none=True, required=True)
    code = fields.String(allow_none=True, required=True)


class OpenAIErrorSchema(Schema):
    error = fields.Nested(OpenAIErrorDetailSchema, required=True)


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
    keyed = _keyed_errors(api_keys, "HTTPError")
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
                    **keyed,
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
        path="/stream/{token}/{name}.{format}",
        operations={
            "get": {
                "summary": "Download a generated image (with --stream-redirect, a stored image is a 302 to the store).",
                "operationId": "getImage",
                "parameters": [
                    {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "format", "in": "path", "required": True, "schema": {"type": "string", "enum": list(IMAGE_FORMATS)}},
                ],
                "responses": {
                    "200": {
                        "description": "The image, in the format asked for.",
                        "content": {media: {"schema": {"type": "string", "format": "binary"}} for media in IMAGE_FORMATS.values()},
                    },
                    "206": {"description": "A range of a stored image (Range: bytes=...)."},
                    "302": {"description": "With --stream-redirect: a presigned URL of the stored image, valid 5 minutes."},
                    "304": {"description": "The stored image has the ETag sent in If-None-Match."},
                    "404": _error("Unknown, tampered or expired image."),
                    "416": _error("A range outside the image."),
                    "502": _error("The orchestrator or image store holding the image cannot be reached."),
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
    _openai_paths(spec, limits, security, api_keys)
    if api_keys:
        spec.path(
            path="/admin/usage",
            operations={
                "get": {
                    "summary": "Each key's usage (a key with admin = true): requests by status, images, megapixel-steps, "
                    "generation seconds; summed across gateways that share --limits-redis.",
                    "operationId": "usage",
                    "security": security,
                    "responses": {
                        "200": {"description": "Usage by key name.", "content": {"application/json": {"schema": {"type": "object"}}}},
                        "401": keyed["401"],
                        "403": _error("The key is not an admin key."),
                    },
                }
            },
        )
    return spec.to_dict()


def _keyed_errors(api_keys: bool, schema: str) -> dict[str, Any]:
    """A generation's answers that only keys give: a wrong key, a model it may not use, a limit reached."""
    if not api_keys:
        return {}
    limited = _error("The key is over one of its limits (--keys-file); see Retry-After and the x-ratelimit-* headers.", schema)
    limited["headers"] = {
        "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."},
        "x-ratelimit-remaining-requests": {
            "schema": {"type": "integer"},
            "description": "As OpenAI's; also -limit-, -reset-, and for images and megapixel-steps.",
        },
    }
    return {
        "401": _error("Missing or wrong API key.", schema),
        "403": _error("The key may not use this model.", schema),
        "429": limited,
    }


def _openai_paths(spec: APISpec, limits: Limits, security: list[dict[str, list[str]]], api_keys: bool) -> None:
    from .openai_api import _image_generation_schema

    spec.components.schema("OpenAIImageGenerationParams", schema=_image_generation_schema(limits))
    spec.components.schema("OpenAIImagesResponse", schema=OpenAIImagesResponseSchema)
    spec.components.schema("OpenAIModelList", schema=OpenAIModelListSchema)
    spec.components.schema("OpenAIError", schema=OpenAIErrorSchema)
    busy = _error("No orchestrator can take the request now; see Retry-After.", "OpenAIError")
    busy["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    keyed = _keyed_errors(api_keys, "OpenAIError")
    unauthorized = {"401": keyed["401"]} if api_keys else {}
    spec.path(
        path="/v1/images/generations",
        operations={
            "post": {
                "summary": "OpenAI's Images API: generate images from a text prompt.",
                "operationId": "openaiCreateImage",
                "security": security,
                "requestBody": {"required": True, "content": {"application/json": {"schema": "OpenAIImageGenerationParams"}}},
                "responses": {
                    "200": {
                        "description": "The images, as urls or base64.",
                        "content": {"application/json": {"schema": "OpenAIImagesResponse"}},
                    },
                    "400": _error("An invalid request: malformed JSON, a bad field, a model no orchestrator offers.", "OpenAIError"),
                    **keyed,
                    "500": _error("Generation failed on the orchestrator.", "OpenAIError"),
                    "502": _error("The orchestrator holding an image cannot be reached.", "OpenAIError"),
                    "503": busy,
                    "504": _error("The request's deadline passed.", "OpenAIError"),
                },
            }
        },
    )
    spec.path(
        path="/v1/models",
        operations={
            "get": {
                "summary": "OpenAI's model list: the models on offer.",
                "operationId": "openaiListModels",
                "security": security,
                "responses": {
                    "200": {"description": "The models.", "content": {"application/json": {"schema": "OpenAIModelList"}}},
                    **unauthorized,
                },
            }
        },
    )
