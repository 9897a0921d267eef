"""Typed inputs of the call session.

Adapters turn wire messages into these; the session never sees JSON or sockets. Realtime events are named
after the GA protocol; the beta dialect is mapped onto them by :mod:`callbridge.realtime.dialect`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from callbridge.core.context import CallContext
from callbridge.core.usage import TokenUsage

# --- Twilio Media Streams -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TwilioConnected:
    """The ``connected`` message Twilio sends first."""


TWILIO_PHONE_AUDIO = "audio/x-mulaw"
"""Twilio's name for G.711 μ-law at 8 kHz, the audio of its media streams."""
REALTIME_PHONE_AUDIO = "audio/pcmu"
"""The Realtime API's (GA) name for the same audio: the format callbridge asks the model for, both ways."""
PHONE_SAMPLE_RATE = 8000


@dataclass(frozen=True, slots=True)
class TwilioStart:
    stream_sid: str
    call_sid: str
    account_sid: str = ""
    custom_parameters: dict[str, str] = field(default_factory=dict)
    encoding: str = TWILIO_PHONE_AUDIO
    sample_rate: int = PHONE_SAMPLE_RATE


@dataclass(slots=True)  # not frozen: one is made per audio frame, and freezing costs 5x; never mutated
class TwilioMedia:
    """One inbound audio frame; ``payload`` is base64 μ-law and is passed on untouched."""

    payload: str
    timestamp_ms: int = 0


@dataclass(slots=True)  # not frozen: one is made per audio frame, and freezing costs 5x; never mutated
class TwilioMark:
    """Twilio echoes a mark when playback reaches it, or when a ``clear`` flushed it."""

    name: str


@dataclass(frozen=True, slots=True)
class TwilioDtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class TwilioStop:
    """The caller hung up or the stream ended."""


@dataclass(frozen=True, slots=True)
class TwilioDisconnected:
    """The media-stream WebSocket closed without a ``stop``."""

    code: int | None = None


@dataclass(frozen=True, slots=True)
class TwilioInvalidMessage:
    """A frame that is not a valid Media Streams message; counted and logged, never fatal."""

    reason: str


# --- Realtime API ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RealtimeConnected:
    """The driver opened the Realtime WebSocket; the session may now configure it."""


@dataclass(frozen=True, slots=True)
class RealtimeConnectFailed:
    reason: str
    status: int | None = None
    """The HTTP status of a refused handshake (401: the API key), if the server answered one."""
    code: str = ""
    """The ``error.code`` of the refusal's JSON body, if it had one (``invalid_api_key``)."""


@dataclass(frozen=True, slots=True)
class RealtimeSessionCreated:
    pass


@dataclass(frozen=True, slots=True)
class RealtimeSessionUpdated:
    """The model confirmed the session's configuration; the formats are GA names (``audio/pcmu``)."""

    input_format: str = REALTIME_PHONE_AUDIO
    output_format: str = REALTIME_PHONE_AUDIO


@dataclass(frozen=True, slots=True)
class RealtimeSpeechStarted:
    item_id: str
    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class RealtimeSpeechStopped:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class RealtimeResponseCreated:
    response_id: str


@dataclass(frozen=True, slots=True)
class RealtimeResponseDone:
    response_id: str
    status: str
    status_details: dict[str, str] | None = None
    """For ``failed``, ``incomplete`` and ``cancelled``: ``type``, ``reason``, ``error_type``, ``error_code``,
    ``error_message`` (the strings the server gave, flattened; absent ones left out)."""
    usage: TokenUsage | None = None
    output_item_ids: tuple[str, ...] = ()
    """The assistant message items the response produced."""


@dataclass(slots=True)  # not frozen: one is made per audio frame, and freezing costs 5x; never mutated
class RealtimeAudioDelta:
    response_id: str
    item_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class RealtimeTranscriptDelta:
    """More interim text of a line being spoken: the agent's (its audio's transcript) or the caller's (the input
    transcription), before the line completes."""

    speaker: Literal["agent", "caller"]
    item_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class RealtimeAudioTranscriptDone:
    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class RealtimeInputTranscriptionCompleted:
    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class RealtimeInputTranscriptionFailed:
    item_id: str
    message: str


@dataclass(frozen=True, slots=True)
class RealtimeFunctionCallDone:
    """A ``function_call`` item finished (``response.output_item.done``)."""

    response_id: str
    item_id: str
    call_id: str
    name: str
    arguments: str
    status: str


