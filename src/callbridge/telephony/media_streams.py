"""Twilio Media Streams wire format: inbound JSON frames → session events, outbound commands → JSON.

Every inbound frame is untrusted: it is size-checked (when the caller gives a limit), parsed, and each field the
session uses is checked for type, range and length. Anything else becomes :class:`TwilioInvalidMessage` with a
short reason (never the frame itself, which may be huge or hold audio), never an exception.
"""

from __future__ import annotations

import binascii
import re
from typing import Any

import orjson

from callbridge.core import events as ev

MAX_SID_CHARS = 64
"""Twilio SIDs are 34 characters; anything much longer is not one."""
MAX_MARK_CHARS = 256
"""Mark names are the bridge's own ``item_id:end_byte``; Twilio echoes them back."""
MAX_CUSTOM_PARAMETERS = 32
MAX_TIMESTAMP_MS = 2**53
"""Stream timestamps are milliseconds since the stream began; past this they are not a phone call."""
MAX_REASON_CHARS = 200

_SID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_DTMF = re.compile(r"[0-9*#A-Da-d]")


class _Invalid(ValueError):
    """A frame that breaks the Media Streams schema (internal: it becomes a TwilioInvalidMessage)."""


def parse_twilio_message(raw: str | bytes | memoryview, max_bytes: int | None = None) -> ev.TwilioEvent:
    """Parse one Media Streams frame. Malformed frames become :class:`TwilioInvalidMessage`, never exceptions.

    ``max_bytes`` caps the frame's size (characters for text) before it is parsed at all.
    """
    try:
        if max_bytes is not None and len(raw) > max_bytes:
            raise _Invalid(f"message of {len(raw)} bytes exceeds the limit of {max_bytes}")
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Invalid(f"not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise _Invalid("not a JSON object")
        return _parse(message)
    except _Invalid as exc:
        return ev.TwilioInvalidMessage(_short(str(exc)))
    except Exception as exc:  # pragma: no cover - a gap in the checks above; the fuzz tests look for this reason
        return ev.TwilioInvalidMessage(f"internal parser error: {type(exc).__name__}")


def _parse(message: dict[str, Any]) -> ev.TwilioEvent:
    kind = message.get("event")
    if not isinstance(kind, str):
        raise _Invalid("event must be a string")
    if kind == "media":
        media = _object(message, "media")
        return ev.TwilioMedia(_base64(media, "media.payload"), _timestamp(media.get("timestamp", "0")))
    if kind == "mark":
        return ev.TwilioMark(_string(_object(message, "mark"), "name", "mark.name", MAX_MARK_CHARS))
    if kind == "start":
        start = _object(message, "start")
        parameters = start.get("customParameters") or {}
        if not isinstance(parameters, dict):
            raise _Invalid("start.customParameters must be an object")
        if len(parameters) > MAX_CUSTOM_PARAMETERS:
            raise _Invalid(f"start.customParameters has more than {MAX_CUSTOM_PARAMETERS} entries")
        if not all(isinstance(value, str) for value in parameters.values()):
            raise _Invalid("start.customParameters values must be strings")
        media_format = start.get("mediaFormat") or {}
        if not isinstance(media_format, dict):
            raise _Invalid("start.mediaFormat must be an object")
        encoding = media_format.get("encoding", "audio/x-mulaw")
        if not isinstance(encoding, str) or len(encoding) > 64:
            raise _Invalid("start.mediaFormat.encoding must be a short string")
        account_sid = start.get("accountSid", "")
        if not isinstance(account_sid, str) or (account_sid and not _SID.fullmatch(account_sid)):
            raise _Invalid("start.accountSid must be a SID")
        return ev.TwilioStart(
            stream_sid=_sid(start, "streamSid", "start.streamSid"),
            call_sid=_sid(start, "callSid", "start.callSid"),
            account_sid=account_sid,
            custom_parameters=dict(parameters),
            encoding=encoding,
            sample_rate=_integer(media_format.get("sampleRate", 8000), "start.mediaFormat.sampleRate", 1_000_000),
        )
    if kind == "dtmf":
        digit = _string(_object(message, "dtmf"), "digit", "dtmf.digit", 1)
        if not _DTMF.fullmatch(digit):
            raise _Invalid("dtmf.digit must be one of 0-9, *, #, A-D")
        return ev.TwilioDtmf(digit)
    if kind == "stop":
        return ev.TwilioStop()
    if kind == "connected":
        return ev.TwilioConnected()
    raise _Invalid(f"unknown event {_short(kind, 60)!r}")


def _object(message: dict[str, Any], key: str) -> dict[str, Any]:
    value = message.get(key)
    if not isinstance(value, dict):
        raise _Invalid(f"{key} must be an object")
    return value


def _string(container: dict[str, Any], key: str, field: str, max_chars: int) -> str:
    value = container.get(key)
    if not isinstance(value, str) or not value:
        raise _Invalid(f"{field} must be a non-empty string")
    if len(value) > max_chars:
        raise _Invalid(f"{field} is longer than {max_chars} characters")
    return value


def _sid(container: dict[str, Any], key: str, field: str) -> str:
    value = _string(container, key, field, MAX_SID_CHARS)
    if not _SID.fullmatch(value):
        raise _Invalid(f"{field} must be a SID (letters, digits, _.:-)")
    return value


def _base64(container: dict[str, Any], field: str) -> str:
    value = container.get("payload")
    if not isinstance(value, str):
        raise _Invalid(f"{field} must be a string")
    try:
        binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise _Invalid(f"{field} is not valid base64") from None
    return value


def _integer(value: Any, field: str, maximum: int) -> int:
    """A non-negative integer, or a string of decimal digits (Twilio sends timestamps as strings)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{field} must be an integer")
    if not 0 <= value <= maximum:
        raise _Invalid(f"{field} is out of range")
    return value


def _timestamp(value: Any) -> int:
    return _integer(value, "media.timestamp", MAX_TIMESTAMP_MS)


def _short(text: str, limit: int = MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def dumps(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()
