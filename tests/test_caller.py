"""The simulated caller against a tiny fake bridge served by uvicorn on a free local port."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from twilio.request_validator import RequestValidator

from callbridge.telephony.g711 import read_wav_as_ulaw, rms, silence, tone, write_wav
from callbridge.testing.caller import (
    CallRecording,
    CallRefused,
    CallScript,
    Dtmf,
    HangUp,
    Pause,
    Say,
    SayWhenHearing,
    SimulatedCaller,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

AUTH_TOKEN = "test-auth-token"
VALIDATOR = RequestValidator(AUTH_TOKEN)
STREAM_URL = "wss://example.test/twilio/media-stream"
TWIML = (
    f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{STREAM_URL}">'
    '<Parameter name="cb" value="tok"/></Stream></Connect></Response>'
)
AGENT_CHUNK = tone(100, 300)  # the agent answers with 10 chunks of 100 ms, each followed by a mark
AGENT_AUDIO = AGENT_CHUNK * 10
MARKS = [f"m{i}" for i in range(10)]


@dataclass
class FakeBridge:
    """Checks signatures and records what the caller sent; subclasses play the agent."""

    twiml: str = TWIML
    public_url: str | None = None
    reject_socket: bool = False
    voice_params: dict[str, str] = field(default_factory=dict)
    voice_signature_ok: bool | None = None
    socket_signature_ok: bool | None = None
    connected: dict[str, Any] = field(default_factory=dict)
    start: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    last_media_ms = -1
    mark_echoes: list[tuple[str, int]] = field(default_factory=list)  # with the caller's media time then
    closed = False

    async def voice(self, request: Request) -> Response:
        self.voice_params = {key: str(value) for key, value in (await request.form()).items()}
        url = f"{self.public_url or str(request.base_url).rstrip('/')}/twilio/voice"
        signature = request.headers.get("X-Twilio-Signature", "")
        self.voice_signature_ok = VALIDATOR.validate(url, self.voice_params, signature)
        if not self.voice_signature_ok:
            return Response("bad signature", status_code=403)
        return Response(self.twiml, media_type="application/xml")

    async def media_stream(self, ws: WebSocket) -> None:
        signature = ws.headers.get("X-Twilio-Signature", "")
        self.socket_signature_ok = VALIDATOR.validate(STREAM_URL, {}, signature)
        if not self.socket_signature_ok or self.reject_socket:
            await ws.close(1008)
            return
        await ws.accept()
        self.connected = await ws.receive_json()
        self.start = await ws.receive_json()
        await self.on_start(ws)
        try:
            while not self.closed:
                message = await ws.receive_json()
                self.messages.append(message)
                if message["event"] == "media":
                    self.last_media_ms = int(message["media"]["timestamp"])
                elif message["event"] == "mark":
                    self.mark_echoes.append((message["mark"]["name"], self.last_media_ms))
                await self.on_message(ws, message)
        except WebSocketDisconnect:
            pass

    async def on_start(self, ws: WebSocket) -> None:
        pass

    async def on_message(self, ws: WebSocket, message: dict[str, Any]) -> None:
        pass

    @property
    def stream_sid(self) -> str:
        return str(self.start["streamSid"])

    def media(self, audio: bytes) -> dict[str, Any]:
        return {"event": "media", "streamSid": self.stream_sid, "media": {"payload": base64.b64encode(audio).decode()}}


class BargeInBridge(FakeBridge):
    """Answers at once with 1 s of audio and marks; clears when the caller speaks after pressing a key."""

    dtmf: str | None = None
    cleared = False

    async def on_start(self, ws: WebSocket) -> None:
        for name in MARKS:
            await ws.send_json(self.media(AGENT_CHUNK))
            await ws.send_json({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    async def on_message(self, ws: WebSocket, message: dict[str, Any]) -> None:
        if message["event"] == "dtmf":
            self.dtmf = message["dtmf"]["digit"]
        elif (
            message["event"] == "media"
            and self.dtmf
            and not self.cleared
            and rms(base64.b64decode(message["media"]["payload"])) > 1000
        ):
            self.cleared = True
            await ws.send_json({"event": "clear", "streamSid": self.stream_sid})


class RudeBridge(FakeBridge):
    """Sends one valid mark among malformed messages, then closes the socket with 1008."""

    async def on_start(self, ws: WebSocket) -> None:
        sid = self.stream_sid
        await ws.send_bytes(b"\xff" * 160)
        await ws.send_text("not json")
        await ws.send_json({"event": "bogus", "streamSid": sid})
        await ws.send_json({"event": "clear", "streamSid": "MZ" + "0" * 32})
        await ws.send_json({"event": "mark", "streamSid": sid, "mark": {}})
        await ws.send_json({"event": "media", "streamSid": sid, "media": {"payload": "//8=", "track": "outbound"}})
        await ws.send_json({"event": "media", "streamSid": sid, "media": {"payload": "not base64!"}})
        await ws.send_json({"event": "mark", "streamSid": sid, "mark": {"name": "ok"}})

    async def on_message(self, ws: WebSocket, message: dict[str, Any]) -> None:
        if self.last_media_ms >= 100:
            self.closed = True
            await ws.close(1008, "go away")


Serve = Callable[[FakeBridge], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts a bridge on a free port and returns its base URL; stops every server afterwards."""
    running: list[tuple[uvicorn.Server, asyncio.Task[None], socket.socket]] = []

    async def start(bridge: FakeBridge) -> str:
        app = Starlette(
            routes=[
                Route("/twilio/voice", bridge.voice, methods=["POST"]),
                WebSocketRoute("/twilio/media-stream", bridge.media_stream),
            ]
        )
        listener = socket.create_server(("127.0.0.1", 0))  # listening already: no need to wait for uvicorn
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        running.append((server, asyncio.create_task(server.serve(sockets=[listener])), listener))
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for server, task, listener in running:
        server.should_exit = True
        await task
        listener.close()


