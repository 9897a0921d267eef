"""Strict conformance checks for the two wire protocols callbridge speaks.

The OpenAI SDK's pydantic models accept unknown keys (``extra="allow"``), so validating an event with them
alone would let a misspelt field through, and the live service rejects those with ``unknown_parameter``.
:func:`validate_client_event` and :func:`validate_server_event` therefore validate against the SDK unions and
then walk the validated model, comparing every input key with the model's declared fields at each level.

Errors carry the ``code`` and ``param`` the Realtime API would put in its ``error`` event, so the fake server
can answer with them verbatim.
"""

from __future__ import annotations

import base64
import binascii
import functools
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import pydantic
from openai.types.beta.realtime import realtime_client_event as beta_client
from openai.types.beta.realtime import realtime_server_event as beta_server
from openai.types.realtime import realtime_client_event as ga_client
from openai.types.realtime import realtime_server_event as ga_server

from callbridge.realtime.dialect import Dialect

__all__ = [
    "ConformanceError",
    "Dialect",
    "validate_client_event",
    "validate_server_event",
    "validate_twilio_message",
]


class ConformanceError(ValueError):
    """An event the other side would reject; ``code`` and ``param`` follow the Realtime API's error object."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


_UNIONS: dict[tuple[str, Dialect], Any] = {
    ("client", "ga"): ga_client.RealtimeClientEvent,
    ("client", "beta"): beta_client.RealtimeClientEvent,
    ("server", "ga"): ga_server.RealtimeServerEvent,
    ("server", "beta"): beta_server.RealtimeServerEvent,
}


@functools.cache
def _variants(kind: str, dialect: Dialect) -> dict[str, pydantic.TypeAdapter[Any]]:
    """Event type -> adapter for that member of the union.

    The unions are ``Annotated[Union[...], PropertyInfo(discriminator="type")]``; pydantic does not read the SDK's
    ``PropertyInfo``, so validating against the whole union reports errors from every member. Dispatching on
    ``type`` first is what a discriminated union would do, and keeps error locations readable.
    """
    members = typing.get_args(typing.get_args(_UNIONS[kind, dialect])[0])
    return {
        typing.get_args(member.model_fields["type"].annotation)[0]: pydantic.TypeAdapter(member) for member in members
    }


def server_event_types(dialect: Dialect = "ga") -> frozenset[str]:
    """Every server event type the ``openai`` package defines for ``dialect``."""
    return frozenset(_variants("server", dialect))


def validate_client_event(event: Mapping[str, Any], dialect: Dialect = "ga") -> None:
    """Raise :class:`ConformanceError` unless ``event`` is a client event the Realtime API accepts."""
    _validate(event, "client", dialect)


def validate_server_event(event: Mapping[str, Any], dialect: Dialect = "ga") -> None:
    """Raise :class:`ConformanceError` unless ``event`` is a well-formed Realtime server event."""
    _validate(event, "server", dialect)


def _validate(event: Mapping[str, Any], kind: str, dialect: Dialect) -> None:
    if not isinstance(event, Mapping):
        raise ConformanceError(f"Expected an event object, got {type(event).__name__}.")
    if "type" not in event:
        raise ConformanceError("Missing required parameter: 'type'.", code="missing_required_parameter", param="type")
    variants = _variants(kind, dialect)
    adapter = variants.get(event["type"])
    if adapter is None:
        supported = ", ".join(f"'{name}'" for name in variants)
        raise ConformanceError(f"Invalid value: '{event['type']}'. Supported values are: {supported}.", param="type")
    try:
        model = adapter.validate_python(event)
    except pydantic.ValidationError as exc:
        raise _from_validation_error(exc, event) from None
    for param in _unknown_keys(model, event, ""):
        raise ConformanceError(f"Unknown parameter: '{param}'.", code="unknown_parameter", param=param)
    try:  # and the SDK's union itself, exactly as a user of the openai package would check it
        _union(kind, dialect).validate_python(event)
    except pydantic.ValidationError as exc:
        raise _from_validation_error(exc, event) from None


@functools.cache
def _union(kind: str, dialect: Dialect) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(_UNIONS[kind, dialect])


def _unknown_keys(value: Any, data: Any, path: str) -> Iterator[str]:
    """Yield the dotted path of every key in ``data`` that the validated ``value`` has no field for."""
    if isinstance(value, pydantic.BaseModel) and isinstance(data, Mapping):
        names: dict[str, str] = {}
        for name, field in type(value).model_fields.items():
            names[name] = name
            if field.alias:
                names[field.alias] = name
        for key, item in data.items():
            where = f"{path}.{key}" if path else str(key)
            if key in names:
                yield from _unknown_keys(getattr(value, names[key]), item, where)
            else:
                yield where
    elif isinstance(value, Mapping) and isinstance(data, Mapping):
        for key, item in data.items():
            yield from _unknown_keys(value.get(key), item, f"{path}.{key}")
    elif isinstance(value, list | tuple) and isinstance(data, list):
        for index, (element, item) in enumerate(zip(value, data, strict=False)):
            yield from _unknown_keys(element, item, f"{path}[{index}]")


def _from_validation_error(exc: pydantic.ValidationError, data: Mapping[str, Any]) -> ConformanceError:
    # Union members each report their own errors; the deepest location is the most specific complaint
    # (a misspelt enum deep in the realtime session beats "session.type should be 'transcription'").
    errors = sorted(exc.errors(), key=lambda error: -len(_param_parts(error["loc"], data)))
    error = errors[0]
    param = "".join(_param_parts(error["loc"], data)).lstrip(".")
    if error["type"] == "missing":
        return ConformanceError(
            f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param
        )
    return ConformanceError(f"Invalid value for '{param}': {error['msg']}.", param=param)


def _param_parts(loc: tuple[int | str, ...], data: Any) -> list[str]:
    """Turn a pydantic error location into the API's param path, dropping union member tags."""
    parts: list[str] = []
    node = data
    for position, key in enumerate(loc):
        if isinstance(node, Mapping) and key in node:
            parts.append(f".{key}")
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            parts.append(f"[{key}]")
            node = node[key]
        elif (
            isinstance(node, Mapping)
            and position == len(loc) - 1
            and isinstance(key, str)
            and key.isidentifier()
            and key[0].islower()
        ):
            parts.append(f".{key}")  # a missing field (member tags are class names or "literal[...]")
    return parts


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


