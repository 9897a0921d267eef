"""Live events as server-sent events: ``GET /api/live`` (the call list) and ``GET /api/calls/{call_sid}/live``.

Each event is sent with its type as the SSE ``event``, its id as the SSE ``id`` and its data as JSON; a client that
reconnects with ``Last-Event-ID`` receives what followed that event. Comments keep idle streams alive through
proxies. The streams are left out of the OpenAPI document: they never end, so they cannot be tried from it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
import structlog
from fastapi import APIRouter, Depends, Header, HTTPException, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from callbridge.api.rest import CallSid, Services, authorized
from callbridge.service.live import BadEventId, LiveEvents

log = structlog.stdlib.get_logger("callbridge.api")

KEEPALIVE_S = 15
"""A comment on an idle stream this often, so that proxies do not cut it."""

LastEventId = Annotated[
    str | None, Header(alias="Last-Event-ID", description="The id of the last event received: resume after it")
]


def live_router() -> APIRouter:
    api = APIRouter(prefix="/api", tags=["live"], dependencies=[Depends(authorized)], include_in_schema=False)

    @api.get("/live")
    async def live_calls(request: Request, last_event_id: LastEventId = None) -> EventSourceResponse:
        """The call list as it changes: ``call.started``, ``call.updated``, ``call.ended`` of every call."""
        return await _stream(request, None, last_event_id)

    @api.get("/calls/{call_sid}/live")
    async def live_call(
        call_sid: CallSid, request: Request, services: Services, last_event_id: LastEventId = None
    ) -> EventSourceResponse:
        """One call's events as they happen: its lines, partials, events, turn metrics, status and end."""
        await services.call(call_sid)  # 404 for a call not on record
        return await _stream(request, call_sid, last_event_id)

    return api


async def _stream(request: Request, call_sid: str | None, last_event_id: str | None) -> EventSourceResponse:
    live: LiveEvents = request.app.state.services.live
    after = None
    if last_event_id is not None:
        try:
            after = await live.check_event_id(call_sid, last_event_id)
        except BadEventId as exc:
            # The reason, not the value: what a client sends back is not written to the log.
            log.warning("live.bad_last_event_id", call_sid=call_sid, reason=str(exc), length=len(last_event_id))
            raise HTTPException(400, str(exc)) from None

    async def events() -> AsyncIterator[ServerSentEvent]:
        async for event in live.subscribe(call_sid, after):
            data = orjson.dumps({"call_sid": event.call_sid, **event.data}).decode()
            yield ServerSentEvent(data=data, event=event.type, id=event.id)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Callbridge-Worker": str(os.getpid())}
    return EventSourceResponse(events(), ping=KEEPALIVE_S, headers=headers)
