"""Twilio's media-stream WebSocket, served by picows on uvicorn's own port.

uvicorn parses every HTTP request of the port; one that asks to become a WebSocket is handed to uvicorn's WebSocket
protocol class, which is callbridge's :class:`WebSocketRouter` (``uvicorn.Config(ws=...)``, see
:func:`callbridge.transport.server.uvicorn_config`). Upgrades on the media stream's path go to picows, whose frames
reach the call's :class:`~callbridge.bridge.CallBridge` in the read callback itself; any other path goes to uvicorn's
own WebSocket implementation and the ASGI app, as usual. One port serves everything, so a tunnel or a proxy needs no
second route; only the audio skips the ASGI layer and the ``websockets`` framing under it, which together
were most of what a relay cost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from picows import (
    WSAutoPingStrategy,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in picows' stubs
from uvicorn.config import Config
from uvicorn.server import ServerState

from callbridge.transport.websocket_io import READ_BUFFER_BYTES, MessageListener

HANDSHAKE_TIMEOUT_S = 5.0


class StreamHandler(Protocol):
    """Who takes a media stream's frames once it is accepted (a :class:`~callbridge.bridge.CallBridge`)."""

    def twilio_message(self, payload: bytes | memoryview, binary: bool) -> None: ...

    def twilio_closed(self) -> None: ...


@dataclass(frozen=True, slots=True)
class MediaStreamEndpoint:
    """What the application decides about media streams (built by :func:`callbridge.api.app.create_app`)."""

    path: str
    admit: Callable[[WSUpgradeRequest, str | None], str | None]
    """Checks an upgrade request (and the client's address): ``None`` admits it, a string refuses it with 403."""
    open_call: Callable[[MessageListener], StreamHandler]
    """Starts the call of an accepted stream; the stream's frames then go to the bridge it returns."""
    max_message_bytes: int
    """The call counts and drops messages over this size unparsed; over four times it, the stream is closed."""

    @property
    def ceiling_bytes(self) -> int:
        """Messages up to this size reach the call; a larger one closes the stream (1009)."""
        return 4 * self.max_message_bytes


class TwilioStream(MessageListener):
    """One media stream: its messages go to the call's bridge, in the read callback."""

    def __init__(self, endpoint: MediaStreamEndpoint) -> None:
        super().__init__(endpoint.ceiling_bytes)
        self._endpoint = endpoint
        self._bridge: StreamHandler | None = None

    def on_ws_connected(self, transport: Any) -> None:
        super().on_ws_connected(transport)
        self._bridge = self._endpoint.open_call(self)

    def on_message(self, payload: bytes | memoryview, binary: bool) -> None:
        if self._bridge is not None:
            self._bridge.twilio_message(payload, binary)

    def on_close(self) -> None:
        if self._bridge is not None:
            self._bridge.twilio_closed()


class WebSocketRouter(asyncio.Protocol):
    """uvicorn's WebSocket protocol class: the media stream's path to picows, every other path to uvicorn's own.

    uvicorn creates it on an upgrade request, feeds it the request (rebuilt from what uvicorn parsed) and makes it
    the connection's protocol. The router picks the protocol that serves the connection, passes the request on,
    and then steps out of the way (:meth:`asyncio.Transport.set_protocol`); until it has, it forwards.
    """

    def __init__(
        self, config: Config, server_state: ServerState, app_state: dict[str, Any], *, endpoint: MediaStreamEndpoint
    ) -> None:
        self._uvicorn = functools.partial(
            _uvicorn_websocket_class(config), config=config, server_state=server_state, app_state=app_state
        )
        self._endpoint = endpoint
        self._transport: asyncio.Transport | None = None
        self._target: asyncio.BaseProtocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports implement it, unregistered

    def data_received(self, data: bytes) -> None:
        if self._target is None:
            assert self._transport is not None
            self._target = self._pick(data)
            self._target.connection_made(self._transport)
            # uvicorn makes this router the connection's protocol once this call returns; the target takes over
            # right after that.
            asyncio.get_running_loop().call_soon(self._hand_over)
        _feed(self._target, data)

    def _pick(self, request: bytes) -> asyncio.BaseProtocol:
        target = request.split(b" ", 2)[1].split(b"?", 1)[0] if request.count(b" ") >= 2 else b""
        if target.decode("latin-1") != self._endpoint.path:
            protocol: asyncio.BaseProtocol = self._uvicorn()
            return protocol
        peer = self._transport.get_extra_info("peername") if self._transport is not None else None
        client = str(peer[0]) if isinstance(peer, tuple) and peer else None
        endpoint = self._endpoint

        def listener(request: WSUpgradeRequest) -> Any:
            refusal = endpoint.admit(request, client)
            if refusal is not None:
                response = WSUpgradeResponse.create_error_response(403, refusal.encode())
                return WSUpgradeResponseWithListener(response, None)
            return TwilioStream(endpoint)

        return _picows_server_protocol(listener, endpoint.ceiling_bytes)

    def _hand_over(self) -> None:
        if self._transport is not None and self._target is not None and not self._transport.is_closing():
            self._transport.set_protocol(self._target)

    def eof_received(self) -> bool | None:
        eof_received = getattr(self._target, "eof_received", None)
        return eof_received() if eof_received is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._target is not None:
            self._target.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._target is not None:
            self._target.pause_writing()

    def resume_writing(self) -> None:
        if self._target is not None:
            self._target.resume_writing()


def websocket_router(endpoint: MediaStreamEndpoint) -> Callable[..., WebSocketRouter]:
    """The ``ws`` of a ``uvicorn.Config`` that serves ``endpoint`` with picows."""
    return functools.partial(WebSocketRouter, endpoint=endpoint)


def _uvicorn_websocket_class(config: Config) -> Callable[..., asyncio.BaseProtocol]:
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    assert AutoWebSocketsProtocol is not None, "uvicorn finds no WebSocket library (websockets is a dependency)"
    return AutoWebSocketsProtocol


def _picows_server_protocol(
    listener: Callable[[WSUpgradeRequest], Any], max_frame_size: int
) -> asyncio.BufferedProtocol:
    """picows' server-side protocol for one accepted connection, as ``picows.ws_create_server`` builds it (that
    function binds a listening socket of its own, which uvicorn already has)."""
    protocol: asyncio.BufferedProtocol = WSProtocol(
        None,  # host and port: client side only
        None,  # path: client side only
        False,  # is_client_side
        listener,
        logging.getLogger("picows.server"),
        True,  # disconnect_on_exception
        HANDSHAKE_TIMEOUT_S,
        False,  # enable_auto_ping: Twilio sends audio every 20 ms; a dead peer is seen by its silence and TCP
        20.0,
        20.0,
        WSAutoPingStrategy.PING_WHEN_IDLE,
        True,  # enable_auto_pong
        max_frame_size,
        None,  # extra headers
        READ_BUFFER_BYTES,
    )
    return protocol


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
    else:
        assert isinstance(protocol, asyncio.Protocol)
        protocol.data_received(data)
