"""Campaigns and the do-not-call list, over the REST API (same bearer token as the rest of it).

A campaign is made as a draft with its contacts (JSON), or gets more of them later (``text/csv``); either way an
import is checked whole and a bad row refuses all of it (422 naming every row and field). Then ``start``, ``pause``,
``resume``, ``cancel``; the dialer does the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field

from callbridge.api.docs import ErrorBody, answers
from callbridge.api.rest import authorized
from callbridge.config import Settings
from callbridge.service.calling_hours import normalize_number
from callbridge.service.calls import CallServices, NotFound
from callbridge.service.campaigns import LIFECYCLE, CampaignInvalid, Campaigns, CampaignSpec
from callbridge.service.dialer import Dialer, ServicesTelephone
from callbridge.service.dialing import CONTACT_STATUSES, ContactStatus
from callbridge.store import campaigns as records
from callbridge.store.campaigns import CampaignStore

CSV_TYPES = ("text/csv", "application/csv", "text/plain")
CampaignId = Annotated[str, Path(description="The campaign's id (cmp_…)")]


class ContactProblemOut(BaseModel):
    """One bad row of an import."""

    row: str = Field(description="line N of the CSV (its header is line 1), or contacts[i] of the JSON list")
    field: str = Field(description="The column or field at fault")
    message: str = Field(description="What is wrong")


class ImportRefused(ErrorBody):
    """An import with bad rows: none of it was kept."""

    problems: list[ContactProblemOut] = Field(default=[], description="Every bad row, and what is wrong with it")


class CampaignOut(BaseModel):
    """A campaign, and how many of its contacts are in each status."""

    id: str = Field(description="The campaign's id (cmp_…)")
    name: str = Field(description="Its name")
    agent: str = Field(description="The agent that talks on its calls")
    from_: str = Field(serialization_alias="from", description="The number it calls from")
    status: Literal["draft", "running", "paused", "completed", "cancelled"] = Field(
        description="draft → running ⇄ paused → completed (nobody left to call) or cancelled"
    )
    settings: dict[str, Any] = Field(description="Calling hours and days, pacing, retries, machine handling")
    counts: dict[str, int] = Field(description="Contacts by status: " + ", ".join(CONTACT_STATUSES))
    total: int = Field(description="Contacts in the campaign")
    created_at: datetime = Field(description="When it was made")
    completed_at: datetime | None = Field(description="When it completed or was cancelled")


class AttemptOut(BaseModel):
    """One attempt to reach a contact: one call."""

    number: int = Field(description="1 for the first attempt")
    call_sid: str | None = Field(description="Twilio's SID of the attempt's call (null while it is being placed)")
    state: str = Field(description="claimed, created or settled")
    outcome: str | None = Field(description="answered, voicemail_left, no-answer, busy or failed, once settled")
    claimed_at: datetime = Field(description="When the dialer took it on (just before creating its call)")


class ContactOut(BaseModel):
    """A contact of the campaign, with its attempts."""

    id: int = Field(description="The contact's number in the campaign (pages go by it)")
    to: str = Field(description="The number called (E.164)")
    reference: str | None = Field(description="Your reference for the person")
    name: str | None = Field(description="The person's name")
    time_zones: list[str] = Field(description="The time zones its calling hours are judged in (all of them)")
    status: ContactStatus = Field(description="Where the contact stands: " + ", ".join(CONTACT_STATUSES))
    attempts: list[AttemptOut] = Field(description="Its attempts, first first")
    next_attempt_at: datetime | None = Field(description="When it is due again (a retry, or its window opening)")


class ContactPage(BaseModel):
    """A page of a campaign's contacts."""

    contacts: list[ContactOut] = Field(description="The contacts of this page, in id order")
    next_after: int | None = Field(description="Pass it back as after for the next page; null on the last page")


class Added(BaseModel):
    """An import that was kept whole."""

    added: int = Field(description="Contacts added")


class DncIn(BaseModel):
    """A number never to call again."""

    number: str = Field(max_length=64, description="The number never to call (E.164)")
    reason: str | None = Field(default=None, max_length=500, description="Why, for your records")


class DncOut(BaseModel):
    """A number on the do-not-call list."""

    number: str = Field(description="The number (E.164)")
    reason: str | None = Field(description="Why")
    source: str = Field(description="api, or agent when the person asked on a call")
    call_sid: str | None = Field(description="The call on which the person asked, for source agent")
    created_at: datetime = Field(description="When it was listed")


