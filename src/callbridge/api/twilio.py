"""Twilio's webhooks: an incoming call, call status, stream status, answering-machine verdicts. Each is signed with
the account's auth token."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response

from callbridge.bridge import CallRegistry
from callbridge.config import Settings
from callbridge.observability.metrics import Metrics
from callbridge.service.calls import CallServices, ServiceError
from callbridge.telephony.signatures import TwilioSignatures

log = structlog.stdlib.get_logger("callbridge.api")


def twilio_router(
    settings: Settings, signatures: TwilioSignatures, registry: CallRegistry, metrics: Metrics
) -> APIRouter:
    router = APIRouter(prefix="/twilio", include_in_schema=False)

    async def signed_form(request: Request, path: str) -> dict[str, str] | None:
        """The request's form, if Twilio signed it (over the public URL, never the one the request came in on)."""
        form = await request.form()
        params = {key: str(value) for key, value in form.items()}
        if not signatures.valid(f"{settings.public_url}{path}", params, request.headers.get("x-twilio-signature")):
            log.warning("security.webhook_signature_invalid", path=path, client=_client(request))
            return None
        return params

    @router.post("/voice")
    async def voice(request: Request) -> Response:
        params = await signed_form(request, "/twilio/voice")
        if params is None:
            return _forbidden()
        services: CallServices = request.app.state.services
        if (reason := registry.refusal()) is not None:
            call_sid = params.get("CallSid")
            log.warning("admission.refused", call_sid=call_sid, reason=reason, active_calls=len(registry))
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

    async def callback(request: Request, path: str, keep: Callable[[dict[str, str]], Awaitable[None]]) -> Response:
        """A status callback: verified, kept, answered 204."""
        params = await signed_form(request, path)
        if params is None:
            return _forbidden()
        await keep(params)
        return Response(status_code=204)

    @router.post("/status")
    async def status(request: Request) -> Response:
        return await callback(request, "/twilio/status", request.app.state.services.status_callback)

    @router.post("/amd")
    async def amd(request: Request) -> Response:
        """Twilio's asynchronous answering-machine verdict: on the call's record, and to the call that awaits it
        (in this process, or the one that carries it). A call not live yet finds it on its record when it starts."""
        params = await signed_form(request, "/twilio/amd")
        if params is None:
            return _forbidden()
        verdict = await request.app.state.services.amd_verdict(params)
        if verdict is not None:
            try:
                await request.app.state.control.amd(*verdict)
            except ServiceError as exc:  # not live (yet): the record has it
                log.info("twilio.amd_not_delivered", call_sid=verdict[0], reason=str(exc))
        return Response(status_code=204)

    @router.post("/stream-status")
    async def stream_status(request: Request) -> Response:
        return await callback(request, "/twilio/stream-status", request.app.state.services.stream_status)

    return router


def _forbidden() -> Response:
    return Response("invalid Twilio signature", status_code=403, media_type="text/plain")


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None
