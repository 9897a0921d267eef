"""Outputs of the call session: what the driver must do, in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from callbridge.core.context import AgentConfig, CallContext
from callbridge.core.transcript import TranscriptLine

# ---------------------------------------------------------------------------------------------------- to Twilio
# The media stream's three messages. The Twilio adapter serialises them (:mod:`callbridge.telephony.outbound`).


@dataclass(slots=True)  # not frozen: one is made per audio frame, and freezing costs 5x; never mutated
class PlayAudio:
    """Agent audio for the caller: base64 μ-law, as the model sent it."""

    payload: str


@dataclass(frozen=True, slots=True)
class SendMark:
    """A mark after the audio sent so far: Twilio echoes it once the caller has heard up to here."""

    name: str


@dataclass(frozen=True, slots=True)
class ClearAudio:
    """Drop the audio Twilio has buffered for the caller (a barge-in)."""


TwilioCommand = PlayAudio | SendMark | ClearAudio


# ---------------------------------------------------------------------------------------------------- to the model
# The Realtime client events the session sends, each with its own ``event_id`` (an error names the one it is about).
# ``operation`` is the protocol's name for it; the Realtime adapter gives each its JSON shape in the endpoint's
# dialect (:mod:`callbridge.realtime.client_events`).


@dataclass(slots=True)  # not frozen: one is made per audio frame; never mutated
class AppendAudio:
    """Caller audio for the model's input buffer: base64 μ-law, as Twilio sent it."""

    event_id: str
    audio: str
    operation: ClassVar[str] = "input_audio_buffer.append"


@dataclass(frozen=True, slots=True)
class UpdateSession:
    """Configure the model's session for this call: the agent's settings, with the call's instructions."""

    event_id: str
    agent: AgentConfig
    instructions: str
    operation: ClassVar[str] = "session.update"


@dataclass(frozen=True, slots=True)
class Message:
    """A conversation message: context, an earlier turn, a note about the call."""

    role: Literal["system", "user", "assistant"]
    text: str


@dataclass(frozen=True, slots=True)
class FunctionOutput:
    """What a tool call returned, for the model."""

    call_id: str
    output: str


ConversationItem = Message | FunctionOutput


@dataclass(frozen=True, slots=True)
class CreateItem:
    event_id: str
    item: ConversationItem
    operation: ClassVar[str] = "conversation.item.create"


@dataclass(frozen=True, slots=True)
class DeleteItem:
    """Take an item the caller heard nothing of out of the model's conversation."""

    event_id: str
    item_id: str
    operation: ClassVar[str] = "conversation.item.delete"


@dataclass(frozen=True, slots=True)
class TruncateItem:
    """Cut an agent item's audio (and its transcript) to what the caller heard."""

    event_id: str
    item_id: str
    audio_end_ms: int
    operation: ClassVar[str] = "conversation.item.truncate"


@dataclass(frozen=True, slots=True)
class CreateResponse:
    """Ask the model to respond; ``instructions`` replace the session's for this response only."""

    event_id: str
    instructions: str | None = None
    operation: ClassVar[str] = "response.create"


@dataclass(frozen=True, slots=True)
class CancelResponse:
    """Stop the response in progress (``response_id``: that one only, if it is still the current one)."""

    event_id: str
    response_id: str | None = None
    operation: ClassVar[str] = "response.cancel"


RealtimeCommand = AppendAudio | UpdateSession | CreateItem | DeleteItem | TruncateItem | CreateResponse | CancelResponse


# ---------------------------------------------------------------------------------------------------- to the driver


@dataclass(frozen=True, slots=True)
class OpenRealtime:
    """Open the Realtime connection (after ``delay_s``): the call was admitted, or the connection is lost.

    ``replace``: the current connection is done with (a rollover, an expired session): close it now, so that its
    closing is not taken for a loss.
    """

    delay_s: float = 0.0
    replace: bool = False


@dataclass(frozen=True, slots=True)
class RecordTranscript:
    line: TranscriptLine


@dataclass(frozen=True, slots=True)
class RunTool:
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ShowPartial:
    """The interim text of a line being spoken, for whoever watches the call live (at most every
    :data:`~callbridge.core.session.PARTIAL_EVERY_S`)."""

    speaker: Literal["agent", "caller"]
    item_id: str
    text: str


@dataclass(frozen=True, slots=True)
class ResolveContext:
    """Ask the host application for the call's context; answered with ``ContextResolved``, within a deadline."""

    context: CallContext


@dataclass(frozen=True, slots=True)
class RecordEvent:
    """Something worth keeping on the call's record: a tool call, a barge-in, a key press, an error."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TransferCall:
    """Redirect the live call to a human (``<Dial>``) through Twilio's REST API, before the stream closes."""

    to: str


@dataclass(frozen=True, slots=True)
class ControlRefused:
    """The host application's command (``HostSay``, ``HostInstruct``, ``HostTransfer``) cannot be carried out:
    ``not_ready`` (the model's session is not confirmed yet, or is being replaced), ``ending`` (the call is closing:
    a goodbye or a transfer is under way) or ``ended``. Nothing else was done."""

    reason: Literal["not_ready", "ending", "ended"]
    detail: str


@dataclass(frozen=True, slots=True)
class Log:
    """A structured log line for the call (the driver binds call and stream SIDs)."""

    event: str
    level: str = "info"
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Measure:
    """A measurement for the metrics (the driver turns it into a histogram observation)."""

    name: Literal["turn_latency_s"]
    value: float


@dataclass(frozen=True, slots=True)
class EndCall:
    """Tear the call down: close both sockets; ``hang_up`` ends the phone call through Twilio's REST API.

    ``fallback``: the agent is gone but the caller is still there — redirect the call to the configured fallback
    (an apology and hang-up, or a transfer to a human). ``twilio_close_code`` is the WebSocket close code for the
    media stream (1008 when refused).
    """

    reason: str
    hang_up: bool = False
    twilio_close_code: int = 1000
    fallback: bool = False


Command = (
    PlayAudio
    | SendMark
    | ClearAudio
    | AppendAudio
    | UpdateSession
    | CreateItem
    | DeleteItem
    | TruncateItem
    | CreateResponse
    | CancelResponse
    | OpenRealtime
    | ResolveContext
    | RecordTranscript
    | ShowPartial
    | RecordEvent
    | RunTool
    | TransferCall
    | ControlRefused
    | Log
    | Measure
    | EndCall
)
