"""Campaigns on record: their contacts, each contact's attempts, the do-not-call list and the dialer's lease.

The dialer keeps all of its state here, so that a process killed at any moment leaves nothing that a restart cannot
pick up. The rule that matters most: **an attempt is claimed in a transaction before its call is created**. The
``(contact, attempt number)`` pair is unique, so two dialers (or one dialer twice) cannot both claim it, and an attempt
left ``claimed`` by a crash, its create's outcome unknown, is resolved against Twilio before anything dials again.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ForeignKey, Index, Row, UniqueConstraint, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from callbridge.store.models import Base, Id, Json, utcnow
from callbridge.store.repository import Store

CLAIMED, CREATED, SETTLED = "claimed", "created", "settled"
"""An attempt's states: claimed (its call may or may not exist), created (Twilio gave it a SID), settled."""


class CampaignRow(Base):
    __tablename__ = "campaigns"

    id: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str]
    agent: Mapped[str]
    from_number: Mapped[str]
    status: Mapped[str]  # draft, running, paused, completed, cancelled
    spec: Mapped[dict[str, Any]] = mapped_column(Json)  # hours, days, pacing, retry, machine handling
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    completed_at: Mapped[datetime | None]


class ContactRow(Base):
    __tablename__ = "campaign_contacts"
    __table_args__ = (
        UniqueConstraint("campaign_id", "number"),
        Index(None, "campaign_id", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    number: Mapped[str]
    reference: Mapped[str | None]
    name: Mapped[str | None]
    zones: Mapped[list[str]] = mapped_column(Json)
    context: Mapped[dict[str, Any]] = mapped_column(Json)
    extra: Mapped[dict[str, Any]] = mapped_column("metadata", Json)
    status: Mapped[str]
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AttemptRow(Base):
    __tablename__ = "campaign_attempts"
    __table_args__ = (UniqueConstraint("contact_id", "number"), Index(None, "state"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("campaign_contacts.id", ondelete="CASCADE"))
    number: Mapped[int]  # 1 for the first attempt
    state: Mapped[str]
    call_sid: Mapped[str | None] = mapped_column(unique=True)
    outcome: Mapped[str | None]
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)
    settled_at: Mapped[datetime | None]


class DncRow(Base):
    __tablename__ = "dnc_numbers"

    number: Mapped[str] = mapped_column(primary_key=True)
    reason: Mapped[str | None]
    source: Mapped[str]  # "api" or "agent"
    call_sid: Mapped[str | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LeaseRow(Base):
    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(primary_key=True)
    holder: Mapped[str]
    expires_at: Mapped[datetime]


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    name: str
    agent: str
    from_number: str
    status: str
    spec: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


@dataclass(frozen=True, slots=True)
class CampaignContact:
    id: int
    campaign_id: str
    number: str
    reference: str | None
    name: str | None
    zones: list[str]
    context: dict[str, Any]
    metadata: dict[str, Any]
    status: str
    attempts: int
    next_attempt_at: datetime | None


@dataclass(frozen=True, slots=True)
class Attempt:
    id: int
    contact_id: int
    number: int
    state: str
    call_sid: str | None
    outcome: str | None
    claimed_at: datetime
    settled_at: datetime | None


@dataclass(frozen=True, slots=True)
class NewContact:
    number: str
    zones: Sequence[str]
    reference: str | None = None
    name: str | None = None
    context: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DncEntry:
    number: str
    reason: str | None
    source: str
    call_sid: str | None
    created_at: datetime


T = TypeVar("T")


def _plain(cls: type[T], row: Row[Any]) -> T:
    """The dataclass ``cls`` from a row of the table's columns (keyed by column name)."""
    values = row._mapping
    return cls(**{field.name: values[field.name] for field in fields(cls)})  # type: ignore[arg-type]


class CampaignStore:
    """Campaigns in the store's database; every method is one short transaction."""

    def __init__(self, store: Store) -> None:
        self.engine = store.engine

    # ------------------------------------------------------------------------------------------------ campaigns

    async def create(
        self, *, name: str, agent: str, from_number: str, spec: dict[str, Any], contacts: Iterable[NewContact]
    ) -> Campaign:
        """A draft campaign and its contacts, all or nothing."""
        campaign_id = "cmp_" + secrets.token_hex(8)
        async with self.engine.begin() as connection:
            row = {"id": campaign_id, "name": name, "agent": agent, "from_number": from_number, "spec": spec}
            await connection.execute(insert(CampaignRow).values(status="draft", **row))
            await self._insert_contacts(connection, campaign_id, contacts)
            found = await connection.execute(select(CampaignRow).where(CampaignRow.id == campaign_id))
            return _plain(Campaign, found.one())

    async def add_contacts(self, campaign_id: str, contacts: Iterable[NewContact]) -> int:
        """Add contacts, all or none (``ValueError`` naming a number already in the campaign)."""
        async with self.engine.begin() as connection:
            return await self._insert_contacts(connection, campaign_id, contacts)

    async def _insert_contacts(self, connection: Any, campaign_id: str, contacts: Iterable[NewContact]) -> int:
        rows = [
            {
                "campaign_id": campaign_id,
                "number": contact.number,
                "reference": contact.reference,
                "name": contact.name,
                "zones": list(contact.zones),
                "context": contact.context or {},
                "metadata": contact.metadata or {},
                "status": "pending",
            }
            for contact in contacts
        ]
        if rows:
            try:
                await connection.execute(insert(ContactRow), rows)
            except IntegrityError:
                raise ValueError("a number is already in the campaign") from None
        return len(rows)

    async def get(self, campaign_id: str) -> Campaign | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(select(CampaignRow).where(CampaignRow.id == campaign_id))).one_or_none()
        return None if row is None else _plain(Campaign, row)

    async def campaigns(self, status: str | None = None) -> list[Campaign]:
        query = select(CampaignRow).order_by(CampaignRow.created_at.desc(), CampaignRow.id)
        if status is not None:
            query = query.where(CampaignRow.status == status)
        async with self.engine.connect() as connection:
            return [_plain(Campaign, row) for row in await connection.execute(query)]

    async def transition(self, campaign_id: str, to: str, allowed_from: Iterable[str]) -> Campaign | None:
        """Move a campaign to ``to`` if it is in one of ``allowed_from``; ``None`` when it is not (or is unknown)."""
        values: dict[str, Any] = {"status": to, "updated_at": utcnow()}
        if to in ("completed", "cancelled"):
            values["completed_at"] = utcnow()
        async with self.engine.begin() as connection:
            changed = await connection.execute(
                update(CampaignRow)
                .where(CampaignRow.id == campaign_id, CampaignRow.status.in_(list(allowed_from)))
                .values(**values)
                .returning(CampaignRow)
            )
            row = changed.one_or_none()
        return None if row is None else _plain(Campaign, row)

    async def counts(self, campaign_id: str) -> dict[str, int]:
        query = (
            select(ContactRow.status, func.count())
            .where(ContactRow.campaign_id == campaign_id)
            .group_by(ContactRow.status)
        )
        async with self.engine.connect() as connection:
            return {status: count for status, count in await connection.execute(query)}

    # ------------------------------------------------------------------------------------------------ contacts

    async def numbers(self, campaign_id: str) -> set[str]:
        async with self.engine.connect() as connection:
            found = await connection.execute(select(ContactRow.number).where(ContactRow.campaign_id == campaign_id))
            return set(found.scalars())

    async def contacts(
        self, campaign_id: str, *, status: str | None = None, after: int = 0, limit: int | None = 100
    ) -> list[CampaignContact]:
        """A page of contacts in id order, after the contact id ``after`` (``limit=None``: all of them)."""
        query = (
            select(ContactRow)
            .where(ContactRow.campaign_id == campaign_id, ContactRow.id > after)
            .order_by(ContactRow.id)
        )
        if status is not None:
            query = query.where(ContactRow.status == status)
        if limit is not None:
            query = query.limit(limit)
        async with self.engine.connect() as connection:
            return [_plain(CampaignContact, row) for row in await connection.execute(query)]

    async def attempts(self, contact_ids: Iterable[int]) -> dict[int, list[Attempt]]:
        ids = list(contact_ids)
        found: dict[int, list[Attempt]] = {contact_id: [] for contact_id in ids}
        if not ids:
            return found
        query = (
            select(AttemptRow).where(AttemptRow.contact_id.in_(ids)).order_by(AttemptRow.contact_id, AttemptRow.number)
        )
        async with self.engine.connect() as connection:
            for row in await connection.execute(query):
                found[row.contact_id].append(_plain(Attempt, row))
        return found

    async def due(self, campaign_id: str, now: datetime, limit: int) -> list[CampaignContact]:
        """Contacts waiting for an attempt whose time has come (or never was set), oldest first."""
        query = (
            select(ContactRow)
            .where(
                ContactRow.campaign_id == campaign_id,
                ContactRow.status.in_(("pending", "scheduled")),
                (ContactRow.next_attempt_at.is_(None)) | (ContactRow.next_attempt_at <= now),
            )
            .order_by(ContactRow.next_attempt_at.is_not(None), ContactRow.next_attempt_at, ContactRow.id)
            .limit(limit)
        )
        async with self.engine.connect() as connection:
            return [_plain(CampaignContact, row) for row in await connection.execute(query)]

    async def waiting_until(self, contact_id: int, at: datetime) -> None:
        """A due contact whose calling window is closed: try again at ``at``."""
        async with self.engine.begin() as connection:
            await connection.execute(
                update(ContactRow)
                .where(ContactRow.id == contact_id, ContactRow.status.in_(("pending", "scheduled")))
                .values(status="scheduled", next_attempt_at=at)
            )

    async def mark_dnc(self, campaign_id: str) -> int:
        """Contacts still waiting whose number is on the do-not-call list: ``dnc``, never dialed."""
        listed = select(DncRow.number)
        async with self.engine.begin() as connection:
            changed = await connection.execute(
                update(ContactRow)
                .where(
                    ContactRow.campaign_id == campaign_id,
                    ContactRow.status.in_(("pending", "scheduled")),
                    ContactRow.number.in_(listed),
                )
                .values(status="dnc", next_attempt_at=None)
            )
            return changed.rowcount or 0

    async def unfinished(self, campaign_id: str) -> int:
        """Contacts still waiting or in progress."""
        query = select(func.count()).where(
            ContactRow.campaign_id == campaign_id, ContactRow.status.in_(("pending", "scheduled", "in_progress"))
        )
        async with self.engine.connect() as connection:
            return int((await connection.execute(query)).scalar_one())

    # ------------------------------------------------------------------------------------------------ attempts

    async def claim(self, contact: CampaignContact) -> Attempt | None:
        """Claim the contact's next attempt, before its call is created; ``None`` if another claim won."""
        async with self.engine.begin() as connection:
            moved = await connection.execute(
                update(ContactRow)
                .where(
                    ContactRow.id == contact.id,
                    ContactRow.attempts == contact.attempts,
                    ContactRow.status.in_(("pending", "scheduled")),
                )
                .values(status="in_progress", attempts=contact.attempts + 1, next_attempt_at=None)
            )
            if moved.rowcount != 1:
                return None
            created = await connection.execute(
                insert(AttemptRow)
                .values(contact_id=contact.id, number=contact.attempts + 1, state=CLAIMED)
                .returning(AttemptRow)
            )
            return _plain(Attempt, created.one())

    async def placed(self, attempt_id: int, call_sid: str) -> None:
        """Twilio created the attempt's call."""
        async with self.engine.begin() as connection:
            await connection.execute(
                update(AttemptRow).where(AttemptRow.id == attempt_id).values(state=CREATED, call_sid=call_sid)
            )

    async def not_placed(self, attempt: Attempt, retry_at: datetime | None) -> None:
        """Twilio is known not to have created the call (refused, 429): the attempt is undone, the contact waits
        again (until ``retry_at``)."""
        async with self.engine.begin() as connection:
            await connection.execute(delete(AttemptRow).where(AttemptRow.id == attempt.id, AttemptRow.state == CLAIMED))
            await connection.execute(
                update(ContactRow)
                .where(ContactRow.id == attempt.contact_id, ContactRow.attempts == attempt.number)
                .values(
                    status="pending" if attempt.number == 1 else "scheduled",
                    attempts=attempt.number - 1,
                    next_attempt_at=retry_at,
                )
            )

    async def open_attempts(self, campaign_id: str | None = None) -> list[tuple[Attempt, CampaignContact]]:
        """Attempts not yet settled, with their contacts (of one campaign, or all)."""
        query = select(AttemptRow).where(AttemptRow.state != SETTLED).order_by(AttemptRow.id)
        if campaign_id is not None:
            query = query.where(
                AttemptRow.contact_id.in_(select(ContactRow.id).where(ContactRow.campaign_id == campaign_id))
            )
        async with self.engine.connect() as connection:
            attempts = [_plain(Attempt, row) for row in await connection.execute(query)]
            ids = {attempt.contact_id for attempt in attempts}
            found = await connection.execute(select(ContactRow).where(ContactRow.id.in_(ids)))
            contacts = {row.id: _plain(CampaignContact, row) for row in found}
        return [(attempt, contacts[attempt.contact_id]) for attempt in attempts]

    async def settle(
        self, attempt: Attempt, outcome: str, contact_status: str, next_attempt_at: datetime | None
    ) -> bool:
        """The attempt's call is over: its outcome, and its contact's new status. ``False`` if already settled."""
        async with self.engine.begin() as connection:
            done = await connection.execute(
                update(AttemptRow)
                .where(AttemptRow.id == attempt.id, AttemptRow.state != SETTLED)
                .values(state=SETTLED, outcome=outcome, settled_at=utcnow())
            )
            if done.rowcount != 1:
                return False
            await connection.execute(
                update(ContactRow)
                .where(ContactRow.id == attempt.contact_id, ContactRow.status == "in_progress")
                .values(status=contact_status, next_attempt_at=next_attempt_at)
            )
            return True

    async def dnc_add(
        self, number: str, *, reason: str | None = None, source: str = "api", call_sid: str | None = None
    ) -> DncEntry:
        async with self.engine.begin() as connection:
            existing = (await connection.execute(select(DncRow).where(DncRow.number == number))).one_or_none()
            if existing is None:
                values = {"number": number, "reason": reason, "source": source, "call_sid": call_sid}
                await connection.execute(insert(DncRow).values(**values))
            row = (await connection.execute(select(DncRow).where(DncRow.number == number))).one()
        return _plain(DncEntry, row)

    async def dnc_remove(self, number: str) -> bool:
        async with self.engine.begin() as connection:
            return bool((await connection.execute(delete(DncRow).where(DncRow.number == number))).rowcount)

    async def dnc_list(self, *, after: str = "", limit: int = 100) -> list[DncEntry]:
        query = select(DncRow).where(DncRow.number > after).order_by(DncRow.number).limit(limit)
        async with self.engine.connect() as connection:
            return [_plain(DncEntry, row) for row in await connection.execute(query)]

    async def on_dnc(self, number: str) -> bool:
        async with self.engine.connect() as connection:
            found = await connection.execute(select(DncRow.number).where(DncRow.number == number))
            return found.one_or_none() is not None

    # ------------------------------------------------------------------------------------------------ the lease

    async def lease(self, name: str, holder: str, ttl_s: float, now: datetime | None = None) -> bool:
        """Hold (or renew) the lease ``name`` for ``ttl_s`` unless another holder's lease is still running.

        One dialer runs at a time across processes and hosts sharing the database: whoever holds the lease. A
        holder that dies stops renewing, and another takes over once its lease has run out.
        """
        now = now or utcnow()
        expires = now + timedelta(seconds=ttl_s)
        async with self.engine.begin() as connection:
            taken = await connection.execute(
                update(LeaseRow)
                .where(LeaseRow.name == name, (LeaseRow.holder == holder) | (LeaseRow.expires_at < now))
                .values(holder=holder, expires_at=expires)
            )
            if taken.rowcount == 1:
                return True
        try:
            async with self.engine.begin() as connection:
                await connection.execute(insert(LeaseRow).values(name=name, holder=holder, expires_at=expires))
            return True
        except IntegrityError:  # another holder's lease is live
            return False

    async def release(self, name: str, holder: str) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder))
