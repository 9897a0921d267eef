"""Both of a call's WebSockets on picows, a compiled WebSocket stack driven by callbacks.

A phone call is two streams of small messages, 50 a second each way. With picows each frame reaches the bridge in
the read callback itself: no task wakes up, nothing is queued, and a send is one buffered write. Measured with
``benchmarks/relay.py``, a bare relay on picows costs a third of the same relay on ``websockets``, and moving
callbridge's audio path to it halved the bridge's CPU per call.

:class:`MessageListener` adds what picows leaves to its user: messages made of several frames are joined (up to a
size limit), pings are answered (picows' auto-pong), and a close frame is answered and ends the connection.
"""

from __future__ import annotations

import asyncio

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

ABNORMAL_CLOSURE = 1006
"""The close code of a connection that ended without a close frame (RFC 6455 §7.1.5)."""
MAX_BACKLOG_BYTES = 1024 * 1024
"""What a connection may queue for a peer that has stopped reading before it is dropped: over a minute of a call's
audio (a stalled peer would otherwise hold its call's memory growing until the call ends)."""
CLOSE_TIMEOUT_S = 2.0
"""How long a peer has to answer our close frame before the connection is dropped."""
READ_BUFFER_BYTES = 4096
"""Each connection's read buffer to start with (picows grows it when a message needs more): most messages are under
1 KiB, and picows' default of 16 KiB per connection was a sixth of a call's memory."""
NO_STATUS_RECEIVED = 1005
"""The close code of a close frame that carried none (RFC 6455 §7.1.5); it is never sent, so 1000 answers it."""


class MessageListener(WSListener):
    """A picows listener that hands whole messages to :meth:`on_message` and the close to :meth:`on_close`."""

    def __init__(self, max_message_bytes: int, max_backlog_bytes: int = MAX_BACKLOG_BYTES) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self._max_backlog_bytes = max_backlog_bytes
        self._backlog: int | None = None  # bytes sent since the peer stopped reading (None: it reads)
        self.close_code: int | None = None
        self.close_reason = ""
        self._max_message_bytes = max_message_bytes
        self._parts: list[bytes] = []
        self._parts_binary = False
        self._parts_size = 0

    # ---------------------------------------------------------------------------------------------- for subclasses

    def on_message(self, payload: bytes | memoryview, binary: bool) -> None:
        """One whole message (a memoryview is valid only during the call)."""

    def on_close(self) -> None:
        """The connection is gone: ``close_code`` is the peer's close frame's (or the echo of ours), else 1006."""

    # ---------------------------------------------------------------------------------------------- sending

    def send_text(self, text: str | bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_close_frame_sent or transport.is_disconnected:
            return
        if self._backlog is not None:
            self._backlog += len(text)
            if self._backlog > self._max_backlog_bytes:  # a peer that no longer reads is dropped, not buffered for
                transport.disconnect(graceful=False)
                return
        transport.send(WSMsgType.TEXT, text.encode() if isinstance(text, str) else text)

    def pause_writing(self) -> None:
        """The socket's send buffer is full: the peer is not reading (picows calls this)."""
        self._backlog = 0

    def resume_writing(self) -> None:
        self._backlog = None

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame; the connection ends when the peer answers it, or after ``CLOSE_TIMEOUT_S``.

        Waiting for the answer is the closing handshake: a socket closed while the peer is still sending resets
        the connection, and the peer may then never read our close frame (nor its code). A peer that has stopped
        reading is dropped at once: it would never read it anyway.
        """
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        if self._backlog is not None:
            transport.disconnect(graceful=False)
            return
        if not transport.is_close_frame_sent:
            transport.send_close(WSCloseCode(code), reason.encode()[:120])
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, transport.disconnect)

    # ---------------------------------------------------------------------------------------------- picows

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if transport.is_close_frame_sent and kind is not WSMsgType.CLOSE:
            return  # closing: only the peer's answer matters now
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            if frame.fin and not self._parts:
                self.on_message(frame.get_payload_as_memoryview(), kind is WSMsgType.BINARY)
                return
            self._parts.clear()
            self._parts_size = 0
            self._parts_binary = kind is WSMsgType.BINARY
            self._add_part(transport, frame)
        elif kind is WSMsgType.CONTINUATION:
            self._add_part(transport, frame)
        elif kind is WSMsgType.CLOSE:
            code = frame.get_close_code()
            if code is WSCloseCode.NO_INFO:  # a close frame without a status (picows says 0)
                self.close_code, code = NO_STATUS_RECEIVED, WSCloseCode.OK
            else:
                self.close_code = code.value
            self.close_reason = frame.get_close_reason() or ""
            if not transport.is_close_frame_sent:
                transport.send_close(code)
            transport.disconnect(graceful=True)

    def _add_part(self, transport: WSTransport, frame: WSFrame) -> None:
        if not self._parts and frame.msg_type is WSMsgType.CONTINUATION:
            self.close(WSCloseCode.PROTOCOL_ERROR.value, "continuation frame without a message")
            return
        self._parts_size += frame.payload_size
        if self._parts_size > self._max_message_bytes:
            self._parts.clear()
            self.close(WSCloseCode.MESSAGE_TOO_BIG.value, "message too big")
            return
        self._parts.append(frame.get_payload_as_bytes())
        if frame.fin:
            message = b"".join(self._parts)
            self._parts.clear()
            self.on_message(message, self._parts_binary)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.close_code is None:
            self.close_code = ABNORMAL_CLOSURE
        self.on_close()
