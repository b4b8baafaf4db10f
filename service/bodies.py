"""Request bodies: each is one msgspec type, which both decodes the body and declares it in the OpenAPI document.

A handler takes its body as `data: T`. A Struct is read as JSON; a Struct with file fields (`Upload`, or a list of
them) is a multipart form; a union of one of each takes either, chosen by the Content-Type.

Types are not coerced: `"4"` is not a number. A number is an integer when its value is whole, as JSON Schema says,
so `4.0` counts as `4`. Malformed JSON is a 400; a body that does not fit its schema is a 422 naming the field.
Form fields arrive as text, so numbers are read from it there, unlike in JSON bodies; a boolean form field is `true`
or `false` in any case (generated clients send `True`), nothing else.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar, Union, get_args, get_origin

import msgspec
from litestar import Litestar, Request
from litestar.datastructures import UploadFile
from litestar.dto import AbstractDTO
from litestar.openapi.spec import (
    Encoding,
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    PathItem,
    Reference,
    RequestBody,
    Schema,
)
from litestar.routes import HTTPRoute
from litestar.typing import FieldDefinition

from service.errors import BadRequest, InvalidInput, UnsupportedMediaType
from service.settings import Settings

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.dto.data_structures import DTOFieldDefinition

T = TypeVar("T")
JSON = "application/json"
FORM = "multipart/form-data"
REF = "#/components/schemas/{name}"
_AT_PATH = re.compile(r"at `\$\.?([^`]*)`")
_DECODED = "decoded_body"


class Upload:
    """A file part of a multipart body: the form field it came in, its file name, its declared type and its bytes."""

    __slots__ = ("content_type", "data", "field", "filename")

    def __init__(self, field: str, filename: str, content_type: str, data: bytes) -> None:
        self.field = field
        self.filename = filename
        self.content_type = content_type
        self.data = data


def deployment(**bounds: str | Callable[[Settings], Any]) -> dict[str, Any]:
    """`msgspec.Meta(extra=...)` for a bound the deployment narrows, as {JSON Schema keyword: setting name, or a
    function of the settings}.

    The type keeps the widest bound, which decoding enforces; the service refuses what lies past the deployment's own
    bound with an error code of its own; the document states the deployment's value, which is what a client may send.
    """
    return {"deployment": bounds}


def part_types(*media_types: str) -> dict[str, Any]:
    """`msgspec.Meta(extra=...)` for a file field: the media types its parts may declare."""
    return {"part_types": ", ".join(media_types)}


def part_aliases(*names: str) -> dict[str, Any]:
    """`msgspec.Meta(extra=...)` for a file field: other part names whose parts it takes too (`image[]` for `image`,
    as some clients name the parts of a list). Only the field's own name is documented."""
    return {"part_aliases": names}


# Body decoding


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


@dataclass(frozen=True, slots=True)
class FileField:
    many: bool
    required: bool
    part_types: str | None
    # The struct field the parts go to: the part name itself, or the field it is an alias of.
    target: str


def _unwrapped(kind: msgspec.inspect.Type) -> tuple[msgspec.inspect.Type, dict[str, Any]]:
    """A field's type without its metadata and without `| None`, and the `Meta(extra=...)` found on the way."""
    extra: dict[str, Any] = {}
    while True:
        if isinstance(kind, msgspec.inspect.Metadata):
            extra.update(kind.extra or {})
            kind = kind.type
        elif isinstance(kind, msgspec.inspect.UnionType) and len(kind.types) == 2 and kind.includes_none:
            kind = next(member for member in kind.types if not isinstance(member, msgspec.inspect.NoneType))
        else:
            return kind, extra


def _is_upload(kind: msgspec.inspect.Type) -> bool:
    return isinstance(kind, msgspec.inspect.CustomType) and kind.cls is Upload


@cache
def file_fields(type_: type[msgspec.Struct]) -> dict[str, FileField]:
    """The part names a struct takes files under (its file fields' names and their aliases), by name."""
    found = {}
    for field in msgspec.inspect.type_info(type_).fields:  # type: ignore[attr-defined]
        kind, extra = _unwrapped(field.type)
        many = isinstance(kind, msgspec.inspect.ListType) and _is_upload(_unwrapped(kind.item_type)[0])
        if many or _is_upload(kind):
            name = field.encode_name
            found[name] = FileField(many, field.required, extra.get("part_types"), name)
            for alias in extra.get("part_aliases", ()):
                found[alias] = FileField(many, False, extra.get("part_types"), name)
    return found


