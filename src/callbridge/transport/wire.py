"""Reading JSON messages off the wire, one way for both peers: msgspec schemas, checked in C as they are parsed.

Each adapter declares the messages it reads as :class:`msgspec.Struct` types, a tagged union on the message's
kind, with every field the session uses typed and bounded (``Annotated[str, Meta(max_length=...)]``); a
:class:`msgspec.json.Decoder` of that union parses a message and checks it in one pass, and fields the session does
not use are skipped without being built. A base64 audio field is declared :data:`Base64` and read with
:func:`base64_text`, which checks it in C too. What a schema cannot say (a number Twilio sends as a string of
digits, say) the adapter checks after decoding and raises :class:`Invalid`.

Whatever goes wrong, the adapter turns it into its typed error event with :func:`reason`: a short text naming the
field (msgspec's ``Expected `str` of length <= 256 - at `$.mark.name```), never the message itself, which may be
huge or hold audio.
"""

from __future__ import annotations

from typing import Final, TypeVar

import msgspec

__all__ = [
    "DECODE_ERRORS",
    "MAX_JSON_INTEGER",
    "MAX_REASON_CHARS",
    "Base64",
    "Invalid",
    "at",
    "base64_text",
    "decode_field",
    "reason",
    "short",
]

MAX_REASON_CHARS: Final = 200
"""The longest reason an adapter gives for refusing a message."""
MAX_JSON_INTEGER: Final = 2**53
"""The largest integer every JSON reader holds exactly; a count or a time in milliseconds past it is not one."""

Base64 = msgspec.Raw
"""A field holding base64 text: the decoder keeps its JSON as it is, :func:`base64_text` checks and reads it."""

T = TypeVar("T")

_BASE64: Final = msgspec.json.Decoder(bytes)  # a JSON string of base64, decoded (and so checked) in C
_TEXT: Final = msgspec.json.Decoder(str)


class Invalid(ValueError):
    """A message that breaks its schema in a way the schema cannot express; the text is the reason."""


DECODE_ERRORS: Final = (msgspec.DecodeError, Invalid, UnicodeError, RecursionError)
"""What reading a message may raise, each a refusal of the message, never of the reader.

``msgspec.DecodeError`` (and its ``ValidationError``): not JSON, or not the schema; ``UnicodeEncodeError``: text
with a lone surrogate (only a ``str`` can hold one); ``UnicodeDecodeError``: a string that is not UTF-8 (msgspec
before 0.23 says so this way); ``RecursionError``: arrays or objects nested too deep."""


def base64_text(field: msgspec.Raw, path: str) -> str:
    """The base64 text of ``field``, a :data:`Base64` field at ``path`` (``media.payload``: named in the reason)."""
    try:
        text = _TEXT.decode(field)
        _BASE64.decode(field)  # strict: the standard alphabet, padded; the bytes are not kept
    except msgspec.DecodeError as exc:
        raise Invalid(at(str(exc), path)) from None
    return text


def decode_field(decoder: msgspec.json.Decoder[T], field: msgspec.Raw, path: str) -> T:
    """``field``, kept :class:`msgspec.Raw` at ``path`` (``item``), read with ``decoder``; a reason names the path."""
    try:
        return decoder.decode(field)
    except msgspec.ValidationError as exc:
        message, _, inner = str(exc).partition(" - at `$")
        raise Invalid(at(message, path + inner.removesuffix("`"))) from None


def at(message: str, path: str) -> str:
    """``message`` about the field at ``path`` (``media.timestamp``), in the form of msgspec's own reasons."""
    return f"{message} - at `$.{path}`"


def reason(exc: BaseException) -> str:
    """Why a message was refused, in at most :data:`MAX_REASON_CHARS` characters, from one of :data:`DECODE_ERRORS`."""
    if isinstance(exc, msgspec.ValidationError | Invalid):
        return short(str(exc))
    if isinstance(exc, RecursionError):
        return "not JSON: nested too deeply"
    if isinstance(exc, UnicodeEncodeError):
        return "not JSON: text with a lone surrogate"
    if isinstance(exc, UnicodeDecodeError):
        return "not JSON: Invalid UTF-8 encoded string"
    return short(f"not JSON: {exc}")


def short(text: str, limit: int = MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
