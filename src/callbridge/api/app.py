"""The application: Twilio's webhooks, the REST API and health as an ASGI app, and the media stream's endpoint
(served by picows on the same port, see :mod:`callbridge.api.media_stream`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from picows import WSUpgradeRequest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from callbridge.agents import load_agents
from callbridge.api.limits import BodySizeLimit
from callbridge.api.media_stream import MediaStreamEndpoint
from callbridge.api.rest import router
from callbridge.bridge import CallBridge, ContextResolver, RealtimeEndpoint, TwilioLink
from callbridge.config import Settings
from callbridge.core.context import CallContext
from callbridge.core.session import CallSession, SessionConfig
from callbridge.core.transcript import TranscriptLine, TranscriptSink
from callbridge.metrics import Metrics
from callbridge.process import is_orphan
from callbridge.resolvers import HttpContextResolver, PythonContextResolver
from callbridge.services import CallServices
from callbridge.store.repository import DatabaseTranscriptSink, Store
from callbridge.telephony.params import StreamParameterSigner
from callbridge.telephony.rest import TwilioCalls
from callbridge.telephony.signatures import TwilioSignatures
from callbridge.tools import ToolRegistry, load_registry

log = structlog.stdlib.get_logger("callbridge.api")


class _Sinks:
    """Transcript lines go to the store and, when given, to an extra sink (the demo's live printer)."""

    def __init__(self, store: Store, extra: TranscriptSink | None) -> None:
        self._store = DatabaseTranscriptSink(store)
        self._extra = extra

    async def write(self, line: TranscriptLine) -> None:
        await self._store.write(line)
        if self._extra is not None:
            await self._extra.write(line)


def create_app(
    settings: Settings,
    *,
    tools: ToolRegistry | None = None,
    sink: TranscriptSink | None = None,
) -> FastAPI:
    """Build the service. Everything it needs comes from ``settings`` and the arguments: no globals."""
    if tools is None:
        tools = load_registry(settings.tools) if settings.tools else ToolRegistry()
    agents = load_agents(settings, tools, settings.agents_file)
    secret = settings.secret.get_secret_value() if settings.secret else ""
    if not secret:
        secret = secrets.token_urlsafe(32)
        log.warning("config.no_secret", detail="CALLBRIDGE_SECRET unset: using a random per-process secret")
    signer = StreamParameterSigner(secret, settings.stream_parameters_ttl_seconds)
    auth_token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    signatures = TwilioSignatures(auth_token, disabled=settings.dev_disable_signatures)
    if signatures.disabled:
        log.error(
            "security.signatures_disabled",
            detail="CALLBRIDGE_DEV_DISABLE_SIGNATURES is on: ANYONE who finds this service can place calls through it "
            "and talk to the model at your expense. For local development only; never expose it.",
        )
    elif not signatures.configured:
        log.error("config.no_twilio_auth_token", detail="TWILIO_AUTH_TOKEN unset: every Twilio request is refused")
    twilio_rest = None
    if settings.twilio_account_sid and auth_token:
        twilio_rest = TwilioCalls(settings.twilio_account_sid, auth_token, api_base_url=settings.twilio_api_base_url)
    resolver: ContextResolver | None = None
    if settings.context_url:
        webhook_secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else secret
        resolver = HttpContextResolver(settings.context_url, webhook_secret)
    elif settings.context_function:
        resolver = PythonContextResolver(settings.context_function)
    endpoint = RealtimeEndpoint(
        url=settings.effective_realtime_url,
        model=settings.realtime_model,
        dialect=settings.realtime_dialect,
        api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
        connect_timeout=settings.realtime_connect_timeout_seconds,
    )
    session_config = SessionConfig(
        agent=agents.default,
        agents=agents.agents,
        verify_parameters=signer.verify,
        pre_ready_buffer_ms=settings.pre_ready_buffer_ms,
        hang_up_when_model_ends=settings.on_model_end == "hangup",
        load_context=True,
        resolve_context=resolver is not None,
        reconnect_deadline_s=settings.realtime_reconnect_deadline_seconds,
        ready_timeout_s=settings.realtime_ready_timeout_seconds,
        rollover_after_s=settings.realtime_rollover_seconds,
    )
    active_calls: dict[int, CallBridge] = {}
    metrics = Metrics(lambda: [bridge.session for bridge in active_calls.values()])

    def refusal() -> str | None:
        """Why this process takes no new call right now (``None``: it takes one)."""
        if app.state.draining:
            return "draining"
        if len(active_calls) >= settings.max_calls:
            return "over_capacity"
        return None

    async def drain() -> None:
        """Take no new call; let live calls go on until they end or the deadline, then hand them the fallback."""
        app.state.draining = True
        loop = asyncio.get_running_loop()
        log.warning("drain.started", active_calls=len(active_calls), deadline_s=settings.drain_seconds)
        deadline = loop.time() + settings.drain_seconds
        while active_calls and loop.time() < deadline:  # noqa: ASYNC110 - calls end on their own sockets
            await asyncio.sleep(0.1)
        if active_calls:
            log.warning("drain.deadline", ending_calls=len(active_calls))
            for bridge in list(active_calls.values()):
                bridge.request_end("shutdown")
            give_up = loop.time() + 10
            while active_calls and loop.time() < give_up:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        log.warning("drain.finished", calls_left=len(active_calls))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal endpoint
        store = await Store.open(settings.database_url)
        orphans = await store.close_orphaned_calls("interrupted", is_orphan)
        if orphans:
            log.warning("calls.orphans_closed", count=orphans, reason="interrupted")
        services = CallServices(settings, store, signer, agents, twilio_rest)
        app.state.services = services
        app.state.store = store
        app.state.sinks = _Sinks(store, sink)
        # Without a webhook URL nothing is ever queued: no task polls the database for nothing.
        outbox = asyncio.create_task(services.deliver_webhooks()) if settings.webhook_url else None
        try:
            async with contextlib.AsyncExitStack() as stack:
                if settings.uses_local_engine:
                    from callbridge.engine.agent import LocalEngine

                    engine = await stack.enter_async_context(LocalEngine())
                    app.state.engine = engine
                    endpoint = dataclasses.replace(endpoint, url=engine.url)
                    log.warning(
                        "engine.local",
                        detail="no OPENAI_API_KEY and no CALLBRIDGE_REALTIME_URL: calls use the offline local engine",
                        url=engine.url,
                    )
                # What start-up built lives as long as the process: keep it out of the garbage collector's full
                # passes, which otherwise walk it all and stall every call's audio for tens of milliseconds.
                gc.freeze()
                yield
        finally:
            if outbox is not None:
                outbox.cancel()
                await asyncio.gather(outbox, return_exceptions=True)
            await services.aclose()
            await store.close()

    app = FastAPI(
        title="callbridge",
        summary="Twilio Media Streams ⇄ OpenAI Realtime bridge: calls, transcripts, call control",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.active_calls = active_calls
    app.state.draining = False
    app.state.drain = drain
    app.state.metrics = metrics
    app.include_router(router())
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        """422 without echoing the input back: it may be what could not be encoded in the first place."""
        errors = [{key: error[key] for key in ("loc", "msg", "type") if key in error} for error in exc.errors()]
        body = json.dumps({"detail": errors}, ensure_ascii=True, default=str)
        return Response(body, status_code=422, media_type="application/json")

    async def twilio_form(request: Request, path: str) -> dict[str, str] | None:
        form = await request.form()
        params = {key: str(value) for key, value in form.items()}
        if not signatures.valid(f"{settings.public_url}{path}", params, request.headers.get("x-twilio-signature")):
            log.warning("security.webhook_signature_invalid", path=path, client=_client(request))
            return None
        return params

    @app.post("/twilio/voice", include_in_schema=False)
    async def twilio_voice(request: Request) -> Response:
        params = await twilio_form(request, "/twilio/voice")
        if params is None:
            return Response("invalid Twilio signature", status_code=403, media_type="text/plain")
        services: CallServices = app.state.services
        if (reason := refusal()) is not None:
            log.warning(
                "admission.refused", call_sid=params.get("CallSid"), reason=reason, active_calls=len(active_calls)
            )
            metrics.refusals.labels(reason).inc()
            await services.refused(params, reason)
            return Response(services.fallback_twiml, media_type="application/xml")
        try:
            twiml = await services.incoming(params)
        except Exception as exc:  # the caller hears an apology, never dead air
            log.error("twilio.incoming_failed", error=str(exc), call_sid=params.get("CallSid"))
            twiml = services.fallback_twiml
        log.info("twilio.incoming_call", call_sid=params.get("CallSid"), caller=params.get("From"))
        return Response(twiml, media_type="application/xml")

    async def twilio_callback(
        request: Request, path: str, keep: Callable[[dict[str, str]], Awaitable[None]]
    ) -> Response:
        """A status callback from Twilio: verified, kept, answered 204 (403 when its signature is wrong)."""
        params = await twilio_form(request, path)
        if params is None:
            return Response("invalid Twilio signature", status_code=403, media_type="text/plain")
        await keep(params)
        return Response(status_code=204)

    @app.post("/twilio/status", include_in_schema=False)
    async def twilio_status(request: Request) -> Response:
        return await twilio_callback(request, "/twilio/status", app.state.services.status_callback)

    @app.post("/twilio/stream-status", include_in_schema=False)
    async def twilio_stream_status(request: Request) -> Response:
        return await twilio_callback(request, "/twilio/stream-status", app.state.services.stream_status)

    def admit_stream(request: WSUpgradeRequest, client: str | None) -> str | None:
        """Before the upgrade is answered: a stream needs Twilio's signature and a process that takes calls."""
        if not signatures.valid(settings.stream_url, {}, request.headers.get("x-twilio-signature")):
            log.warning("security.stream_signature_invalid", client=client)
            return "invalid Twilio signature"
        if (reason := refusal()) is not None:
            log.warning("admission.stream_refused", reason=reason, active_calls=len(active_calls))
            metrics.refusals.labels(f"stream_{reason}").inc()
            return reason
        return None

    def open_call(twilio: TwilioLink) -> CallBridge:
        """An accepted stream: its call starts now, and runs in a task of its own until it ends."""
        services: CallServices = app.state.services

        async def authorize(session: CallSession) -> CallContext | str | None:
            if any(
                other is not bridge and other.session.call_sid == session.call_sid for other in active_calls.values()
            ):
                return "a stream is already live for this call"
            return await services.authorize(session)

        async def admitted(session: CallSession) -> None:
            if session.call_sid:
                await services.call_started(session.call_sid, session.stream_sid, session.context)

        bridge = CallBridge(
            session_config,
            endpoint,
            sink=app.state.sinks,
            tools=tools,
            tool_timeout=settings.tool_timeout_seconds,
            hang_up=twilio_rest.hang_up if twilio_rest else None,
            transfer=services.transfer if twilio_rest else None,
            resolve_context=resolver,
            context_deadline=settings.context_timeout_seconds,
            events=services.record_event,
            fallback=services.fallback if twilio_rest else None,
            authorize=authorize,
            on_admitted=admitted,
            metrics=metrics,
            max_frame_bytes=settings.max_message_bytes,
        )
        active_calls[id(bridge)] = bridge
        bridge.start(twilio)
        task = asyncio.create_task(run_call(bridge, services))
        running_calls.add(task)
        task.add_done_callback(running_calls.discard)
        return bridge

    async def run_call(bridge: CallBridge, services: CallServices) -> None:
        try:
            session = await bridge.wait()
            if session.end_reason == "refused":
                metrics.refusals.labels("stream_parameters").inc()
            if session.context is not None:
                try:
                    await services.call_ended(session)
                except Exception as exc:  # the summary below is still logged
                    log.error("call.record_failed", call_sid=session.call_sid, error=f"{type(exc).__name__}: {exc}")
            # Last: once a call's summary is logged, its record is final.
            log.info(
                "call.summary",
                call_sid=session.call_sid,
                stream_sid=session.stream_sid,
                reason=session.end_reason,
                **dataclasses.asdict(session.stats),
            )
        finally:
            active_calls.pop(id(bridge), None)
            metrics.call_ended(bridge.session)  # with the pop, at once: a scrape counts the call exactly once

    running_calls: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references to tasks
    app.state.media_stream = MediaStreamEndpoint(
        "/twilio/media-stream", admit_stream, open_call, max_message_bytes=settings.max_message_bytes
    )

    @app.get("/metrics", tags=["health"])
    async def prometheus_metrics() -> Response:
        """Prometheus metrics of this process: calls, frames, barge-ins, errors, turn and relay latency."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Ready while this process can take another call (a load balancer should route elsewhere when not)."""
        reason = refusal()
        ready = reason is None
        body: dict[str, Any] = {"ready": ready, "active_calls": len(active_calls), "max_calls": settings.max_calls}
        if reason is not None:
            body["reason"] = reason
        return JSONResponse(body, status_code=200 if ready else 503)

    return app


def _client(connection: Request) -> str | None:
    return connection.client.host if connection.client else None
