"""The REST API: outbound calls, handing live calls to the agent, call records and transcripts.

Every route needs ``Authorization: Bearer $CALLBRIDGE_API_TOKEN`` (a GET may carry the dashboard's session cookie
instead); with no token configured the API refuses everything (it never runs open by accident).
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any, Literal, Self

import orjson
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, status
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from callbridge.api.dashboard import session_of
from callbridge.api.docs import ErrorBody, answers
from callbridge.core import transcript
from callbridge.core.context import CallContext, ContextItem
from callbridge.service.calls import CallServices
from callbridge.service.recordings import Recordings, byte_range
from callbridge.store import repository

bearer = HTTPBearer(auto_error=False, description="CALLBRIDGE_API_TOKEN")


class _Body(BaseModel):
    """A request body that must survive the trip into signed parameters and TwiML intact."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _encodable(self) -> Self:
        try:  # lone surrogates and integers beyond 64 bits parse as JSON but cannot be signed or sent on
            orjson.dumps(self.model_dump())
        except orjson.JSONEncodeError as exc:
            raise ValueError(f"not encodable as UTF-8 JSON: {exc}") from None
        return self


class ContextIn(_Body):
    """Per-call context, carried by the signed stream parameters (keep it small: TwiML is limited in size)."""

    reference: str | None = Field(default=None, max_length=200, description="Your id for the call's subject")
    name: str | None = Field(default=None, max_length=100, description="The name of the person on the call")
    instructions: str | None = Field(
        default=None, max_length=1500, description="Instructions for this call, in place of the agent's own"
    )
    greeting: str | None = Field(
        default=None, max_length=300, description="What the agent says first, in place of its own greeting"
    )
    items: list[tuple[Literal["system", "user", "assistant"], str]] = Field(
        default=[],
        max_length=10,
        description="Conversation items the model is given before the call starts: [role, text] pairs",
    )
    metadata: dict[str, Any] = Field(
        default={}, description="Anything of yours to keep with the call: on its record and in its webhooks"
    )

    def to_context(
        self,
        *,
        agent: str | None,
        call_sid: str | None,
        caller: str | None,
        called: str | None,
        outbound: bool = False,
    ) -> CallContext:
        return CallContext(
            call_sid=call_sid,
            direction="outbound" if outbound else "inbound",
            agent=agent,
            reference=self.reference,
            caller=caller,
            called=called,
            name=self.name,
            instructions=self.instructions,
            greeting=self.greeting,
            items=tuple(ContextItem(role, text) for role, text in self.items),
            metadata=self.metadata,
        )


_AGENT = "The agent that takes the call, by name (the default agent when absent)"
_CONTEXT = "What the agent knows of this call"


class OutboundCall(_Body):
    """An outbound call to place."""

    to: str = Field(pattern=r"^\+[1-9]\d{6,14}$", description="E.164 number to call")
    from_: str = Field(alias="from", pattern=r"^\+[1-9]\d{6,14}$", description="Your Twilio number")
    agent: str | None = Field(default=None, description=_AGENT)
    context: ContextIn = Field(default=ContextIn(), description=_CONTEXT)
    say: str | None = Field(default=None, max_length=300, description="Spoken before the agent connects")
    machine_detection: bool | None = Field(
        default=None,
        description="Twilio's answering-machine detection (default: the agent's): the agent waits for the verdict, "
        "greets a person, and leaves the agent's voicemail_message on a machine, its {placeholders} filled from "
        "the context (name, reference, metadata): a missing one is a 422",
    )


class Handoff(_Body):
    """A live call to hand to the agent."""

    agent: str | None = Field(default=None, description=_AGENT)
    context: ContextIn = Field(default=ContextIn(), description=_CONTEXT)
    say: str | None = Field(default=None, max_length=300, description="Spoken before the agent connects")


class _Record(BaseModel):
    """An answer read from one of the store's records (``from_attributes``): its fields are the record's."""

    model_config = ConfigDict(from_attributes=True)


