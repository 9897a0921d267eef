"""Campaigns: a list of people to call with one agent, within calling hours, paced, retried, never on do-not-call.

:class:`CampaignSpec` is what ``POST /api/campaigns`` takes, checked whole before anything is kept;
:class:`Campaigns` carries out the requests of the API and the CLI; the dialer that places the calls is
:class:`callbridge.service.dialer.Dialer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from callbridge.service.calling_hours import WEEKDAYS, CallingHours, normalize_number, parse_duration
from callbridge.service.calls import Invalid, NotFound, ServiceError
from callbridge.service.contacts import Contact, ContactSpec, ContactsRefused, Row, check, from_csv, from_json
from callbridge.service.dialing import CONTACT_STATUSES, Outcome, RetryPolicy
from callbridge.store.campaigns import Attempt, Campaign, CampaignContact, CampaignStore, NewContact

LIFECYCLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "start": ("running", ("draft",)),
    "pause": ("paused", ("running",)),
    "resume": ("running", ("paused",)),
    "cancel": ("cancelled", ("draft", "running", "paused")),
}
"""Each lifecycle action: the status it leads to, from the statuses it is allowed in."""


class RetrySpec(BaseModel):
    """When a contact is called again."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(default=3, ge=1, le=20, description="Attempts per contact, the first included")
    backoff: list[str] = Field(
        default=["30m", "2h"],
        max_length=20,
        description="The wait before the 2nd, 3rd… attempt (30s, 30m, 2h, 1d); the last one repeats",
    )
    on: list[Outcome] = Field(
        default=["no-answer", "busy", "failed"],
        description="The outcomes that are tried again: no-answer, busy, failed, voicemail_left",
    )

    @field_validator("backoff")
    @classmethod
    def _durations(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_duration(text)
        return value

    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, tuple(parse_duration(text) for text in self.backoff), frozenset(self.on))


class CampaignSpec(BaseModel):
    """A campaign as ``POST /api/campaigns`` takes it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=200, description="Its name")
    agent: str = Field(description="The agent that talks on its calls (of the agents file)")
    from_: str = Field(alias="from", description="The number it calls from (E.164)")
    contacts: list[ContactSpec] = Field(
        default=[], max_length=100_000, description="The people to call (more with POST …/contacts, as CSV)"
    )
    calling_hours: str = Field(
        default="09:00-20:00", description="The daily window in each contact's local time, HH:MM-HH:MM"
    )
    days: list[str] = Field(default=list(WEEKDAYS), description="The days to call on (monday… or mon…)")
    max_concurrent: int = Field(default=5, ge=1, le=1000, description="Calls of the campaign at once, at most")
    calls_per_second: float = Field(
        default=1.0, gt=0, le=100, description="Calls created per second, at most (Twilio's default limit: 1)"
    )
    retry: RetrySpec = Field(default=RetrySpec(), description="When a contact is called again")
    machine_detection: bool = Field(default=True, description="Twilio's answering-machine detection on each call")
    on_machine: Literal["leave_message", "hang_up"] = Field(
        default="leave_message",
        description="On an answering machine: leave the agent's voicemail_message (word for word), or hang up",
    )

    @field_validator("from_")
    @classmethod
    def _from(cls, value: str) -> str:
        return normalize_number(value)

    @field_validator("calling_hours")
    @classmethod
    def _window(cls, value: str) -> str:
        CallingHours.parse(value)
        return value

    @field_validator("days")
    @classmethod
    def _days(cls, value: list[str]) -> list[str]:
        CallingHours.parse("00:00-24:00", value)
        return value

    def hours(self) -> CallingHours:
        return CallingHours.parse(self.calling_hours, self.days)

    def settings(self) -> dict[str, Any]:
        """What the dialer needs, as kept on the campaign's record."""
        return self.model_dump(mode="json", exclude={"name", "agent", "from_", "contacts"})


