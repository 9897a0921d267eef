"""Realtime server events (JSON) → typed session events.

The model's server is trusted no more than the caller: each event is parsed and checked in one pass against the
schema below (the structs, a union tagged by ``type``; see :mod:`callbridge.transport.wire`): each field the session
uses is checked for type, range and length, audio deltas must be base64, and the rest of the event is skipped. A
malformed event becomes a ``callbridge_malformed_event`` :class:`RealtimeError` with a short reason (never the event
itself); an event type the session does not act on becomes :class:`RealtimeOther`. Nothing raises.

Both dialects have a decoder: the beta one also knows each beta event name
(:data:`~callbridge.realtime.dialect.BETA_TO_GA_EVENT_NAMES`) as a variant of its GA event.
"""

from __future__ import annotations

import functools
import operator
from typing import Annotated, ClassVar, Final, NamedTuple, cast

import msgspec
from msgspec import Meta

from callbridge.core import events as ev
from callbridge.core.usage import TokenUsage
from callbridge.realtime.dialect import BETA_TO_GA_AUDIO_FORMAT, BETA_TO_GA_EVENT_NAMES, Dialect, ga_event_type
from callbridge.transport import wire

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
MAX_MESSAGE_CHARS = 1000
"""An error's or a failed transcription's message, as the session keeps it."""
MAX_DETAIL_CHARS = 500
"""Each string of a response's ``status_details.error``, as the session keeps it."""
MAX_OUTPUT_ITEMS = 64
"""The assistant messages of one response the session keeps the ids of (the first ones)."""


def is_known_server_event(event_type: str) -> bool:
    """Whether ``event_type`` (a GA name, as in :class:`RealtimeOther`) is a documented server event."""
    return event_type in SERVER_EVENT_TYPES


Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
Natural = Annotated[int, Meta(ge=0, le=wire.MAX_JSON_INTEGER)]
"""A time in milliseconds or a count of tokens."""
Text = str | None
"""An optional string: absent or null reads as ""."""


class _Event(msgspec.Struct, tag_field="type", gc=False):
    """A server event; each type the session acts on is the event it stands for."""

    def event(self) -> ev.RealtimeEvent:
        raise NotImplementedError


class _AudioDelta(_Event, tag="response.output_audio.delta"):
    response_id: Id
    item_id: Id
    delta: wire.Base64

    def event(self) -> ev.RealtimeAudioDelta:
        return ev.RealtimeAudioDelta(self.response_id, self.item_id, wire.base64_text(self.delta, "delta"))


class _SpeechStarted(_Event, tag="input_audio_buffer.speech_started"):
    item_id: Id
    audio_start_ms: Natural = 0

    def event(self) -> ev.RealtimeSpeechStarted:
        return ev.RealtimeSpeechStarted(self.item_id, self.audio_start_ms)


class _SpeechStopped(_Event, tag="input_audio_buffer.speech_stopped"):
    item_id: Id
    audio_end_ms: Natural = 0

    def event(self) -> ev.RealtimeSpeechStopped:
        return ev.RealtimeSpeechStopped(self.item_id, self.audio_end_ms)


class _TimeoutTriggered(_Event, tag="input_audio_buffer.timeout_triggered"):
    item_id: Id

    def event(self) -> ev.RealtimeTimeoutTriggered:
        return ev.RealtimeTimeoutTriggered(self.item_id)


class _ItemTruncated(_Event, tag="conversation.item.truncated"):
    item_id: Id
    audio_end_ms: Natural

    def event(self) -> ev.RealtimeItemTruncated:
        return ev.RealtimeItemTruncated(self.item_id, self.audio_end_ms)


class _AudioTranscriptDelta(_Event, tag="response.output_audio_transcript.delta"):
    item_id: Id
    delta: Text = None

    def event(self) -> ev.RealtimeTranscriptDelta:
        return ev.RealtimeTranscriptDelta("agent", self.item_id, self.delta or "")


