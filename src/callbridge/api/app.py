"""The application: ``create_app(settings)`` wires the parts together and does nothing else.

Routes live by audience: Twilio's webhooks (:mod:`callbridge.api.twilio`), the media stream (served by picows on the
same port, :mod:`callbridge.transport.router`, its calls built in :mod:`callbridge.api.streams`), the REST API
(:mod:`callbridge.api.rest`), health and metrics (:mod:`callbridge.api.health`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import secrets
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from callbridge.api.campaigns import campaigns_router
from callbridge.api.control import control_router
from callbridge.api.dashboard import mount_dashboard
from callbridge.api.docs import ErrorBody, serve_docs
from callbridge.api.health import health_router
from callbridge.api.limits import BodySizeLimit
from callbridge.api.live import live_router
from callbridge.api.rest import router
from callbridge.api.streams import StreamCalls
from callbridge.api.twilio import twilio_router
from callbridge.api.webhooks import webhooks_router
from callbridge.bridge import CallRegistry, ContextResolver, RealtimeEndpoint
from callbridge.config import Settings
from callbridge.core.session import SessionConfig
from callbridge.core.transcript import TranscriptLine, TranscriptSink
from callbridge.observability.metrics import Metrics
from callbridge.service.agents import AgentDirectory, load_agents
from callbridge.service.calls import (
    CallServices,
    Invalid,
    NotConfigured,
    NotFound,
    ServiceError,
    TooManyRequests,
    Upstream,
)
from callbridge.service.campaigns import CampaignConflict, CampaignInvalid
from callbridge.service.control import NotLive
from callbridge.service.live import live_events
from callbridge.service.ownership import is_orphan
from callbridge.service.recordings import Recordings
from callbridge.service.resolvers import HttpContextResolver, PythonContextResolver
from callbridge.service.tools import ToolRegistry, load_registry
from callbridge.store.repository import DatabaseTranscriptSink, Store
from callbridge.telephony.params import StreamParameterSigner
from callbridge.telephony.rest import TwilioCalls
from callbridge.telephony.signatures import TwilioSignatures
from callbridge.transport.router import MediaStreamEndpoint

log = structlog.stdlib.get_logger("callbridge.api")


class _Sinks:
    """Transcript lines go to the store, then to the live events, and, when given, to an extra sink (the demo's live
    printer)."""

    def __init__(self, store: Store, services: CallServices, extra: TranscriptSink | None) -> None:
        self._store = DatabaseTranscriptSink(store)
        self._services = services
        self._extra = extra

    async def write(self, line: TranscriptLine) -> None:
        await self._store.write(line)
        await self._services.line_completed(line)
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
    secret = _secret(settings)
    signer = StreamParameterSigner(secret, settings.stream_parameters_ttl_seconds)
    signatures = _signatures(settings)
    auth_token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    twilio_rest = None
    if settings.twilio_account_sid and auth_token:
        twilio_rest = TwilioCalls(settings.twilio_account_sid, auth_token, api_base_url=settings.twilio_api_base_url)
    resolver = _resolver(settings)
    metrics = Metrics(lambda: registry.sessions())  # the live calls, read at each scrape
    registry = CallRegistry(settings.max_calls, metrics)

    calls: StreamCalls  # made just below: it needs the app, whose lifespan needs it
    app = FastAPI(
        title="callbridge",
        summary="Twilio Media Streams ⇄ OpenAI Realtime bridge: calls, transcripts, call control",
        lifespan=lambda app: _lifespan(app, settings, agents, signer, twilio_rest, sink, calls),
        docs_url=None,  # served by serve_docs, on assets of its own
        redoc_url=None,
    )
    calls = StreamCalls(
        app,
        settings,
        _session_config(settings, agents, signer, resolver),
        _realtime_endpoint(settings),
        agents.toolbox,
        resolver,
        registry,
        metrics,
        signatures,
        twilio_rest,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.drain = lambda: registry.drain(settings.drain_seconds)
    app.state.metrics = metrics
    app.state.media_stream = MediaStreamEndpoint(
        "/twilio/media-stream", calls.admit, calls.open, max_message_bytes=settings.max_message_bytes
    )
    app.include_router(twilio_router(settings, signatures, registry, metrics))
    app.include_router(router())
    app.include_router(live_router())
    app.include_router(control_router())
    app.include_router(campaigns_router())
    app.include_router(webhooks_router())
    app.include_router(health_router(registry, metrics))
    serve_docs(app)
    mount_dashboard(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(ServiceError, _refused)
    return app


@contextlib.asynccontextmanager
async def _lifespan(
    app: FastAPI,
    settings: Settings,
    agents: AgentDirectory,
    signer: StreamParameterSigner,
    twilio_rest: TwilioCalls | None,
    sink: TranscriptSink | None,
    calls: StreamCalls,
) -> AsyncIterator[None]:
    """The store, the services, the webhook outbox and (without a key or URL) the local engine, for the app's life."""
    store = await Store.open(settings.database_url)
    orphans = await store.close_orphaned_calls("interrupted", is_orphan)
    if orphans:
        log.warning("calls.orphans_closed", count=orphans, reason="interrupted")
    live = live_events(settings.redis_url, app.state.metrics, settings.redis_prefix)
    await live.start()
    services = CallServices(settings, store, signer, agents, twilio_rest, live)
    app.state.services = services
    app.state.store = store
    app.state.sinks = _Sinks(store, services, sink)
    app.state.recordings = recordings = Recordings(settings, store)
    await recordings.recover()  # what a killed process left incomplete is made whole before any call starts
    # Without a webhook URL nothing is ever queued: no task polls the database for nothing.
    outbox = asyncio.create_task(services.outbox.run()) if settings.webhook_url else None
    sweeps = asyncio.create_task(recordings.sweep_forever()) if settings.recordings_retention_days else None
    await agents.toolbox.start()  # MCP servers: connected in the background, retried until they answer
    try:
        async with contextlib.AsyncExitStack() as stack:
            if settings.uses_local_engine:
                from callbridge.engine.agent import LocalEngine

                engine = await stack.enter_async_context(LocalEngine())
                app.state.engine = engine
                calls.endpoint = dataclasses.replace(calls.endpoint, url=engine.url)
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
        for task in (outbox, sweeps):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await agents.toolbox.aclose()
        await services.aclose()
        await live.aclose()
        await store.close()


