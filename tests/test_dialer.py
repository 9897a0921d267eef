"""The dialer's steps on a real store, with a scripted phone network standing in for Twilio: retries, windows,
do-not-call, concurrency, throttling, and attempts left behind by a crash."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from callbridge.service.dialer import CallState, Dialer, Throttled
from callbridge.store import Store
from callbridge.store.campaigns import Attempt, Campaign, CampaignContact, CampaignStore, NewContact

MONDAY_NOON_NEW_YORK = datetime(2026, 12, 7, 17, 0, tzinfo=UTC)
SPEC = {
    "calling_hours": "09:00-20:00",
    "days": ["monday", "tuesday", "wednesday", "thursday", "friday"],
    "max_concurrent": 2,
    "calls_per_second": 100.0,
    "retry": {"max_attempts": 2, "backoff": ["30s"], "on": ["no-answer", "busy", "failed"]},
}


@dataclass
class Network:
    """Per number, the final status of each successive call; the calls created, and those live."""

    scripts: dict[str, list[str]]
    created: list[tuple[str, str]] = field(default_factory=list)  # (number, call sid)
    live: set[str] = field(default_factory=set)
    ended: dict[str, str] = field(default_factory=dict)
    throttle_next: int = 0
    peak: int = 0
    completed_campaigns: list[str] = field(default_factory=list)
    _sids: itertools.count[int] = field(default_factory=itertools.count)

    async def place(self, campaign: Campaign, contact: CampaignContact, attempt: Attempt) -> str:
        if self.throttle_next:
            self.throttle_next -= 1
            raise Throttled()
        sid = f"CA{next(self._sids):032d}"
        self.created.append((contact.number, sid))
        self.live.add(sid)
        self.peak = max(self.peak, len(self.live))
        return sid

    def finish_all(self) -> None:
        """Every live call ends as its number's script says."""
        for number, sid in self.created:
            if sid in self.live:
                self.live.discard(sid)
                self.ended[sid] = self.scripts[number].pop(0)

    async def find_created(self, campaign: Campaign, contact: CampaignContact, since: datetime) -> str | None:
        return next((sid for number, sid in reversed(self.created) if number == contact.number), None)

    async def state(self, call_sid: str, *, refresh: bool) -> CallState | None:
        if call_sid in self.ended:
            return CallState(self.ended[call_sid], True)
        return CallState("in-progress", False)

    async def completed(self, campaign: Campaign, counts: dict[str, int]) -> None:
        self.completed_campaigns.append(campaign.id)


@pytest.fixture
async def campaigns(tmp_path: Path) -> CampaignStore:
    store = await Store.open(f"sqlite:///{tmp_path / 'calls.db'}")
    return CampaignStore(store)


def number(n: int) -> str:
    return f"+1202555{n:04d}"


async def running(campaigns: CampaignStore, count: int, spec: dict[str, object] = SPEC) -> Campaign:
    contacts = [NewContact(number(n), ["America/New_York"]) for n in range(count)]
    campaign = await campaigns.create(name="c", agent="a", from_number="+12025550100", spec=spec, contacts=contacts)
    started = await campaigns.transition(campaign.id, "running", ["draft"])
    assert started is not None
    return started


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


async def test_a_campaign_runs_to_completion_with_retries(campaigns: CampaignStore) -> None:
    network = Network({number(0): ["completed"], number(1): ["busy", "busy"], number(2): ["no-answer", "completed"]})
    campaign = await running(campaigns, 3)
    clock = Clock(MONDAY_NOON_NEW_YORK)
    dialer = Dialer(campaigns, network, holder="me", capacity=lambda: 10, clock=clock)
    await dialer.step()
    assert len(network.created) == 2  # max_concurrent
    network.finish_all()
    await dialer.step()  # settles both, dials the third
    assert len(network.created) == 3
    network.finish_all()
    await dialer.step()
    assert await campaigns.counts(campaign.id) == {"answered": 1, "scheduled": 2}
    await dialer.step()
    assert len(network.created) == 3  # the retries wait for their backoff
    clock.at += timedelta(seconds=31)
    for _ in range(3):
        await dialer.step()
        network.finish_all()
    await dialer.step()
    assert await campaigns.counts(campaign.id) == {"answered": 2, "exhausted": 1}
    assert [n for n, _ in network.created].count(number(1)) == 2
    assert network.completed_campaigns == [campaign.id]
    assert network.peak <= 2


