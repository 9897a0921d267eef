"""Media streams become calls: which upgrades are admitted, how each call's bridge is built, and how a finished
call is kept (its record, its summary)."""

from __future__ import annotations

import dataclasses

import structlog
from fastapi import FastAPI
from picows import WSUpgradeRequest

from callbridge.bridge import (
    CallBridge,
    CallHooks,
    CallLimits,
    CallRegistry,
    ContextResolver,
    RealtimeEndpoint,
    TwilioLink,
)
from callbridge.config import Settings
from callbridge.core.context import CallContext
from callbridge.core.session import CallSession, SessionConfig
from callbridge.observability.metrics import Metrics
from callbridge.service.calls import CallServices
from callbridge.service.tools import ToolRunner
from callbridge.telephony.rest import TwilioCalls
from callbridge.telephony.signatures import TwilioSignatures

log = structlog.stdlib.get_logger("callbridge.api")


@dataclasses.dataclass
class StreamCalls:
    """What the media-stream endpoint asks of the application (see :class:`~callbridge.transport.router.
    MediaStreamEndpoint`). ``app.state`` holds the services and sinks once the application has started."""

    app: FastAPI
    settings: Settings
    session_config: SessionConfig
    endpoint: RealtimeEndpoint
    """Where calls reach the model; the local engine, when it runs, sets its own URL at start."""
    tools: ToolRunner
    """Every tool of the service (Python, HTTP, MCP): the calls' bridges run them."""
    resolver: ContextResolver | None
    registry: CallRegistry
    metrics: Metrics
    signatures: TwilioSignatures
    twilio_rest: TwilioCalls | None

    def admit(self, request: WSUpgradeRequest, client: str | None) -> str | None:
        """Before the upgrade is answered: a stream needs Twilio's signature and a process that takes calls."""
        if not self.signatures.valid(self.settings.stream_url, {}, request.headers.get("x-twilio-signature")):
            log.warning("security.stream_signature_invalid", client=client)
            return "invalid Twilio signature"
        if (reason := self.registry.refusal()) is not None:
            log.warning("admission.stream_refused", reason=reason, active_calls=len(self.registry))
            self.metrics.refusals.labels(f"stream_{reason}").inc()
            return reason
        return None

    def open(self, twilio: TwilioLink) -> CallBridge:
        """An accepted stream: its call starts now, and runs in a task of its own until it ends."""
        services: CallServices = self.app.state.services
        rest = self.twilio_rest

        async def authorize(session: CallSession) -> CallContext | str | None:
            if self.registry.live_elsewhere(bridge):
                return "a stream is already live for this call"
            return await services.authorize(session)

        async def admitted(session: CallSession) -> None:
            if session.call_sid:
                await services.call_started(session.call_sid, session.stream_sid, session.context)

        bridge = CallBridge(
            self.session_config,
            self.endpoint,
            sink=self.app.state.sinks,
            tools=self.tools,
            hooks=CallHooks(
                authorize=authorize,
                resolve_context=self.resolver,
                on_admitted=admitted,
                events=services.record_event,
                hang_up=rest.hang_up if rest else None,
                transfer=services.transfer if rest else None,
                fallback=services.fallback if rest else None,
                record=self.app.state.recordings.open,
                live=services.publish_soon,
            ),
            limits=CallLimits(
                tool_timeout=self.settings.tool_timeout_seconds,
                context_deadline=self.settings.context_timeout_seconds,
                max_frame_bytes=self.settings.max_message_bytes,
            ),
            metrics=self.metrics,
        )
        self.registry.start(bridge, twilio, self.ended)
        return bridge

    async def ended(self, session: CallSession) -> None:
        """Keep a finished call: its record and webhook, then its summary line (last: once it is logged, the
        record is final)."""
        if session.end_reason == "refused":
            self.metrics.refusals.labels("stream_parameters").inc()
        if session.context is not None:
            try:
                await self.app.state.services.call_ended(session)
            except Exception as exc:  # the summary below is still logged
                log.error("call.record_failed", call_sid=session.call_sid, error=f"{type(exc).__name__}: {exc}")
        log.info(
            "call.summary",
            call_sid=session.call_sid,
            stream_sid=session.stream_sid,
            reason=session.end_reason,
            **dataclasses.asdict(session.stats),
        )
