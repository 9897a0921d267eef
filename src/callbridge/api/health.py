"""Health, readiness and metrics: for load balancers and Prometheus."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from callbridge.bridge import CallRegistry
from callbridge.observability.metrics import Metrics


def health_router(registry: CallRegistry, metrics: Metrics) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus metrics of this process: calls, frames, barge-ins, errors, tokens, turn and relay latency."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready while this process can take another call (a load balancer should route elsewhere when not)."""
        reason = registry.refusal()
        body: dict[str, Any] = {"ready": reason is None, "active_calls": len(registry), "max_calls": registry.max_calls}
        if reason is not None:
            body["reason"] = reason
        return JSONResponse(body, status_code=200 if reason is None else 503)

    return router
