"""The session's commands to the model as Realtime client events, in the GA shape or the beta one.

The core says what to do (:mod:`callbridge.core.commands`); this module alone knows the JSON each dialect expects
for it. The beta dialect is a serializer of its own, not a rewrite of GA dicts: the shapes differ in the session
configuration (flat fields, ``g711_ulaw`` format names, ``modalities``) and in assistant text parts (``text``, not
``output_text``). :func:`encode` is what the call sends; :func:`client_event` is the same event as a dict, which the
conformance checks validate against the ``openai`` package's types.
"""

from __future__ import annotations

from typing import Any

import orjson

from callbridge.core.commands import (
    AppendAudio,
    CancelResponse,
    ConversationItem,
    CreateItem,
    CreateResponse,
    DeleteItem,
    Message,
    RealtimeCommand,
    TruncateItem,
    UpdateSession,
)
from callbridge.core.context import AgentConfig
from callbridge.core.events import REALTIME_PHONE_AUDIO
from callbridge.realtime.dialect import GA_TO_BETA_AUDIO_FORMAT, Dialect


def encode(command: RealtimeCommand, dialect: Dialect) -> bytes:
    """The command as the text of one WebSocket message."""
    if type(command) is AppendAudio:  # the per-frame path: the same in both dialects
        return orjson.dumps({"type": AppendAudio.operation, "event_id": command.event_id, "audio": command.audio})
    return orjson.dumps(client_event(command, dialect))


def client_event(command: RealtimeCommand, dialect: Dialect) -> dict[str, Any]:
    """The command as a Realtime client event in ``dialect``."""
    event: dict[str, Any] = {"type": command.operation, "event_id": command.event_id}
    match command:
        case AppendAudio(audio=audio):
            event["audio"] = audio
        case UpdateSession(agent=agent, instructions=instructions):
            if dialect == "ga":
                event["session"] = _ga_session(agent, instructions)
            else:
                event["session"] = _beta_session(agent, instructions)
        case CreateItem(item=item):
            event["item"] = _item(item, dialect)
        case DeleteItem(item_id=item_id):
            event["item_id"] = item_id
        case TruncateItem(item_id=item_id, audio_end_ms=audio_end_ms):
            event.update(item_id=item_id, content_index=0, audio_end_ms=audio_end_ms)
        case CreateResponse(instructions=instructions):
            if instructions:
                event["response"] = {"instructions": instructions}
        case CancelResponse(response_id=response_id):
            if response_id is not None:
                event["response_id"] = response_id
    return event


def _item(item: ConversationItem, dialect: Dialect) -> dict[str, Any]:
    if isinstance(item, Message):
        part_type = "input_text" if item.role != "assistant" else ("output_text" if dialect == "ga" else "text")
        return {"type": "message", "role": item.role, "content": [{"type": part_type, "text": item.text}]}
    return {"type": "function_call_output", "call_id": item.call_id, "output": item.output}


def _present(**fields: Any) -> dict[str, Any]:
    """The fields that have a value: what the agent leaves out, the server's defaults decide."""
    return {key: value for key, value in fields.items() if value is not None and value != ""}


def _transcription(agent: AgentConfig) -> dict[str, Any] | None:
    if not agent.transcription_model:
        return None
    return _present(
        model=agent.transcription_model, language=agent.transcription_language, prompt=agent.transcription_prompt
    )


def _tools(agent: AgentConfig) -> dict[str, Any]:
    if not agent.all_tools:
        return {}
    return _present(tools=agent.all_tools, tool_choice=agent.tool_choice)


def _noise_reduction(agent: AgentConfig) -> dict[str, str] | None:
    return {"type": agent.noise_reduction} if agent.noise_reduction else None


def _ga_session(agent: AgentConfig, instructions: str) -> dict[str, Any]:
    audio_format = {"type": REALTIME_PHONE_AUDIO}
    audio_input = {
        "format": audio_format,
        "turn_detection": agent.turn_detection,
        **_present(noise_reduction=_noise_reduction(agent), transcription=_transcription(agent)),
    }
    audio_output = {"format": audio_format, "voice": agent.voice, **_present(speed=agent.speed)}
    return {
        "type": "realtime",
        "model": agent.model,
        "output_modalities": ["audio"],
        "instructions": instructions,
        "audio": {"input": audio_input, "output": audio_output},
        **_present(max_output_tokens=agent.max_output_tokens),
        **_tools(agent),
    }


def _beta_session(agent: AgentConfig, instructions: str) -> dict[str, Any]:
    """The beta session: flat audio fields, and no idle timeout (a GA addition the beta server refuses)."""
    audio_format = GA_TO_BETA_AUDIO_FORMAT[REALTIME_PHONE_AUDIO]
    turn_detection = agent.turn_detection
    if turn_detection:
        turn_detection = {key: value for key, value in turn_detection.items() if key != "idle_timeout_ms"}
    return {
        "modalities": ["audio", "text"],
        "instructions": instructions,
        "input_audio_format": audio_format,
        "output_audio_format": audio_format,
        "voice": agent.voice,
        "turn_detection": turn_detection or None,
        **_present(
            input_audio_transcription=_transcription(agent),
            input_audio_noise_reduction=_noise_reduction(agent),
            speed=agent.speed,
            max_response_output_tokens=agent.max_output_tokens,
        ),
        **_tools(agent),
    }
