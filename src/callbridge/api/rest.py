"""The REST API: outbound calls, handing live calls to the agent, call records and transcripts.

Every route needs ``Authorization: Bearer $CALLBRIDGE_API_TOKEN``; with no token configured the API refuses
everything (it never runs open by accident).
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any, Literal, Self

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from callbridge.core.context import CallContext, ContextItem
from callbridge.core.transcript import TranscriptLine
from callbridge.service.calls import CallServices
from callbridge.store.repository import CallEvent, CallPage, CallRecord

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
    name: str | None = Field(default=None, max_length=100)
    instructions: str | None = Field(default=None, max_length=1500)
    greeting: str | None = Field(default=None, max_length=300)
    items: list[tuple[Literal["system", "user", "assistant"], str]] = Field(default=[], max_length=10)
    metadata: dict[str, Any] = {}

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


class OutboundCall(_Body):
    to: str = Field(pattern=r"^\+[1-9]\d{6,14}$", description="E.164 number to call")
    from_: str = Field(alias="from", pattern=r"^\+[1-9]\d{6,14}$", description="Your Twilio number")
    agent: str | None = None
    context: ContextIn = ContextIn()
    say: str | None = Field(default=None, max_length=300, description="Spoken before the agent connects")


class Handoff(_Body):
    agent: str | None = None
    context: ContextIn = ContextIn()
    say: str | None = Field(default=None, max_length=300)


class TranscriptOut(BaseModel):
    call_sid: str
    lines: list[TranscriptLine]


def get_services(request: Request) -> CallServices:
    services: CallServices = request.app.state.services
    return services


Services = Annotated[CallServices, Depends(get_services)]


async def authorized(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], services: Services
) -> None:
    """Every route of the API needs the bearer token; with none configured, nothing gets in."""
    token = services.api_token
    if not token or credentials is None or not hmac.compare_digest(credentials.credentials, token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )


def router() -> APIRouter:
    api = APIRouter(prefix="/api", tags=["calls"], dependencies=[Depends(authorized)])
    _calls(api)
    _one_call(api)
    return api


def _calls(api: APIRouter) -> None:
    """Placing calls and listing them."""

    @api.post("/calls", status_code=201, response_model=CallRecord)
    async def create_call(body: OutboundCall, services: Services) -> CallRecord:
        """Place an outbound call answered by the agent."""
        context = body.context.to_context(
            agent=body.agent, call_sid=None, caller=body.from_, called=body.to, outbound=True
        )
        return await services.place_call(context, say=body.say)

    @api.get("/calls", response_model=CallPage)
    async def list_calls(
        services: Services,
        status_: Annotated[str | None, Query(alias="status")] = None,
        number: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: str | None = None,
    ) -> CallPage:
        return await services.calls(status=status_, number=number, since=since, until=until, limit=limit, cursor=cursor)


def _one_call(api: APIRouter) -> None:
    """One call: its record, transcript and events; hanging it up; handing it to the agent."""

    @api.get("/calls/{call_sid}", response_model=CallRecord)
    async def get_call(call_sid: str, services: Services) -> CallRecord:
        return await services.call(call_sid)

    @api.get(
        "/calls/{call_sid}/transcript",
        response_model=TranscriptOut,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def get_transcript(
        call_sid: str, request: Request, services: Services, format: Literal["json", "text"] | None = None
    ) -> Any:
        lines = await services.transcript(call_sid)
        if format == "text" or (format is None and "text/plain" in request.headers.get("accept", "")):
            text = "".join(
                f"[{line.start_ms / 1000:7.2f}] {line.speaker}: {line.text}{' (interrupted)' * line.interrupted}\n"
                for line in lines
            )
            return PlainTextResponse(text)
        return TranscriptOut(call_sid=call_sid, lines=lines)

    @api.get("/calls/{call_sid}/events", response_model=list[CallEvent])
    async def get_events(call_sid: str, services: Services) -> list[CallEvent]:
        """Tool calls (arguments and results), barge-ins, key presses, transfers, status changes, errors."""
        return await services.events(call_sid)

    @api.post("/calls/{call_sid}/hangup", response_model=CallRecord)
    async def hang_up(call_sid: str, services: Services) -> CallRecord:
        return await services.hang_up(call_sid)

    @api.post("/calls/{call_sid}/agent", response_model=CallRecord)
    async def hand_to_agent(call_sid: str, body: Handoff, services: Services) -> CallRecord:
        """Hand a call that is already live (in a queue, at an IVR) to the agent."""
        context = body.context.to_context(agent=body.agent, call_sid=call_sid, caller=None, called=None)
        return await services.hand_to_agent(call_sid, context, say=body.say)
