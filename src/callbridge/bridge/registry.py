"""The calls one process carries: who is admitted, each call's life from its stream's start to its record, and the
drain on shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

import structlog

from callbridge.bridge.call import CallBridge, TwilioLink
from callbridge.core.session import CallSession

log = structlog.stdlib.get_logger("callbridge.calls")

CallEnded = Callable[[CallSession], Awaitable[None]]
"""Keeps a finished call (its record, its summary); called once per call, after everything it started stopped."""


class EndedCalls(Protocol):
    """Where finished calls are counted (:class:`callbridge.observability.metrics.Metrics`)."""

    def call_ended(self, session: CallSession) -> None: ...


class CallRegistry:
    """The live calls of this process.

    A call runs in a task of its own from :meth:`start` until its bridge has stopped and its ``on_ended`` hook has
    kept it; only then does it leave the registry, so a drain waits for records to be written, not just for sockets.
    """

    def __init__(self, max_calls: int, counted: EndedCalls | None = None) -> None:
        self.max_calls = max_calls
        self.draining = False
        self._counted = counted
        self._calls: dict[CallBridge, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def sessions(self) -> Iterator[CallSession]:
        return (bridge.session for bridge in list(self._calls))

    def refusal(self) -> str | None:
        """Why this process takes no new call right now (``None``: it takes one)."""
        if self.draining:
            return "draining"
        if len(self._calls) >= self.max_calls:
            return "over_capacity"
        return None

    def live_elsewhere(self, bridge: CallBridge) -> bool:
        """Whether another stream of the same call is live (a replayed stream, or Twilio reconnecting)."""
        call_sid = bridge.session.call_sid
        return any(other is not bridge and other.session.call_sid == call_sid for other in self._calls)

    def find(self, call_sid: str) -> CallBridge | None:
        """The bridge that carries the call in this process, if any: the one not yet ended when a replayed stream of
        the same call is being refused beside it (an ended one still answers, with its refusal)."""
        found = None
        for bridge in self._calls:
            if bridge.session.call_sid == call_sid:
                if bridge.session.phase != "ended":
                    return bridge
                found = bridge
        return found

    def start(self, bridge: CallBridge, twilio: TwilioLink, on_ended: CallEnded) -> None:
        """Run a call whose stream has just been accepted, until it has ended and been kept."""
        bridge.start(twilio)
        self._calls[bridge] = asyncio.create_task(self._run(bridge, on_ended))

    async def _run(self, bridge: CallBridge, on_ended: CallEnded) -> None:
        try:
            session = await bridge.wait()
            try:
                await on_ended(session)
            except Exception as exc:  # bookkeeping never takes the process down
                log.error("call.keep_failed", call_sid=session.call_sid, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._calls.pop(bridge, None)
            if self._counted is not None:
                self._counted.call_ended(bridge.session)  # with the pop, at once: a scrape counts the call once

    async def drain(self, deadline_s: float, give_up_s: float = 10.0) -> None:
        """Take no new call; let live calls go on until they end or the deadline, then hand them the fallback."""
        self.draining = True
        log.warning("drain.started", active_calls=len(self._calls), deadline_s=deadline_s)
        if self._calls:
            await asyncio.wait(list(self._calls.values()), timeout=deadline_s)
        if self._calls:
            log.warning("drain.deadline", ending_calls=len(self._calls))
            for bridge in list(self._calls):
                bridge.request_end("shutdown")
            await asyncio.wait(list(self._calls.values()), timeout=give_up_s)
        log.warning("drain.finished", calls_left=len(self._calls))