class _InputTranscriptionDelta(_Event, tag="conversation.item.input_audio_transcription.delta"):
    item_id: Id
    delta: Text = None

    def event(self) -> ev.RealtimeTranscriptDelta:
        return ev.RealtimeTranscriptDelta("caller", self.item_id, self.delta or "")


class _AudioTranscriptDone(_Event, tag="response.output_audio_transcript.done"):
    item_id: Id
    transcript: Text = None

    def event(self) -> ev.RealtimeAudioTranscriptDone:
        return ev.RealtimeAudioTranscriptDone(self.item_id, self.transcript or "")


class _InputTranscriptionCompleted(_Event, tag="conversation.item.input_audio_transcription.completed"):
    item_id: Id
    transcript: Text = None

    def event(self) -> ev.RealtimeInputTranscriptionCompleted:
        return ev.RealtimeInputTranscriptionCompleted(self.item_id, self.transcript or "")


class _ErrorMessage(msgspec.Struct, gc=False):
    message: Text = None


class _InputTranscriptionFailed(_Event, tag="conversation.item.input_audio_transcription.failed"):
    item_id: Id
    error: _ErrorMessage | None = None

    def event(self) -> ev.RealtimeInputTranscriptionFailed:
        message = self.error.message if self.error else None
        return ev.RealtimeInputTranscriptionFailed(self.item_id, wire.short(message or "", MAX_MESSAGE_CHARS))


class _ResponseId(msgspec.Struct, gc=False):
    id: Id


class _ResponseCreated(_Event, tag="response.created"):
    response: _ResponseId

    def event(self) -> ev.RealtimeResponseCreated:
        return ev.RealtimeResponseCreated(self.response.id)


class _StatusError(msgspec.Struct, gc=False):
    type: Text = None
    code: Text = None
    message: Text = None


class _StatusDetails(msgspec.Struct, gc=False):
    type: Text = None
    reason: Text = None
    error: _StatusError | None = None

    def flat(self) -> dict[str, str] | None:
        """Short strings: ``type``, ``reason``, ``error_type``, ``error_code``, ``error_message`` (absent ones left
        out; ``None`` if all are)."""
        error = self.error or _StatusError()
        flat = {
            "type": wire.short(self.type or ""),
            "reason": wire.short(self.reason or ""),
            "error_type": wire.short(error.type or "", MAX_DETAIL_CHARS),
            "error_code": wire.short(error.code or "", MAX_DETAIL_CHARS),
            "error_message": wire.short(error.message or "", MAX_DETAIL_CHARS),
        }
        return {key: value for key, value in flat.items() if value} or None


class _TokenDetails(msgspec.Struct, gc=False):
    text_tokens: Natural | None = None
    audio_tokens: Natural | None = None
    cached_tokens: Natural | None = None


class _Usage(msgspec.Struct, gc=False):
    input_token_details: _TokenDetails | None = None
    output_token_details: _TokenDetails | None = None

    def tokens(self) -> TokenUsage:
        inputs = self.input_token_details or _TokenDetails()
        outputs = self.output_token_details or _TokenDetails()
        return TokenUsage(
            input_text=inputs.text_tokens or 0,
            input_audio=inputs.audio_tokens or 0,
            input_cached=inputs.cached_tokens or 0,
            output_text=outputs.text_tokens or 0,
            output_audio=outputs.audio_tokens or 0,
            responses=1,
        )


class _OutputEntry(msgspec.Struct, gc=False):
    type: Text = None
    role: Text = None
    id: Id | None = None

    def assistant_message_id(self) -> str | None:
        if self.type != "message" or self.role != "assistant":
            return None
        if self.id is None:
            raise wire.Invalid(wire.at("Expected an id", "response.output[].id"))
        return self.id


class _Response(msgspec.Struct, gc=False):
    id: Id
    status: Text = None
    status_details: _StatusDetails | None = None
    usage: _Usage | None = None
    output: list[_OutputEntry] | None = None


