"""Calls on record: the application layer between the HTTP routes, the store, Twilio's REST API and webhooks (whose
delivery is :class:`callbridge.service.webhooks.WebhookOutbox`'s)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import secrets
import time
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from callbridge.config import Settings
from callbridge.core.context import CallContext, ContextItem
from callbridge.core.session import CallSession
from callbridge.core.transcript import TranscriptLine
from callbridge.service.agents import AgentDirectory
from callbridge.service.contacts import missing, placeholder_values, render
from callbridge.service.live import LiveEvents, LocalLiveEvents
from callbridge.service.ownership import process_identity
from callbridge.service.webhooks import WebhookOutbox
from callbridge.store.campaigns import CampaignStore
from callbridge.store.models import ENDED, FINAL_STATUSES
from callbridge.store.repository import CallEvent, CallPage, CallRecord, Store
from callbridge.telephony.params import StreamParameterSigner
from callbridge.telephony.rest import TwilioCalls, TwilioRestException
from callbridge.telephony.twiml import connect_stream_twiml, dial_twiml, fallback_twiml

log = structlog.stdlib.get_logger("callbridge.services")

STATUS_EVENTS = ["initiated", "ringing", "answered", "completed"]
BINDING_WAIT_S = 2.0
"""How long an outbound call's stream may wait for its call record (Twilio answered before we stored it)."""


async def agent_twiml(settings: Settings, context: CallContext, say: str | None = None) -> str:
    """The TwiML that hands a call to the agent, for Python host apps that build their own Twilio responses.

    Answer a webhook with it, or pass it to ``calls(sid).update(twiml=…)``. The call's context goes to the record
    in ``CALLBRIDGE_DATABASE_URL`` (the service that receives the stream reads it there, so both must share the
    database) and the stream parameter, signed with ``CALLBRIDGE_SECRET`` (shared too), refers to it.
    """
    if settings.secret is None:
        raise ValueError("CALLBRIDGE_SECRET must be set: the stream parameters are signed with it")
    if not context.call_sid:
        raise ValueError("the context needs the call's SID: its record is where the service finds the context")
    signer = StreamParameterSigner(settings.secret.get_secret_value(), settings.stream_parameters_ttl_seconds)
    store = await Store.open(settings.database_url)
    try:
        await store.record_call(
            call_sid=context.call_sid,
            direction=context.direction,
            from_number=context.caller,
            to_number=context.called,
            agent=context.agent or "default",
            status="in-progress",
            context=_context_json(context),
        )
    finally:
        await store.close()
    return _stream_twiml(settings, signer, context, say)


def _stream_twiml(settings: Settings, signer: StreamParameterSigner, context: CallContext, say: str | None) -> str:
    """``<Say>`` (optional) and ``<Connect><Stream>`` with this call's signed parameters; Twilio reports the
    stream's start, stop and errors to ``/twilio/stream-status``."""
    parameters = signer.mint(context, time.time())
    return connect_stream_twiml(
        settings.stream_url,
        parameters,
        say=say or settings.say,
        status_callback=f"{settings.public_url}/twilio/stream-status",
    )


class ServiceError(Exception):
    """A request the services cannot carry out; the HTTP layer maps each kind to its status (one handler)."""


class NotFound(ServiceError):
    """No such call (on record, or at Twilio)."""


class Invalid(ServiceError):
    """The request cannot be carried out as asked: an unknown agent, TwiML over Twilio's size, Twilio's 4xx."""


class NotConfigured(ServiceError):
    """What the request needs is not configured (Twilio REST credentials)."""


class Upstream(ServiceError):
    """Twilio failed or could not be reached."""


class TooManyRequests(ServiceError):
    """Twilio is throttling this account (429, error 20429): nothing was done; try again later."""


