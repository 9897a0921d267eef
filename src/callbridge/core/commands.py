"""Outputs of the call session: what the driver must do, in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from callbridge.core.context import CallContext
from callbridge.core.transcript import TranscriptLine


@dataclass(slots=True)  # not frozen: one is made per audio frame, and freezing costs 5x; never mutated
class SendTwilio:
    """A Media Streams message to Twilio (already in wire shape)."""

    message: dict[str, Any]


@dataclass(slots=True)  # not frozen: one is made per audio frame, and freezing costs 5x; never mutated
class SendRealtime:
    """A Realtime client event in GA shape; the adapter maps it to the configured dialect."""

    event: dict[str, Any]


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
    SendTwilio
    | SendRealtime
    | OpenRealtime
    | ResolveContext
    | RecordTranscript
    | RecordEvent
    | RunTool
    | TransferCall
    | Log
    | Measure
    | EndCall
)
