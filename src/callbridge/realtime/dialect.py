"""The beta Realtime shape as a small mapping onto GA.

The session speaks GA only. For servers that still speak the beta protocol (an older proxy, a compatible local
server) the adapter maps outgoing GA events to beta fields and incoming beta event names to GA names.
"""

from __future__ import annotations

from typing import Any, Literal

Dialect = Literal["ga", "beta"]

BETA_TO_GA_EVENT_NAMES = {
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
}

_GA_TO_BETA_AUDIO_FORMAT = {"audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw", "audio/pcm": "pcm16"}
BETA_TO_GA_AUDIO_FORMAT = {beta: ga for ga, beta in _GA_TO_BETA_AUDIO_FORMAT.items()}


def headers_for(dialect: Dialect, api_key: str | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {api_key or 'unused'}"}
    if dialect == "beta":
        headers["OpenAI-Beta"] = "realtime=v1"
    return headers


def to_beta(event: dict[str, Any]) -> dict[str, Any]:
    """Map a GA client event to its beta equivalent (events whose shape is shared pass through)."""
    kind = event["type"]
    if kind == "session.update":
        return {**event, "session": _beta_session(event["session"])}
    if kind == "conversation.item.create" and event["item"].get("type") == "message":
        content = [
            {**part, "type": "text"} if part.get("type") == "output_text" else part for part in event["item"]["content"]
        ]
        return {**event, "item": {**event["item"], "content": content}}
    if kind == "response.create" and "response" in event:
        response = dict(event["response"])
        if "output_modalities" in response:
            response["modalities"] = ["audio", "text"] if "audio" in response.pop("output_modalities") else ["text"]
        return {**event, "response": response}
    return event


def _beta_session(session: dict[str, Any]) -> dict[str, Any]:
    beta: dict[str, Any] = {"modalities": ["audio", "text"]}
    for key in ("instructions", "tools", "tool_choice"):
        if key in session:
            beta[key] = session[key]
    audio_in = session.get("audio", {}).get("input", {})
    audio_out = session.get("audio", {}).get("output", {})
    if "format" in audio_in:
        beta["input_audio_format"] = _GA_TO_BETA_AUDIO_FORMAT[audio_in["format"]["type"]]
    if "format" in audio_out:
        beta["output_audio_format"] = _GA_TO_BETA_AUDIO_FORMAT[audio_out["format"]["type"]]
    if "voice" in audio_out:
        beta["voice"] = audio_out["voice"]
    if "turn_detection" in audio_in:
        turn_detection = audio_in["turn_detection"]
        beta["turn_detection"] = (
            {k: v for k, v in turn_detection.items() if k != "idle_timeout_ms"} if turn_detection else None
        )
    if "transcription" in audio_in:
        beta["input_audio_transcription"] = audio_in["transcription"]
    if "noise_reduction" in audio_in:
        beta["input_audio_noise_reduction"] = audio_in["noise_reduction"]
    if "speed" in audio_out:
        beta["speed"] = audio_out["speed"]
    if "max_output_tokens" in session:
        beta["max_response_output_tokens"] = session["max_output_tokens"]
    return beta


def ga_event_type(dialect: Dialect, event_type: str) -> str:
    if dialect == "beta":
        return BETA_TO_GA_EVENT_NAMES.get(event_type, event_type)
    return event_type