@cache
def boolean_fields(type_: type[msgspec.Struct]) -> frozenset[str]:
    """The fields of a struct that take a boolean."""
    return frozenset(
        field.encode_name
        for field in msgspec.inspect.type_info(type_).fields  # type: ignore[attr-defined]
        if isinstance(_unwrapped(field.type)[0], msgspec.inspect.BoolType)
    )


@cache
def attribute_names(type_: type[msgspec.Struct]) -> dict[str, str]:
    """The attribute of a struct each of its fields is decoded into, by the field's name in a body."""
    return {field.encode_name: field.name for field in msgspec.inspect.type_info(type_).fields}  # type: ignore[attr-defined]


_FORM_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True, slots=True)
class Body:
    """What a route's `data` annotation accepts: a JSON type, a form type, or one of each."""

    json: type[msgspec.Struct] | None
    form: type[msgspec.Struct] | None

    @staticmethod
    @cache
    def of(annotation: Any) -> Body:
        members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
        json: type[msgspec.Struct] | None = None
        form: type[msgspec.Struct] | None = None
        for member in members:
            if not (isinstance(member, type) and issubclass(member, msgspec.Struct)):
                raise TypeError(f"a request body is a msgspec Struct or a union of two, not {member!r}")
            if file_fields(member):
                if form is not None:
                    raise TypeError(f"{annotation!r} names two form types")
                form = member
            else:
                if json is not None:
                    raise TypeError(f"{annotation!r} names two JSON types")
                json = member
        return Body(json, form)

    @property
    def types(self) -> list[type[msgspec.Struct]]:
        return [kind for kind in (self.json, self.form) if kind is not None]

    async def read(self, request: Request[Any, Any, Any]) -> Any:
        """Decode the request's body. A route without a form type reads JSON whatever the Content-Type says."""
        if self.form is None:
            assert self.json is not None
            return decode_json(await request.body(), self.json)
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type == FORM:
            return await _read_form(request, self.form)
        if media_type == JSON and self.json is not None:
            return decode_json(await request.body(), self.json)
        accepted = ", or ".join(JSON if kind is self.json else f"{FORM} with file parts" for kind in self.types)
        raise UnsupportedMediaType(f"Send {accepted}", code="unsupported_content_type")


async def _read_form(request: Request[Any, Any, Any], type_: type[T]) -> T:
    """A multipart body as its form type: each text field at most once, file parts only in the file fields."""
    files = file_fields(type_)  # type: ignore[arg-type]
    names = {field.encode_name for field in msgspec.inspect.type_info(type_).fields}  # type: ignore[attr-defined]
    # Read whole first: the framework then parses the form from these bytes and can still hand them over.
    await request.body()
    form = await request.form()
    values: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                file = files.get(name)
                if file is None:
                    raise InvalidInput(f"unexpected file part {name!r}", code="unknown_field", field=name)
                if not file.many and file.target in values:
                    raise InvalidInput(f"only one {name} is accepted", code="duplicate_field", field=name)
                upload = Upload(file.target, value.filename or name, value.content_type or "", await value.read())
                if file.many:
                    values.setdefault(file.target, []).append(upload)
                else:
                    values[file.target] = upload
            elif name not in names or name in files:
                code = "file_expected" if name in files else "unknown_field"
                raise InvalidInput(f"unexpected form field {name!r}", code=code, field=name)
            elif name in values:
                raise InvalidInput(f"{name} is given more than once", code="duplicate_field", field=name)
            elif name in boolean_fields(type_):  # type: ignore[arg-type]
                flag = _FORM_BOOLEANS.get(str(value).lower())
                if flag is None:
                    raise InvalidInput(f"{name}: expected `true` or `false`", code="invalid_field", field=name)
                values[name] = flag
            else:
                values[name] = str(value)
    finally:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                await value.close()
    for name, file in files.items():
        if file.required and name not in values:
            raise InvalidInput(
                f"a multipart request needs at least one `{name}` file part", code=f"{name}_required", field=name
            )
    decoded = validate(values, type_, strict=False)
    attributes = attribute_names(type_)  # type: ignore[arg-type]
    for name in values:
        # Text reads as null in lax decoding ("null"), but a form field is present or absent: never null.
        if getattr(decoded, attributes[name]) is None:
            raise InvalidInput(f"{name}: a form field cannot be null", code="invalid_field", field=name)
    return decoded


async def read_body(request: Request[Any, Any, Any]) -> None:
    """Decode the body of a route that takes `data`, for `StrictBody` to hand to the handler."""
    field = request.route_handler.parsed_data_field
    if field is not None:
        request.state[_DECODED] = await Body.of(field.annotation).read(request)


