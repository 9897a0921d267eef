"""Twilio Media Streams wire format: inbound JSON frames → session events.

Every inbound frame is untrusted: it is size-checked (when the caller gives a limit), then parsed and checked in
one pass against the schema below (the structs, a union tagged by ``event``; see :mod:`callbridge.transport.wire`):
each field the session uses is checked for type, range and length, and the rest of the frame is skipped. Anything
else becomes :class:`TwilioInvalidMessage` with a short reason (never the frame itself, which may be huge or hold
audio), never an exception.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from msgspec import Meta

from callbridge.core import events as ev
from callbridge.transport import wire

MAX_SID_CHARS = 64
"""Twilio SIDs are 34 characters; anything much longer is not one."""
MAX_MARK_CHARS = 256
"""Mark names are the bridge's own ``item_id:end_byte``; Twilio echoes them back."""
MAX_CUSTOM_PARAMETERS = 32
MAX_ENCODING_CHARS = 64
MAX_SAMPLE_RATE = 1_000_000
MAX_TIMESTAMP_MS = wire.MAX_JSON_INTEGER
"""Stream timestamps are milliseconds since the stream began; past this they are not a phone call."""
MAX_DIGITS = 20
"""Twilio sends its numbers as strings of digits; longer than a 64-bit integer's is not a number it sends."""

_DEFAULTS = ev.TwilioStart(stream_sid="", call_sid="")  # what a start that leaves out its media format means

Sid = Annotated[str, Meta(min_length=1, max_length=MAX_SID_CHARS, pattern=r"^[A-Za-z0-9_.:-]+\Z")]
OptionalSid = Annotated[str, Meta(max_length=MAX_SID_CHARS, pattern=r"^[A-Za-z0-9_.:-]*\Z")]
MarkName = Annotated[str, Meta(min_length=1, max_length=MAX_MARK_CHARS)]
Digit = Annotated[str, Meta(pattern=r"^[0-9*#A-Da-d]\Z")]
CustomParameters = Annotated[dict[str, str], Meta(max_length=MAX_CUSTOM_PARAMETERS)]
Encoding = Annotated[str, Meta(max_length=MAX_ENCODING_CHARS)]
Number = int | str
"""A non-negative integer, or a string of its decimal digits (as Twilio sends them); :func:`_number` reads it."""


class _Frame(msgspec.Struct, tag_field="event", gc=False):
    """A Media Streams message; each kind is the event it stands for."""

    def event(self) -> ev.TwilioEvent:
        raise NotImplementedError


class _MediaBody(msgspec.Struct, gc=False):
    payload: wire.Base64
    timestamp: Number = "0"


class _Media(_Frame, tag="media"):
    media: _MediaBody

    def event(self) -> ev.TwilioMedia:
        media = self.media
        payload = wire.base64_text(media.payload, "media.payload")
        return ev.TwilioMedia(payload, _number(media.timestamp, "media.timestamp", MAX_TIMESTAMP_MS))


class _MarkBody(msgspec.Struct, gc=False):
    name: MarkName


class _Mark(_Frame, tag="mark"):
    mark: _MarkBody

    def event(self) -> ev.TwilioMark:
        return ev.TwilioMark(self.mark.name)


class _MediaFormat(msgspec.Struct, rename="camel", gc=False):
    encoding: Encoding = _DEFAULTS.encoding
    sample_rate: Number = _DEFAULTS.sample_rate


class _StartBody(msgspec.Struct, rename="camel", gc=False):
    stream_sid: Sid
    call_sid: Sid
    account_sid: OptionalSid = ""
    custom_parameters: CustomParameters | None = None
    media_format: _MediaFormat | None = None


class _Start(_Frame, tag="start"):
    start: _StartBody

    def event(self) -> ev.TwilioStart:
        start = self.start
        media_format = start.media_format or _MediaFormat()
        return ev.TwilioStart(
            stream_sid=start.stream_sid,
            call_sid=start.call_sid,
            account_sid=start.account_sid,
            custom_parameters=start.custom_parameters or {},
            encoding=media_format.encoding,
            sample_rate=_number(media_format.sample_rate, "start.mediaFormat.sampleRate", MAX_SAMPLE_RATE),
        )


class _DtmfBody(msgspec.Struct, gc=False):
    digit: Digit


class _Dtmf(_Frame, tag="dtmf"):
    dtmf: _DtmfBody

    def event(self) -> ev.TwilioDtmf:
        return ev.TwilioDtmf(self.dtmf.digit)


class _Stop(_Frame, tag="stop"):
    def event(self) -> ev.TwilioStop:
        return ev.TwilioStop()


class _Connected(_Frame, tag="connected"):
    def event(self) -> ev.TwilioConnected:
        return ev.TwilioConnected()


_FRAMES: Final[msgspec.json.Decoder[_Frame]] = msgspec.json.Decoder(
    _Media | _Mark | _Start | _Dtmf | _Stop | _Connected
)


def parse_twilio_message(raw: str | bytes | memoryview, max_bytes: int | None = None) -> ev.TwilioEvent:
    """Parse one Media Streams frame. Malformed frames become :class:`TwilioInvalidMessage`, never exceptions.

    ``max_bytes`` caps the frame's size (characters for text) before it is parsed at all.
    """
    try:
        if max_bytes is not None and len(raw) > max_bytes:
            return ev.TwilioInvalidMessage(f"message of {len(raw)} bytes exceeds the limit of {max_bytes}")
        return _FRAMES.decode(raw).event()
    except wire.DECODE_ERRORS as exc:
        return ev.TwilioInvalidMessage(wire.reason(exc))
    except Exception as exc:  # pragma: no cover - a gap in the checks above; the fuzz tests look for this reason
        return ev.TwilioInvalidMessage(f"internal parser error: {type(exc).__name__}")


def _number(value: Number, field: str, maximum: int) -> int:
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit() and len(value) <= MAX_DIGITS):
            raise wire.Invalid(wire.at("Expected an integer or a string of digits", field))
        value = int(value)
    if not 0 <= value <= maximum:
        raise wire.Invalid(wire.at(f"Expected an integer between 0 and {maximum}", field))
    return value
