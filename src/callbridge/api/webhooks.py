"""The webhook deliveries: what the outbox holds for ``CALLBRIDGE_WEBHOOK_URL``, and retrying one by hand.

``GET /api/webhooks/deliveries?status=dead`` lists the deliveries whose attempts ran out (``pending`` and
``delivered`` too, newest first, paged like the calls); ``POST /api/webhooks/deliveries/{delivery_id}/retry``
makes a dead or pending delivery due now, with all of ``CALLBRIDGE_WEBHOOK_MAX_ATTEMPTS`` ahead of it again and its
``webhook-id`` kept (a receiver that already has it can tell). Protected like the rest of the REST API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field

from callbridge.api.docs import ErrorBody, answers
from callbridge.api.rest import Services, authorized
from callbridge.store import repository


class WebhookDelivery(BaseModel):
    """One webhook in the outbox: what it carries, where it goes, and how its attempts went."""

    model_config = ConfigDict(from_attributes=True)

    id: int = Field(description="The delivery's number in the outbox")
    webhook_id: str = Field(description="The webhook-id header of every attempt: the same across retries")
    url: str = Field(description="Where it is POSTed")
    payload: dict[str, Any] = Field(description="The JSON body (event, and the call or the live event's data)")
    status: Literal["pending", "delivered", "dead"] = Field(
        description="pending (due now or later), delivered (the receiver answered 2xx) or dead (its attempts ran out)"
    )
    attempts: int = Field(description="Failed attempts so far")
    next_attempt_at: datetime = Field(description="When it is next attempted, while pending")
    delivered_at: datetime | None = Field(description="When the receiver accepted it")
    dead_at: datetime | None = Field(description="When its last attempt failed and it was given up")
    last_error: str | None = Field(description="Why the last failed attempt failed")
    last_status: int | None = Field(description="The receiver's HTTP status at the last attempt (null: no answer)")
    created_at: datetime = Field(description="When it was put in the outbox")


class WebhookDeliveryPage(BaseModel):
    """Webhook deliveries, newest first, one page of them."""

    model_config = ConfigDict(from_attributes=True)

    entries: list[WebhookDelivery] = Field(description="The deliveries of this page")
    next_cursor: str | None = Field(description="Pass it back as cursor for the next page; null on the last page")


DeliveryId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The delivery's number in the outbox (its id)")]

_REFUSED_RETRY: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such delivery in the outbox"},
    409: {"model": ErrorBody, "description": "The delivery was delivered already: nothing to retry"},
}


def webhooks_router() -> APIRouter:
    api = APIRouter(
        prefix="/api/webhooks",
        tags=["webhooks"],
        dependencies=[Depends(authorized)],
        responses=answers(401, 413, 422),
    )

    @api.get("/deliveries", response_model=WebhookDeliveryPage)
    async def list_deliveries(
        services: Services,
        status_: Annotated[
            Literal["pending", "delivered", "dead"] | None,
            Query(alias="status", description="Only deliveries with this status (pending, delivered or dead)"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=200, description="Deliveries on a page, at most")] = 50,
        cursor: Annotated[
            str | None, Query(description="Where the page starts: the next_cursor of the page before")
        ] = None,
    ) -> repository.OutboxPage:
        """Webhook deliveries, newest first, a page at a time: ?status=dead for those whose attempts ran out."""
        try:
            return await services.outbox.deliveries(status=status_, limit=limit, cursor=cursor)
        except ValueError as exc:  # a cursor that is not one of ours
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None

    @api.post("/deliveries/{delivery_id}/retry", response_model=WebhookDelivery, responses=_REFUSED_RETRY)
    async def retry_delivery(delivery_id: DeliveryId, services: Services) -> repository.OutboxEntry:
        """Deliver a dead or pending webhook now: its attempts start over (all of CALLBRIDGE_WEBHOOK_MAX_ATTEMPTS
        ahead of it), with the same webhook-id."""
        entry = await services.outbox.retry(delivery_id)
        if entry is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such delivery")
        if entry.status == "delivered":
            raise HTTPException(status.HTTP_409_CONFLICT, "the delivery was delivered already")
        return entry

    return api
