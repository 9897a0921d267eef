"""The ASGI application: Twilio's webhook, the media-stream WebSocket, health."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect, WebSocketState

from callbridge.bridge import CallBridge, HangUp, RealtimeEndpoint
from callbridge.config import Settings
from callbridge.core.context import CallContext
from callbridge.core.session import SessionConfig
from callbridge.core.transcript import MemoryTranscriptSink, TranscriptSink
from callbridge.telephony.params import StreamParameterSigner
from callbridge.telephony.rest import TwilioCalls
from callbridge.telephony.signatures import TwilioSignatures
from callbridge.telephony.twiml import connect_stream_twiml
from callbridge.tools import ToolRegistry, load_registry

log = structlog.stdlib.get_logger("callbridge.api")


class StarletteTwilioTransport:
    """The media-stream WebSocket as the bridge's :class:`~callbridge.bridge.TwilioTransport`."""

    def __init__(self, websocket: WebSocket, max_message_bytes: int) -> None:
        self._websocket = websocket
        self._max = max_message_bytes

    async def receive(self) -> str | bytes | None:
        try:
            message = await self._websocket.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        if message["type"] == "websocket.disconnect":
            return None
        data: str | bytes | None = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        if len(data) > self._max:
            return b""  # reported as an invalid (binary-sized) frame, never parsed
        return data

    async def send(self, text: str) -> None:
        await self._websocket.send_text(text)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._websocket.application_state != WebSocketState.DISCONNECTED:
            await self._websocket.close(code, reason[:120])


def create_app(
    settings: Settings,
    *,
    tools: ToolRegistry | None = None,
    sink: TranscriptSink | None = None,
) -> FastAPI:
    """Build the service. Everything it needs comes from ``settings`` and the arguments: no globals."""
    if tools is None:
        tools = load_registry(settings.tools) if settings.tools else ToolRegistry()
    transcripts = sink or MemoryTranscriptSink()
    secret = settings.secret.get_secret_value() if settings.secret else ""
    if not secret:
        secret = secrets.token_urlsafe(32)
        log.warning("config.no_secret", detail="CALLBRIDGE_SECRET unset: using a random per-process secret")
    signer = StreamParameterSigner(secret, settings.stream_parameters_ttl_seconds)
    auth_token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    signatures = TwilioSignatures(auth_token)
    if not signatures.configured:
        log.error("config.no_twilio_auth_token", detail="TWILIO_AUTH_TOKEN unset: every Twilio request is refused")
    hang_up: HangUp | None = None
    if settings.twilio_account_sid and auth_token:
        hang_up = TwilioCalls(settings.twilio_account_sid, auth_token).hang_up
    endpoint = RealtimeEndpoint(
        url=settings.effective_realtime_url,
        model=settings.realtime_model,
        dialect=settings.realtime_dialect,
        api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
        connect_timeout=settings.realtime_connect_timeout_seconds,
    )
    session_config = SessionConfig(
        agent=settings.agent(tools.schemas),
        verify_parameters=signer.verify,
        pre_ready_buffer_ms=settings.pre_ready_buffer_ms,
        hang_up_when_model_ends=settings.on_model_end == "hangup",
    )
    active_calls: dict[str, CallBridge] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal endpoint
        if not settings.uses_local_engine:
            yield
            return
        from callbridge.engine.agent import LocalEngine

        async with LocalEngine() as engine:
            app.state.engine = engine
            endpoint = dataclasses.replace(endpoint, url=engine.url)
            log.warning(
                "engine.local",
                detail="no OPENAI_API_KEY and no CALLBRIDGE_REALTIME_URL: calls use callbridge's offline local engine",
                url=engine.url,
            )
            yield

    app = FastAPI(title="callbridge", summary="Twilio Media Streams ⇄ OpenAI Realtime bridge", lifespan=lifespan)
    app.state.settings = settings
    app.state.active_calls = active_calls
    app.state.transcripts = transcripts

    @app.post("/twilio/voice", include_in_schema=False)
    async def twilio_voice(request: Request) -> Response:
        form = await request.form()
        params = {key: str(value) for key, value in form.items()}
        url = f"{settings.public_url}/twilio/voice"
        if not signatures.valid(url, params, request.headers.get("x-twilio-signature")):
            log.warning("security.webhook_signature_invalid", path="/twilio/voice", client=_client(request))
            return Response("invalid Twilio signature", status_code=403, media_type="text/plain")
        call_sid = params.get("CallSid")
        context = CallContext(call_sid=call_sid, caller=params.get("From"), called=params.get("To"))
        parameters = signer.mint(context, time.time())
        twiml = connect_stream_twiml(settings.stream_url, parameters, say=settings.say_before_connect)
        log.info("twilio.incoming_call", call_sid=call_sid, caller=context.caller, called=context.called)
        return Response(twiml, media_type="application/xml")

    @app.websocket("/twilio/media-stream")
    async def media_stream(websocket: WebSocket) -> None:
        if not signatures.valid(settings.stream_url, {}, websocket.headers.get("x-twilio-signature")):
            log.warning("security.stream_signature_invalid", client=_client(websocket))
            await websocket.close(code=1008)
            return
        await websocket.accept()
        bridge = CallBridge(
            session_config,
            endpoint,
            sink=transcripts,
            tools=tools,
            tool_timeout=settings.tool_timeout_seconds,
            hang_up=hang_up,
        )
        key = f"pending-{id(bridge)}"
        active_calls[key] = bridge
        try:
            session = await bridge.run(StarletteTwilioTransport(websocket, settings.max_message_bytes))
            log.info(
                "call.summary",
                call_sid=session.call_sid,
                stream_sid=session.stream_sid,
                reason=session.end_reason,
                **{name: getattr(session.stats, name) for name in session.stats.__dataclass_fields__},
            )
        finally:
            active_calls.pop(key, None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body: dict[str, Any] = {"ready": True, "active_calls": len(active_calls)}
        return JSONResponse(body)

    return app


def _client(connection: Request | WebSocket) -> str | None:
    return connection.client.host if connection.client else None
