"""The picows listener both of a call's WebSockets use: messages joined from frames, sizes capped, closes answered."""

from __future__ import annotations

from typing import Any

import pytest
from picows import WSCloseCode, WSMsgType
from picows.picows import _make_test_ws_frame

from callbridge.transport import websocket_io
from callbridge.transport.websocket_io import MessageListener
from support import wait_until


class Transport:
    """What the listener uses of picows' WSTransport, recording what it is asked to do."""

    def __init__(self) -> None:
        self.sent: list[tuple[WSMsgType, bytes]] = []
        self.closes: list[tuple[WSCloseCode, bytes | None]] = []
        self.is_close_frame_sent = False
        self.is_disconnected = False
        self.graceful: bool | None = None

    def send(self, kind: WSMsgType, payload: bytes) -> None:
        self.sent.append((kind, bytes(payload)))

    def send_close(self, code: WSCloseCode = WSCloseCode.NO_INFO, message: bytes | None = None) -> None:
        self.closes.append((code, message))
        self.is_close_frame_sent = True

    def disconnect(self, graceful: bool = True) -> None:
        self.is_disconnected = True
        self.graceful = graceful


class Recorder(MessageListener):
    def __init__(self, max_message_bytes: int = 100, max_backlog_bytes: int = 1000) -> None:
        super().__init__(max_message_bytes, max_backlog_bytes)
        self.messages: list[tuple[bytes, bool]] = []
        self.closed = False

    def on_message(self, payload: bytes | memoryview, binary: bool) -> None:
        self.messages.append((bytes(payload), binary))

    def on_close(self) -> None:
        self.closed = True


def connected(listener: Recorder) -> Any:
    transport: Any = Transport()  # duck-typed for picows' WSTransport
    listener.on_ws_connected(transport)
    return transport


def frame(kind: WSMsgType, payload: bytes, fin: bool = True) -> Any:
    return _make_test_ws_frame(kind, payload, fin, False)


def test_whole_and_fragmented_messages_arrive_whole() -> None:
    listener = Recorder()
    transport = connected(listener)
    listener.on_ws_frame(transport, frame(WSMsgType.TEXT, b'{"event":"stop"}'))
    listener.on_ws_frame(transport, frame(WSMsgType.TEXT, b'{"event":', fin=False))
    listener.on_ws_frame(transport, frame(WSMsgType.CONTINUATION, b'"media"', fin=False))
    listener.on_ws_frame(transport, frame(WSMsgType.CONTINUATION, b"}"))
    listener.on_ws_frame(transport, frame(WSMsgType.BINARY, b"\x00\x01"))
    assert listener.messages == [(b'{"event":"stop"}', False), (b'{"event":"media"}', False), (b"\x00\x01", True)]
    assert not transport.closes


async def test_a_message_over_the_limit_closes_the_connection_with_1009() -> None:
    listener = Recorder(max_message_bytes=10)
    transport = connected(listener)
    listener.on_ws_frame(transport, frame(WSMsgType.TEXT, b"x" * 6, fin=False))
    listener.on_ws_frame(transport, frame(WSMsgType.CONTINUATION, b"x" * 6, fin=False))
    listener.on_ws_frame(transport, frame(WSMsgType.CONTINUATION, b"x" * 6))  # what was in flight is ignored
    assert listener.messages == []
    assert [code for code, _ in transport.closes] == [WSCloseCode.MESSAGE_TOO_BIG]
    assert not transport.is_disconnected  # the closing handshake: the peer reads our code, then answers
    listener.on_ws_frame(transport, frame(WSMsgType.CLOSE, (1009).to_bytes(2, "big")))
    assert transport.is_disconnected and len(transport.closes) == 1


async def test_a_continuation_without_a_message_is_a_protocol_error() -> None:
    listener = Recorder()
    transport = connected(listener)
    listener.on_ws_frame(transport, frame(WSMsgType.CONTINUATION, b"x"))
    assert [code for code, _ in transport.closes] == [WSCloseCode.PROTOCOL_ERROR]


def test_a_close_is_answered_with_its_code_and_one_without_a_code_with_1000() -> None:
    listener = Recorder()
    transport = connected(listener)
    listener.on_ws_frame(transport, frame(WSMsgType.CLOSE, (1001).to_bytes(2, "big") + b"bye"))
    listener.on_ws_disconnected(transport)
    assert (listener.close_code, listener.close_reason, listener.closed) == (1001, "bye", True)
    assert [code for code, _ in transport.closes] == [WSCloseCode.GOING_AWAY] and transport.is_disconnected

    silent = Recorder()
    transport = connected(silent)
    silent.on_ws_frame(transport, frame(WSMsgType.CLOSE, b""))
    assert silent.close_code == 1005  # "no status received": never sent on the wire
    assert [code for code, _ in transport.closes] == [WSCloseCode.OK]


async def test_a_dropped_connection_reports_1006_and_a_peer_that_never_answers_our_close_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dropped = Recorder()
    dropped.on_ws_disconnected(connected(dropped))
    assert dropped.close_code == 1006 and dropped.closed

    monkeypatch.setattr(websocket_io, "CLOSE_TIMEOUT_S", 0.01)
    listener = Recorder()
    transport = connected(listener)
    listener.close(4000, "an application's own code")
    assert [(code.value, message) for code, message in transport.closes] == [(4000, b"an application's own code")]
    assert not transport.is_disconnected
    # Dropped once CLOSE_TIMEOUT_S (10 ms here) has passed without an answer; polled, with a deadline far past it.
    await wait_until(lambda: transport.is_disconnected, 5, what="the peer that never answered our close dropped")


async def test_a_peer_that_stops_reading_is_dropped_once_its_backlog_passes_the_limit() -> None:
    listener = Recorder(max_backlog_bytes=1000)
    transport = connected(listener)
    listener.pause_writing()  # picows: the send buffer is full
    for _ in range(10):
        listener.send_text(b"x" * 100)
    assert not transport.is_disconnected  # 1000 bytes queued: still within the limit
    listener.resume_writing()  # it read again: the count starts over next time
    listener.pause_writing()
    for _ in range(11):
        listener.send_text(b"x" * 100)
    assert transport.is_disconnected and transport.graceful is False
    assert len(transport.sent) == 20

    stalled = Recorder()
    transport = connected(stalled)
    stalled.pause_writing()
    stalled.close(1000, "bye")  # a close frame would wait behind what the peer never reads
    assert transport.is_disconnected and transport.graceful is False