class _ResponseDone(_Event, tag="response.done"):
    response: _Response

    def event(self) -> ev.RealtimeResponseDone:
        response = self.response
        ids = (entry.assistant_message_id() for entry in (response.output or ())[:MAX_OUTPUT_ITEMS])
        return ev.RealtimeResponseDone(
            response.id,
            wire.short(response.status or "") or "completed",
            status_details=response.status_details.flat() if response.status_details else None,
            usage=response.usage.tokens() if response.usage else None,
            output_item_ids=tuple(item_id for item_id in ids if item_id is not None),
        )


class _ItemType(msgspec.Struct, gc=False):
    type: Text = None


class _FunctionCall(msgspec.Struct, gc=False):
    id: Id
    call_id: Id
    name: Id
    arguments: Text = None
    status: Text = None


_ITEM_TYPE: Final = msgspec.json.Decoder(_ItemType)
_FUNCTION_CALL: Final = msgspec.json.Decoder(_FunctionCall)
_OTHER_ITEM_DONE: Final = ev.RealtimeOther("response.output_item.done")


class _OutputItemDone(_Event, tag="response.output_item.done"):
    """A finished output item: a function call is the session's business, any other item is not."""

    response_id: Id
    item: msgspec.Raw

    def event(self) -> ev.RealtimeFunctionCallDone | ev.RealtimeOther:
        if wire.decode_field(_ITEM_TYPE, self.item, "item").type != "function_call":
            return _OTHER_ITEM_DONE
        item = wire.decode_field(_FUNCTION_CALL, self.item, "item")
        return ev.RealtimeFunctionCallDone(
            response_id=self.response_id,
            item_id=item.id,
            call_id=item.call_id,
            name=item.name,
            arguments=item.arguments or "{}",
            status=wire.short(item.status or "") or "completed",
        )


class _SessionCreated(_Event, tag="session.created"):
    def event(self) -> ev.RealtimeSessionCreated:
        return ev.RealtimeSessionCreated()


class _Format(msgspec.Struct, gc=False):
    type: Text = None


class _AudioSide(msgspec.Struct, gc=False):
    format: _Format | None = None

    def format_type(self) -> str:
        return wire.short(self.format.type or "") if self.format else ""


class _Audio(msgspec.Struct, gc=False):
    input: _AudioSide | None = None
    output: _AudioSide | None = None


class _Session(msgspec.Struct, gc=False):
    audio: _Audio | msgspec.UnsetType | None = msgspec.UNSET  # GA: session.audio.{input,output}.format.type
    input_audio_format: Text = None  # beta: g711_ulaw, pcm16, …
    output_audio_format: Text = None

    def formats(self) -> tuple[str, str]:
        """The input and output audio formats as GA names (``audio/pcmu``), in either dialect's shape."""
        if self.audio is msgspec.UNSET:
            return _ga_format(self.input_audio_format or ""), _ga_format(self.output_audio_format or "")
        audio = self.audio or _Audio()
        sides = (audio.input or _AudioSide(), audio.output or _AudioSide())
        return sides[0].format_type() or "unknown", sides[1].format_type() or "unknown"


def _ga_format(beta: str) -> str:
    return BETA_TO_GA_AUDIO_FORMAT.get(beta, wire.short(beta))


class _SessionUpdated(_Event, tag="session.updated"):
    session: _Session

    def event(self) -> ev.RealtimeSessionUpdated:
        input_format, output_format = self.session.formats()
        return ev.RealtimeSessionUpdated(input_format, output_format)


class _ErrorBody(msgspec.Struct, gc=False):
    type: Text = None
    code: Text = None
    message: Text = None
    param: Text = None
    event_id: Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None = None


class _Error(_Event, tag="error"):
    error: _ErrorBody | None = None

    def event(self) -> ev.RealtimeError:
        error = self.error or _ErrorBody()
        return ev.RealtimeError(
            code=wire.short(error.code or error.type or "unknown"),
            message=wire.short(error.message or "", MAX_MESSAGE_CHARS),
            event_id=error.event_id,
            error_type=wire.short(error.type or ""),
            param=wire.short(error.param or "") or None,
        )


