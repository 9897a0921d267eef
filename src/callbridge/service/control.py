"""The host application's control of a live call: what the agent says, the facts it is given, the transfer.

A command is carried out by the process that carries the call (its :class:`~callbridge.bridge.call.CallBridge`), which
hands it to the call's session as an event: the session decides (a refusal when the call is not live or is ending).
With several workers, a command that reaches a worker which does not carry the call goes through Redis pub/sub when
``CALLBRIDGE_REDIS_URL`` is set: every process listens on a channel of its own and on one for all, and answers on a
reply channel of its own; the command goes to the owner's channel when the call's record names it (else to all), and
the process that carries the call answers within :data:`REPLY_TIMEOUT_S`. Without Redis, such a worker refuses the
command (``not_live_here``): the caller of the API may try again, and reach the other worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import secrets
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from callbridge.bridge.registry import CallRegistry
from callbridge.core import events as ev
from callbridge.service.calls import CallServices, Invalid, NotConfigured, NotFound, ServiceError
from callbridge.store.models import ENDED, FINAL_STATUSES
from callbridge.store.repository import CallRecord

log = structlog.stdlib.get_logger("callbridge.control")

TEXT_CHARS = 4000
"""What the agent is asked to say, or told, at most (characters)."""
E164 = re.compile(r"^\+[1-9]\d{6,14}$")
REPLY_TIMEOUT_S = 2.0
"""How long a worker waits for the process that carries a call to answer a command passed on through Redis."""
SUBSCRIBE_WAIT_S = 2.0
"""How long start-up waits for the subscription to the command channels (Redis down: the service starts anyway)."""

NotLiveCode = Literal["not_live", "not_live_here"]
Command = Literal["say", "instruct", "transfer", "amd"]
ControlEvent = ev.HostEvent | ev.AmdVerdict
"""What reaches a call from outside it: the host application's commands, and Twilio's answering-machine verdict."""
_EVENTS: dict[Command, type[ControlEvent]] = {
    "say": ev.HostSay,
    "instruct": ev.HostInstruct,
    "transfer": ev.HostTransfer,
    "amd": ev.AmdVerdict,
}


class NotLive(ServiceError):
    """The call is on record but not live: ended, not started yet, not ready or ending (``not_live``), or carried
    by another process that this one cannot reach, without Redis (``not_live_here``)."""

    def __init__(self, detail: str, code: NotLiveCode = "not_live") -> None:
        super().__init__(detail)
        self.code: NotLiveCode = code


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    """A command the call took: carried out now, or queued in the call (after the agent's current response)."""

    call_sid: str
    command: Command
    carried_by: str
    """The process that carries the call: ``host:pid:start time`` (the call record's ``owner``)."""


def _kind(event: ControlEvent) -> Command:
    return next(kind for kind, type_ in _EVENTS.items() if isinstance(event, type_))


def _text(text: str, what: str) -> str:
    if not text.strip():
        raise Invalid(f"{what} is empty")
    if len(text) > TEXT_CHARS:
        raise Invalid(f"{what} is {len(text)} characters long: at most {TEXT_CHARS}")
    return text


def _is_live(record: CallRecord) -> str | None:
    """Why a call on record is not live (``None``: it may be, somewhere)."""
    if record.ended_at is not None or record.status in FINAL_STATUSES or record.status == ENDED:
        return "the call has ended"
    if record.started_at is None:
        return "the call has not started: its media stream is not live yet"
    return None


class CallControl:
    """Say, instruct and transfer, for the REST API: carried out here, or passed on to the process that carries the
    call (see the module's doc). Start it with :meth:`start`, stop it with :meth:`aclose`."""

    def __init__(
        self,
        services: CallServices,
        registry: CallRegistry,
        redis_url: str | None = None,
        prefix: str = "callbridge",
        *,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
    ) -> None:
        self.services = services
        self.registry = registry
        self.owner = services.owner
        self._reply_timeout_s = reply_timeout_s
        self._channels = f"{prefix}:control"
        self._inbox = self._inbox_of(self.owner)
        self._broadcast = f"{self._channels}:all"
        self._replies = f"{self._channels}:reply:{self.owner}"
        self._redis_url = redis_url
        # Commands and replies are published fast or not at all; the subscriber blocks on its connection.
        self._publisher = (
            aioredis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=1) if redis_url else None
        )
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    def _inbox_of(self, owner: str) -> str:
        return f"{self._channels}:process:{owner}"

    async def start(self) -> None:
        """Listen for the commands other workers pass on, and for the answers to ours (with Redis)."""
        if self._redis_url is None:
            return
        self._listener = asyncio.create_task(self._listen(self._redis_url))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SUBSCRIBE_WAIT_S):
                await self._subscribed.wait()

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self._publisher is not None:
            await self._publisher.aclose()

    # --- the commands -------------------------------------------------------------------------------------

    async def say(self, call_sid: str, text: str, interrupt: bool = False) -> Accepted:
        """The agent says ``text`` word for word: now, cutting off what it says, or after its current response."""
        return await self._deliver(call_sid, ev.HostSay(_text(text, "the text to say"), interrupt))

    async def instruct(self, call_sid: str, text: str, respond: bool = False) -> Accepted:
        """A system message for the agent (new facts); ``respond``: the agent speaks about it."""
        return await self._deliver(call_sid, ev.HostInstruct(_text(text, "the instruction"), respond))

    async def transfer(self, call_sid: str, to: str, say: str | None = None) -> Accepted:
        """The agent stops, says ``say`` if given, and Twilio dials ``to`` (E.164)."""
        if not E164.fullmatch(to):
            raise Invalid(f"{to!r} is not an E.164 number (+ and 7 to 15 digits)")
        if self.services.twilio is None:
            raise NotConfigured("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN are needed for call control")
        return await self._deliver(call_sid, ev.HostTransfer(to, _text(say, "the last sentence") if say else None))

    async def amd(self, call_sid: str, answered_by: str, detection_ms: int | None) -> Accepted:
        """Twilio's answering-machine verdict, to the call that awaits it."""
        return await self._deliver(call_sid, ev.AmdVerdict(answered_by, detection_ms))

    async def _deliver(self, call_sid: str, event: ControlEvent) -> Accepted:
        """To the call, here or in the process that carries it."""
        if self.registry.find(call_sid) is not None:
            return self.run_here(call_sid, event)
        record = await self.services.store.get_call(call_sid)
        if record is None:
            raise NotFound("no such call")
        if (why := _is_live(record)) is not None:
            raise NotLive(why)
        if record.owner == self.owner:  # its stream is over here; the record is being written
            raise NotLive("the call has ended")
        if self._publisher is None:
            carrier = f" ({record.owner})" if record.owner else ""
            raise NotLive(
                f"the call is carried by another process{carrier}, which this one cannot reach without "
                "CALLBRIDGE_REDIS_URL: send the command again (it may reach that process)",
                "not_live_here",
            )
        return await self._ask(record.owner, call_sid, event)

    def run_here(self, call_sid: str, event: ControlEvent) -> Accepted:
        """Hand the command to the call this process carries; :class:`NotLive` if there is none or it refuses."""
        bridge = self.registry.find(call_sid)
        if bridge is None:
            raise NotLive("the call is not live in the process that carried it")
        refusal = bridge.control(event)
        if refusal is not None:
            raise NotLive(refusal.detail)
        return Accepted(call_sid, _kind(event), self.owner)

    # --- through Redis -------------------------------------------------------------------------------------

    async def _ask(self, owner: str | None, call_sid: str, event: ControlEvent) -> Accepted:
        """Pass the command to the owner (or to every process, when the record names none) and wait for the answer."""
        assert self._publisher is not None
        request_id = secrets.token_hex(8)
        fields = {field.name: getattr(event, field.name) for field in dataclasses.fields(event)}
        message = {
            "id": request_id,
            "reply_to": self._replies,
            "call_sid": call_sid,
            "command": _kind(event),
            "fields": fields,
            "direct": owner is not None,
        }
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        try:
            listeners = await self._publisher.publish(
                self._inbox_of(owner) if owner else self._broadcast, orjson.dumps(message)
            )
            if not listeners:
                raise NotLive("the process that carries the call is gone")
            async with asyncio.timeout(self._reply_timeout_s):
                reply = await answer
        except TimeoutError:
            raise NotLive("the process that carries the call did not answer") from None
        except (RedisError, OSError) as exc:
            log.warning("control.redis_unavailable", call_sid=call_sid, error=f"{type(exc).__name__}: {exc}")
            raise NotLive("the process that carries the call cannot be reached (Redis)") from None
        finally:
            self._waiting.pop(request_id, None)
        if not reply.get("ok"):
            raise NotLive(str(reply.get("detail") or "the call is not live"))
        return Accepted(call_sid, _kind(event), str(reply.get("carried_by") or owner or ""))

    async def _listen(self, url: str) -> None:
        """Commands for this process and answers to its own, for ever (resubscribing after a Redis outage)."""
        subscriber = aioredis.from_url(url, socket_connect_timeout=2)
        down = False
        try:
            while True:
                try:
                    async with subscriber.pubsub(ignore_subscribe_messages=True) as pubsub:
                        await pubsub.subscribe(self._inbox, self._broadcast, self._replies)
                        self._subscribed.set()
                        log.info("control.listening", channel=self._inbox, again=down)
                        down = False
                        async for message in pubsub.listen():
                            await self._received(message)
                except (RedisError, OSError) as exc:
                    self._subscribed.clear()
                    if not down:  # once per outage: commands from other workers do not reach this one meanwhile
                        log.error("control.redis_unavailable", error=f"{type(exc).__name__}: {exc}")
                    down = True
                    await asyncio.sleep(1.0)
        finally:
            await subscriber.aclose()

    async def _received(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return
        channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
        try:
            body = orjson.loads(message["data"])
        except orjson.JSONDecodeError:
            log.warning("control.bad_message", channel=channel)
            return
        if channel == self._replies:
            waiting = self._waiting.get(str(body.get("id")))
            if waiting is not None and not waiting.done():
                waiting.set_result(body)
            return
        await self._carry_out(body)

    async def _carry_out(self, body: dict[str, Any]) -> None:
        """A command another worker passed on: carried out if this process carries the call, and answered (silence,
        for a command sent to all, when it does not)."""
        call_sid = str(body.get("call_sid"))
        kind = next((type_ for name, type_ in _EVENTS.items() if name == body.get("command")), None)
        if self.registry.find(call_sid) is None and not body.get("direct"):
            return  # another process's call
        reply: dict[str, Any] = {"id": body.get("id")}
        try:
            if kind is None:
                raise NotLive(f"unknown command {body.get('command')!r}")
            event = kind(**body.get("fields", {}))
            accepted = self.run_here(call_sid, event)
            reply |= {"ok": True, "carried_by": accepted.carried_by}
        except (NotLive, TypeError) as exc:
            reply |= {"ok": False, "detail": str(exc)}
        try:
            assert self._publisher is not None
            await self._publisher.publish(str(body.get("reply_to")), orjson.dumps(reply))
        except (RedisError, OSError) as exc:
            log.warning("control.reply_failed", call_sid=call_sid, error=f"{type(exc).__name__}: {exc}")
