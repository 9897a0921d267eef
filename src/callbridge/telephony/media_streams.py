"""Twilio Media Streams wire format: inbound JSON frames → session events, outbound commands → JSON."""

from __future__ import annotations

from typing import Any

import orjson

from callbridge.core import events as ev


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    return value


def parse_twilio_message(raw: str | bytes) -> ev.TwilioEvent:
    """Parse one Media Streams frame. Malformed frames become :class:`TwilioInvalidMessage`, never exceptions."""
    try:
        message = orjson.loads(raw)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
        return _parse(message)
    except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
        return ev.TwilioInvalidMessage(str(exc) or type(exc).__name__)


def _parse(message: dict[str, Any]) -> ev.TwilioEvent:
    kind = message.get("event")
    if kind == "media":
        media = message["media"]
        timestamp = media.get("timestamp", "0")
        return ev.TwilioMedia(_text(media["payload"], "media.payload"), int(timestamp))
    if kind == "mark":
        return ev.TwilioMark(_text(message["mark"]["name"], "mark.name"))
    if kind == "start":
        start = message["start"]
        parameters = start.get("customParameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError("start.customParameters must be an object")
        media_format = start.get("mediaFormat") or {}
        return ev.TwilioStart(
            stream_sid=_text(start["streamSid"], "start.streamSid"),
            call_sid=_text(start["callSid"], "start.callSid"),
            account_sid=str(start.get("accountSid", "")),
            custom_parameters={str(k): str(v) for k, v in parameters.items()},
            encoding=str(media_format.get("encoding", "audio/x-mulaw")),
            sample_rate=int(media_format.get("sampleRate", 8000)),
        )
    if kind == "dtmf":
        return ev.TwilioDtmf(_text(message["dtmf"]["digit"], "dtmf.digit"))
    if kind == "stop":
        return ev.TwilioStop()
    if kind == "connected":
        return ev.TwilioConnected()
    raise ValueError(f"unknown event {kind!r}")


def dumps(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()
