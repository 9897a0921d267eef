"""The same bare pass-through as ``bare_relay.py``, on picows (a compiled WebSocket stack), for ``relay.py``.

    .venv/bin/python benchmarks/bare_relay_picows.py --port 8090 --realtime-url ws://127.0.0.1:9001

It shows how much of a relay's cost is the WebSocket stack: the relay logic is identical (parse each message,
pass the base64 audio through in a new JSON message), only the sockets differ.
"""

from __future__ import annotations

import asyncio

import orjson
from bare_relay import run_relay
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect, ws_create_server

SESSION_UPDATE = orjson.dumps({"type": "session.update", "session": {"type": "realtime"}})


class ModelSide(WSListener):
    """The Realtime connection of one call: each audio delta goes to the caller as a Twilio ``media`` message."""

    def __init__(self, twilio: WSTransport, stream_sid: str) -> None:
        self.twilio = twilio
        self.stream_sid = stream_sid

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        event = orjson.loads(frame.get_payload_as_bytes())
        if event.get("type") == "response.output_audio.delta":
            media = {"event": "media", "streamSid": self.stream_sid, "media": {"payload": event["delta"]}}
            self.twilio.send(WSMsgType.TEXT, orjson.dumps(media))


class TwilioSide(WSListener):
    """One call's media stream: each caller frame goes to the model as ``input_audio_buffer.append``."""

    def __init__(self, realtime_url: str) -> None:
        self.realtime_url = realtime_url
        self.transport: WSTransport | None = None
        self.model: WSTransport | None = None
        self.opening: asyncio.Task[None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        message = orjson.loads(frame.get_payload_as_bytes())
        kind = message.get("event")
        if kind == "media" and self.model is not None:
            append = {"type": "input_audio_buffer.append", "audio": message["media"]["payload"]}
            self.model.send(WSMsgType.TEXT, orjson.dumps(append))
        elif kind == "start" and self.opening is None:
            self.opening = asyncio.get_running_loop().create_task(self.open(transport, message["start"]["streamSid"]))
        elif kind == "stop":
            transport.disconnect()

    async def open(self, twilio: WSTransport, stream_sid: str) -> None:
        model, _ = await ws_connect(lambda: ModelSide(twilio, stream_sid), self.realtime_url, max_frame_size=2**24)
        model.send(WSMsgType.TEXT, SESSION_UPDATE)
        self.model = model

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.model is not None:
            self.model.disconnect()


async def main(port: int, realtime_url: str) -> None:
    server = await ws_create_server(lambda request: TwilioSide(realtime_url), "127.0.0.1", port)
    print(f"listening {port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    run_relay(main, __doc__.splitlines()[0] if __doc__ else None)