@dataclass(frozen=True, slots=True)
class RealtimeItemTruncated:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class RealtimeTimeoutTriggered:
    """Server VAD's ``idle_timeout_ms`` passed with the caller silent: the model re-prompts them by itself."""

    item_id: str


@dataclass(frozen=True, slots=True)
class RealtimeError:
    code: str
    message: str
    event_id: str | None = None
    """The client event the error answers, when the server names it."""
    error_type: str = ""
    param: str | None = None


@dataclass(frozen=True, slots=True)
class RealtimeClosed:
    code: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RealtimeOther:
    """A server event the session does not act on; ``known`` is false for a type the protocol does not have."""

    type: str
    known: bool = True


# --- Driver-originated ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolFinished:
    call_id: str
    output: str
    ok: bool = True


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: the driver's timer, set to :meth:`CallSession.next_deadline`, fired."""


@dataclass(frozen=True, slots=True)
class ContextLoaded:
    """The call's context as the service keeps it (its record), loaded once the stream's reference was checked;
    ``None``: the parameters' context stands."""

    context: CallContext | None


@dataclass(frozen=True, slots=True)
class ContextResolved:
    """The driver's answer to :class:`~callbridge.core.commands.ResolveContext` (``None``: keep the defaults)."""

    context: CallContext | None


@dataclass(frozen=True, slots=True)
class HangupRequested:
    """The application asks to end the call (e.g. a tool or an API call)."""

    reason: str = "requested"


@dataclass(frozen=True, slots=True)
class EndRequested:
    """The process must let the call go (a drain deadline passed): it ends with the fallback, not dead air."""

    reason: str = "shutdown"


@dataclass(frozen=True, slots=True)
class CallRefused:
    """The driver's check of an admitted call failed (e.g. stream parameters replayed on another call)."""

    reason: str


@dataclass(frozen=True, slots=True)
class AmdVerdict:
    """Twilio's answering-machine detection decided (``AnsweredBy``): ``human``, ``unknown``, ``machine_start``,
    ``machine_end_beep``, ``machine_end_silence``, ``machine_end_other`` or ``fax``."""

    answered_by: str
    detection_ms: int | None = None
    """How long Twilio listened before deciding (``MachineDetectionDuration``)."""


# --- The host application's call control --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostSay:
    """The host application has the agent say ``text`` word for word: now, cutting off what it is saying (as a
    barge-in does), or after its current turn."""

    text: str
    interrupt: bool = False


@dataclass(frozen=True, slots=True)
class HostInstruct:
    """New facts for the agent, as a system message in the live conversation (kept for a new model session too);
    ``respond``: the agent speaks about them (after its current turn)."""

    text: str
    respond: bool = False


@dataclass(frozen=True, slots=True)
class HostTransfer:
    """The host application moves the call to ``to`` (E.164): the agent stops, says ``say`` word for word if given,
    then Twilio dials the number, as after the agent's own ``transfer_call``."""

    to: str
    say: str | None = None


HostEvent = HostSay | HostInstruct | HostTransfer
"""What the host application asks of a live call; the session answers a refusal it cannot carry out with a
:class:`~callbridge.core.commands.ControlRefused`."""

TwilioEvent = (
    TwilioConnected
    | TwilioStart
    | TwilioMedia
    | TwilioMark
    | TwilioDtmf
    | TwilioStop
    | TwilioDisconnected
    | TwilioInvalidMessage
)
RealtimeEvent = (
    RealtimeConnected
    | RealtimeConnectFailed
    | RealtimeSessionCreated
    | RealtimeSessionUpdated
    | RealtimeSpeechStarted
    | RealtimeSpeechStopped
    | RealtimeResponseCreated
    | RealtimeResponseDone
    | RealtimeAudioDelta
    | RealtimeTranscriptDelta
    | RealtimeAudioTranscriptDone
    | RealtimeInputTranscriptionCompleted
    | RealtimeInputTranscriptionFailed
    | RealtimeFunctionCallDone
    | RealtimeItemTruncated
    | RealtimeTimeoutTriggered
    | RealtimeError
    | RealtimeClosed
    | RealtimeOther
)
Event = (
    TwilioEvent
    | RealtimeEvent
    | Tick
    | ToolFinished
    | ContextLoaded
    | ContextResolved
    | HangupRequested
    | EndRequested
    | CallRefused
    | AmdVerdict
    | HostEvent
)