class CallRecord(_Record):
    """A call on record: who, which agent, its status, and how it ended."""

    call_sid: str = Field(description="Twilio's call SID")
    stream_sid: str | None = Field(description="The SID of the call's media stream, once Twilio has opened it")
    direction: str = Field(description="inbound or outbound")
    from_number: str | None = Field(description="The calling number")
    to_number: str | None = Field(description="The number called")
    agent: str = Field(description="The agent that takes the call")
    status: str = Field(
        description="Twilio's status of the call (queued, ringing, in-progress, completed, busy, failed, no-answer, "
        "canceled), or ended: the media stream is over and Twilio has not yet said how the call ended"
    )
    context: dict[str, Any] | None = Field(description="The call's context, as the agent received it")
    created_at: datetime = Field(description="When the call was put on record")
    started_at: datetime | None = Field(description="When the call's media stream started")
    ended_at: datetime | None = Field(description="When the call ended")
    end_reason: str | None = Field(
        description="Why the call ended (caller_hung_up, hung_up_through_api, a Twilio final status, ...)"
    )
    metrics: dict[str, Any] | None = Field(
        description="The media stream's counters (frames, barge-ins, tool calls, errors), once the call has ended"
    )
    usage: dict[str, int] | None = Field(description="Tokens the model billed for the call, once it has ended")
    owner: str | None = Field(
        description="The process that carries (or carried) the call's media stream: host:pid:start time"
    )
    answered_by: str | None = Field(
        description="Twilio's answering-machine verdict when detection ran: human, unknown, machine_end_beep, "
        "machine_end_silence, machine_end_other or fax"
    )
    updated_at: datetime = Field(description="When the record last changed")


class CallPage(_Record):
    """Calls, newest first, one page of them."""

    calls: list[CallRecord] = Field(description="The calls of this page")
    next_cursor: str | None = Field(description="Pass it back as cursor for the next page; null on the last page")


class CallEvent(_Record):
    """Something that happened during a call."""

    id: int = Field(description="The event's number: events of a call are numbered in the order they happened")
    call_sid: str = Field(description="Twilio's SID of the call")
    kind: str = Field(description="What happened: tool_call, barge_in, dtmf, transfer, status, error, ...")
    data: dict[str, Any] = Field(description="The event's details; their keys depend on kind")
    created_at: datetime = Field(description="When it happened")


class TranscriptLine(_Record):
    """One completed line of the conversation."""

    call_sid: str = Field(description="Twilio's SID of the call")
    speaker: transcript.Speaker = Field(description="Who spoke: caller or agent")
    text: str = Field(description="What was said")
    start_ms: int = Field(description="When the line started, in milliseconds from the start of the media stream")
    end_ms: int = Field(description="When the line ended, in milliseconds from the start of the media stream")
    item_id: str = Field(description="The model's conversation item the line belongs to")
    interrupted: bool = Field(description="The agent was cut off (barge-in): text is what the caller heard")
    failed: bool = Field(description="Transcription failed: text is empty or partial")


class TranscriptOut(_Record):
    """A call's transcript, in the order the lines were spoken."""

    call_sid: str = Field(description="Twilio's SID of the call")
    lines: list[TranscriptLine] = Field(description="The lines, in the order they were spoken")


CallSid = Annotated[str, Path(description="Twilio's SID of the call (CA followed by 32 hexadecimal digits)")]


def get_services(request: Request) -> CallServices:
    services: CallServices = request.app.state.services
    return services


Services = Annotated[CallServices, Depends(get_services)]


async def authorized(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], services: Services
) -> None:
    """Every route of the API needs the bearer token; with none configured, nothing gets in. A GET may instead
    carry the dashboard's session cookie (the browser's ``EventSource`` and ``<audio>`` send no header)."""
    token = services.api_token
    if token and credentials is None and request.method == "GET" and session_of(request) is not None:
        return
    if not token or credentials is None or not hmac.compare_digest(credentials.credentials, token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )


def router() -> APIRouter:
    api = APIRouter(prefix="/api", tags=["calls"], dependencies=[Depends(authorized)], responses=answers(401, 413, 422))
    _calls(api)
    _one_call(api)
    _recording(api)
    return api


def _calls(api: APIRouter) -> None:
    """Placing calls and listing them."""

    @api.post("/calls", status_code=201, response_model=CallRecord, responses=answers(502, 503))
    async def create_call(body: OutboundCall, services: Services) -> repository.CallRecord:
        """Place an outbound call answered by the agent."""
        context = body.context.to_context(
            agent=body.agent, call_sid=None, caller=body.from_, called=body.to, outbound=True
        )
        return await services.place_call(context, say=body.say, machine_detection=body.machine_detection)

    @api.get("/calls", response_model=CallPage)
    async def list_calls(
        services: Services,
        status_: Annotated[
            str | None, Query(alias="status", description="Only calls with this status (as on the record)")
        ] = None,
        number: Annotated[str | None, Query(description="Only calls from or to this number (E.164)")] = None,
        since: Annotated[datetime | None, Query(description="Only calls put on record at or after this time")] = None,
        until: Annotated[datetime | None, Query(description="Only calls put on record before this time")] = None,
        limit: Annotated[int, Query(ge=1, le=200, description="Calls on a page, at most")] = 50,
        cursor: Annotated[
            str | None, Query(description="Where the page starts: the next_cursor of the page before")
        ] = None,
    ) -> repository.CallPage:
        """Calls, newest first, a page at a time."""
        return await services.calls(status=status_, number=number, since=since, until=until, limit=limit, cursor=cursor)


