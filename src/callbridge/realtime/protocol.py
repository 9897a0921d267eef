"""Realtime server events (JSON) → typed session events.

The model's server is trusted no more than the caller: each field the session uses is checked for type, range
and length, and audio deltas must be base64. A malformed event becomes a ``callbridge_malformed_event``
:class:`RealtimeError` with a short reason (never the event itself); an event type the session does not act on
becomes :class:`RealtimeOther`. Nothing raises.
"""

from __future__ import annotations

import binascii
from typing import Any

import orjson

from callbridge.core import events as ev
from callbridge.core.usage import TokenUsage
from callbridge.realtime.dialect import BETA_TO_GA_AUDIO_FORMAT, Dialect, ga_event_type

SERVER_EVENT_TYPES = frozenset(
    {
        "conversation.created",
        "conversation.item.added",
        "conversation.item.created",
        "conversation.item.deleted",
        "conversation.item.done",
        "conversation.item.input_audio_transcription.completed",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.failed",
        "conversation.item.input_audio_transcription.segment",
        "conversation.item.retrieved",
        "conversation.item.truncated",
        "error",
        "input_audio_buffer.cleared",
        "input_audio_buffer.committed",
        "input_audio_buffer.dtmf_event_received",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.timeout_triggered",
        "mcp_list_tools.completed",
        "mcp_list_tools.failed",
        "mcp_list_tools.in_progress",
        "output_audio_buffer.cleared",
        "output_audio_buffer.started",
        "output_audio_buffer.stopped",
        "rate_limits.updated",
        "response.content_part.added",
        "response.content_part.done",
        "response.created",
        "response.done",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.mcp_call.completed",
        "response.mcp_call.failed",
        "response.mcp_call.in_progress",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.output_audio_transcript.delta",
        "response.output_audio_transcript.done",
        "response.output_item.added",
        "response.output_item.done",
        "response.output_text.delta",
        "response.output_text.done",
        "session.created",
        "session.updated",
        "transcription_session.updated",
    }
)
"""Every server event of the Realtime protocol, by its GA name (beta names map onto them); a test keeps it equal to
what the ``openai`` package defines, whose models are not imported here (they would cost every process 30 MiB).
``RealtimeOther`` of any other type is an event the protocol does not have: a confused or hostile server."""
MALFORMED = "callbridge_malformed_event"
"""The ``code`` of the :class:`RealtimeError` a malformed server event becomes."""
MAX_ID_CHARS = 256
MAX_TYPE_CHARS = 128
MAX_MS = 2**53
MAX_REASON_CHARS = 200


def is_known_server_event(event_type: str) -> bool:
    """Whether ``event_type`` (a GA name, as in :class:`RealtimeOther`) is a documented server event."""
    return event_type in SERVER_EVENT_TYPES


class _Invalid(ValueError):
    """A server event that breaks the protocol (internal: it becomes a malformed-event error)."""


def parse_server_event(raw: str | bytes | memoryview, dialect: Dialect = "ga") -> ev.RealtimeEvent:
    """Parse one server event; anything unexpected becomes an error or :class:`RealtimeOther`, never raises.

    (Its size is capped by the connection: ``RealtimeEndpoint.max_message_bytes``.)
    """
    try:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Invalid(f"not JSON: {exc}") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise _Invalid("not a Realtime event object")
        return _parse(ga_event_type(dialect, event["type"]), event)
    except _Invalid as exc:
        return ev.RealtimeError(code=MALFORMED, message=_short(str(exc)))
    except Exception as exc:  # pragma: no cover - a gap in the checks; the fuzz tests look for this message
        return ev.RealtimeError(code=MALFORMED, message=f"internal parser error: {type(exc).__name__}")


def _parse(kind: str, event: dict[str, Any]) -> ev.RealtimeEvent:
    match kind:
        case "response.output_audio.delta":
            return ev.RealtimeAudioDelta(_id(event, "response_id"), _id(event, "item_id"), _base64(event, "delta"))
        case "input_audio_buffer.speech_started":
            return ev.RealtimeSpeechStarted(_id(event, "item_id"), _ms(event, "audio_start_ms", 0))
        case "input_audio_buffer.speech_stopped":
            return ev.RealtimeSpeechStopped(_id(event, "item_id"), _ms(event, "audio_end_ms", 0))
        case "response.created":
            return ev.RealtimeResponseCreated(_id(_object(event, "response"), "id", "response.id"))
        case "response.done":
            return _response_done(_object(event, "response"))
        case "input_audio_buffer.timeout_triggered":
            return ev.RealtimeTimeoutTriggered(_id(event, "item_id"))
        case "response.output_audio_transcript.done":
            return ev.RealtimeAudioTranscriptDone(_id(event, "item_id"), _text(event, "transcript"))
        case "conversation.item.input_audio_transcription.completed":
            return ev.RealtimeInputTranscriptionCompleted(_id(event, "item_id"), _text(event, "transcript"))
        case "conversation.item.input_audio_transcription.failed":
            error = _object(event, "error", optional=True)
            message = _short(_text(error, "message", "error.message"), 1000)
            return ev.RealtimeInputTranscriptionFailed(_id(event, "item_id"), message)
        case "response.output_item.done":
            return _output_item_done(event)
        case "conversation.item.truncated":
            return ev.RealtimeItemTruncated(_id(event, "item_id"), _ms(event, "audio_end_ms", None))
        case "session.created":
            return ev.RealtimeSessionCreated()
        case "session.updated":
            input_format, output_format = _audio_formats(_object(event, "session"))
            return ev.RealtimeSessionUpdated(input_format, output_format)
        case "error":
            return _error(_object(event, "error", optional=True))
    return ev.RealtimeOther(_short(kind, MAX_TYPE_CHARS), known=is_known_server_event(kind))


