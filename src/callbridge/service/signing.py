"""HMAC signatures on what callbridge sends to the host application (context requests, post-call webhooks).

Header ``X-Callbridge-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">``, keyed with
``CALLBRIDGE_WEBHOOK_SECRET``. The receiver recomputes it over the raw body and rejects old timestamps, which
stops replays. :func:`verify_signature` is the reference check for Python receivers.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-Callbridge-Signature"


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    stamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def verify_signature(
    secret: str, body: bytes, header: str, *, tolerance_s: int = 300, now: float | None = None
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and is at most ``tolerance_s`` old."""
    try:
        parts = dict(part.split("=", 1) for part in header.split(","))
        stamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - stamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, stamp), f"t={stamp},v1={parts.get('v1', '')}")
