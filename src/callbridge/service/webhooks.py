"""Standard Webhooks: how every request callbridge makes to the host application is signed.

Post-call and live-event webhooks, context requests and HTTP tools all carry the three headers of the Standard
Webhooks specification (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``), made by the
``standardwebhooks`` package and keyed by ``CALLBRIDGE_WEBHOOK_SECRET`` (``whsec_`` and base64; ``callbridge secret``
prints a new one). Receivers verify them with any Standard Webhooks library (Ruby, Python, Node, PHP, Go…). A retry
of one delivery keeps its ``webhook-id``, so that a receiver can tell it from a new one.

:class:`WebhookOutbox` delivers what goes to ``CALLBRIDGE_WEBHOOK_URL`` from a durable outbox: each failed attempt
is followed by a wait drawn at random (full jitter) up to a maximum that doubles per failure, for
``CALLBRIDGE_WEBHOOK_MAX_ATTEMPTS`` attempts; then the delivery is dead until it is retried through the REST API
(``POST /api/webhooks/deliveries/{id}/retry``).
"""

from __future__ import annotations

import asyncio
import base64
import random
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import structlog
from standardwebhooks.webhooks import Webhook

from callbridge.config import Settings, check_webhook_secret
from callbridge.store.repository import OutboxEntry, OutboxPage, Store

log = structlog.stdlib.get_logger("callbridge.webhooks")

BACKOFF_CAP_S = 8 * 3600.0
"""The longest wait between two attempts. With the defaults (``CALLBRIDGE_WEBHOOK_BACKOFF_SECONDS`` 60, 12 attempts)
the 11 waits between the attempts are at most 1, 2, 4, 8, 16, 32, 64, 128 and 256 minutes, then 8 h and 8 h: the
last attempt comes at most about 24.5 h after the first (about half that on average: each wait is drawn at random
up to its maximum)."""


def new_secret() -> str:
    """A fresh signing key in the form Standard Webhooks libraries take: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def new_message_id() -> str:
    """A delivery's ``webhook-id``: unique per delivery, the same for each of its retries."""
    return "msg_" + secrets.token_urlsafe(18)


def check_secret(secret: str) -> None:
    """Raise ``ValueError`` unless ``secret`` is a usable key (``whsec_`` and non-empty base64)."""
    check_webhook_secret(secret)


class WebhookSigner:
    """Signs request bodies for the host application. Never made with an empty key: the constructor refuses it."""

    def __init__(self, secret: str) -> None:
        check_secret(secret)
        self._webhook = Webhook(secret)

    def headers(self, body: bytes, message_id: str | None = None, at: datetime | None = None) -> dict[str, str]:
        """The headers of one signed JSON request (``message_id``: the delivery's id, kept across its retries)."""
        message_id = message_id or new_message_id()
        at = at or datetime.now(UTC)
        return {
            "Content-Type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": self._webhook.sign(message_id, at, body),
        }


def backoff_delay(
    failed_attempts: int,
    base_s: float,
    *,
    cap_s: float = BACKOFF_CAP_S,
    draw: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait after a delivery's ``failed_attempts``-th failure: exponential backoff with full jitter,
    ``draw(0, min(cap, base * 2 ** (failed_attempts - 1)))``. Drawn at random so that deliveries that failed
    together (the receiver was down) do not all come back at once."""
    exponent = max(failed_attempts - 1, 0)
    ceiling = cap_s if exponent >= 64 else min(cap_s, base_s * 2.0**exponent)
    return draw(0.0, ceiling)


class WebhookOutbox:
    """The durable outbox of what callbridge POSTs to ``CALLBRIDGE_WEBHOOK_URL`` (post-call and live-event webhooks).

    Deliveries are rows in the store: kept before they are sent, so they survive restarts, and claimed with a lease
    so that several processes share the work. Each attempt is signed afresh (a new ``webhook-timestamp``) with the
    delivery's own ``webhook-id``. A delivery that fails ``CALLBRIDGE_WEBHOOK_MAX_ATTEMPTS`` times is dead: it stays
    on record (``GET /api/webhooks/deliveries?status=dead``) until it is retried by hand.
    """

    def __init__(self, settings: Settings, store: Store, client: httpx.AsyncClient | None = None) -> None:
        self.store = store
        self.url = settings.webhook_url
        self.max_attempts = settings.webhook_max_attempts
        self.backoff_s = settings.webhook_backoff_seconds
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        self._signer = WebhookSigner(secret) if secret else None
        self._http = client or httpx.AsyncClient(timeout=10)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def enqueue(self, payload: dict[str, Any]) -> int | None:
        """Keep ``payload`` for delivery to the webhook URL, with a ``webhook-id`` of its own (None: no URL)."""
        if self.url is None:
            return None
        return await self.store.enqueue_webhook(self.url, payload, new_message_id())

    async def run(self, poll_s: float = 1.0) -> None:
        """Deliver what falls due, forever; a database error is logged and the next poll tries again."""
        while True:
            try:
                await self.deliver_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the outbox must outlive a transient database error
                log.error("webhook.outbox_error", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(poll_s)

    async def deliver_due(self) -> int:
        """Attempt every delivery due now, once; returns how many were attempted."""
        entries = await self.store.due_webhooks(datetime.now(UTC))
        for entry in entries:
            await self._attempt(entry)
        return len(entries)

    async def _attempt(self, entry: OutboxEntry) -> None:
        if self._signer is None:
            raise ValueError("CALLBRIDGE_WEBHOOK_SECRET is unset: no webhook is sent unsigned")
        body = orjson.dumps(entry.payload)
        status_code: int | None = None
        try:
            response = await self._http.post(
                entry.url, content=body, headers=self._signer.headers(body, entry.webhook_id)
            )
            status_code = response.status_code
            response.raise_for_status()
        except httpx.HTTPError as exc:
            await self._failed(entry, f"{type(exc).__name__}: {exc}", status_code)
        else:
            await self.store.mark_delivered(entry.id, status_code)
            log.info("webhook.delivered", url=entry.url, id=entry.id, webhook_id=entry.webhook_id)

    async def _failed(self, entry: OutboxEntry, error: str, status_code: int | None) -> None:
        attempts = entry.attempts + 1
        if attempts >= self.max_attempts:
            await self.store.mark_failed(entry.id, error, None, status_code)
            log.error("webhook.dead", url=entry.url, id=entry.id, webhook_id=entry.webhook_id, attempts=attempts)
            return
        delay = backoff_delay(attempts, self.backoff_s)
        await self.store.mark_failed(entry.id, error, datetime.now(UTC) + timedelta(seconds=delay), status_code)
        log.warning("webhook.failed", url=entry.url, id=entry.id, attempts=attempts, retry_in_s=round(delay, 1))

    async def deliveries(self, *, status: str | None, limit: int, cursor: str | None) -> OutboxPage:
        """Deliveries, newest first, a page at a time; ``ValueError`` for a cursor this service did not make."""
        return await self.store.list_webhooks(status=status, limit=limit, cursor=cursor)

    async def retry(self, entry_id: int) -> OutboxEntry | None:
        """Make a dead or pending delivery due now, with all of ``max_attempts`` ahead of it again (its
        ``webhook-id`` kept); a delivered one is returned unchanged. None: no such delivery."""
        return await self.store.retry_webhook(entry_id, datetime.now(UTC), reset_attempts=True)