class _NotActedOn(_Event):
    """A documented event the session does not act on: its fields are skipped, its type kept (as a GA name)."""

    other: ClassVar[ev.RealtimeOther]

    def event(self) -> ev.RealtimeOther:
        return self.other


class _Envelope(msgspec.Struct, gc=False):
    type: str


_ACTED_ON: Final[tuple[type[_Event], ...]] = (
    _AudioDelta,
    _SpeechStarted,
    _SpeechStopped,
    _TimeoutTriggered,
    _ItemTruncated,
    _AudioTranscriptDelta,
    _InputTranscriptionDelta,
    _AudioTranscriptDone,
    _InputTranscriptionCompleted,
    _InputTranscriptionFailed,
    _ResponseCreated,
    _ResponseDone,
    _OutputItemDone,
    _SessionCreated,
    _SessionUpdated,
    _Error,
)


def _tag(variant: type[_Event]) -> str:
    return str(variant.__struct_config__.tag)


def _variant(base: type[_Event], tag: str, **namespace: object) -> type[_Event]:
    """A subclass of ``base`` tagged ``tag``."""
    variant = msgspec.defstruct(f"{base.__name__}[{tag}]", [], bases=(base,), tag=tag, namespace=namespace)
    return cast("type[_Event]", variant)


_GA_VARIANTS: Final = _ACTED_ON + tuple(
    _variant(_NotActedOn, name, other=ev.RealtimeOther(name))
    for name in sorted(SERVER_EVENT_TYPES - {_tag(variant) for variant in _ACTED_ON})
)
"""Every server event type: those the session acts on, then the others."""
_BETA_VARIANTS: Final = _GA_VARIANTS + tuple(
    _variant(next(variant for variant in _GA_VARIANTS if _tag(variant) == ga), beta)
    for beta, ga in BETA_TO_GA_EVENT_NAMES.items()
)
"""The beta dialect's: the GA types, and each beta name as a variant of its GA type."""


class _Schema(NamedTuple):
    decoder: msgspec.json.Decoder[_Event]
    types: frozenset[str]
    """The event types the decoder knows."""

    @classmethod
    def of(cls, variants: tuple[type[_Event], ...]) -> _Schema:
        return cls(msgspec.json.Decoder(functools.reduce(operator.or_, variants)), frozenset(map(_tag, variants)))


_SCHEMAS: Final[dict[Dialect, _Schema]] = {"ga": _Schema.of(_GA_VARIANTS), "beta": _Schema.of(_BETA_VARIANTS)}
_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)


def parse_server_event(raw: str | bytes | memoryview, dialect: Dialect = "ga") -> ev.RealtimeEvent:
    """Parse one server event; anything unexpected becomes an error or :class:`RealtimeOther`, never raises.

    (Its size is capped by the connection: ``RealtimeEndpoint.max_message_bytes``.)
    """
    decoder, known = _SCHEMAS[dialect]
    try:
        try:
            return decoder.decode(raw).event()
        except msgspec.ValidationError as refused:
            return _not_in_schema(raw, dialect, known, refused)
    except wire.DECODE_ERRORS as exc:
        return ev.RealtimeError(code=MALFORMED, message=wire.reason(exc))
    except Exception as exc:  # pragma: no cover - a gap in the checks; the fuzz tests look for this message
        return ev.RealtimeError(code=MALFORMED, message=f"internal parser error: {type(exc).__name__}")


def _not_in_schema(
    raw: str | bytes | memoryview, dialect: Dialect, known: frozenset[str], refused: msgspec.ValidationError
) -> ev.RealtimeOther:
    """An event the schema refused: of a type it does not have (a :class:`RealtimeOther`), or malformed (raises)."""
    kind = _ENVELOPE.decode(raw).type  # no string type: malformed, with that reason
    if kind in known:
        raise refused
    kind = ga_event_type(dialect, kind)
    return ev.RealtimeOther(wire.short(kind, MAX_TYPE_CHARS), known=is_known_server_event(kind))
