"""The public text-to-image request: validated with marshmallow at the edge, a frozen dataclass inside.

Both daemons validate with the schema built here (the gateway before it forwards, the node again
before it generates), so the contract is written once.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from . import IMAGE_FORMATS
from .errors import BadRequest, InvalidFields, UnsupportedMediaType

MAX_SEED = 2**32 - 1
DEFAULT_QUALITY = 90  # of JPEG and WebP, when output_compression is absent


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one request may ask for; each daemon takes them from its configuration."""

    min_size: int = 64
    max_size: int = 2048
    max_pixels: int = 2048 * 2048  # width x height x images, so that one request cannot exhaust a node
    max_steps: int = 100
    max_images: int = 8
    max_prompt_length: int = 2000
    max_guidance: float = 30.0
    max_loras: int = 4
    max_lora_weight: float = 10.0


@dataclass(frozen=True, slots=True)
class TextToImageRequest:
    """A validated request. ``None`` means "the model's default" (see the model profiles)."""

    prompt: str
    model_id: str = ""
    width: int = 512
    height: int = 512
    guidance_scale: float | None = None
    negative_prompt: str = ""
    safety_check: bool | None = None  # None: check whenever the node has a checker for the model
    seed: int | None = None
    num_inference_steps: int | None = None
    num_images_per_prompt: int = 1
    loras: tuple[tuple[str, float], ...] = field(default=())
    output_format: str = "png"
    output_compression: int | None = None  # JPEG and WebP quality; None: DEFAULT_QUALITY


# pydantic-style type names in 422 details, for clients written against the Livepeer runner.
_ERROR_TYPES = {
    "Missing data for required field.": "missing",
    "Unknown field.": "extra_forbidden",
    "Field may not be null.": "none_forbidden",
    "Not a valid integer.": "int_type",
    "Not a valid number.": "float_type",
    "Not a valid string.": "string_type",
    "Not a valid boolean.": "bool_type",
}