_TEXT_TRANSCRIPT = "A line each: [start in seconds] speaker: text, (interrupted) after a line the caller cut off"


def _one_call(api: APIRouter) -> None:
    """One call: its record, transcript and events; hanging it up; handing it to the agent."""

    @api.get("/calls/{call_sid}", response_model=CallRecord, responses=answers(404))
    async def get_call(call_sid: CallSid, services: Services) -> repository.CallRecord:
        """The call's record."""
        return await services.call(call_sid)

    @api.get(
        "/calls/{call_sid}/transcript",
        response_model=TranscriptOut,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string", "description": _TEXT_TRANSCRIPT}}}},
            **answers(404),
        },
    )
    async def get_transcript(
        call_sid: CallSid,
        request: Request,
        services: Services,
        format: Annotated[
            Literal["json", "text"] | None,
            Query(description="json or text; when absent, text if the Accept header asks for text/plain"),
        ] = None,
    ) -> Any:
        """The call's transcript, as JSON or as text (a line each)."""
        lines = await services.transcript(call_sid)
        if format == "text" or (format is None and "text/plain" in request.headers.get("accept", "")):
            text = "".join(
                f"[{line.start_ms / 1000:7.2f}] {line.speaker}: {line.text}{' (interrupted)' * line.interrupted}\n"
                for line in lines
            )
            return PlainTextResponse(text)
        return TranscriptOut.model_validate({"call_sid": call_sid, "lines": lines})

    @api.get("/calls/{call_sid}/events", response_model=list[CallEvent], responses=answers(404))
    async def get_events(call_sid: CallSid, services: Services) -> list[repository.CallEvent]:
        """Tool calls (arguments and results), barge-ins, key presses, transfers, status changes, errors."""
        return await services.events(call_sid)

    @api.post("/calls/{call_sid}/hangup", response_model=CallRecord, responses=answers(404, 502, 503))
    async def hang_up(call_sid: CallSid, services: Services) -> repository.CallRecord:
        """End the call."""
        return await services.hang_up(call_sid)

    @api.post("/calls/{call_sid}/agent", response_model=CallRecord, responses=answers(404, 502, 503))
    async def hand_to_agent(call_sid: CallSid, body: Handoff, services: Services) -> repository.CallRecord:
        """Hand a call that is already live (in a queue, at an IVR) to the agent."""
        context = body.context.to_context(agent=body.agent, call_sid=call_sid, caller=None, called=None)
        return await services.hand_to_agent(call_sid, context, say=body.say)


def get_recordings(request: Request) -> Recordings:
    recordings: Recordings = request.app.state.recordings
    return recordings


_WAV = {"audio/wav": {"schema": {"type": "string", "format": "binary"}}}
_RANGE = "Bytes of the WAV to send (RFC 9110, one range: bytes=0-, bytes=1000-1999, bytes=-500); without it, all of it"


def _recording(api: APIRouter) -> None:
    """A call's recording, as a WAV a browser plays and seeks in."""

    @api.get(
        "/calls/{call_sid}/recording",
        response_class=Response,
        responses={
            200: {"content": _WAV, "description": "The recording: 16-bit PCM, 8 kHz, two channels"},
            206: {"content": _WAV, "description": "The bytes of the recording the Range header asked for"},
            404: {"model": ErrorBody, "description": "No such call on record, or no recording of it (why, in detail)"},
            416: {"model": ErrorBody, "description": "The Range header asks for bytes past the end"},
        },
        openapi_extra={
            "parameters": [
                {
                    "name": "Range",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": _RANGE,
                }
            ]
        },
    )
    async def get_recording(
        call_sid: CallSid, request: Request, recordings: Annotated[Recordings, Depends(get_recordings)]
    ) -> Response:
        """The call's recording once it has ended: the caller on the left, the agent on the right as the caller
        heard it, time-aligned to the call."""
        recording = await recordings.recording(call_sid)
        size = recording.size
        try:
            asked = byte_range(request.headers.get("range"), size)
        except ValueError:
            raise HTTPException(
                status.HTTP_416_REQUESTED_RANGE_NOT_SATISFIABLE,
                "the range starts past the end of the recording",
                headers={"Content-Range": f"bytes */{size}"},
            ) from None
        first, last = asked or (0, size - 1)
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Length": str(last - first + 1),
            "Content-Disposition": f'inline; filename="{call_sid}.wav"',
            "Cache-Control": "private, no-store",
        }
        if asked is not None:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        return StreamingResponse(
            recording.chunks(first, last),
            status_code=status.HTTP_206_PARTIAL_CONTENT if asked else status.HTTP_200_OK,
            media_type="audio/wav",
            headers=headers,
        )
