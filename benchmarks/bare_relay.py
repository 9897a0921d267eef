"""The floor a Twilio ⇄ Realtime bridge cannot go below: a bare pass-through, for ``benchmarks/relay.py``.

    .venv/bin/python benchmarks/bare_relay.py --port 8090 --realtime-url ws://127.0.0.1:9001

It accepts Twilio Media Streams WebSockets (no signature, no webhook, no admission), opens one WebSocket to the
Realtime server per call (sending one minimal ``session.update``), relays each Twilio ``media`` payload as
``input_audio_buffer.append`` and each ``response.output_audio.delta`` as a Twilio ``media`` message, and does
nothing else: no marks, no state, no records. It prints ``listening <port>`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

SESSION_UPDATE = orjson.dumps({"type": "session.update", "session": {"type": "realtime"}})


async def model_to_twilio(model: ClientConnection, twilio: ServerConnection, stream_sid: str) -> None:
    async for raw in model:
        event = orjson.loads(raw)
        if event.get("type") == "response.output_audio.delta":
            media = {"event": "media", "streamSid": stream_sid, "media": {"payload": event["delta"]}}
            await twilio.send(orjson.dumps(media), text=True)


async def relay(twilio: ServerConnection, realtime_url: str) -> None:
    model: ClientConnection | None = None
    downlink: asyncio.Task[None] | None = None
    try:
        async for raw in twilio:
            message = orjson.loads(raw)
            event = message.get("event")
            if event == "media" and model is not None:
                append = {"type": "input_audio_buffer.append", "audio": message["media"]["payload"]}
                await model.send(orjson.dumps(append), text=True)
            elif event == "start" and model is None:
                model = await connect(realtime_url, compression=None, max_size=2**24)
                await model.send(SESSION_UPDATE, text=True)
                downlink = asyncio.create_task(model_to_twilio(model, twilio, message["start"]["streamSid"]))
            elif event == "stop":
                break
    except ConnectionClosed:
        pass
    finally:
        if downlink is not None:
            downlink.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await downlink
        if model is not None:
            await model.close()


async def main(port: int, realtime_url: str) -> None:
    async with serve(lambda ws: relay(ws, realtime_url), "127.0.0.1", port, compression=None) as server:
        print(f"listening {port}", flush=True)
        await server.serve_forever()


def run_relay(relay_main: Callable[[int, str], Coroutine[Any, Any, None]], description: str | None) -> None:
    """The command line of a bare relay: ``--port``, ``--realtime-url``, ``--uvloop`` (on by default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--realtime-url", required=True)
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    arguments = parser.parse_args()
    runner: asyncio.Runner
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop if arguments.uvloop else None)
    except ImportError:
        runner = asyncio.Runner()
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(relay_main(arguments.port, arguments.realtime_url))


if __name__ == "__main__":
    run_relay(main, __doc__.splitlines()[0] if __doc__ else None)
