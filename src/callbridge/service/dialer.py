"""The dialer: places the calls of running campaigns, one step at a time, with all of its state in the database.

Each step, under the ``dialer`` lease (one dialer at a time across processes and hosts):

1. attempts whose call is over are settled: their outcome, and the contact's next status (a retry, or final);
2. attempts left ``claimed`` by a process that died between claiming and learning what Twilio did are resolved
   against Twilio: the call it created is adopted, or, when Twilio has none, the attempt is undone. Nothing dials
   the contact again before that;
3. each running campaign dials its due contacts whose calling window is open, within ``max_concurrent``, its
   ``calls_per_second`` and the process's headroom; contacts on the do-not-call list are marked ``dnc`` instead;
4. a campaign with nobody left to call completes (and its ``campaign.completed`` webhook is queued).

An attempt is claimed in its own transaction before ``calls.create``: a crash at any point either leaves it claimed
(step 2) or created (step 1), never dialed twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from callbridge.core.context import CallContext, ContextItem
from callbridge.service.calls import CallServices, Invalid, NotConfigured, NotFound, TooManyRequests
from callbridge.service.campaigns import settings_of
from callbridge.service.dialing import INTERRUPTED, Pacer, outcome
from callbridge.store.campaigns import Attempt, Campaign, CampaignContact, CampaignStore
from callbridge.store.models import FINAL_STATUSES, utcnow

log = structlog.stdlib.get_logger("callbridge.dialer")

LEASE = "dialer"
STREAM_GRACE = timedelta(seconds=30)
"""A call that ended with a stream whose end was never kept (its process died) is settled this long after its end."""
REFRESH_AFTER_S = 60.0
"""How long a placed call may go without a final status before Twilio is asked for it (a status callback can be
lost while no process was up to receive it)."""


class Throttled(Exception):
    """Twilio refused the create for now (HTTP 429, error 20429): nothing was created."""

    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__("throttled")
        self.retry_after = retry_after


class Refused(Exception):
    """Twilio refused the create for good (a 4xx other than 429): nothing was created."""


@dataclasses.dataclass(frozen=True, slots=True)
class CallState:
    """What the dialer needs to know of a placed call."""

    status: str
    """Twilio's status (``queued`` … ``completed``, ``busy``, ``no-answer``, ``failed``, ``canceled``)."""
    over: bool
    """Whether everything about the call is known (its final status, and its stream's end when it had one)."""
    end_reason: str | None = None
    answered_by: str | None = None
    reached_agent: bool = True
    """Whether its media stream ever reached callbridge (an answered call whose stream did not: nobody talked)."""


class Telephone(Protocol):
    """How the dialer reaches Twilio and the calls on record (the services implement it)."""

    async def place(self, campaign: Campaign, contact: CampaignContact, attempt: Attempt) -> str:
        """Create the call; its SID. Raises :class:`Throttled`, :class:`Refused`, or anything else when the outcome
        is unknown (a timeout, a 5xx, a dropped connection)."""
        ...

    async def find_created(self, campaign: Campaign, contact: CampaignContact, since: datetime) -> str | None:
        """The SID of a call Twilio created from the campaign's number to the contact since ``since``, if any."""
        ...

    async def state(self, call_sid: str, *, refresh: bool) -> CallState | None:
        """The call as on record (``refresh``: after asking Twilio for its status); ``None`` if unknown."""
        ...

    async def completed(self, campaign: Campaign, counts: dict[str, int]) -> None:
        """A campaign completed (its webhook)."""
        ...


