"""Campaigns on record, on SQLite and PostgreSQL: all-or-nothing imports, claims that cannot be won twice, the
do-not-call list, and the lease that keeps one dialer running."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from callbridge.store import Store
from callbridge.store.campaigns import CampaignStore, NewContact

POSTGRES_URL = os.environ.get("CALLBRIDGE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
NOW = datetime(2026, 12, 7, 15, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
async def campaigns(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CampaignStore]:
    if request.param == "sqlite":
        store = await Store.open(f"sqlite:///{tmp_path / 'calls.db'}")
        yield CampaignStore(store)
        await store.close()
        return
    admin = create_async_engine(POSTGRES_URL)
    schema = f"callbridge_test_{uuid.uuid4().hex[:12]}"
    async with admin.begin() as connection:
        await connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    store = await Store.open(POSTGRES_URL, connect_args={"server_settings": {"search_path": schema}})
    try:
        yield CampaignStore(store)
    finally:
        await store.close()
        async with admin.begin() as connection:
            await connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


def contact(n: int) -> NewContact:
    return NewContact(f"+1202555{n:04d}", ["America/New_York"], reference=f"r{n}", metadata={"time": "10 am"})


async def test_a_campaign_and_its_contacts_are_kept_together(campaigns: CampaignStore) -> None:
    campaign = await campaigns.create(
        name="reminders", agent="a", from_number="+12025550100", spec={"max_concurrent": 2}, contacts=[contact(1)]
    )
    assert campaign.status == "draft" and campaign.spec == {"max_concurrent": 2}
    assert await campaigns.add_contacts(campaign.id, [contact(2), contact(3)]) == 2
    with pytest.raises(ValueError, match="already in the campaign"):
        await campaigns.add_contacts(campaign.id, [contact(4), contact(2)])
    assert await campaigns.numbers(campaign.id) == {contact(n).number for n in (1, 2, 3)}  # 4 was not half-kept
    assert await campaigns.counts(campaign.id) == {"pending": 3}
    page = await campaigns.contacts(campaign.id, limit=2)
    assert [found.reference for found in page] == ["r1", "r2"]
    assert page[0].metadata == {"time": "10 am"} and page[0].zones == ["America/New_York"]
    assert [found.reference for found in await campaigns.contacts(campaign.id, after=page[-1].id)] == ["r3"]


async def test_transitions_happen_only_from_the_allowed_states(campaigns: CampaignStore) -> None:
    campaign = await campaigns.create(name="c", agent="a", from_number="+12025550100", spec={}, contacts=[])
    assert await campaigns.transition(campaign.id, "paused", ["running"]) is None
    running = await campaigns.transition(campaign.id, "running", ["draft"])
    assert running is not None and running.status == "running"
    done = await campaigns.transition(campaign.id, "cancelled", ["running", "paused"])
    assert done is not None and done.completed_at is not None
    assert await campaigns.transition("cmp_unknown", "running", ["draft"]) is None


async def test_an_attempt_is_claimed_once(campaigns: CampaignStore) -> None:
    campaign = await campaigns.create(name="c", agent="a", from_number="+1", spec={}, contacts=[contact(1)])
    [due] = await campaigns.due(campaign.id, NOW, 10)
    claims = await asyncio.gather(*(campaigns.claim(due) for _ in range(5)))
    won = [claim for claim in claims if claim is not None]
    assert len(won) == 1 and won[0].number == 1
    assert await campaigns.due(campaign.id, NOW, 10) == []
    await campaigns.placed(won[0].id, "CA1")
    [(attempt, owner)] = await campaigns.open_attempts(campaign.id)
    assert attempt.call_sid == "CA1" and owner.status == "in_progress"
    retry_at = NOW + timedelta(seconds=30)
    assert await campaigns.settle(attempt, "busy", "scheduled", retry_at)
    assert not await campaigns.settle(attempt, "busy", "scheduled", retry_at)  # settled once
    assert await campaigns.due(campaign.id, NOW, 10) == []
    [again] = await campaigns.due(campaign.id, retry_at, 10)
    assert again.attempts == 1 and again.status == "scheduled"
    second = await campaigns.claim(again)
    assert second is not None and second.number == 2
    assert [found.number for found in (await campaigns.attempts([again.id]))[again.id]] == [1, 2]


async def test_a_create_twilio_refused_is_undone(campaigns: CampaignStore) -> None:
    campaign = await campaigns.create(name="c", agent="a", from_number="+1", spec={}, contacts=[contact(1)])
    [due] = await campaigns.due(campaign.id, NOW, 10)
    attempt = await campaigns.claim(due)
    assert attempt is not None
    await campaigns.not_placed(attempt, NOW + timedelta(seconds=2))
    assert await campaigns.open_attempts() == []
    [back] = await campaigns.due(campaign.id, NOW + timedelta(seconds=2), 10)
    assert back.attempts == 0 and back.status == "pending"


async def test_do_not_call_numbers_are_never_due(campaigns: CampaignStore) -> None:
    campaign = await campaigns.create(name="c", agent="a", from_number="+1", spec={}, contacts=[contact(1), contact(2)])
    entry = await campaigns.dnc_add(contact(2).number, reason="asked", source="agent", call_sid="CA9")
    assert (await campaigns.dnc_add(contact(2).number)).source == "agent"  # adding twice keeps the first entry
    assert entry.reason == "asked" and await campaigns.on_dnc(contact(2).number)
    assert await campaigns.mark_dnc(campaign.id) == 1
    assert await campaigns.counts(campaign.id) == {"pending": 1, "dnc": 1}
    assert [found.number for found in await campaigns.dnc_list()] == [contact(2).number]
    assert await campaigns.dnc_remove(contact(2).number)
    assert not await campaigns.dnc_remove(contact(2).number)
    assert await campaigns.unfinished(campaign.id) == 1


async def test_one_holder_has_the_lease_until_it_runs_out(campaigns: CampaignStore) -> None:
    assert await campaigns.lease("dialer", "a", 10, NOW)
    assert not await campaigns.lease("dialer", "b", 10, NOW + timedelta(seconds=5))
    assert await campaigns.lease("dialer", "a", 10, NOW + timedelta(seconds=5))  # renewed
    assert not await campaigns.lease("dialer", "b", 10, NOW + timedelta(seconds=14))
    assert await campaigns.lease("dialer", "b", 10, NOW + timedelta(seconds=16))  # a stopped renewing
    await campaigns.release("dialer", "b")
    assert await campaigns.lease("dialer", "a", 10, NOW + timedelta(seconds=17))
