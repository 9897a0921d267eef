"""The two dialects of the Realtime protocol: GA, and the beta some servers still speak (an older proxy, a
compatible local server).

What differs on the way in is here (event names, audio format names, the handshake's headers); the client events'
shapes in each dialect are :mod:`callbridge.realtime.client_events`.
"""

from __future__ import annotations

from typing import Literal

from callbridge.core.events import REALTIME_PHONE_AUDIO

Dialect = Literal["ga", "beta"]

BETA_TO_GA_EVENT_NAMES = {
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
}

GA_TO_BETA_AUDIO_FORMAT = {REALTIME_PHONE_AUDIO: "g711_ulaw", "audio/pcma": "g711_alaw", "audio/pcm": "pcm16"}
BETA_TO_GA_AUDIO_FORMAT = {beta: ga for ga, beta in GA_TO_BETA_AUDIO_FORMAT.items()}


def headers_for(dialect: Dialect, api_key: str | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {api_key or 'unused'}"}
    if dialect == "beta":
        headers["OpenAI-Beta"] = "realtime=v1"
    return headers


def ga_event_type(dialect: Dialect, event_type: str) -> str:
    if dialect == "beta":
        return BETA_TO_GA_EVENT_NAMES.get(event_type, event_type)
    return event_type