def _secret(settings: Settings) -> str:
    secret = settings.secret.get_secret_value() if settings.secret else ""
    if not secret:
        secret = secrets.token_urlsafe(32)
        log.warning("config.no_secret", detail="CALLBRIDGE_SECRET unset: using a random per-process secret")
    return secret


def _signatures(settings: Settings) -> TwilioSignatures:
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
    return signatures


def _resolver(settings: Settings) -> ContextResolver | None:
    if settings.context_url:  # the settings refuse a context URL without a webhook secret
        webhook_secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        return HttpContextResolver(settings.context_url, webhook_secret)
    if settings.context_function:
        return PythonContextResolver(settings.context_function)
    return None


def _realtime_endpoint(settings: Settings) -> RealtimeEndpoint:
    return RealtimeEndpoint(
        url=settings.effective_realtime_url,
        model=settings.realtime_model,
        dialect=settings.realtime_dialect,
        api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
        connect_timeout=settings.realtime_connect_timeout_seconds,
    )


def _session_config(
    settings: Settings, agents: AgentDirectory, signer: StreamParameterSigner, resolver: ContextResolver | None
) -> SessionConfig:
    return SessionConfig(
        agent=agents.default,
        agents=agents.agents,
        verify_parameters=signer.verify,
        pre_ready_buffer_ms=settings.pre_ready_buffer_ms,
        hang_up_when_model_ends=settings.on_model_end == "hangup",
        load_context=True,
        resolve_context=resolver is not None,
        reconnect_deadline_s=settings.realtime_reconnect_deadline_seconds,
        ready_timeout_s=settings.realtime_ready_timeout_seconds,
        amd_timeout_s=settings.amd_timeout_seconds,
        rollover_after_s=settings.realtime_rollover_seconds,
    )


_STATUS_OF = {
    NotFound: 404,
    Invalid: 422,
    NotConfigured: 503,
    Upstream: 502,
    NotLive: 409,
    CampaignConflict: 409,
    TooManyRequests: 429,
}
"""The HTTP status of each kind of refusal of the services."""


async def _refused(request: Request, exc: Exception) -> Response:
    """The one place a service's refusal becomes an HTTP answer: an :class:`ErrorBody` with its status."""
    status = next((code for kind, code in _STATUS_OF.items() if isinstance(exc, kind)), 500)
    body = ErrorBody(detail=str(exc)).model_dump()
    if isinstance(exc, NotLive):
        body["code"] = exc.code  # not_live, or not_live_here: another worker carries the call
    if isinstance(exc, CampaignInvalid):
        body["problems"] = exc.problems  # every bad row of an import, by row and field
    return JSONResponse(body, status_code=status)


async def _invalid_request(request: Request, exc: Exception) -> Response:
    """422 without echoing the input back: it may be what could not be encoded in the first place."""
    assert isinstance(exc, RequestValidationError)
    errors = [{key: error[key] for key in ("loc", "msg", "type") if key in error} for error in exc.errors()]
    body = json.dumps({"detail": errors}, ensure_ascii=True, default=str)
    return Response(body, status_code=422, media_type="application/json")