def get_campaigns(request: Request) -> Campaigns:
    campaigns: Campaigns = request.app.state.campaigns
    return campaigns


CampaignsDep = Annotated[Campaigns, Depends(get_campaigns)]


async def _out(campaigns: Campaigns, campaign_id: str) -> CampaignOut:
    campaign, counts = await campaigns.summary(campaign_id)
    return CampaignOut(
        id=campaign.id,
        name=campaign.name,
        agent=campaign.agent,
        from_=campaign.from_number,
        status=campaign.status,
        settings=campaign.spec,
        counts=counts,
        total=sum(counts.values()),
        created_at=campaign.created_at,
        completed_at=campaign.completed_at,
    )


@contextlib.asynccontextmanager
async def _campaigns(app: FastAPI) -> AsyncIterator[None]:
    """The campaigns and, with Twilio configured, the dialer, for the app's life (after the services it uses)."""
    settings: Settings = app.state.settings
    services: CallServices = app.state.services
    store = CampaignStore(services.store)
    clock = _clock(settings.dev_campaign_clock)
    templates = {name: agent.voicemail_message for name, agent in services.agents.agents.items()}
    app.state.campaigns = Campaigns(store, templates, clock)
    headroom = max(1, settings.max_calls // 10)  # inbound calls keep a tenth of the process's capacity
    dialer = Dialer(
        store,
        ServicesTelephone(services, store),
        holder=services.owner,
        capacity=lambda: settings.max_calls - headroom,
        clock=clock,
    )
    task = asyncio.create_task(dialer.run()) if services.twilio is not None else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _clock(start: datetime | None) -> Callable[[], datetime]:
    """The campaigns' wall clock: the real one, or one that starts at ``start`` and runs on (tests of hours)."""
    if start is None:
        return lambda: datetime.now(UTC)
    origin, began = start.astimezone(UTC), time.monotonic()
    return lambda: origin + timedelta(seconds=time.monotonic() - began)


def campaigns_router() -> APIRouter:
    api = APIRouter(
        prefix="/api",
        tags=["campaigns"],
        dependencies=[Depends(authorized)],
        responses=answers(401, 413, 422),
        lifespan=_campaigns,
    )
    refused: dict[int | str, dict[str, Any]] = {
        422: {"model": ImportRefused, "description": "Bad rows or fields, each named; nothing was kept"}
    }

    @api.post(
        "/campaigns", status_code=201, response_model=CampaignOut, response_model_by_alias=True, responses=refused
    )
    async def create_campaign(body: CampaignSpec, campaigns: CampaignsDep) -> CampaignOut:
        """A draft campaign with its contacts (start it with POST /api/campaigns/{id}/start)."""
        campaign = await campaigns.create(body)
        return await _out(campaigns, campaign.id)

    @api.get("/campaigns", response_model=list[CampaignOut], response_model_by_alias=True)
    async def list_campaigns(campaigns: CampaignsDep) -> list[CampaignOut]:
        """Every campaign, newest first."""
        return [await _out(campaigns, campaign.id) for campaign in await campaigns.store.campaigns()]

    @api.get(
        "/campaigns/{campaign_id}", response_model=CampaignOut, response_model_by_alias=True, responses=answers(404)
    )
    async def get_campaign(campaign_id: CampaignId, campaigns: CampaignsDep) -> CampaignOut:
        """The campaign and its contacts' counts by status."""
        return await _out(campaigns, campaign_id)

    @api.post(
        "/campaigns/{campaign_id}/contacts",
        response_model=Added,
        responses={**answers(404, 409), **refused},
        openapi_extra={"requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}}},
    )
    async def add_contacts(campaign_id: CampaignId, request: Request, campaigns: CampaignsDep) -> Added:
        """Add contacts from a CSV file: a header naming to, and any of reference, name, timezone (other columns are
        the contact's metadata, which the voicemail message's placeholders may name)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type not in CSV_TYPES:
            raise CampaignInvalid(f"send the contacts as text/csv, not {content_type or 'nothing'}")
        try:
            text = (await request.body()).decode("utf-8")
        except UnicodeDecodeError:
            raise CampaignInvalid("the CSV must be UTF-8") from None
        return Added(added=await campaigns.add_csv(campaign_id, text))

    @api.get(
        "/campaigns/{campaign_id}/contacts",
        response_model=ContactPage,
        responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}, **answers(404)},
    )
    async def list_contacts(
        campaign_id: CampaignId,
        campaigns: CampaignsDep,
        status: Annotated[ContactStatus | None, Query(description="Only contacts in this status")] = None,
        after: Annotated[int, Query(ge=0, description="The next_after of the page before")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000, description="Contacts on a page, at most")] = 100,
        format: Annotated[Literal["json", "csv"], Query(description="csv: every contact, as a file")] = "json",
    ) -> Any:
        """The campaign's contacts with their attempts, a page at a time (or all of them as CSV)."""
        if format == "csv":
            rows = await campaigns.contacts(campaign_id, status=status, after=0, limit=None)
            return PlainTextResponse(_csv(rows), media_type="text/csv")
        rows = await campaigns.contacts(campaign_id, status=status, after=after, limit=limit)
        return ContactPage(
            contacts=[_contact(contact, attempts) for contact, attempts in rows],
            next_after=rows[-1][0].id if len(rows) == limit else None,
        )

    for action in LIFECYCLE:
        _lifecycle(api, action)
    _dnc(api)
    return api


def _lifecycle(api: APIRouter, action: str) -> None:
    to, allowed = LIFECYCLE[action]

    async def act(campaign_id: CampaignId, campaigns: CampaignsDep) -> CampaignOut:
        await campaigns.act(campaign_id, action)
        return await _out(campaigns, campaign_id)

    act.__doc__ = f"Make the campaign {to} (from {' or '.join(allowed)}; 409 otherwise)."
    api.post(
        f"/campaigns/{{campaign_id}}/{action}",
        response_model=CampaignOut,
        response_model_by_alias=True,
        responses=answers(404, 409),
        name=f"{action}_campaign",
    )(act)


def _dnc(api: APIRouter) -> None:
    @api.post("/dnc", status_code=201, response_model=DncOut, tags=["do not call"])
    async def add_dnc(body: DncIn, campaigns: CampaignsDep) -> records.DncEntry:
        """Never call this number from a campaign again."""
        try:
            number = normalize_number(body.number)
        except ValueError as exc:
            raise CampaignInvalid(str(exc)) from None
        return await campaigns.store.dnc_add(number, reason=body.reason)

    @api.delete("/dnc/{number}", status_code=204, responses=answers(404), tags=["do not call"])
    async def remove_dnc(
        number: Annotated[str, Path(description="The number to take off the list (E.164)")], campaigns: CampaignsDep
    ) -> Response:
        """Take a number off the list."""
        try:
            normalized = normalize_number(number)
        except ValueError as exc:
            raise CampaignInvalid(str(exc)) from None
        if not await campaigns.store.dnc_remove(normalized):
            raise NotFound("the number is not on the list")
        return Response(status_code=204)

    @api.get("/dnc", response_model=list[DncOut], tags=["do not call"])
    async def list_dnc(
        campaigns: CampaignsDep,
        after: Annotated[str, Query(description="The last number of the page before")] = "",
        limit: Annotated[int, Query(ge=1, le=1000, description="Numbers on a page, at most")] = 100,
    ) -> list[records.DncEntry]:
        """The do-not-call list, in number order, a page at a time."""
        return await campaigns.store.dnc_list(after=after, limit=limit)


def _contact(contact: records.CampaignContact, attempts: list[records.Attempt]) -> ContactOut:
    return ContactOut(
        id=contact.id,
        to=contact.number,
        reference=contact.reference,
        name=contact.name,
        time_zones=contact.zones,
        status=contact.status,
        attempts=[AttemptOut.model_validate(attempt, from_attributes=True) for attempt in attempts],
        next_attempt_at=contact.next_attempt_at,
    )


def _csv(rows: list[tuple[records.CampaignContact, list[records.Attempt]]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["to", "reference", "name", "status", "attempts", "call_sids", "outcomes", "next_attempt_at"])
    for contact, attempts in rows:
        writer.writerow(
            [
                contact.number,
                contact.reference or "",
                contact.name or "",
                contact.status,
                len(attempts),
                " ".join(attempt.call_sid or "" for attempt in attempts),
                " ".join(attempt.outcome or "" for attempt in attempts),
                contact.next_attempt_at.isoformat() if contact.next_attempt_at else "",
            ]
        )
    return out.getvalue()