class StrictBody(AbstractDTO[Any]):
    """The DTO of every `data` parameter. The framework would decode bodies itself, leniently (`"4"` for 4), and before
    the route's dependencies (the caller's authentication among them); instead `read_body` decodes it, strictly, in a
    before-request hook that authenticates first, and this hands the result over."""

    @classmethod
    def create_for_field_definition(
        cls, field_definition: FieldDefinition, handler_id: str, backend_cls: Any = None
    ) -> None:
        Body.of(field_definition.annotation)  # A handler whose `data` is not a body type fails at startup.

    def decode_bytes(self, value: bytes) -> Any:
        return self.asgi_connection.state[_DECODED]

    def decode_builtins(self, value: dict[str, Any]) -> Any:
        return self.asgi_connection.state[_DECODED]

    def data_to_encodable_type(self, data: Any | Collection[Any]) -> Any:
        raise NotImplementedError("StrictBody decodes request bodies only")

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: SchemaCreator
    ) -> Reference | Schema:
        """The framework's single media type; `document_bodies` then declares the body under each one it accepts."""
        return TypeReference(Body.of(field_definition.annotation).types[0])

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Generator[DTOFieldDefinition, None, None]:
        raise NotImplementedError("StrictBody keeps the body's own type")

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False


# The OpenAPI document


class TypeReference(Reference):
    """A reference to a type's component schema, by the type itself: `document_bodies` adds the component from the
    msgspec type when the framework did not generate one."""

    def __init__(self, kind: type) -> None:
        super().__init__(ref=REF.format(name=kind.__name__))
        self.kind = kind


def document_bodies(app: Litestar, settings: Settings) -> None:
    """Declare every route's body from its type, under each media type it accepts; add the body types and the types
    of any other `TypeReference` as components, stating this deployment's bounds."""
    document = app.openapi_schema
    paths = document.paths or {}
    types: list[type[msgspec.Struct]] = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if (field := handler.parsed_data_field) is None or not handler.resolve_include_in_schema():
                continue
            body = Body.of(field.annotation)
            request_body = _request_body(body)
            for method in handler.http_methods:
                getattr(paths[route.path_format], method.lower()).request_body = request_body
            types += body.types
    components = document.components
    known = components.schemas or {}
    types += [reference.kind for reference in _type_references(paths) if reference.ref.rsplit("/", 1)[1] not in known]
    schemas = {**known, **_component_schemas(list(dict.fromkeys(types)), settings)}
    components.schemas = dict(sorted(schemas.items()))


def _type_references(paths: dict[str, PathItem]) -> list[TypeReference]:
    """The `TypeReference`s in the operations' responses."""
    found = []
    for item in paths.values():
        for method in ("get", "put", "post", "delete", "patch"):
            operation: Operation | None = getattr(item, method)
            for response in (operation.responses or {}).values() if operation else ():
                for media in (response.content or {}).values() if isinstance(response, OpenAPIResponse) else ():
                    if isinstance(media.schema, TypeReference):
                        found.append(media.schema)
    return found


def _request_body(body: Body) -> RequestBody:
    content = {}
    if body.json is not None:
        content[JSON] = OpenAPIMediaType(schema=TypeReference(body.json))
    if body.form is not None:
        encoding = {
            name: Encoding(content_type=file.part_types)
            for name, file in file_fields(body.form).items()
            if file.part_types is not None and name == file.target
        }
        content[FORM] = OpenAPIMediaType(schema=TypeReference(body.form), encoding=encoding or None)
    return RequestBody(required=True, content=content)


def _file_schema(kind: type) -> dict[str, Any]:
    if kind is Upload:
        return {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
    raise NotImplementedError(kind)


def _component_schemas(bodies: list[type[msgspec.Struct]], settings: Settings) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(bodies, schema_hook=_file_schema, ref_template=REF)
    for body in bodies:
        schema = components[body.__name__]
        is_form = bool(file_fields(body))
        for field in msgspec.inspect.type_info(body).fields:  # type: ignore[attr-defined]
            properties = schema["properties"]
            prop = properties[field.encode_name]
            options = prop.get("anyOf", [])
            if is_form and {"type": "null"} in options:
                # A form field is present or absent; it cannot be null.
                prop = properties[field.encode_name] = {
                    **next(option for option in options if option != {"type": "null"}),
                    **({"description": prop["description"]} if "description" in prop else {}),
                }
                options = []
            bounded = next((option for option in options if option != {"type": "null"}), prop)
            for keyword, setting in _unwrapped(field.type)[1].get("deployment", {}).items():
                value = getattr(settings, setting) if isinstance(setting, str) else setting(settings)
                bounded[keyword] = list(value) if isinstance(value, tuple) else value
    return components