class CampaignInvalid(Invalid):
    """A campaign request that cannot be carried out; ``problems`` name rows and fields."""

    def __init__(self, message: str, problems: Sequence[dict[str, str]] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class CampaignNotFound(NotFound):
    """No such campaign."""


class CampaignConflict(ServiceError):
    """What the campaign's status does not allow (starting a cancelled campaign, adding to a completed one)."""


def settings_of(campaign: Campaign) -> tuple[CallingHours, RetryPolicy, dict[str, Any]]:
    spec = campaign.spec
    hours = CallingHours.parse(spec.get("calling_hours", "09:00-20:00"), spec.get("days"))
    return hours, RetrySpec.model_validate(spec.get("retry", {})).policy(), spec


class Campaigns:
    """The campaigns' requests; the voicemail template of an agent (if any) is what contacts must fill."""

    def __init__(self, store: CampaignStore, templates: dict[str, str | None], clock: Callable[[], datetime]) -> None:
        self.store = store
        self._templates = templates
        """Every known agent's voicemail message (``None``: it has none)."""
        self._clock = clock

    async def create(self, spec: CampaignSpec) -> Campaign:
        if spec.agent not in self._templates:
            raise CampaignInvalid(
                f"unknown agent {spec.agent!r}", [{"row": "", "field": "agent", "message": "unknown"}]
            )
        contacts = self._checked(
            self._template(spec.agent, spec.settings()), spec.hours(), from_json(spec.contacts), ()
        )
        return await self.store.create(
            name=spec.name,
            agent=spec.agent,
            from_number=spec.from_,
            spec=spec.settings(),
            contacts=[_new(contact) for contact in contacts],
        )

    async def add_csv(self, campaign_id: str, text: str) -> int:
        campaign = await self.get(campaign_id)
        if campaign.status in ("completed", "cancelled"):
            raise CampaignConflict(f"the campaign is {campaign.status}")
        hours, _, _ = settings_of(campaign)
        known = await self.store.numbers(campaign_id)
        contacts = self._checked(self._template(campaign.agent, campaign.spec), hours, from_csv(text), known)
        return await self.store.add_contacts(campaign_id, [_new(contact) for contact in contacts])

    def _template(self, agent: str, settings: dict[str, Any]) -> str | None:
        """The voicemail message each contact must be able to fill, when the campaign leaves one on machines."""
        leaves = settings.get("machine_detection", True) and settings.get("on_machine") == "leave_message"
        return self._templates.get(agent) if leaves else None

    def _checked(
        self, template: str | None, hours: CallingHours, rows: Sequence[Row], known: Iterable[str]
    ) -> list[Contact]:
        try:
            return check(rows, hours=hours, now=self._clock(), template=template, known_numbers=known)
        except ContactsRefused as refused:
            problems = [
                {"row": problem.row, "field": problem.field, "message": problem.message} for problem in refused.problems
            ]
            raise CampaignInvalid(str(refused), problems) from None

    async def get(self, campaign_id: str) -> Campaign:
        campaign = await self.store.get(campaign_id)
        if campaign is None:
            raise CampaignNotFound("no such campaign")
        return campaign

    async def summary(self, campaign_id: str) -> tuple[Campaign, dict[str, int]]:
        campaign = await self.get(campaign_id)
        counts = await self.store.counts(campaign_id)
        return campaign, {status: counts.get(status, 0) for status in CONTACT_STATUSES}

    async def act(self, campaign_id: str, action: str) -> Campaign:
        to, allowed = LIFECYCLE[action]
        changed = await self.store.transition(campaign_id, to, allowed)
        if changed is None:
            campaign = await self.get(campaign_id)
            raise CampaignConflict(f"cannot {action} a campaign that is {campaign.status}")
        return changed

    async def contacts(
        self, campaign_id: str, *, status: str | None, after: int, limit: int | None
    ) -> list[tuple[CampaignContact, list[Attempt]]]:
        await self.get(campaign_id)
        page = await self.store.contacts(campaign_id, status=status, after=after, limit=limit)
        attempts = await self.store.attempts(contact.id for contact in page)
        return [(contact, attempts[contact.id]) for contact in page]


def _new(contact: Contact) -> NewContact:
    return NewContact(contact.number, contact.zones, contact.reference, contact.name, contact.context, contact.metadata)
