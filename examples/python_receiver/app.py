"""A host application's side of callbridge, in FastAPI: every request callbridge makes to it, verified.

callbridge signs each request per Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``)
with ``CALLBRIDGE_WEBHOOK_SECRET``; this app checks the signature over the raw body with the ``standardwebhooks``
package before it reads anything, and answers:

- ``POST /callbridge/context`` (``CALLBRIDGE_CONTEXT_URL``): who the call is about, from its ``reference``;
- ``POST /callbridge/webhooks`` (``CALLBRIDGE_WEBHOOK_URL``): ``call.ended`` (and any live event chosen with
  ``CALLBRIDGE_WEBHOOK_EVENTS``), each delivery handled once however often it is retried;
- ``POST /callbridge/tools/lookup_order``: the ``lookup_order`` HTTP tool of the agents file.

Run it with ``CALLBRIDGE_WEBHOOK_SECRET=whsec_… uvicorn app:app --port 8000``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
log = logging.getLogger("receiver")

app = FastAPI(title="callbridge receiver example")
webhook = Webhook(os.environ["CALLBRIDGE_WEBHOOK_SECRET"])

# What the host application knows; a real one reads its database.
CUSTOMERS = {
    "customer-42": {
        "name": "Ada",
        "greeting": "Hello Ada, this is Bright Dental calling about your appointment tomorrow.",
        "instructions": "You are Bright Dental's assistant. Confirm Ada's appointment tomorrow at 10:00.",
        "items": [{"role": "user", "text": "Last visit: a cleaning in May."}],
        "metadata": {"customer_id": 42},
    }
}
ORDERS = {42: {"status": "shipped", "delivery": "Thursday"}, 7: {"status": "being packed", "delivery": "next week"}}
seen_deliveries: set[str] = set()


async def verified(request: Request) -> dict[str, Any]:
    """The request's JSON body, once its signature is verified (401 otherwise: never act on an unsigned body)."""
    body = await request.body()
    try:
        payload: dict[str, Any] = webhook.verify(body, dict(request.headers))
    except WebhookVerificationError as exc:
        log.warning("refused a request: %s", exc)
        raise HTTPException(status_code=401, detail="invalid signature") from None
    return payload


Verified = Annotated[dict[str, Any], Depends(verified)]


@app.post("/callbridge/context")
async def context(payload: Verified) -> dict[str, Any]:
    """``{"call_sid", "reference", "agent", "from", "to"}`` in; the call's context out (every field optional)."""
    customer = CUSTOMERS.get(payload.get("reference") or "")
    log.info("context for %s (reference %s): %s", payload["call_sid"], payload.get("reference"), bool(customer))
    return customer or {}


@app.post("/callbridge/webhooks", status_code=204)
async def webhooks(request: Request, payload: Verified) -> Response:
    """Post-call and live-event webhooks. A retry carries the same ``webhook-id``: handle each delivery once."""
    delivery = request.headers["webhook-id"]
    if delivery in seen_deliveries:
        return Response(status_code=204)
    seen_deliveries.add(delivery)
    if payload["event"] == "call.ended":
        call = payload["call"]
        said = [f"{line['speaker']}: {line['text']}" for line in payload["transcript"]]
        log.info("call.ended %s (%s, %s): %s", call["call_sid"], call["end_reason"], delivery, json.dumps(said))
    else:
        log.info("%s %s (%s)", payload["event"], payload.get("call_sid"), delivery)
    return Response(status_code=204)


@app.post("/callbridge/tools/lookup_order")
async def lookup_order(payload: Verified) -> dict[str, Any]:
    """``{"call_sid", "tool", "arguments": {"order_id"}, "context"}`` in; any JSON out is what the model hears."""
    order_id = payload["arguments"]["order_id"]
    order = ORDERS.get(order_id)
    log.info("lookup_order %s for %s", order_id, payload["call_sid"])
    if order is None:
        return {"order_id": order_id, "found": False}
    return {"order_id": order_id, "found": True, **order}