def _response_done(response: dict[str, Any]) -> ev.RealtimeResponseDone:
    return ev.RealtimeResponseDone(
        _id(response, "id", "response.id"),
        _short(_text(response, "status", "response.status")) or "completed",
        status_details=_status_details(response),
        usage=_usage(response),
        output_item_ids=_assistant_items(response),
    )


def _output_item_done(event: dict[str, Any]) -> ev.RealtimeEvent:
    """A finished output item: a function call is the session's business, any other item is not."""
    item = _object(event, "item")
    if item.get("type") != "function_call":
        return ev.RealtimeOther("response.output_item.done")
    return ev.RealtimeFunctionCallDone(
        response_id=_id(event, "response_id"),
        item_id=_id(item, "id", "item.id"),
        call_id=_id(item, "call_id", "item.call_id"),
        name=_id(item, "name", "item.name"),
        arguments=_text(item, "arguments", "item.arguments") or "{}",
        status=_short(_text(item, "status", "item.status")) or "completed",
    )


def _error(error: dict[str, Any]) -> ev.RealtimeError:
    event_id = error.get("event_id")
    if event_id is not None and not (isinstance(event_id, str) and len(event_id) <= MAX_ID_CHARS):
        raise _Invalid("error.event_id must be a short string")
    return ev.RealtimeError(
        code=_short(_text(error, "code", "error.code") or _text(error, "type", "error.type") or "unknown"),
        message=_short(_text(error, "message", "error.message"), 1000),
        event_id=event_id,
        error_type=_short(_text(error, "type", "error.type")),
        param=_short(_text(error, "param", "error.param")) or None,
    )


def _audio_formats(session: dict[str, Any]) -> tuple[str, str]:
    """The session's input and output audio formats as GA names (``audio/pcmu``), in either dialect's shape."""
    if "audio" in session:  # GA: session.audio.{input,output}.format.type
        audio = _object(session, "audio", optional=True)
        formats = []
        for side in ("input", "output"):
            fmt = _object(_object(audio, side, optional=True), "format", optional=True)
            formats.append(_short(_text(fmt, "type", f"session.audio.{side}.format.type")) or "unknown")
        return formats[0], formats[1]
    beta = [_text(session, f"{side}_audio_format") for side in ("input", "output")]  # beta: g711_ulaw, pcm16, …
    return BETA_TO_GA_AUDIO_FORMAT.get(beta[0], _short(beta[0])), BETA_TO_GA_AUDIO_FORMAT.get(beta[1], _short(beta[1]))


def _status_details(response: dict[str, Any]) -> dict[str, str] | None:
    """``status_details`` flattened to short strings: ``type``, ``reason``, ``error_type``, ``error_code``,
    ``error_message``."""
    details = _object(response, "status_details", optional=True)
    if not details:
        return None
    flat = {key: _short(_text(details, key, f"status_details.{key}")) for key in ("type", "reason")}
    error = _object(details, "error", optional=True)
    for key in ("type", "code", "message"):
        flat[f"error_{key}"] = _short(_text(error, key, f"status_details.error.{key}"), 500)
    return {key: value for key, value in flat.items() if value}


def _usage(response: dict[str, Any]) -> TokenUsage | None:
    usage = _object(response, "usage", optional=True)
    if not usage:
        return None
    inputs = _object(usage, "input_token_details", optional=True)
    outputs = _object(usage, "output_token_details", optional=True)
    return TokenUsage(
        input_text=_count(inputs, "text_tokens"),
        input_audio=_count(inputs, "audio_tokens"),
        input_cached=_count(inputs, "cached_tokens"),
        output_text=_count(outputs, "text_tokens"),
        output_audio=_count(outputs, "audio_tokens"),
        responses=1,
    )


def _assistant_items(response: dict[str, Any]) -> tuple[str, ...]:
    output = response.get("output")
    if not isinstance(output, list):
        return ()
    return tuple(
        _id(item, "id", "response.output[].id")
        for item in output[:64]
        if isinstance(item, dict) and item.get("type") == "message" and item.get("role") == "assistant"
    )


def _count(container: dict[str, Any], key: str) -> int:
    value = container.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MS:
        raise _Invalid(f"usage {key} must be a non-negative integer")
    return value


def _object(container: dict[str, Any], key: str, *, optional: bool = False) -> dict[str, Any]:
    value = container.get(key)
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"{key} must be an object")
    return value


def _id(container: dict[str, Any], key: str, field: str | None = None) -> str:
    value = container.get(key)
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise _Invalid(f"{field or key} must be a non-empty string of at most {MAX_ID_CHARS} characters")
    return value


def _text(container: dict[str, Any], key: str, field: str | None = None) -> str:
    """An optional string field ("" when absent or null)."""
    value = container.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Invalid(f"{field or key} must be a string")
    return value


def _ms(container: dict[str, Any], key: str, default: int | None) -> int:
    value = container.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MS:
        raise _Invalid(f"{key} must be a non-negative integer")
    return value


def _base64(container: dict[str, Any], key: str) -> str:
    value = container.get(key)
    if not isinstance(value, str):
        raise _Invalid(f"{key} must be a string")
    try:
        binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise _Invalid(f"{key} is not valid base64") from None
    return value


def _short(text: str, limit: int = MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