class StrictBoolean(fields.Boolean):
    """JSON ``true`` or ``false`` only: not 1, "yes" or "on" (marshmallow's Boolean takes those)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


# The shape of ``loras``, as far as a pattern can say it: empty, or a JSON object (the rest is checked when parsed).
LORAS_PATTERN = r"^\s*(\{[\s\S]*\})?\s*$"


class _Loras(fields.String):
    """A JSON object in a string (Livepeer's format), loaded as ``((lora_id, weight), ...)``."""

    def __init__(self, limits: Limits, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limits = limits

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[tuple[str, float], ...]:  # type: ignore[override]
        try:
            return _parse_loras(super()._deserialize(value, attr, data, **kwargs), self.limits)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


def build_request_schema(limits: Limits) -> Schema:
    """A schema instance for ``limits``; ``load`` returns a ``TextToImageRequest``."""
    budget = f"width x height x num_images_per_prompt at most {limits.max_pixels}"  # checked in _check_combination

    class TextToImageSchema(Schema):
        class Meta:
            ordered = True

        prompt = fields.String(
            required=True,
            validate=validate.Length(min=1, max=limits.max_prompt_length),
            metadata={"description": "What to draw."},
        )
        model_id = fields.String(
            load_default="",
            validate=validate.Length(max=256),
            metadata={"description": "Model to use; empty or absent means the default model."},
        )
        width = fields.Integer(
            strict=True,
            load_default=512,
            validate=validate.Range(min=limits.min_size, max=limits.max_size),
            metadata={
                "description": f"Image width in pixels, a multiple of 8; {budget}.",
                "multipleOf": 8,
            },
        )
        height = fields.Integer(
            strict=True,
            load_default=512,
            validate=validate.Range(min=limits.min_size, max=limits.max_size),
            metadata={
                "description": f"Image height in pixels, a multiple of 8; {budget}.",
                "multipleOf": 8,
            },
        )
        guidance_scale = fields.Float(
            load_default=None,
            validate=validate.Range(min=0.0, max=limits.max_guidance),
            metadata={"description": "Classifier-free guidance; absent means the model's default."},
        )
        negative_prompt = fields.String(
            load_default="",
            validate=validate.Length(max=limits.max_prompt_length),
            metadata={"description": "What not to draw (ignored when guidance is below 1)."},
        )
        safety_check = StrictBoolean(
            load_default=None,
            metadata={
                "description": "Run the safety checker and report `nsfw`. Absent: checked wherever the node has a checker; "
                "`true` on a node without one is a 400."
            },
        )
        seed = fields.Integer(
            strict=True,
            load_default=None,
            validate=validate.Range(min=0, max=MAX_SEED),
            metadata={"description": "Seed of the first image; image i uses seed + i. Random when absent."},
        )
        num_inference_steps = fields.Integer(
            strict=True,
            load_default=None,
            validate=validate.Range(min=1, max=limits.max_steps),
            metadata={"description": "Denoising steps; absent means the model's default."},
        )
        num_images_per_prompt = fields.Integer(
            strict=True,
            load_default=1,
            validate=validate.Range(min=1, max=limits.max_images),
            metadata={"description": f"How many images to generate; {budget}."},
        )
        loras = _Loras(
            limits,
            load_default="",  # not deserialized: _to_request turns it into no LoRAs
            metadata={
                "description": f'LoRA adapters as a JSON object in a string: `{{"repo/id": weight}}`, at most {limits.max_loras}, '
                f"each weight 0 to {limits.max_lora_weight}; empty for none.",
                "pattern": LORAS_PATTERN,
            },
        )
        output_format = fields.String(
            load_default="png",
            validate=validate.OneOf(tuple(IMAGE_FORMATS), error=f"Must be one of {', '.join(IMAGE_FORMATS)}."),
            metadata={"description": "The images' file format (OpenAI's name for it); the stream url ends with it."},
        )
        output_compression = fields.Integer(
            strict=True,
            load_default=None,
            validate=validate.Range(min=0, max=100),
            metadata={"description": f"JPEG and WebP quality, 0 to 100 (absent: {DEFAULT_QUALITY}); PNG is lossless and takes none."},
        )

        @validates_schema(skip_on_field_errors=False)
        def _check_combination(self, data: dict[str, Any], **_: Any) -> None:
            errors: dict[str, str] = {}
            if data.get("output_format") == "png" and data.get("output_compression") is not None:
                errors["output_compression"] = "Applies to jpeg and webp only: PNG is lossless; leave it out or ask for jpeg or webp."
            for name in ("width", "height"):
                if isinstance(data.get(name), int) and data[name] % 8:
                    errors[name] = f"Must be a multiple of 8, got {data[name]}."
            if not errors and all(isinstance(data.get(k), int) for k in ("width", "height", "num_images_per_prompt")):
                pixels = data["width"] * data["height"] * data["num_images_per_prompt"]
                if pixels > limits.max_pixels:
                    errors["num_images_per_prompt"] = (
                        f"width x height x num_images_per_prompt is {pixels} pixels, over the limit of "
                        f"{limits.max_pixels}; ask for fewer or smaller images."
                    )
            if errors:
                raise ValidationError(errors)

        @post_load
        def _to_request(self, data: dict[str, Any], **_: Any) -> TextToImageRequest:
            return TextToImageRequest(**{**data, "loras": data["loras"] or ()})

    return TextToImageSchema()


def to_body(request: TextToImageRequest) -> dict[str, Any]:
    """The request as a Livepeer API body (what a gateway forwards to a node): what is None left out."""
    body = {name: value for name, value in asdict(request).items() if value is not None and name != "loras"}
    if request.output_format == "png":
        del body["output_format"]  # the default, left out: a node of an earlier version knows no such field
    if request.loras:
        body["loras"] = json.dumps(dict(request.loras))
    return body


def _parse_loras(text: str, limits: Limits) -> tuple[tuple[str, float], ...]:
    if not text.strip():
        return ()
    try:
        loras = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError('Must be a JSON object in a string, like "{\\"repo/id\\": 1.0}".') from None
    if not isinstance(loras, dict):
        raise ValueError('Must be a JSON object mapping LoRA ids to weights, like "{\\"repo/id\\": 1.0}".')
    if len(loras) > limits.max_loras:
        raise ValueError(f"At most {limits.max_loras} LoRAs per request, got {len(loras)}.")
    parsed = []
    for lora_id, weight in loras.items():
        if not lora_id.strip() or len(lora_id) > 256:
            raise ValueError("LoRA ids must be non-empty and at most 256 characters.")
        if not lora_id.isprintable():
            raise ValueError(f"LoRA id {lora_id!r} holds a control character; LoRA ids are names or repo ids such as 'repo/id'.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"The weight of {lora_id!r} must be a number, got {weight!r}.")
        if not 0 <= weight <= limits.max_lora_weight:
            raise ValueError(f"The weight of {lora_id!r} must be between 0 and {limits.max_lora_weight}, got {weight}.")
        parsed.append((lora_id, float(weight)))
    return tuple(parsed)


def parse_request(body: bytes, content_type: str | None, schema: Schema) -> TextToImageRequest:
    """Decode and validate a request body, raising the API's 400, 415 or 422 errors."""
    return validate_request(decode_body(body, content_type), schema)


def decode_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The JSON object in a request body (400 or 415 otherwise), decoded once."""
    media_type = (content_type or "application/json").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"The body must be JSON: send 'Content-Type: application/json', not {media_type!r}.")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}.") from None
    except RecursionError:  # e.g. a list in a list, 100,000 levels deep: never a request
        raise BadRequest("The body is not usable JSON: it is nested too deeply.") from None
    if not isinstance(data, dict):
        raise BadRequest("The body must be a JSON object with at least a 'prompt' field.")
    return data


def validate_request(data: dict[str, Any], schema: Schema) -> TextToImageRequest:
    """The checked request (422 naming every problem field)."""
    try:
        request: TextToImageRequest = schema.load(data)
    except ValidationError as exc:
        raise InvalidFields(_problems(exc.normalized_messages())) from None
    return request


def _problems(messages: dict[str, Any]) -> list[tuple[str, str, str]]:
    problems = []
    for name, value in messages.items():
        texts = value if isinstance(value, list) else [value]
        for text in texts:
            text = str(text)
            problems.append((name, text, _ERROR_TYPES.get(text, "value_error")))
    return problems