class CallServices:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        signer: StreamParameterSigner,
        agents: AgentDirectory,
        twilio: TwilioCalls | None,
        live: LiveEvents | None = None,
    ) -> None:
        self.settings = settings
        self.live = live or LocalLiveEvents()
        """Where the calls' live events go (``GET /api/live``); the types in CALLBRIDGE_WEBHOOK_EVENTS go to the
        webhook outbox too."""
        self._webhooked = settings.webhook_event_types
        self._pending: set[asyncio.Task[None]] = set()
        self.store = store
        self.signer = signer
        self.agents = agents
        self.twilio = twilio
        self.api_token = settings.api_token.get_secret_value() if settings.api_token else None
        self.owner = process_identity()
        self.outbox = WebhookOutbox(settings, store)
        """The webhooks to deliver: ``outbox.run()`` delivers them, for the app's life."""

    async def aclose(self) -> None:
        await asyncio.gather(*self._pending, return_exceptions=True)
        await self.outbox.aclose()
        if self.twilio is not None:
            await self.twilio.aclose()

    # --- TwiML ---------------------------------------------------------------------------------------------

    def stream_twiml(self, context: CallContext, say: str | None = None) -> str:
        return _stream_twiml(self.settings, self.signer, context, say)

    @property
    def fallback_twiml(self) -> str:
        return fallback_twiml(self.settings.fallback_say, self.settings.fallback_transfer_to)

    @contextlib.contextmanager
    def _twilio_errors(self) -> Iterator[None]:
        """Twilio's refusals as HTTP answers: its 4xx are the request's fault, the rest is a bad gateway."""
        try:
            yield
        except ValueError as exc:  # TwiML over Twilio's 4000-character limit, refused before sending
            raise Invalid(str(exc)) from None
        except TwilioRestException as exc:
            if exc.status == 404:
                raise NotFound("Twilio knows no such call") from None
            if exc.status == 429:
                raise TooManyRequests(f"Twilio is throttling: {exc.msg}") from None
            if 400 <= exc.status < 500:
                raise Invalid(f"Twilio refused: {exc.msg}") from None
            raise Upstream(f"Twilio failed: {exc.msg}") from None
        except (TimeoutError, OSError) as exc:
            raise Upstream(f"Twilio unreachable: {exc}") from None

    def _twilio(self) -> TwilioCalls:
        if self.twilio is None:
            raise NotConfigured("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN are needed for call control")
        return self.twilio

    def _agent_name(self, requested: str | None) -> str:
        if requested is not None and self.agents.get(requested) is None:
            raise Invalid(f"unknown agent {requested!r}")
        return requested or self.agents.default.name

    # --- calls ---------------------------------------------------------------------------------------------

    async def incoming(self, params: dict[str, str]) -> str:
        """Twilio's incoming-call webhook: the TwiML that connects the call to the agent for its number."""
        call_sid, called = params.get("CallSid"), params.get("To")
        agent = self.agents.for_number(called)
        context = CallContext(call_sid=call_sid, agent=agent, caller=params.get("From"), called=called)
        if call_sid:
            await self.store.record_call(
                call_sid=call_sid,
                direction="inbound",
                from_number=context.caller,
                to_number=called,
                agent=agent,
                status="ringing",
                context=_context_json(context),
            )
        return self.stream_twiml(context)

    async def refused(self, params: dict[str, str], reason: str) -> None:
        """Keep a record of a call turned away (the caller heard the fallback)."""
        call_sid = params.get("CallSid")
        if not call_sid:
            return
        await self.store.record_call(
            call_sid=call_sid,
            direction="inbound",
            from_number=params.get("From"),
            to_number=params.get("To"),
            agent=self.agents.for_number(params.get("To")),
            status="completed",
        )
        await self.store.update_call(call_sid, ended_at=datetime.now(UTC), end_reason=reason)
        await self.store.add_event(call_sid, "refused", {"reason": reason})

    async def place_call(
        self,
        context: CallContext,
        say: str | None,
        *,
        machine_detection: bool | None = None,
        leave_voicemail: bool = True,
    ) -> CallRecord:
        """Place an outbound call answered by the agent.

        ``machine_detection`` (default: the agent's) runs Twilio's asynchronous answering-machine detection: the agent
        waits for the verdict, and a machine gets the agent's ``voicemail_message`` (unless ``leave_voicemail`` is
        false), its placeholders filled from the context here, before anything is dialed.
        """
        agent = self._agent_name(context.agent)
        config = self.agents.get(agent) or self.agents.default
        detect = config.machine_detection if machine_detection is None else machine_detection
        voicemail = None
        if detect and leave_voicemail and config.voicemail_message:
            values = placeholder_values(context.name, context.reference, context.called, {}, context.metadata)
            absent = missing(config.voicemail_message, values)
            if absent:
                names = ", ".join(f"{{{name}}}" for name in absent)
                raise Invalid(f"agent {agent!r}'s voicemail message needs {names}: give it in the context's metadata")
            voicemail = render(config.voicemail_message, values)
        # The TwiML is signed before Twilio assigns the call SID: a one-time binding ties it to the record instead.
        context = dataclasses.replace(
            context,
            agent=agent,
            call_sid=None,
            binding=secrets.token_urlsafe(16),
            machine_detection=detect,
            voicemail=voicemail,
        )
        twiml = self.stream_twiml(context, say)
        with self._twilio_errors():
            call_sid = await self._twilio().create(
                to=context.called or "",
                from_=context.caller or "",
                twiml=twiml,
                status_callback=f"{self.settings.public_url}/twilio/status",
                status_callback_event=STATUS_EVENTS,
                machine_detection="DetectMessageEnd" if detect else None,
                amd_callback=f"{self.settings.public_url}/twilio/amd" if detect else None,
            )
        return await self.store.record_call(
            call_sid=call_sid,
            direction="outbound",
            from_number=context.caller,
            to_number=context.called,
            agent=agent,
            status="queued",
            context=_context_json(context),
        )

    async def hand_to_agent(self, call_sid: str, context: CallContext, say: str | None) -> CallRecord:
        agent = self._agent_name(context.agent)
        existing = await self.store.get_call(call_sid)
        context = dataclasses.replace(
            context,
            call_sid=call_sid,
            agent=agent,
            direction="outbound" if existing is not None and existing.direction == "outbound" else "inbound",
            caller=context.caller or (existing.from_number if existing else None),
            called=context.called or (existing.to_number if existing else None),
        )
        twilio = self._twilio()
        # The context is on record before Twilio can connect the stream that will look for it.
        record = await self.store.record_call(
            call_sid=call_sid,
            direction=existing.direction if existing else "inbound",
            from_number=context.caller,
            to_number=context.called,
            agent=agent,
            status="in-progress",
            context=_context_json(context),
        )
        with self._twilio_errors():
            await twilio.redirect(call_sid, self.stream_twiml(context, say))
        return record

    async def authorize(self, session: CallSession) -> CallContext | str | None:
        """The call's context from its record, once the stream is known to be this call's: a stream whose
        parameters are replayed onto a call that is over, onto another call (outbound parameters are bound
        through the call record), or alongside a stream already live for the call is refused (a string)."""
        call_sid, context = session.call_sid, session.context
        if not call_sid or context is None:
            return "no call"
        try:
            record = await self.store.get_call(call_sid)
        except Exception as exc:
            if context.binding is not None:
                raise  # only the record can bind these parameters: without it the call is refused
            # Parameters bound to this call's SID need no record: a database outage must not turn callers away.
            # The call goes on with the default agent.
            log.warning("call.authorize_without_record", call_sid=call_sid, error=f"{type(exc).__name__}: {exc}")
            return None
        if context.binding is not None:
            deadline = time.monotonic() + BINDING_WAIT_S
            while record is None and time.monotonic() < deadline:  # the create request may not have returned yet
                await asyncio.sleep(0.1)
                record = await self.store.get_call(call_sid)
            if record is None or (record.context or {}).get("binding") != context.binding:
                return "stream parameters belong to another call"
        if record is not None and record.ended_at is not None:
            return "the call is already over"
        return _context_of(record, call_sid) if record is not None else None

    async def fallback(self, call_sid: str) -> None:
        """The agent cannot go on: redirect the caller to the apology (and a human, when one is configured)."""
        await self._twilio().redirect(call_sid, self.fallback_twiml)
        await self.record_event(call_sid, "fallback", {"transfer_to": self.settings.fallback_transfer_to})

    async def transfer(self, call_sid: str, number: str) -> None:
        """Move a live call to a human: Twilio leaves the stream and runs the ``<Dial>``."""
        await self._twilio().redirect(call_sid, dial_twiml(number))
        await self.record_event(call_sid, "transfer", {"to": number})

    async def call(self, call_sid: str) -> CallRecord:
        record = await self.store.get_call(call_sid)
        if record is None:
            raise NotFound("no such call")
        return record

    async def calls(
        self,
        *,
        status: str | None,
        number: str | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        cursor: str | None,
    ) -> CallPage:
        try:
            return await self.store.list_calls(
                status=status, number=number, since=since, until=until, limit=limit, cursor=cursor
            )
        except ValueError as exc:  # a cursor that is not one of ours
            raise Invalid(str(exc)) from None

    async def transcript(self, call_sid: str) -> list[TranscriptLine]:
        await self.call(call_sid)
        return await self.store.transcript(call_sid)

    async def events(self, call_sid: str) -> list[CallEvent]:
        await self.call(call_sid)
        return await self.store.events(call_sid)

    async def hang_up(self, call_sid: str) -> CallRecord:
        await self.call(call_sid)
        with self._twilio_errors():
            await self._twilio().hang_up(call_sid)
        record = await self.store.update_call(call_sid, end_reason="hung_up_through_api")
        if record is None:  # gone meanwhile
            raise NotFound("no such call")
        return record

    async def status_callback(self, params: dict[str, str]) -> None:
        call_sid, call_status = params.get("CallSid"), params.get("CallStatus")
        if not call_sid or not call_status:
            return
        fields: dict[str, Any] = {"status": call_status}
        record = await self.store.get_call(call_sid)
        if call_status in FINAL_STATUSES:
            if record is not None and record.ended_at is None:
                fields["ended_at"] = datetime.now(UTC)
                fields["end_reason"] = record.end_reason or call_status
        elif record is not None and (record.status in FINAL_STATUSES or record.status == ENDED):
            del fields["status"]  # a late callback (ringing, in-progress) does not bring an ended call back to life
        updated = await self.store.update_call(call_sid, **fields) if fields else record
        if updated is None:
            await self.store.record_call(
                call_sid=call_sid,
                direction=params.get("Direction", "inbound").split("-")[0],
                from_number=params.get("From"),
                to_number=params.get("To"),
                status=call_status,
            )
        await self.store.add_event(call_sid, "status", {"status": call_status})
        if "status" in fields:  # not a late callback
            await self.publish(call_sid, "call.updated", {"status": call_status})

    async def call_started(self, call_sid: str, stream_sid: str | None, context: CallContext | None) -> None:
        fields: dict[str, Any] = {
            "status": "in-progress",
            "stream_sid": stream_sid,
            "started_at": datetime.now(UTC),
            "owner": self.owner,
        }
        if await self.store.update_call(call_sid, **fields) is None:
            await self.store.record_call(
                call_sid=call_sid,
                direction="inbound",
                from_number=context.caller if context else None,
                to_number=context.called if context else None,
                agent=(context.agent if context else None) or self.agents.default.name,
                status="in-progress",
            )
            await self.store.update_call(call_sid, **fields)
        started = {"status": "in-progress", "stream_sid": stream_sid}
        if context is not None:
            started |= {"from": context.caller, "to": context.called, "agent": context.agent, "phase": "live"}
        await self.publish(call_sid, "call.started", started)

    async def call_ended(self, session: CallSession) -> None:
        call_sid = session.call_sid
        if call_sid is None:
            return
        metrics = dataclasses.asdict(session.stats)
        known = await self.store.get_call(call_sid)
        status = known.status if known is not None and known.status in FINAL_STATUSES else ENDED
        record = await self.store.update_call(
            call_sid,
            status=status,
            ended_at=datetime.now(UTC),
            end_reason=session.end_reason,
            metrics=metrics,
            usage=session.usage.as_record(),
        )
        self.live.publish(call_sid, "call.ended", {"status": status, "end_reason": session.end_reason})
        if record is not None and self.settings.webhook_url and "call.ended" in self._webhooked:
            lines = await self.store.transcript(call_sid)
            events = await self.store.events(call_sid)
            payload = {
                "event": "call.ended",
                "call": _jsonable(dataclasses.asdict(record)),
                "transcript": [_jsonable(dataclasses.asdict(line)) for line in lines],
                "events": [_jsonable(dataclasses.asdict(event)) for event in events],
            }
            await self.outbox.enqueue(payload)

    async def record_event(self, call_sid: str, kind: str, data: dict[str, Any]) -> None:
        await self.store.add_event(call_sid, kind, data)
        if kind == "do_not_call":  # the person asked the agent: never again from a campaign
            number, reason = str(data.get("number")), data.get("reason")
            await CampaignStore(self.store).dnc_add(number, reason=reason, source="agent", call_sid=call_sid)
            log.info("dnc.added", call_sid=call_sid, source="agent")
        await self.publish(call_sid, "call.event", {"kind": kind, "data": data})

    async def line_completed(self, line: TranscriptLine) -> None:
        """A transcript line, once it is in the database."""
        await self.publish(line.call_sid, "transcript.line", _jsonable(dataclasses.asdict(line)))

    async def publish(self, call_sid: str, kind: str, data: dict[str, Any]) -> None:
        """A live event, and the webhook's copy when its type is in CALLBRIDGE_WEBHOOK_EVENTS."""
        self.live.publish(call_sid, kind, data)
        if kind in self._webhooked and kind != "call.ended" and self.settings.webhook_url:
            await self.outbox.enqueue({"event": kind, "call_sid": call_sid, "data": data})

    def publish_soon(self, call_sid: str, kind: str, data: dict[str, Any]) -> None:
        """:meth:`publish` from where nothing may wait (the call's audio path): the webhook's copy, if any, later.
        A turn's latency is kept on record too (a ``turn`` event), later."""
        if kind == "turn.metrics":
            self._later(self._keep_turn(call_sid, data))
        if kind not in self._webhooked:
            self.live.publish(call_sid, kind, data)
            return
        self._later(self.publish(call_sid, kind, data))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _keep_turn(self, call_sid: str, data: dict[str, Any]) -> None:
        try:
            await self.store.add_event(call_sid, "turn", data)
        except Exception as exc:  # the call goes on without it; its live event was sent
            log.warning("call.turn_not_kept", call_sid=call_sid, error=f"{type(exc).__name__}: {exc}")

    async def amd_verdict(self, params: dict[str, str]) -> tuple[str, str, int | None] | None:
        """Twilio's asynchronous answering-machine verdict, kept on the call's record; ``(call SID, verdict,
        detection ms)`` for the live call, or ``None`` when the callback names no call or verdict."""
        call_sid, verdict = params.get("CallSid"), params.get("AnsweredBy")
        if not call_sid or not verdict:
            log.warning("twilio.amd_incomplete", call_sid=call_sid)
            return None
        duration = params.get("MachineDetectionDuration", "")
        detection_ms = int(duration) if duration.isdigit() else None
        log.info("twilio.amd", call_sid=call_sid, answered_by=verdict, detection_ms=detection_ms)
        if await self.store.update_call(call_sid, answered_by=verdict[:40]) is None:
            log.warning("twilio.amd_unknown_call", call_sid=call_sid)
        return call_sid, verdict[:40], detection_ms

    async def stream_status(self, params: dict[str, str]) -> None:
        """Twilio's ``<Stream statusCallback>``: ``stream-started``, ``stream-stopped`` or ``stream-error`` on the
        call's record. An error is logged whether or not the call is known: a wrong stream URL shows up here."""
        call_sid, stream_event = params.get("CallSid"), params.get("StreamEvent", "")
        if stream_event not in ("stream-started", "stream-stopped", "stream-error"):
            log.warning("twilio.stream_status_unknown_event", call_sid=call_sid, stream_event=stream_event[:100])
            return
        data: dict[str, Any] = {
            "stream_sid": params.get("StreamSid"),
            "name": params.get("StreamName"),
            "timestamp": params.get("Timestamp"),
        }
        if stream_event == "stream-error":
            message = params.get("StreamError", "")
            # Twilio's error codes are five digits (31920: the handshake was answered with something other than 101).
            found = re.search(r"(?<!\d)\d{5}(?!\d)", message)
            code = int(found.group()) if found else None
            data |= {"message": message, "code": code}
            log.error(
                "twilio.stream_error", call_sid=call_sid, stream_sid=data["stream_sid"], code=code, message=message
            )
        else:
            log.info(f"twilio.{stream_event.replace('-', '_')}", call_sid=call_sid, stream_sid=data["stream_sid"])
        if not call_sid:
            return
        try:
            if await self.store.get_call(call_sid) is None:
                log.warning("twilio.stream_status_unknown_call", call_sid=call_sid, stream_event=stream_event)
                return
            await self.record_event(call_sid, stream_event.replace("-", "_"), data)
        except Exception as exc:  # an event the store cannot take is logged; Twilio has nothing to do about it
            log.error("twilio.stream_status_failed", call_sid=call_sid, error=f"{type(exc).__name__}: {exc}")


def _context_of(record: CallRecord, call_sid: str) -> CallContext:
    """A call's context as its record keeps it (what the REST API or the webhook was given)."""
    kept = record.context or {}
    items = kept.get("items") or ()
    metadata = kept.get("metadata")
    return CallContext(
        call_sid=call_sid,
        direction="outbound" if record.direction == "outbound" else "inbound",
        agent=kept.get("agent") or record.agent,
        reference=kept.get("reference"),
        caller=kept.get("caller") or record.from_number,
        called=kept.get("called") or record.to_number,
        name=kept.get("name"),
        instructions=kept.get("instructions"),
        greeting=kept.get("greeting"),
        items=tuple(ContextItem(item["role"], item["text"]) for item in items if isinstance(item, dict)),
        metadata=metadata if isinstance(metadata, dict) else {},
        binding=kept.get("binding"),
        machine_detection=bool(kept.get("machine_detection")),
        voicemail=kept.get("voicemail"),
        answered_by=record.answered_by,
    )


def _context_json(context: CallContext) -> dict[str, Any]:
    value: dict[str, Any] = _jsonable(dataclasses.asdict(context))
    return value


def _jsonable(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value, default=str))
