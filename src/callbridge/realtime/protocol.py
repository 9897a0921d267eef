"""Realtime server events (JSON) → typed session events."""

from __future__ import annotations

from typing import Any

import orjson

from callbridge.core import events as ev
from callbridge.realtime.dialect import Dialect, ga_event_type


def parse_server_event(raw: str | bytes, dialect: Dialect = "ga") -> ev.RealtimeEvent:
    """Parse one server event; anything unexpected becomes an error or :class:`RealtimeOther`, never raises."""
    try:
        event = orjson.loads(raw)
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ValueError("not a Realtime event object")
        return _parse(ga_event_type(dialect, event["type"]), event)
    except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
        return ev.RealtimeError(code="callbridge_malformed_event", message=str(exc) or type(exc).__name__)


def _parse(kind: str, event: dict[str, Any]) -> ev.RealtimeEvent:
    match kind:
        case "response.output_audio.delta":
            return ev.RealtimeAudioDelta(event["response_id"], event["item_id"], event["delta"])
        case "input_audio_buffer.speech_started":
            return ev.RealtimeSpeechStarted(event["item_id"], int(event.get("audio_start_ms", 0)))
        case "input_audio_buffer.speech_stopped":
            return ev.RealtimeSpeechStopped(event["item_id"], int(event.get("audio_end_ms", 0)))
        case "response.created":
            return ev.RealtimeResponseCreated(event["response"]["id"])
        case "response.done":
            response = event["response"]
            return ev.RealtimeResponseDone(response["id"], str(response.get("status", "completed")))
        case "response.output_audio_transcript.done":
            return ev.RealtimeAudioTranscriptDone(event["item_id"], str(event.get("transcript") or ""))
        case "conversation.item.input_audio_transcription.completed":
            return ev.RealtimeInputTranscriptionCompleted(event["item_id"], str(event.get("transcript") or ""))
        case "conversation.item.input_audio_transcription.failed":
            error = event.get("error") or {}
            return ev.RealtimeInputTranscriptionFailed(event["item_id"], str(error.get("message", "")))
        case "response.output_item.done":
            item = event["item"]
            if item.get("type") != "function_call":
                return ev.RealtimeOther(kind)
            return ev.RealtimeFunctionCallDone(
                response_id=event["response_id"],
                item_id=item["id"],
                call_id=item["call_id"],
                name=item["name"],
                arguments=str(item.get("arguments") or "{}"),
                status=str(item.get("status", "completed")),
            )
        case "conversation.item.truncated":
            return ev.RealtimeItemTruncated(event["item_id"], int(event["audio_end_ms"]))
        case "session.created":
            return ev.RealtimeSessionCreated()
        case "session.updated":
            return ev.RealtimeSessionUpdated()
        case "error":
            error = event.get("error") or {}
            return ev.RealtimeError(
                code=str(error.get("code") or error.get("type") or "unknown"),
                message=str(error.get("message", "")),
                event_id=error.get("event_id"),
                error_type=str(error.get("type", "")),
            )
    return ev.RealtimeOther(kind)
