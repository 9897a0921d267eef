"""What a call knows about itself: the agent's configuration and the per-call context."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """How the agent behaves on a call; mapped onto ``session.update`` by the session."""

    instructions: str = (
        "You are a friendly, efficient phone agent. Keep every answer short and natural: this is a phone call. "
        "Ask one question at a time."
    )
    model: str = "gpt-realtime-1.5"
    voice: str = "marin"
    greeting: str | None = None
    speaks_first: bool = True
    turn_detection: dict[str, Any] = field(default_factory=lambda: {"type": "server_vad"})
    """Server or semantic VAD as ``session.update`` takes it (``idle_timeout_ms`` included, for server VAD)."""
    transcription_model: str | None = "gpt-transcribe"
    transcription_language: str | None = None
    transcription_prompt: str | None = None
    noise_reduction: str | None = "far_field"
    """``near_field`` or ``far_field`` input noise reduction; ``None`` leaves it off."""
    speed: float | None = None
    max_output_tokens: int | None = None
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | None = None
    tool_filler_after_ms: int = 1500
    """A tool still running this long: the model says a short filler once (0: never)."""
    idle_hangup_after: int = 2
    """Re-prompts of a silent caller (server VAD's ``idle_timeout_ms``) before the agent says goodbye."""
    builtin_tools: tuple[str, ...] = ()
    """Built-in tools the model may use: ``end_call``, ``transfer_call``, ``do_not_call`` (opt-in per agent)."""
    transfer_number: str | None = None
    record: bool = True
    """Whether the agent's calls are recorded."""
    machine_detection: bool = False
    """Its outbound calls run answering-machine detection."""
    voicemail_message: str | None = None
    """The template of what it leaves on an answering machine (placeholders filled from each call's context)."""
    name: str = "default"

    @property
    def all_tools(self) -> list[dict[str, Any]]:
        return [*self.tools, *(BUILTIN_TOOLS[name] for name in self.builtin_tools)]

    @property
    def server_cancels_on_speech(self) -> bool:
        """Whether the server cancels an in-flight response by itself when the caller starts speaking.

        Both VAD types default ``interrupt_response`` to true; the bridge must then not send ``response.cancel``
        (it would race the server's own cancel and earn ``response_cancel_not_active``).
        """
        return bool(self.turn_detection.get("interrupt_response", True))

    @property
    def idle_timeout_ms(self) -> int | None:
        value = self.turn_detection.get("idle_timeout_ms")
        return int(value) if value is not None else None


BUILTIN_TOOLS: dict[str, dict[str, Any]] = {
    "end_call": {
        "type": "function",
        "name": "end_call",
        "description": "End the phone call. Use it when the conversation is over; you will then say goodbye.",
        "parameters": {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "why the call ends"}},
            "required": [],
        },
    },
    "do_not_call": {
        "type": "function",
        "name": "do_not_call",
        "description": "Put the person on the do-not-call list when they ask not to be called again. Then confirm it.",
        "parameters": {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "what they said, in a few words"}},
            "required": [],
        },
    },
    "transfer_call": {
        "type": "function",
        "name": "transfer_call",
        "description": "Transfer the caller to a human colleague when they ask for one or you cannot help.",
        "parameters": {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "why the caller needs a human"}},
            "required": [],
        },
    },
}


@dataclass(frozen=True, slots=True)
class ContextItem:
    role: Literal["system", "user", "assistant"]
    text: str


@dataclass(frozen=True, slots=True)
class CallContext:
    """Per-call context carried by the signed stream parameters (or resolved from them)."""

    call_sid: str | None = None
    direction: Literal["inbound", "outbound"] = "inbound"
    """``outbound``: callbridge placed the call; ``caller`` is then our number and ``called`` the person."""
    agent: str | None = None
    reference: str | None = None
    """The host application's reference (a customer id, a booking id…), resolved into context at call start."""
    caller: str | None = None
    called: str | None = None
    name: str | None = None
    instructions: str | None = None
    greeting: str | None = None
    items: tuple[ContextItem, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    binding: str | None = None
    """Ties parameters minted before Twilio assigned the call SID (outbound calls) to the call's record."""
    machine_detection: bool = False
    """Twilio's answering-machine detection runs on this outbound call: the agent waits for its verdict."""
    voicemail: str | None = None
    """Said word for word to an answering machine, then the call ends (``None``: hang up on a machine)."""
    answered_by: str | None = None
    """Twilio's answering-machine verdict, when it came before the call's stream did (it is on the record)."""

    @property
    def person_number(self) -> str | None:
        """The number of the person on the line (not ours)."""
        return self.called if self.direction == "outbound" else self.caller


def merge_context(base: CallContext, resolved: CallContext | None) -> CallContext:
    """``resolved`` (from a context resolver) over ``base`` (from the signed parameters), field by field."""
    if resolved is None:
        return base
    return CallContext(
        call_sid=base.call_sid,
        direction=base.direction,
        agent=base.agent,
        reference=base.reference,
        caller=base.caller,
        called=base.called,
        name=resolved.name or base.name,
        instructions=resolved.instructions or base.instructions,
        greeting=resolved.greeting or base.greeting,
        items=base.items + resolved.items,
        metadata={**base.metadata, **resolved.metadata},
        binding=base.binding,
        machine_detection=base.machine_detection,
        voicemail=base.voicemail,
        answered_by=base.answered_by,
    )


class ParameterError(Exception):
    """The stream's parameters are absent, tampered with, expired or bound to another call."""


class ParameterVerifier(Protocol):
    def __call__(self, parameters: Mapping[str, str], call_sid: str) -> CallContext:
        """Return the verified context, or raise :class:`ParameterError`.

        Expiry is judged by the wall clock the parameters were minted with, never by the session's monotonic one.
        """
        ...
