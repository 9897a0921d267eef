"""Signed, expiring ``<Parameter>``s: what really admits a media stream.

Twilio's signature on the WebSocket upgrade covers only the URL, which is the same for every call, so it can be
replayed. callbridge therefore mints one token per call into the ``<Stream>`` TwiML it writes: the call's context
reference, bound to the call SID when it is known (else to a one-time binding kept in the call record, checked
when the stream starts), with an expiry, signed with ``CALLBRIDGE_SECRET``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

from callbridge.core.context import CallContext, ContextItem, ParameterError

PARAMETER_NAME = "callbridge"
_SALT = "callbridge.stream-parameters.v1"


class StreamParameterSigner:
    def __init__(self, secret: str, ttl_seconds: int) -> None:
        if not secret:
            raise ValueError("a secret is required to sign stream parameters")
        self._serializer = URLSafeSerializer(secret, salt=_SALT)
        self.ttl_seconds = ttl_seconds

    def mint(self, context: CallContext, now: float) -> dict[str, str]:
        """The ``<Parameter>``s for one call's ``<Stream>``."""
        payload: dict[str, Any] = {"exp": int(now) + self.ttl_seconds, "sid": context.call_sid}
        claims = {
            "dir": "out" if context.direction == "outbound" else None,
            "agent": context.agent,
            "ref": context.reference,
            "from": context.caller,
            "to": context.called,
            "name": context.name,
            "instructions": context.instructions,
            "greeting": context.greeting,
            "items": [[item.role, item.text] for item in context.items] or None,
            "meta": context.metadata or None,
            "bind": context.binding,
        }
        payload.update({key: value for key, value in claims.items() if value is not None})
        return {PARAMETER_NAME: self._serializer.dumps(payload)}

    def verify(self, parameters: Mapping[str, str], call_sid: str, now: float | None = None) -> CallContext:
        """Check signature, expiry (against ``now``, the wall clock by default) and call binding; return the
        context (a :class:`ParameterVerifier`)."""
        if now is None:
            now = time.time()
        token = parameters.get(PARAMETER_NAME)
        if not token:
            raise ParameterError("stream parameters absent")
        try:
            payload = self._serializer.loads(token)
        except BadSignature:
            raise ParameterError("stream parameters tampered with or signed with another secret") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int):
            raise ParameterError("stream parameters malformed")
        if payload["exp"] < now:
            raise ParameterError("stream parameters expired")
        bound = payload.get("sid")
        if bound is not None and bound != call_sid:
            raise ParameterError("stream parameters belong to another call")
        items = tuple(ContextItem(role, text) for role, text in payload.get("items") or ())
        return CallContext(
            call_sid=call_sid,
            direction="outbound" if payload.get("dir") == "out" else "inbound",
            agent=payload.get("agent"),
            reference=payload.get("ref"),
            caller=payload.get("from"),
            called=payload.get("to"),
            name=payload.get("name"),
            instructions=payload.get("instructions"),
            greeting=payload.get("greeting"),
            items=items,
            metadata=payload.get("meta") or {},
            binding=payload.get("bind"),
        )