NonEmpty = Annotated[str, pydantic.Field(min_length=1)]


class _Media(_Strict):
    payload: str

    @pydantic.field_validator("payload")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"payload is not valid base64: {exc}") from None
        return value


class _Mark(_Strict):
    name: NonEmpty


class _MediaMessage(_Strict):
    event: Literal["media"]
    streamSid: NonEmpty
    media: _Media


class _MarkMessage(_Strict):
    event: Literal["mark"]
    streamSid: NonEmpty
    mark: _Mark


class _ClearMessage(_Strict):
    event: Literal["clear"]
    streamSid: NonEmpty


_TWILIO: pydantic.TypeAdapter[_MediaMessage | _MarkMessage | _ClearMessage] = pydantic.TypeAdapter(
    Annotated[_MediaMessage | _MarkMessage | _ClearMessage, pydantic.Field(discriminator="event")]
)


def validate_twilio_message(message: Mapping[str, Any]) -> None:
    """Raise :class:`ConformanceError` unless ``message`` is a ``media``, ``mark`` or ``clear`` message for Twilio.

    These are the only messages a Media Streams server may send, and Twilio ignores anything malformed silently,
    so the check is exact: no other keys, strict types, base64 payloads, non-empty mark names.
    """
    try:
        _TWILIO.validate_python(message)
    except pydantic.ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '<message>'}: {error['msg']}" for error in exc.errors()
        )
        raise ConformanceError(f"Invalid message to Twilio: {details}") from None
