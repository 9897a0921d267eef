"""Standard Webhooks: how every request callbridge makes to the host application is signed.

Post-call and live-event webhooks, context requests and HTTP tools all carry the three headers of the Standard
Webhooks specification (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``), made by the
``standardwebhooks`` package and keyed by ``CALLBRIDGE_WEBHOOK_SECRET`` (``whsec_`` and base64; ``callbridge secret``
prints a new one). Receivers verify them with any Standard Webhooks library (Ruby, Python, Node, PHP, Go…). A retry
of one delivery keeps its ``webhook-id``, so that a receiver can tell it from a new one.
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook


def new_secret() -> str:
    """A fresh signing key in the form Standard Webhooks libraries take: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def new_message_id() -> str:
    """A delivery's ``webhook-id``: unique per delivery, the same for each of its retries."""
    return "msg_" + secrets.token_urlsafe(18)


def check_secret(secret: str) -> None:
    """Raise ``ValueError`` unless ``secret`` is a usable key (``whsec_`` and non-empty base64)."""
    try:
        key = secret.removeprefix("whsec_").rstrip("=")
        if not key or not base64.b64decode(key + "=" * (-len(key) % 4), validate=True):
            raise ValueError("empty")
    except Exception:
        raise ValueError("must be whsec_ and base64, as `callbridge secret` prints") from None


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