async def test_barge_in_call(serve: Serve) -> None:
    bridge = BargeInBridge()
    caller = SimulatedCaller(await serve(bridge), AUTH_TOKEN)
    first, reply = tone(200, 440), tone(200, 660)
    script = CallScript([Say(first), Dtmf("5"), Pause(100), SayWhenHearing(reply, after_heard_ms=200), HangUp()])
    events: list[tuple[str, dict[str, Any]]] = []
    rec = await caller.place_call(script, max_duration_s=5, on_event=lambda kind, data: events.append((kind, data)))

    # The webhook and the socket were both signed, over the public URLs.
    assert bridge.voice_signature_ok and bridge.socket_signature_ok
    assert bridge.voice_params == {
        "CallSid": rec.call_sid,
        "AccountSid": caller.account_sid,
        "From": "+15550100001",
        "To": "+15550100002",
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }
    assert rec.call_sid.startswith("CA") and len(rec.call_sid) == 34
    assert rec.twiml == TWIML and rec.parameters == {"cb": "tok"}

    # connected, start, then every message numbered in order.
    assert bridge.connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert bridge.start == {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": caller.account_sid,
            "streamSid": rec.stream_sid,
            "callSid": rec.call_sid,
            "tracks": ["inbound"],
            "customParameters": {"cb": "tok"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        "streamSid": rec.stream_sid,
    }
    sequence = [int(m["sequenceNumber"]) for m in bridge.messages]
    assert sequence == list(range(2, len(bridge.messages) + 2))

    # 20 ms frames on the media timeline; together they are exactly what the recording says was sent.
    media = [m for m in bridge.messages if m["event"] == "media"]
    assert [m["media"]["timestamp"] for m in media] == [str(20 * k) for k in range(len(media))]
    assert [m["media"]["chunk"] for m in media] == [str(k + 1) for k in range(len(media))]
    assert {m["media"]["track"] for m in media} == {"inbound"}
    payloads = [base64.b64decode(m["media"]["payload"]) for m in media]
    assert {len(p) for p in payloads} == {160}
    assert b"".join(payloads) == rec.sent_audio

    # The script's audio, silence while waiting, the reply, then stop.
    steps = dict(rec.step_times)
    assert steps["Dtmf"] == 0.2
    triggered = steps["SayWhenHearing:triggered"]
    assert rec.sent_audio[:2400] == first + silence(100)
    assert rec.sent_audio[2400 : round(triggered * 8000)] == silence(round(triggered * 1000) - 300)
    assert rec.sent_audio[round(triggered * 8000) :] == reply
    dtmf_at = next(i for i, m in enumerate(bridge.messages) if m["event"] == "dtmf")
    assert bridge.messages[dtmf_at] == {
        "event": "dtmf",
        "sequenceNumber": str(dtmf_at + 2),
        "streamSid": rec.stream_sid,
        "dtmf": {"track": "inbound_track", "digit": "5"},
    }
    assert [m["media"]["timestamp"] for m in media if bridge.messages.index(m) < dtmf_at][-1] == "180"
    assert bridge.messages[-1] == {
        "event": "stop",
        "sequenceNumber": str(len(bridge.messages) + 1),
        "streamSid": rec.stream_sid,
        "stop": {"accountSid": caller.account_sid, "callSid": rec.call_sid},
    }
    assert (rec.ended_by, rec.close_code) == ("caller", 1000)

    # The reply waited for 200 ms of agent audio heard since its step began, and no longer.
    began = steps["SayWhenHearing"]
    heard_while_waiting = [n for at, n in rec.heard_timeline if began <= at < triggered]
    assert sum(heard_while_waiting) >= 1600 > sum(heard_while_waiting[:-1])

    # Marks came back only once their audio had played (by the caller's own media clock) ...
    assert rec.marks_played and rec.marks_flushed
    assert rec.marks_played + rec.marks_flushed == MARKS
    assert [name for name, _ in bridge.mark_echoes] == MARKS
    for index, name in enumerate(rec.marks_played):
        played_at = dict(bridge.mark_echoes)[name]
        assert played_at >= 100 * (index + 1), name  # playback starts at the earliest with frame 1
    # ... and the clear flushed the rest and dropped the unplayed audio.
    [clear] = rec.clears
    assert rec.received_audio_bytes == len(AGENT_AUDIO)
    assert clear.heard_bytes_at_clear == len(rec.heard_audio)
    assert clear.discarded_bytes == len(AGENT_AUDIO) - len(rec.heard_audio) > 0
    assert rec.heard_audio == AGENT_AUDIO[: len(rec.heard_audio)]
    assert clear.at_s >= triggered
    assert rec.protocol_errors == []

    # Both channels line up on the call timeline.
    caller_channel, agent_channel = rec.stereo_channels()
    assert caller_channel == rec.sent_audio and len(agent_channel) == len(caller_channel)
    start_s, count = rec.heard_timeline[0]
    offset = round(start_s * 1000) * 8
    assert agent_channel[:offset] == silence(round(start_s * 1000))
    assert agent_channel[offset : offset + count] == rec.heard_audio[:count]

    assert events[0] == ("sent", bridge.connected)
    assert ("received", {"event": "clear", "streamSid": rec.stream_sid}) in events
    assert [data["step"] for kind, data in events if kind == "step"] == [name for name, _ in rec.step_times]
    assert not any(kind == "sent" and data["event"] == "media" for kind, data in events)


async def test_protocol_errors_and_server_close(serve: Serve) -> None:
    bridge = RudeBridge()
    rec = await SimulatedCaller(await serve(bridge), AUTH_TOKEN).place_call(CallScript([Pause(2000)]))
    assert [error[:5] for error in rec.protocol_errors] == ["31950"] + ["31951"] * 6
    assert rec.marks_played == ["ok"] and rec.received_audio_bytes == 0
    assert (rec.ended_by, rec.close_code, rec.close_reason) == ("server", 1008, "go away")
    assert len(rec.sent_audio) < len(silence(2000))  # it stopped streaming at the close, well before its 2 s script
    assert all(m["event"] != "stop" for m in bridge.messages)


async def test_hang_up_after_script_and_max_duration(serve: Serve) -> None:
    bridge = FakeBridge()
    caller = SimulatedCaller(await serve(bridge), AUTH_TOKEN)
    rec = await caller.place_call(CallScript([Say(tone(30))]), hang_up_after_s=0.1)
    assert rec.ended_by == "caller"
    assert rec.sent_audio == tone(30) + silence(10) + silence(100)  # padded frame, then 5 silent frames
    assert bridge.messages[-1]["event"] == "stop"

    bridge = FakeBridge()
    caller = SimulatedCaller(await serve(bridge), AUTH_TOKEN)
    rec = await caller.place_call(CallScript([Pause(10_000)]), max_duration_s=0.3)
    # A 20 ms frame is sent only when due before the deadline, and the first is due after dialling: at most 300 ms.
    assert rec.ended_by == "timeout" and len(rec.sent_audio) <= len(silence(300))
    assert bridge.messages[-1]["event"] == "stop"


@pytest.mark.parametrize(
    ("bridge", "public_url", "status"),
    [
        (FakeBridge(), "https://elsewhere.example", 403),  # signed over the wrong URL
        (FakeBridge(twiml="<Response><Say>Closed</Say><Hangup/></Response>"), None, 200),
        (FakeBridge(twiml="Sorry"), None, 200),
        (FakeBridge(reject_socket=True), None, 403),
    ],
)
async def test_refused_calls(serve: Serve, bridge: FakeBridge, public_url: str | None, status: int) -> None:
    caller = SimulatedCaller(await serve(bridge), AUTH_TOKEN, public_url=public_url)
    with pytest.raises(CallRefused) as refused:
        await caller.place_call(CallScript(), max_duration_s=5)
    assert refused.value.status_code == status


async def test_public_url_is_what_gets_signed(serve: Serve) -> None:
    bridge = FakeBridge(public_url="https://bridge.example")
    caller = SimulatedCaller(await serve(bridge), AUTH_TOKEN, public_url="https://bridge.example/")
    rec = await caller.place_call(CallScript([HangUp()]))
    assert bridge.voice_signature_ok and bridge.socket_signature_ok
    assert rec.sent_audio == b"" and bridge.messages[-1]["event"] == "stop"


def test_script_from_wav(tmp_path: Path) -> None:
    path = tmp_path / "caller.wav"
    write_wav(path, [tone(100)])
    script = CallScript.from_wav(path, lead_in_ms=40, tail_ms=60)
    assert script.steps == [Pause(40), Say(read_wav_as_ulaw(path)), Pause(60)]
    assert CallScript.from_wav(path, lead_in_ms=0, tail_ms=0).steps == [Say(read_wav_as_ulaw(path))]
    with pytest.raises(ValueError):
        Dtmf("x")


def test_stereo_channels_pad_agent_audio() -> None:
    rec = CallRecording("CA", "MZ", "", {}, sent_audio=bytearray(silence(60)))
    rec.heard_audio += b"\x01" * 160 + b"\x02" * 80
    rec.heard_timeline += [(0.02, 160), (0.04, 80)]
    caller_channel, agent_channel = rec.stereo_channels()
    assert agent_channel == silence(20) + b"\x01" * 160 + b"\x02" * 80 + silence(10)
    assert caller_channel == silence(60)
