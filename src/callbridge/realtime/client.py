"""The client side of the Realtime protocol: the call's WebSocket to the model.

A :class:`ModelConnection` hands each message, as it is read, to its :class:`ModelReceiver` (the call's
:class:`~callbridge.bridge.CallBridge`), and sends the session's typed commands in the endpoint's dialect.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlencode

import orjson
from picows import WSHandshakeError, ws_connect

from callbridge.core import events as ev
from callbridge.realtime.dialect import Dialect, headers_for
from callbridge.transport.websocket_io import READ_BUFFER_BYTES, MessageListener

CONNECT_TIMEOUT_S = 5.0
"""How long opening the model's WebSocket may take (``CALLBRIDGE_REALTIME_CONNECT_TIMEOUT_SECONDS``)."""


@dataclass(frozen=True, slots=True)
class RealtimeEndpoint:
    """Where and how to reach the model."""

    url: str
    model: str
    dialect: Dialect = "ga"
    api_key: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT_S
    max_message_bytes: int = 16 * 1024 * 1024

    @property
    def full_url(self) -> str:
        separator = "&" if "?" in self.url else "?"
        return f"{self.url}{separator}{urlencode({'model': self.model})}"


class ModelReceiver(Protocol):
    """Who hears the model: each message where it is read, and the close the other side made."""

    def realtime_message(self, connection: ModelConnection, payload: bytes | memoryview) -> None: ...

    def realtime_closed(self, connection: ModelConnection) -> None: ...


class ModelConnection(MessageListener):
    """The call's WebSocket to the Realtime server.

    Messages that arrive before the receiver has adopted the connection (the server may speak in the same packet
    as its handshake answer) wait here, so that the session hears ``RealtimeConnected`` first.
    """

    def __init__(self, receiver: ModelReceiver, max_message_bytes: int) -> None:
        super().__init__(max_message_bytes)
        self._receiver = receiver
        self._early: list[bytes] | None = []
        self._closed_early = False

    def adopted(self) -> None:
        early, self._early = self._early, None
        for payload in early or ():
            self._receiver.realtime_message(self, payload)
        if self._closed_early:
            self._receiver.realtime_closed(self)

    def on_message(self, payload: bytes | memoryview, binary: bool) -> None:
        if self._early is not None:
            self._early.append(bytes(payload))
        elif binary:
            self._receiver.realtime_message(self, b"binary message")  # parses as a malformed event
        else:
            self._receiver.realtime_message(self, payload)

    def on_close(self) -> None:
        if self._early is not None:
            self._closed_early = True
        else:
            self._receiver.realtime_closed(self)


async def connect(endpoint: RealtimeEndpoint, receiver: ModelReceiver) -> ModelConnection | ev.RealtimeConnectFailed:
    """Open the model's WebSocket within the endpoint's timeout; a failure comes back as the session's event."""
    try:
        async with asyncio.timeout(endpoint.connect_timeout):
            _, listener = await ws_connect(
                lambda: ModelConnection(receiver, endpoint.max_message_bytes),
                endpoint.full_url,
                extra_headers=headers_for(endpoint.dialect, endpoint.api_key),
                websocket_handshake_timeout=endpoint.connect_timeout,
                max_frame_size=endpoint.max_message_bytes,
                read_buffer_init_size=READ_BUFFER_BYTES,
            )
    except Exception as exc:
        return _connect_failed(exc)
    return cast(ModelConnection, listener)


def _connect_failed(exc: Exception) -> ev.RealtimeConnectFailed:
    """Why the model's WebSocket could not be opened; a refused handshake keeps its HTTP status and error code."""
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if not isinstance(exc, WSHandshakeError) or exc.response is None:
        return ev.RealtimeConnectFailed(reason)
    response, code = exc.response, ""
    try:
        body: Any = orjson.loads(exc.raw_body or b"{}")
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or error.get("type") or "")[:100]
    return ev.RealtimeConnectFailed(f"HTTP {response.status}", status=int(response.status), code=code)
