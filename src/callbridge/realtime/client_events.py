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
from callbridge.realtime.dialect import GA_TO_BETA_AUDIO_FORMAT, PHONE_AUDIO_FORMAT, Dialect


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


def _transcription(agent: AgentConfig) -> dict[str, Any] | None:
    if not agent.transcription_model:
        return None
    transcription: dict[str, Any] = {"model": agent.transcription_model}
    if agent.transcription_language:
        transcription["language"] = agent.transcription_language
    if agent.transcription_prompt:
        transcription["prompt"] = agent.transcription_prompt
    return transcription


def _ga_session(agent: AgentConfig, instructions: str) -> dict[str, Any]:
    audio_format = {"type": PHONE_AUDIO_FORMAT}
    audio_input: dict[str, Any] = {"format": audio_format, "turn_detection": agent.turn_detection}
    if agent.noise_reduction:
        audio_input["noise_reduction"] = {"type": agent.noise_reduction}
    if (transcription := _transcription(agent)) is not None:
        audio_input["transcription"] = transcription
    audio_output: dict[str, Any] = {"format": audio_format, "voice": agent.voice}
    if agent.speed is not None:
        audio_output["speed"] = agent.speed
    session: dict[str, Any] = {
        "type": "realtime",
        "model": agent.model,
        "output_modalities": ["audio"],
        "instructions": instructions,
        "audio": {"input": audio_input, "output": audio_output},
    }
    if agent.max_output_tokens is not None:
        session["max_output_tokens"] = agent.max_output_tokens
    if agent.all_tools:
        session["tools"] = agent.all_tools
        if agent.tool_choice:
            session["tool_choice"] = agent.tool_choice
    return session


def _beta_session(agent: AgentConfig, instructions: str) -> dict[str, Any]:
    """The beta session: flat audio fields, and no idle timeout (a GA addition the beta server refuses)."""
    audio_format = GA_TO_BETA_AUDIO_FORMAT[PHONE_AUDIO_FORMAT]
    turn_detection = agent.turn_detection
    session: dict[str, Any] = {
        "modalities": ["audio", "text"],
        "instructions": instructions,
        "input_audio_format": audio_format,
        "output_audio_format": audio_format,
        "voice": agent.voice,
        "turn_detection": (
            {key: value for key, value in turn_detection.items() if key != "idle_timeout_ms"}
            if turn_detection
            else None
        ),
    }
    if (transcription := _transcription(agent)) is not None:
        session["input_audio_transcription"] = transcription
    if agent.noise_reduction:
        session["input_audio_noise_reduction"] = {"type": agent.noise_reduction}
    if agent.speed is not None:
        session["speed"] = agent.speed
    if agent.max_output_tokens is not None:
        session["max_response_output_tokens"] = agent.max_output_tokens
    if agent.all_tools:
        session["tools"] = agent.all_tools
        if agent.tool_choice:
            session["tool_choice"] = agent.tool_choice
    return session