async def test_closed_windows_wait_and_dnc_is_never_dialed(campaigns: CampaignStore) -> None:
    network = Network({number(0): ["completed"], number(1): ["completed"]})
    campaign = await running(campaigns, 2)
    await campaigns.dnc_add(number(1))
    early = datetime(2026, 12, 7, 13, 59, 50, tzinfo=UTC)  # 08:59:50 in New York
    clock = Clock(early)
    dialer = Dialer(campaigns, network, holder="me", capacity=lambda: 10, clock=clock)
    await dialer.step()
    assert network.created == []
    assert await campaigns.counts(campaign.id) == {"scheduled": 1, "dnc": 1}
    clock.at = early + timedelta(seconds=10)
    await dialer.step()
    assert [n for n, _ in network.created] == [number(0)]


async def test_throttling_undoes_the_attempt_and_slows_down(campaigns: CampaignStore) -> None:
    network = Network({number(0): ["completed"]}, throttle_next=1)
    campaign = await running(campaigns, 1)
    dialer = Dialer(campaigns, network, holder="me", capacity=lambda: 10, clock=Clock(MONDAY_NOON_NEW_YORK))
    await dialer.step()
    assert network.created == []
    [contact] = await campaigns.contacts(campaign.id)
    assert contact.attempts == 0 and contact.status == "pending"
    await dialer.step()
    assert len(network.created) == 1


async def test_an_attempt_a_crash_left_claimed_is_resolved_before_any_redial(campaigns: CampaignStore) -> None:
    network = Network({number(0): ["completed"], number(1): ["completed"]})
    campaign = await running(campaigns, 2)
    due = await campaigns.due(campaign.id, MONDAY_NOON_NEW_YORK, 10)
    # A process claimed both, created the first call, and died before keeping its SID; the second never went out.
    first = await campaigns.claim(due[0])
    second = await campaigns.claim(due[1])
    assert first is not None and second is not None
    network.created.append((number(0), "CA_created_before_the_crash"))
    network.live.add("CA_created_before_the_crash")
    # (A lease of 0 s: the claims are older than the term of any dialer that could still be creating their calls.)
    dialer = Dialer(
        campaigns, network, holder="restarted", capacity=lambda: 10, clock=Clock(MONDAY_NOON_NEW_YORK), lease_s=0
    )
    await dialer.step()
    assert [n for n, _ in network.created] == [number(0), number(1)]  # number 0 was not dialed again
    attempts = await campaigns.attempts([due[0].id, due[1].id])
    assert [attempt.call_sid for attempt in attempts[due[0].id]] == ["CA_created_before_the_crash"]
    assert [attempt.number for attempt in attempts[due[1].id]] == [1]


async def test_a_fresh_claim_is_left_to_the_dialer_that_made_it(campaigns: CampaignStore) -> None:
    network = Network({number(0): ["completed"]})
    campaign = await running(campaigns, 1)
    [due] = await campaigns.due(campaign.id, MONDAY_NOON_NEW_YORK, 10)
    assert await campaigns.claim(due) is not None  # another dialer, mid-create
    dialer = Dialer(campaigns, network, holder="other", capacity=lambda: 10, clock=Clock(MONDAY_NOON_NEW_YORK))
    await dialer.step()
    [(attempt, _)] = await campaigns.open_attempts()
    assert attempt.call_sid is None and network.created == []  # neither undone nor dialed again


async def test_only_the_lease_holder_dials(campaigns: CampaignStore) -> None:
    assert await campaigns.lease("dialer", "first", 60)
    network = Network({number(0): ["completed"]})
    await running(campaigns, 1)
    other = Dialer(campaigns, network, holder="second", capacity=lambda: 10, step_s=0.01)
    assert not await campaigns.lease("dialer", other.holder, 60)
    assert network.created == []


async def test_no_headroom_no_dial(campaigns: CampaignStore) -> None:
    network = Network({number(0): ["completed"]})
    await running(campaigns, 1)
    dialer = Dialer(campaigns, network, holder="me", capacity=lambda: 0, clock=Clock(MONDAY_NOON_NEW_YORK))
    await dialer.step()
    assert network.created == []
