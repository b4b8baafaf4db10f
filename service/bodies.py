"""JSON request bodies: one strict decoder for every route, and the OpenAPI declaration that goes with it.

Types are not coerced: `"4"` is not a number. A number is an integer when its value is whole, as JSON Schema says,
so `4.0` counts as `4`. Malformed JSON is a 400; a body that does not fit its schema is a 422 naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.openapi.spec import OpenAPIMediaType, Operation, Reference, RequestBody

from service.errors import BadRequest, InvalidInput

T = TypeVar("T")
_AT_PATH = re.compile(r"at `\$\.?([^`]*)`")


def _whole_numbers_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_ints(item) for item in value]
    return value


def field_of(error: msgspec.ValidationError) -> str | None:
    match = _AT_PATH.search(str(error))
    return (match.group(1) or None) if match else None


def validate(value: Any, type_: type[T], *, strict: bool = True) -> T:
    """Fit decoded data to its struct, or say which field does not fit."""
    try:
        return msgspec.convert(value, type_, strict=strict)
    except msgspec.ValidationError as exc:
        raise InvalidInput(str(exc), code="invalid_field", field=field_of(exc)) from None


def decode_json(body: bytes, type_: type[T]) -> T:
    try:
        raw = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise BadRequest("The body is not valid JSON", code="malformed_json") from None
    return validate(_whole_numbers_as_ints(raw), type_)


async def read_json(request: Request[Any, Any, Any], type_: type[T]) -> T:
    return decode_json(await request.body(), type_)


def json_body(schema_name: str) -> type[Operation]:
    """An Operation class declaring a required JSON body of the named component schema."""

    @dataclass
    class JsonBodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                required=True,
                content={"application/json": OpenAPIMediaType(schema=Reference(f"#/components/schemas/{schema_name}"))},
            )

    return JsonBodyOperation