class Dialer:
    def __init__(
        self,
        campaigns: CampaignStore,
        telephone: Telephone,
        *,
        holder: str,
        capacity: Callable[[], int],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        lease_s: float = 15.0,
        step_s: float = 0.5,
        refresh_after_s: float = REFRESH_AFTER_S,
    ) -> None:
        self.campaigns = campaigns
        self.telephone = telephone
        self.holder = holder
        self._capacity = capacity
        """How many more calls this deployment may take on now (the headroom under CALLBRIDGE_MAX_CALLS)."""
        self._clock = clock
        self._lease_s = lease_s
        self._step_s = step_s
        self._refresh_after_s = refresh_after_s
        self._pacers: dict[str, Pacer] = {}
        self._placing: set[int] = set()
        self._checked: dict[int, float] = {}  # attempt id → when Twilio was last asked about its call
        self._fresh = True  # the first step since the lease was taken
        self.leading = False
        self._renewed = 0.0  # when the lease was last taken or renewed (monotonic)

    async def run(self) -> None:
        """Step forever while holding the lease; a database error is logged and the next step tries again."""
        try:
            while True:
                try:
                    if not self.leading or self._lease_due():
                        await self._take_lease()
                    if self.leading:
                        await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the dialer outlives a transient database or network error
                    log.error("dialer.step_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(self._step_s)
        finally:
            if self.leading:
                await asyncio.shield(self._release())

    def _lease_due(self) -> bool:
        """Whether the lease must be renewed before more is dialed (a slow-paced step must not outlive it)."""
        return self.leading and time.monotonic() - self._renewed > self._lease_s / 3

    async def _take_lease(self) -> None:
        """Take the lease, or renew it a third of the way through its term: a write to the database every few
        seconds, not at every step."""
        leading = await self.campaigns.lease(LEASE, self.holder, self._lease_s)  # real time, not the clock
        if leading and not self.leading:
            log.info("dialer.leading", holder=self.holder)
            self._fresh = True
        self.leading = leading
        self._renewed = time.monotonic()

    async def _release(self) -> None:
        try:
            await self.campaigns.release(LEASE, self.holder)
        except Exception as exc:  # the lease runs out by itself
            log.warning("dialer.release_failed", error=str(exc))

    async def step(self) -> None:
        open_attempts = await self.campaigns.open_attempts()
        campaigns = {campaign.id: campaign for campaign in await self.campaigns.campaigns()}
        for attempt, contact in open_attempts:
            campaign = campaigns.get(contact.campaign_id)
            if campaign is None or attempt.id in self._placing:
                continue
            if attempt.call_sid is None:
                if utcnow() - attempt.claimed_at < timedelta(seconds=self._lease_s):
                    continue  # the dialer that claimed it may still be creating its call: its lease has not run out
                await self._resolve(campaign, contact, attempt)
            else:
                await self._settle(campaign, attempt, attempt.call_sid)
        self._fresh = False
        in_flight = len(await self.campaigns.open_attempts())
        room = self._capacity() - in_flight
        for campaign in campaigns.values():
            if campaign.status != "running":
                continue
            room -= await self._dial(campaign, room)
            await self._complete_if_done(campaign)

    async def _settle(self, campaign: Campaign, attempt: Attempt, call_sid: str) -> None:
        now = time.monotonic()
        last = self._checked.get(attempt.id)
        # Twilio is asked about a call not over yet on this dialer's first step (status callbacks may have been lost
        # while no process was up), then every ``refresh_after_s``.
        refresh = self._fresh if last is None else now - last > self._refresh_after_s
        if last is None or refresh:
            self._checked[attempt.id] = now
        state = await self.telephone.state(call_sid, refresh=refresh)
        if state is None or not state.over:
            return
        _, policy, _ = settings_of(campaign)
        result = outcome(state.status, state.end_reason, state.answered_by, reached_agent=state.reached_agent)
        status, wait = policy.after(result, attempt.number)
        next_at = self._clock() + timedelta(seconds=wait) if wait is not None else None
        if await self.campaigns.settle(attempt, result, status, next_at):
            self._checked.pop(attempt.id, None)
            log.info("dialer.settled", call_sid=call_sid, outcome=result, contact_status=status, attempt=attempt.number)

    async def _resolve(self, campaign: Campaign, contact: CampaignContact, attempt: Attempt) -> None:
        """A claimed attempt no process is placing: its create's outcome is unknown. Ask Twilio."""
        since = attempt.claimed_at - timedelta(seconds=5)
        call_sid = await self.telephone.find_created(campaign, contact, since)
        if call_sid is not None:
            await self.campaigns.placed(attempt.id, call_sid)
            log.warning("dialer.adopted", call_sid=call_sid, contact=contact.id, attempt=attempt.number)
        else:
            await self.campaigns.not_placed(attempt, None)
            log.warning("dialer.undone", contact=contact.id, attempt=attempt.number, reason="Twilio has no such call")

    async def _dial(self, campaign: Campaign, room: int) -> int:
        """Dial what is due in ``campaign``; the number of calls placed."""
        hours, _, spec = settings_of(campaign)
        await self.campaigns.mark_dnc(campaign.id)
        open_here = len(await self.campaigns.open_attempts(campaign.id))
        room = min(room, int(spec.get("max_concurrent", 5)) - open_here)
        if room <= 0:
            return 0
        pacer = self._pacers.setdefault(campaign.id, Pacer(float(spec.get("calls_per_second", 1.0))))
        placed = 0
        now = self._clock()
        for contact in await self.campaigns.due(campaign.id, now, room * 4):
            if placed >= room or self._lease_due():
                break  # the rest next step (the lease is renewed before it)
            opens = hours.next_open(now, contact.zones)
            if opens is None or opens > now:
                await self.campaigns.waiting_until(contact.id, opens or now + timedelta(days=1))
                continue
            await asyncio.sleep(pacer.wait(time.monotonic()))
            if not await self._still_running(campaign.id):
                break
            attempt = await self.campaigns.claim(contact)
            if attempt is None:
                continue
            outcome_known = await self._place(campaign, contact, attempt, pacer)
            if outcome_known is None:
                break  # throttled: no more creates this step
            placed += outcome_known
        return placed

    async def _place(self, campaign: Campaign, contact: CampaignContact, attempt: Attempt, pacer: Pacer) -> int | None:
        """1 when the call was created, 0 when not (or unknown), ``None`` when Twilio asked us to slow down.

        The pacing counts from Twilio's answer: Twilio received the request before it, so the next request, a full
        interval later, reaches Twilio at least that interval after this one, however long each took to get there.
        """
        self._placing.add(attempt.id)
        try:
            call_sid = await self.telephone.place(campaign, contact, attempt)
        except Throttled as throttled:
            pacer.throttled(time.monotonic(), throttled.retry_after)
            await self.campaigns.not_placed(attempt, None)
            log.warning("dialer.throttled", campaign=campaign.id, rate=pacer.rate)
            return None
        except Refused as refused:
            pacer.placed(time.monotonic())
            _, policy, _ = settings_of(campaign)
            status, wait = policy.after("failed", attempt.number)
            next_at = self._clock() + timedelta(seconds=wait) if wait is not None else None
            await self.campaigns.settle(attempt, "failed", status, next_at)
            log.warning("dialer.refused", campaign=campaign.id, contact=contact.id, error=str(refused))
            return 0
        except Exception as exc:  # the outcome is unknown: the attempt stays claimed until Twilio is asked
            pacer.placed(time.monotonic())
            log.error("dialer.create_unknown", campaign=campaign.id, contact=contact.id, error=f"{type(exc).__name__}")
            return 0
        finally:
            self._placing.discard(attempt.id)
        pacer.placed(time.monotonic())
        await self.campaigns.placed(attempt.id, call_sid)
        log.info("dialer.placed", campaign=campaign.id, call_sid=call_sid, attempt=attempt.number)
        return 1

    async def _still_running(self, campaign_id: str) -> bool:
        campaign = await self.campaigns.get(campaign_id)
        return campaign is not None and campaign.status == "running"

    async def _complete_if_done(self, campaign: Campaign) -> None:
        if await self.campaigns.unfinished(campaign.id):
            return
        done = await self.campaigns.transition(campaign.id, "completed", ["running"])
        if done is not None:
            counts = await self.campaigns.counts(campaign.id)
            log.info("dialer.campaign_completed", campaign=campaign.id, **counts)
            await self.telephone.completed(done, counts)


class ServicesTelephone:
    """The dialer's way to Twilio and to the calls on record: the call services."""

    def __init__(self, services: CallServices, campaigns: CampaignStore) -> None:
        self.services = services
        self.campaigns = campaigns

    async def place(self, campaign: Campaign, contact: CampaignContact, attempt: Attempt) -> str:
        spec = campaign.spec
        metadata = {**contact.metadata, "campaign_id": campaign.id, "contact_id": contact.id, "attempt": attempt.number}
        items = contact.context.get("items") or ()
        context = CallContext(
            direction="outbound",
            agent=campaign.agent,
            reference=contact.reference,
            caller=campaign.from_number,
            called=contact.number,
            name=contact.name,
            instructions=contact.context.get("instructions"),
            greeting=contact.context.get("greeting"),
            items=tuple(ContextItem(role, text) for role, text in items),
            metadata=metadata,
        )
        try:
            record = await self.services.place_call(
                context,
                None,
                machine_detection=bool(spec.get("machine_detection", True)),
                leave_voicemail=spec.get("on_machine", "leave_message") == "leave_message",
            )
        except TooManyRequests as exc:
            raise Throttled() from exc
        except (Invalid, NotFound, NotConfigured) as exc:
            raise Refused(str(exc)) from exc
        return record.call_sid

    async def find_created(self, campaign: Campaign, contact: CampaignContact, since: datetime) -> str | None:
        twilio = self.services.twilio
        if twilio is None:
            raise RuntimeError("Twilio is not configured")
        found = await twilio.created_since(to=contact.number, from_=campaign.from_number, since=since)
        return found[-1] if found else None  # the oldest: the one the attempt created

    async def state(self, call_sid: str, *, refresh: bool) -> CallState | None:
        record = await self.services.store.get_call(call_sid)
        doubtful = record is None or record.status not in FINAL_STATUSES or record.end_reason == INTERRUPTED
        if refresh and doubtful and self.services.twilio is not None:
            status, answered_by = await self.services.twilio.fetch(call_sid)
            if record is None:  # never on record: its stream cannot have reached callbridge either
                return CallState(status, status in FINAL_STATUSES, status, answered_by, reached_agent=False)
            if answered_by and not record.answered_by:  # its detection callback was lost too
                await self.services.store.update_call(call_sid, answered_by=answered_by)
            if status in FINAL_STATUSES:  # a status callback that was lost while no process was up
                await self.services.status_callback({"CallSid": call_sid, "CallStatus": status})
            record = await self.services.store.get_call(call_sid)
        if record is None:
            return None
        over = record.status in FINAL_STATUSES and (
            record.stream_sid is None  # never answered, or never connected
            or record.metrics is not None  # its stream has ended and been kept
            or record.end_reason == INTERRUPTED  # its process died: nothing more comes of its stream
            or (record.ended_at is not None and utcnow() - record.ended_at > STREAM_GRACE)
        )
        return CallState(record.status, over, record.end_reason, record.answered_by, record.stream_sid is not None)

    async def completed(self, campaign: Campaign, counts: dict[str, int]) -> None:
        if "campaign.completed" not in self.services.settings.webhook_event_types:
            return
        await self.services.outbox.enqueue(
            {
                "event": "campaign.completed",
                "campaign": {"id": campaign.id, "name": campaign.name, "agent": campaign.agent},
                "counts": counts,
                "completed_at": (campaign.completed_at or utcnow()).isoformat(),
            }
        )
