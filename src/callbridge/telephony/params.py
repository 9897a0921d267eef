"""Signed, expiring ``<Parameter>``s: what really admits a media stream.

Twilio's signature on the WebSocket upgrade covers only the URL, which is the same for every call, so it can be
replayed. callbridge therefore mints one token per call into the ``<Stream>`` TwiML it writes: a reference to the
call, bound to the call SID when it is known (else to a one-time binding kept in the call record, checked when the
stream starts), with an expiry, signed with ``CALLBRIDGE_SECRET``.

The token carries the reference only, never the call's context (instructions, greeting, items, metadata): that
lives in the call record, written before Twilio can connect, and is loaded when the stream starts. So the
parameter stays short (at most :data:`MAX_PARAMETER_CHARS`) whatever the context holds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

from callbridge.core.context import CallContext, ParameterError

PARAMETER_NAME = "callbridge"
MAX_PARAMETER_CHARS = 256
_SALT = "callbridge.stream-parameters.v2"


class StreamParameterSigner:
    def __init__(self, secret: str, ttl_seconds: int) -> None:
        if not secret:
            raise ValueError("a secret is required to sign stream parameters")
        self._serializer = URLSafeSerializer(secret, salt=_SALT)
        self.ttl_seconds = ttl_seconds

    def mint(self, context: CallContext, now: float) -> dict[str, str]:
        """The ``<Parameter>``s for one call's ``<Stream>``: its SID (or binding) and an expiry, signed."""
        payload: dict[str, Any] = {"exp": int(now) + self.ttl_seconds}
        if context.call_sid is not None:
            payload["sid"] = context.call_sid
        if context.binding is not None:
            payload["bind"] = context.binding
        token = self._serializer.dumps(payload)
        if len(token) > MAX_PARAMETER_CHARS:  # a call SID or binding far longer than Twilio's
            raise ValueError(f"stream parameter of {len(token)} characters (at most {MAX_PARAMETER_CHARS})")
        return {PARAMETER_NAME: token}

    def verify(self, parameters: Mapping[str, str], call_sid: str, now: float | None = None) -> CallContext:
        """Check signature, expiry (against ``now``, the wall clock by default) and call binding; return the call's
        reference as a context to be completed from its record (a :class:`ParameterVerifier`)."""
        if now is None:
            now = time.time()
        token = parameters.get(PARAMETER_NAME)
        if not token:
            raise ParameterError("stream parameters absent")
        if len(token) > 4 * MAX_PARAMETER_CHARS:
            raise ParameterError("stream parameters malformed")
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
        binding = payload.get("bind")
        return CallContext(call_sid=call_sid, binding=binding if isinstance(binding, str) else None)
