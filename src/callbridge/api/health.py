"""Health, readiness and metrics: for load balancers and Prometheus."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from callbridge.bridge import CallRegistry
from callbridge.observability.metrics import Metrics


class Health(BaseModel):
    """The process answers."""

    status: Literal["ok"] = Field(description="Always ok")


class Readiness(BaseModel):
    """Whether this process takes another call."""

    ready: bool = Field(description="It takes another call")
    active_calls: int = Field(description="Calls this process carries now")
    max_calls: int = Field(description="Calls it carries at most (CALLBRIDGE_MAX_CALLS)")
    reason: str | None = Field(
        default=None, description="Why not, when not ready: draining (it is stopping) or over_capacity"
    )


_METRICS: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus' text format", "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}
}


def health_router(registry: CallRegistry, metrics: Metrics) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/metrics", response_class=Response, responses=_METRICS)
    async def prometheus_metrics() -> Response:
        """Prometheus metrics of this process: calls, frames, barge-ins, errors, tokens, turn and relay latency."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, str]:
        """The process answers HTTP."""
        return {"status": "ok"}

    @router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}})
    async def readyz() -> JSONResponse:
        """Ready while this process can take another call (a load balancer should route elsewhere when not)."""
        reason = registry.refusal()
        body = Readiness(ready=reason is None, active_calls=len(registry), max_calls=registry.max_calls, reason=reason)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if reason is None else 503)

    return router
