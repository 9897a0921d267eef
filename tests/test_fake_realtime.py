"""The fake Realtime server over real sockets, and the conformance validators it relies on."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import math
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from callbridge.telephony.g711 import silence, tone, ulaw_to_pcm16
from callbridge.testing.conformance import (
    ConformanceError,
    Dialect,
    validate_client_event,
    validate_server_event,
    validate_twilio_message,
)
from callbridge.testing.fake_realtime import FakeBehavior, FakeRealtimeServer

Event = dict[str, Any]

GA_SESSION: Event = {
    "type": "session.update",
    "session": {
        "type": "realtime",
        "model": "gpt-realtime",
        "output_modalities": ["audio"],
        "instructions": "x",
        "audio": {
            "input": {
                "format": {"type": "audio/pcmu"},
                "turn_detection": {"type": "server_vad"},
                "transcription": {"model": "gpt-4o-mini-transcribe"},
            },
            "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"},
        },
        "tools": [],
        "tool_choice": "auto",
    },
}
BETA_SESSION: Event = {
    "type": "session.update",
    "session": {
        "modalities": ["text", "audio"],
        "input_audio_format": "g711_ulaw",
        "output_audio_format": "g711_ulaw",
        "voice": "alloy",
        "turn_detection": {"type": "server_vad"},
        "input_audio_transcription": {"model": "whisper-1"},
        "instructions": "x",
        "temperature": 0.8,
    },
}
MANUAL_TURNS: Event = {
    "type": "session.update",
    "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
}
RESPONSE_EVENTS = [
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
]
# One caller turn: 500 ms of quiet, 300 ms of "speech", then enough quiet for server_vad's 500 ms.
TURN = silence(500) + tone(300) + silence(600)


class Client:
    """A Realtime client over a real socket; every event it receives must validate for its dialect."""

    def __init__(self, ws: ClientConnection, dialect: Dialect) -> None:
        self.ws = ws
        self.dialect = dialect

    async def send(self, event: Event | str | bytes) -> None:
        await self.ws.send(event if isinstance(event, str | bytes) else json.dumps(event))

    async def append(self, audio: bytes, chunk_ms: int = 100) -> None:
        step = chunk_ms * 8
        for start in range(0, len(audio), step):
            chunk = base64.b64encode(audio[start : start + step]).decode()
            await self.send({"type": "input_audio_buffer.append", "audio": chunk})

    async def recv(self, within: float = 5.0) -> Event:
        async with asyncio.timeout(within):
            event: Event = json.loads(await self.ws.recv())
        validate_server_event(event, self.dialect)
        return event

    async def until(self, event_type: str) -> list[Event]:
        """Events up to and including the next one of ``event_type``."""
        events = [await self.recv()]
        while events[-1]["type"] != event_type:
            events.append(await self.recv())
        return events

    async def error(self) -> Event:
        return (await self.until("error"))[-1]["error"]  # type: ignore[no-any-return]

    async def quiet(self, seconds: float = 0.1) -> None:
        """Assert that nothing arrives for a while."""
        with pytest.raises(TimeoutError):
            await self.recv(within=seconds)


@contextlib.asynccontextmanager
async def session(
    server: FakeRealtimeServer, update: Event | None = GA_SESSION, *, beta: bool = False
) -> AsyncIterator[Client]:
    """Connect, check the opening events, and apply ``update``."""
    headers = {"Authorization": "Bearer sk-test"} | ({"OpenAI-Beta": "realtime=v1"} if beta else {})
    model = "gpt-4o-realtime-preview" if beta else "gpt-realtime"
    async with connect(f"{server.url}?model={model}", additional_headers=headers) as ws:
        client = Client(ws, "beta" if beta else "ga")
        assert (await client.recv())["type"] == "session.created"
        if beta:
            assert (await client.recv())["type"] == "conversation.created"
        if update is not None:
            await client.send(update)
            assert (await client.recv())["type"] == "session.updated"
        yield client


def types(events: list[Event]) -> list[str]:
    return [event["type"] for event in events]


def audio_of(events: list[Event], delta_type: str = "response.output_audio.delta") -> bytes:
    return b"".join(base64.b64decode(event["delta"]) for event in events if event["type"] == delta_type)


def fast(**overrides: Any) -> FakeBehavior:
    return replace(FakeBehavior(speed=0.0, transcripts=["I need a plumber."]), **overrides)


# --- happy paths ------------------------------------------------------------------------------------------


async def test_ga_turn_and_response() -> None:
    async with FakeRealtimeServer(fast()) as server, session(server, update=None) as client:
        await client.quiet()  # GA sends nothing after session.created until spoken to
        await client.send(GA_SESSION)
        updated = (await client.recv())["session"]
        assert updated["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert updated["audio"]["output"]["voice"] == "marin"
        assert updated["audio"]["input"]["turn_detection"] == {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 500,
            "create_response": True,
            "interrupt_response": True,
        }

        await client.append(TURN)
        events = await client.until("response.done")

    reply = "You said: I need a plumber. Is there anything else I can help you with today?"
    assert types(events[:10]) == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.input_audio_transcription.completed",
        *RESPONSE_EVENTS,
    ]
    assert types(events[-6:]) == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    started, stopped, committed, added = events[:4]
    assert started["audio_start_ms"] == 200  # speech at 500 ms minus 300 ms of prefix padding
    assert stopped["audio_end_ms"] == 1300  # speech ended at 800 ms, plus 500 ms of silence
    assert started["item_id"] == stopped["item_id"] == committed["item_id"] == added["item"]["id"]
    assert added["item"]["role"] == "user"
    assert events[5]["transcript"] == "I need a plumber."
    assert len(audio_of(events)) == len(reply) * 60 * 8
    transcript = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    assert transcript == reply == events[-5]["transcript"]
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": reply}]

    record = server.sessions[0]
    assert (record.dialect, record.model) == ("ga", "gpt-realtime")
    assert record.headers["Authorization"] == "Bearer sk-test"
    assert record.audio == TURN
    assert record.errors == []
    assert len(record.client_events) == 1 + len(TURN) // 800
    await asyncio.wait_for(record.closed.wait(), 1)


async def test_beta_turn_and_response() -> None:
    async with FakeRealtimeServer(fast()) as server, session(server, BETA_SESSION, beta=True) as client:
        await client.append(TURN)
        events = await client.until("response.done")

    assert "conversation.item.added" not in types(events)
    assert types(events).count("conversation.item.created") == 2  # the caller's item and the agent's
    assert "conversation.item.input_audio_transcription.completed" in types(events)
    assert audio_of(events, "response.audio.delta")
    assert [e["type"] for e in events if "transcript" in e["type"]][-1] == "response.audio_transcript.done"
    assert events[-1]["response"]["output"][0]["content"][0]["type"] == "audio"
    assert server.sessions[0].dialect == "beta"


async def test_greeting_and_exact_instructions() -> None:
    async with FakeRealtimeServer(fast(ms_per_char=10)) as server, session(server) as client:
        await client.send({"type": "response.create"})
        greeting = (await client.until("response.done"))[-1]["response"]["output"][0]["content"][0]["transcript"]
        assert greeting == server.behavior.greeting
        instructions = "Greet the caller by saying exactly: 'Welcome to Acme.'"
        await client.send({"type": "response.create", "response": {"instructions": instructions}})
        events = await client.until("response.output_audio_transcript.done")
        assert events[-1]["transcript"] == "Welcome to Acme."


async def test_manual_commit_then_response() -> None:
    async with FakeRealtimeServer(fast()) as server, session(server) as client:
        await client.send(MANUAL_TURNS)
        assert (await client.recv())["session"]["audio"]["input"]["turn_detection"] is None
        await client.append(TURN)
        await client.quiet()  # no VAD: nothing happens on its own
        await client.send({"type": "input_audio_buffer.commit"})
        events = await client.until("conversation.item.input_audio_transcription.completed")
        assert types(events)[0] == "input_audio_buffer.committed"
        await client.quiet()  # a manual commit does not create a response
        await client.send({"type": "response.create"})
        events = await client.until("response.output_audio_transcript.done")
        assert events[-1]["transcript"].startswith("You said: I need a plumber.")


async def test_item_create_and_clear() -> None:
    async with FakeRealtimeServer(fast()) as server, session(server) as client:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
        await client.send({"type": "conversation.item.create", "item": item})
        added, done = await client.recv(), await client.recv()
        assert (added["type"], done["type"]) == ("conversation.item.added", "conversation.item.done")
        assert added["item"]["id"].startswith("item_") and added["item"]["content"] == item["content"]
        await client.send({"type": "input_audio_buffer.clear"})
        assert (await client.recv())["type"] == "input_audio_buffer.cleared"

    async with FakeRealtimeServer(fast()) as server, session(server, BETA_SESSION, beta=True) as client:
        await client.send({"type": "conversation.item.create", "item": item | {"id": "item_mine"}})
        created = await client.recv()
        assert created["type"] == "conversation.item.created" and created["item"]["id"] == "item_mine"
        await client.quiet()


async def test_item_delete_and_retrieve() -> None:
    async with FakeRealtimeServer(fast()) as server, session(server) as client:
        item = {"id": "item_a", "type": "message", "role": "system", "content": [{"type": "input_text", "text": "x"}]}
        await client.send({"type": "conversation.item.create", "item": item})
        await client.until("conversation.item.done")
        await client.send({"type": "conversation.item.retrieve", "item_id": "item_a"})
        assert (await client.recv())["item"]["content"] == item["content"]
        await client.send({"type": "conversation.item.delete", "item_id": "item_a"})
        assert (await client.recv())["type"] == "conversation.item.deleted"
        await client.send({"type": "conversation.item.delete", "item_id": "item_a"})
        assert (await client.error())["message"] == "Item with item_id not found: item_a"


async def test_semantic_vad_without_auto_response() -> None:
    update = copy.deepcopy(GA_SESSION)
    update["session"]["audio"]["input"]["turn_detection"] = {"type": "semantic_vad", "create_response": False}
    async with FakeRealtimeServer(fast()) as server, session(server, update) as client:
        await client.append(TURN)
        events = await client.until("conversation.item.input_audio_transcription.completed")
        assert events[1]["audio_end_ms"] == 1300  # semantic_vad waits 500 ms of quiet too
        await client.quiet()


async def test_openai_sdk_client() -> None:
    """The SDK's own client works against the fake, pointed at it with ``websocket_base_url``."""
    async with FakeRealtimeServer(fast()) as server:
        client = AsyncOpenAI(api_key="sk-test", websocket_base_url=server.url.removesuffix("/realtime"))
        async with client.realtime.connect(model="gpt-realtime") as conn:
            await conn.session.update(session=GA_SESSION["session"])
            await conn.input_audio_buffer.append(audio=base64.b64encode(TURN).decode())
            seen = []
            async for event in conn:
                seen.append(event.type)
                if event.type == "response.done":
                    break
    assert seen[:2] == ["session.created", "session.updated"]
    assert server.sessions[0].errors == []
    assert server.sessions[0].model == "gpt-realtime"


# --- errors -----------------------------------------------------------------------------------------------


async def test_invalid_events_get_real_errors() -> None:
    async with FakeRealtimeServer(fast()) as server, session(server, update=None) as client:
        no_type = copy.deepcopy(GA_SESSION) | {"event_id": "evt_1"}
        del no_type["session"]["type"]
        await client.send(no_type)
        error = await client.error()
        assert error == {
            "type": "invalid_request_error",
            "code": "missing_required_parameter",
            "message": "Missing required parameter: 'session.type'.",
            "param": "session.type",
            "event_id": "evt_1",
        }
        misspelt = copy.deepcopy(GA_SESSION)
        misspelt["session"]["audio"]["input"]["turn_detection"]["silence_duration"] = 200
        await client.send(misspelt)
        error = await client.error()
        assert (error["code"], error["param"]) == (
            "unknown_parameter",
            "session.audio.input.turn_detection.silence_duration",
        )
        await client.send({"type": "input_audio_buffer.append", "audio": 42})
        assert (await client.error())["code"] == "invalid_value"
        await client.send({"type": "input_audio_buffer.append", "audio": "not base64!"})
        assert (await client.error())["param"] == "audio"
        garbage: list[str | bytes] = ["{nope", b"\x00\x01", "[1, 2]"]
        for frame in garbage:
            await client.send(frame)
            assert (await client.error())["type"] == "invalid_request_error"
        await client.send({"type": "input_audio_buffer.commit"})
        error = await client.error()
        assert error["code"] == "input_audio_buffer_commit_empty"
        await client.send({"type": "response.cancel"})
        error = await client.error()
        assert (error["code"], error["message"]) == (
            "response_cancel_not_active",
            "Cancellation failed: no active response found",
        )
        await client.send(GA_SESSION)  # still alive and unaffected
        assert (await client.recv())["type"] == "session.updated"
    assert len(server.sessions[0].errors) == 9


async def test_response_create_while_active() -> None:
    async with FakeRealtimeServer(FakeBehavior(delta_ms=20)) as server, session(server) as client:
        await client.send({"type": "response.create"})
        response_id = (await client.recv())["response"]["id"]
        await client.send({"type": "response.create", "event_id": "evt_2"})
        error = await client.error()
        assert error["code"] == "conversation_already_has_active_response"
        assert error["message"] == (
            f"Conversation already has an active response in progress: {response_id}. "
            "Wait until the response is finished before creating a new one."
        )
        assert error["event_id"] == "evt_2"


async def test_cancel_active_response() -> None:
    async with FakeRealtimeServer(FakeBehavior(delta_ms=20)) as server, session(server) as client:
        await client.send({"type": "response.create"})
        await client.until("response.output_audio_transcript.delta")
        await client.send({"type": "response.cancel"})
        events = await client.until("response.done")
        done = events[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        assert done["output"][0]["status"] == "incomplete"
        transcript = next(e for e in events if e["type"] == "response.output_audio_transcript.done")["transcript"]
        assert transcript and server.behavior.greeting.startswith(transcript) and transcript != server.behavior.greeting
        await client.send({"type": "response.cancel"})  # nothing active any more
        assert (await client.error())["code"] == "response_cancel_not_active"
        await client.send({"type": "response.create"})  # a new response may start at once
        assert (await client.recv())["type"] == "response.created"


async def test_truncation() -> None:
    async with FakeRealtimeServer(fast(delta_ms=100, speed=10.0)) as server, session(server) as client:
        await client.append(TURN)
        events = await client.until("response.output_audio.delta")
        user_item = next(e for e in events if e["type"] == "conversation.item.added")["item"]["id"]
        agent_item = events[-1]["item_id"]

        async def truncate(item_id: str, audio_end_ms: int) -> None:
            event = {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0}
            await client.send(event | {"audio_end_ms": audio_end_ms})

        await truncate("item_nope", 0)
        error = await client.error()
        assert (error["code"], error["message"]) == ("invalid_value", "Item with item_id not found: item_nope")
        await truncate(user_item, 0)
        error = await client.error()
        assert (error["code"], error["message"]) == (
            "unsupported_content_type",
            "Only model output audio messages can be truncated",
        )
        await truncate(agent_item, 60_000)
        error = await client.error()
        assert error["code"] == "invalid_value"
        assert error["message"].startswith("Audio content of ") and error["message"].endswith(
            "ms is already shorter than 60000ms"
        )
        await truncate(agent_item, 50)
        events = await client.until("conversation.item.truncated")
        assert events[-1] | {"event_id": ""} == {
            "event_id": "",
            "type": "conversation.item.truncated",
            "item_id": agent_item,
            "content_index": 0,
            "audio_end_ms": 50,
        }
        done = (await client.until("response.done"))[-1]["response"]
        assert done["status"] == "completed"  # truncating does not stop the response

    [truncation] = server.sessions[0].truncations
    assert truncation["item_id"] == agent_item and truncation["audio_end_ms"] == 50
    assert truncation["audio_ms_sent_for_item"] >= 100


async def test_caller_speech_interrupts_response() -> None:
    # A long greeting leaves plenty of time to interrupt it; the answer afterwards is short.
    behavior = FakeBehavior(transcripts=["one"], greeting="Hello. " * 40, delta_ms=20, ms_per_char=20, speed=4.0)
    async with FakeRealtimeServer(behavior) as server, session(server) as client:
        await client.send({"type": "response.create"})
        await client.until("response.output_audio.delta")
        await client.append(tone(100), chunk_ms=20)
        events = await client.until("response.done")
        kinds = types(events)
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.output_audio.done")
        done = events[-1]["response"]
        assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
        assert done["output"][0]["status"] == "incomplete"
        await client.append(silence(600))
        events = await client.until("response.output_audio_transcript.done")
        assert "input_audio_buffer.speech_stopped" in types(events)
        assert events[-1]["transcript"] == "You said: one. Is there anything else I can help you with today?"


async def test_tool_cue_round_trip() -> None:
    behavior = fast(
        transcripts=["What's the weather in Paris?"], tool_cues={"weather": ("get_weather", '{"city":"Paris"}')}
    )
    async with FakeRealtimeServer(behavior) as server, session(server) as client:
        await client.append(TURN)
        events = await client.until("response.done")
        assert "response.output_audio.delta" not in types(events)
        arguments = next(e for e in events if e["type"] == "response.function_call_arguments.done")
        assert (arguments["name"], arguments["arguments"]) == ("get_weather", '{"city":"Paris"}')
        item = next(e for e in events if e["type"] == "response.output_item.done")["item"]
        assert item | {"id": "", "call_id": ""} == {
            "id": "",
            "object": "realtime.item",
            "type": "function_call",
            "status": "completed",
            "name": "get_weather",
            "call_id": "",
            "arguments": '{"city":"Paris"}',
        }
        assert item["call_id"] == arguments["call_id"]
        assert events[-1]["response"]["output"] == [item]

        output = {"type": "function_call_output", "call_id": item["call_id"], "output": "Sunny, 21 °C"}
        await client.send({"type": "conversation.item.create", "item": output})
        await client.send({"type": "response.create"})
        events = await client.until("response.output_audio_transcript.done")
        assert events[-1]["transcript"] == "Here is what I found: Sunny, 21 °C"

    async with FakeRealtimeServer(behavior) as server, session(server, BETA_SESSION, beta=True) as client:
        await client.append(TURN)
        events = await client.until("response.function_call_arguments.done")
        assert "name" not in events[-1]  # the beta event has none; the item carries it


async def test_scripted_server_error() -> None:
    async with FakeRealtimeServer(fast(error_on_turn=1)) as server, session(server) as client:
        await client.append(TURN)
        events = await client.until("error")
        assert "input_audio_buffer.committed" in types(events)
        assert events[-1]["error"]["type"] == "server_error"
        await client.quiet()  # no transcription, no response


async def test_close_after() -> None:
    async with FakeRealtimeServer(fast(close_after_s=0.05)) as server, session(server, update=None) as client:
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv(within=2)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        await asyncio.wait_for(server.sessions[0].closed.wait(), 1)


async def test_handshake_and_stop() -> None:
    async with FakeRealtimeServer(fast()) as server:
        with pytest.raises(InvalidStatus) as rejected:
            async with connect(server.url):
                pass
        assert rejected.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as rejected:
            async with connect(
                server.url.replace("/v1/realtime", "/v2"), additional_headers={"Authorization": "Bearer x"}
            ):
                pass
        assert rejected.value.response.status_code == 404

        async with session(server) as client:
            await server.stop()
            with pytest.raises(ConnectionClosed):
                await client.recv(within=2)
        assert server.sessions[0].closed.is_set()


# --- conformance validators -------------------------------------------------------------------------------


def test_client_validator() -> None:
    validate_client_event(GA_SESSION)
    validate_client_event(BETA_SESSION, "beta")
    with pytest.raises(ConformanceError, match=r"Unknown parameter: 'session\.type'"):
        validate_client_event(GA_SESSION, "beta")
    misspelt = copy.deepcopy(GA_SESSION)
    misspelt["session"]["audio"]["output"]["voise"] = "marin"
    with pytest.raises(ConformanceError, match=r"Unknown parameter: 'session\.audio\.output\.voise'"):
        validate_client_event(misspelt)
    tools = copy.deepcopy(GA_SESSION)
    tools["session"]["tools"] = [{"type": "function", "name": "f", "parameters": {"any": "schema"}, "strict": True}]
    with pytest.raises(ConformanceError, match=r"'session\.tools\[0\]\.strict'"):
        validate_client_event(tools)
    content = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi", "lang": "en"}]}
    with pytest.raises(ConformanceError, match=r"item\.content\[0\]\.lang"):
        validate_client_event({"type": "conversation.item.create", "item": content})
    with pytest.raises(ConformanceError, match=r"Invalid value: 'session\.updated'") as error:
        validate_client_event({"type": "session.updated"})
    assert error.value.param == "type"


def test_server_validator() -> None:
    validate_server_event({"type": "input_audio_buffer.cleared", "event_id": "event_1"})
    with pytest.raises(ConformanceError, match="Missing required parameter: 'event_id'"):
        validate_server_event({"type": "input_audio_buffer.cleared"})
    done: Event = {"type": "response.function_call_arguments.done", "event_id": "e", "response_id": "r", "item_id": "i"}
    done |= {"output_index": 0, "call_id": "c", "arguments": "{}", "name": "f"}
    validate_server_event(done)
    with pytest.raises(ConformanceError, match="Unknown parameter: 'name'"):
        validate_server_event(done, "beta")


def test_twilio_validator() -> None:
    validate_twilio_message({"event": "media", "streamSid": "MZ1", "media": {"payload": "AAAA"}})
    validate_twilio_message({"event": "mark", "streamSid": "MZ1", "mark": {"name": "m1"}})
    validate_twilio_message({"event": "clear", "streamSid": "MZ1"})
    invalid: list[Event] = [
        {"event": "media", "streamSid": "MZ1", "media": {"payload": "AAAA", "track": "outbound"}},
        {"event": "media", "streamSid": "MZ1", "media": {"payload": "not base64!"}},
        {"event": "mark", "streamSid": "MZ1", "mark": {"name": ""}},
        {"event": "clear", "streamSid": "MZ1", "sequenceNumber": "1"},
        {"event": "clear", "streamSid": 1},
        {"event": "stop", "streamSid": "MZ1"},
    ]
    for bad in invalid:
        with pytest.raises(ConformanceError):
            validate_twilio_message(bad)


# --- the service's other behaviours -----------------------------------------------------------------------

PCM_24K: Event = {"type": "audio/pcm", "rate": 24000}
TOOL: Event = {"type": "function", "name": "book", "parameters": {"type": "object", "properties": {}}}


def ga_update(**audio: Event) -> Event:
    """``GA_SESSION`` with its ``audio.input`` / ``audio.output`` sections updated."""
    update = copy.deepcopy(GA_SESSION)
    for section, values in audio.items():
        update["session"]["audio"][section] |= values
    return update


def samples_of(pcm: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(pcm) // 2}h", pcm))


def rms_of(samples: list[int]) -> float:
    return math.sqrt(sum(sample * sample for sample in samples) / len(samples))


def pcm_tone(ms: int, frequency: float = 300.0, amplitude: int = 8000) -> bytes:
    """A sine tone as 16-bit little-endian PCM at 24 kHz."""
    step = 2 * math.pi * frequency / 24000
    return struct.pack(f"<{ms * 24}h", *(int(amplitude * math.sin(step * n)) for n in range(ms * 24)))


def alaw_to_linear(byte: int) -> int:
    """ITU-T G.711 A-law decoding, written out here so the server's encoder is checked against the standard."""
    byte ^= 0x55
    segment = (byte >> 4) & 0x07
    value = ((byte & 0x0F) << 4) + 8 if segment == 0 else (((byte & 0x0F) << 4) + 0x108) << (segment - 1)
    return value if byte & 0x80 else -value


def transcript_of(events: list[Event]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")


async def refused_at_upgrade(server: FakeRealtimeServer, query: str, headers: dict[str, str]) -> tuple[Event, Any]:
    """Connect, expect one ``error`` event and a close from the server; return the error and the close frame."""
    async with connect(f"{server.url}{query}", additional_headers=headers) as ws:
        client = Client(ws, "beta" if "OpenAI-Beta" in headers else "ga")
        event = await client.recv()
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv(within=2)
    assert event["type"] == "error"
    return event["error"], closed.value.rcvd


# 1. session.update validation


INVALID_UPDATES: list[tuple[str, Callable[[Event], None], str, str, str]] = [
    (
        "voice",
        lambda s: s["audio"]["output"].update(voice="nova"),
        "invalid_value",
        "session.audio.output.voice",
        "Invalid value: 'nova'. Supported values are: 'alloy', 'ash', 'ballad', 'coral', 'echo', 'sage', 'shimmer', "
        "'verse', 'marin', and 'cedar'.",
    ),
    (
        "transcription model",
        lambda s: s["audio"]["input"]["transcription"].update(model="whisper-2"),
        "invalid_value",
        "session.audio.input.transcription.model",
        "Invalid value: 'whisper-2'. Supported values are: 'whisper-1', ",
    ),
    (
        "retired transcription model",
        lambda s: s["audio"]["input"]["transcription"].update(model="gpt-4o-transcribe"),
        "invalid_value",
        "session.audio.input.transcription.model",
        "Invalid value: 'gpt-4o-transcribe'. Supported values are: 'whisper-1', 'gpt-transcribe', "
        "'gpt-live-transcribe', 'gpt-4o-mini-transcribe', 'gpt-4o-mini-transcribe-2025-12-15', "
        "'gpt-4o-transcribe-diarize', and 'gpt-realtime-whisper'.",
    ),
    (
        "function parameters",
        lambda s: s.update(tools=[TOOL, TOOL | {"name": "lookup", "parameters": {"type": "array"}}]),
        "invalid_function_parameters",
        "session.tools[1].parameters",
        "Invalid schema for function 'lookup': schema must be a JSON Schema of 'type: \"object\"', "
        "got 'type: \"array\"'.",
    ),
    (
        "speed above",
        lambda s: s["audio"]["output"].update(speed=2),
        "decimal_above_max_value",
        "session.audio.output.speed",
        "Invalid 'session.audio.output.speed': decimal above maximum value. Expected a value <= 1.5, "
        "but got 2.0 instead.",
    ),
    (
        "speed below",
        lambda s: s["audio"]["output"].update(speed=0.1),
        "decimal_below_min_value",
        "session.audio.output.speed",
        "Invalid 'session.audio.output.speed': decimal below minimum value. Expected a value >= 0.25, "
        "but got 0.1 instead.",
    ),
    (
        "max_output_tokens below",
        lambda s: s.update(max_output_tokens=0),
        "integer_below_min_value",
        "session.max_output_tokens",
        "Invalid 'session.max_output_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
    ),
    (
        "max_output_tokens above",
        lambda s: s.update(max_output_tokens=4097),
        "integer_above_max_value",
        "session.max_output_tokens",
        "Invalid 'session.max_output_tokens': integer above maximum value. Expected a value <= 4096, "
        "but got 4097 instead.",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "code", "param", "message"),
    [case[1:] for case in INVALID_UPDATES],
    ids=[case[0] for case in INVALID_UPDATES],
)
async def test_rejected_session_update_changes_nothing(
    mutate: Callable[[Event], None], code: str, param: str, message: str
) -> None:
    update = copy.deepcopy(GA_SESSION) | {"event_id": "evt_update_1"}
    mutate(update["session"])
    behavior = fast(ms_per_char=10, retired_models=frozenset({"gpt-4o-transcribe"}))
    async with FakeRealtimeServer(behavior) as server, session(server, update=None) as client:
        await client.send(update)
        error = await client.error()
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
        assert error["message"].startswith(message)
        assert error["event_id"] == "evt_update_1"
        await client.quiet()  # no session.updated
        # The session is still on its defaults: output audio is 16-bit PCM at 24 kHz, 48 bytes per ms.
        await client.send({"type": "response.create"})
        events = await client.until("response.done")
        assert len(audio_of(events)) == len(server.behavior.greeting) * 10 * 48
        assert events[-1]["response"]["audio"]["output"] == {"format": PCM_24K, "voice": "alloy"}
    assert server.sessions[0].server_events_of("session.updated") == []


async def test_rejected_beta_session_update() -> None:
    update = copy.deepcopy(BETA_SESSION) | {"event_id": "evt_beta"}
    update["session"]["voice"] = "fable"
    async with FakeRealtimeServer(fast()) as server, session(server, update=None, beta=True) as client:
        await client.send(update)
        error = await client.error()
        assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "session.voice", "evt_beta")
        await client.quiet()
        update["session"] |= {"voice": "ash", "max_response_output_tokens": 9000}
        await client.send(update)
        assert (await client.error())["param"] == "session.max_response_output_tokens"


async def test_accepted_settings_are_echoed() -> None:
    update = ga_update(
        input={
            "noise_reduction": {"type": "far_field"},
            "transcription": {"model": "gpt-4o-mini-transcribe", "language": "fr", "prompt": "plumbing"},
        },
        output={"voice": {"id": "voice_1234"}, "speed": 1.25},
    )
    update["session"] |= {"max_output_tokens": 512, "tool_choice": "required", "tools": [TOOL]}
    async with FakeRealtimeServer(fast()) as server, session(server, update=None) as client:
        await client.send(update)
        updated = (await client.recv())["session"]
        assert updated["audio"]["input"]["noise_reduction"] == {"type": "far_field"}
        assert updated["audio"]["input"]["transcription"] == {
            "model": "gpt-4o-mini-transcribe",
            "language": "fr",
            "prompt": "plumbing",
        }
        assert updated["audio"]["output"]["voice"] == {"id": "voice_1234"}
        assert updated["audio"]["output"]["speed"] == 1.25
        assert (updated["max_output_tokens"], updated["tool_choice"]) == (512, "required")
        await client.send({"type": "response.create"})
        assert (await client.until("response.done"))[-1]["response"]["max_output_tokens"] == 512


# 2. audio in the session's formats


async def test_output_audio_in_the_session_format() -> None:
    behavior = fast(ms_per_char=10, greeting="Hello there.")
    expected_ms = len(behavior.greeting) * 10
    async with FakeRealtimeServer(behavior) as server:
        async with session(server, ga_update(output={"format": PCM_24K})) as client:
            await client.send({"type": "response.create"})
            pcm = audio_of(await client.until("response.done"))
            assert len(pcm) == expected_ms * 48
            assert abs(rms_of(samples_of(pcm)) - rms_of(ulaw_to_pcm16(tone(expected_ms, 300.0)))) < 200
        async with session(server, ga_update(output={"format": {"type": "audio/pcma"}})) as client:
            await client.send({"type": "response.create"})
            alaw = audio_of(await client.until("response.done"))
            assert len(alaw) == expected_ms * 8
            decoded = [alaw_to_linear(byte) for byte in alaw]
            assert abs(rms_of(decoded) - rms_of(ulaw_to_pcm16(tone(expected_ms, 300.0)))) < 200
        beta = copy.deepcopy(BETA_SESSION)
        beta["session"]["output_audio_format"] = "pcm16"
        async with session(server, beta, beta=True) as client:
            await client.send({"type": "response.create"})
            events = await client.until("response.done")
            assert len(audio_of(events, "response.audio.delta")) == expected_ms * 48
            assert events[-1]["response"]["output_audio_format"] == "pcm16"


async def test_pcm_input_and_truncation_in_milliseconds() -> None:
    update = ga_update(input={"format": PCM_24K}, output={"format": PCM_24K})
    async with FakeRealtimeServer(fast(delta_ms=100, speed=10.0)) as server, session(server, update) as client:
        turn = bytes(500 * 48) + pcm_tone(300) + bytes(600 * 48)
        for start in range(0, len(turn), 4801):  # chunks that split samples and frames
            await client.send(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(turn[start : start + 4801]).decode()}
            )
        events = await client.until("response.output_audio.delta")
        assert types(events)[:3] == [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
        ]
        assert events[1]["audio_end_ms"] == 1300
        item_id = events[-1]["item_id"]
        assert len(base64.b64decode(events[-1]["delta"])) == 100 * 48
        await client.send(
            {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 101}
        )
        assert (await client.error())["message"] == "Audio content of 100ms is already shorter than 101ms"
        await client.send(
            {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 100}
        )
        await client.until("conversation.item.truncated")
    record = server.sessions[0]
    assert len(record.audio) == len(turn) // 6  # heard as μ-law 8 kHz
    assert record.truncations[0]["audio_ms_sent_for_item"] >= 100


# 3. multi-item responses


async def test_split_reply_items() -> None:
    async with FakeRealtimeServer(fast(split_reply_items=True)) as server, session(server) as client:
        await client.append(TURN)
        events = await client.until("response.done")
    sentences = ["You said: I need a plumber.", "Is there anything else I can help you with today?"]
    start = types(events).index("response.created") + 1
    per_item = [
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    kinds = types(events[start:])
    first, second = [i for i, kind in enumerate(kinds) if kind == "response.output_item.added"]
    assert kinds[first : first + 3] == kinds[second : second + 3] == per_item
    closing = [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
    ]
    assert kinds[second - 5 : second] == closing and kinds[-6:-1] == closing
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["output_index"] for e in added] == [0, 1]
    conversation = [e for e in events if e["type"] == "conversation.item.added"][-2:]
    assert conversation[1]["previous_item_id"] == conversation[0]["item"]["id"] == added[0]["item"]["id"]
    for index, sentence in enumerate(sentences):
        item_id = added[index]["item"]["id"]
        mine = [e for e in events if e.get("item_id") == item_id]
        assert {e["output_index"] for e in mine} == {index}
        assert transcript_of(mine) == sentence
        assert len(audio_of(mine)) == len(sentence) * 60 * 8
    output = events[-1]["response"]["output"]
    assert [item["id"] for item in output] == [e["item"]["id"] for e in added]
    assert [item["status"] for item in output] == ["completed", "completed"]
    assert [item["content"][0]["transcript"] for item in output] == sentences


async def test_cancel_leaves_the_current_item_incomplete() -> None:
    behavior = FakeBehavior(greeting="One. Two. Three.", split_reply_items=True, delta_ms=20, ms_per_char=100)
    async with FakeRealtimeServer(behavior) as server, session(server) as client:
        await client.send({"type": "response.create"})
        await client.until("response.output_audio.delta")
        await client.send({"type": "response.cancel"})
        events = await client.until("response.done")
    assert all(e.get("output_index", 0) == 0 for e in events)
    [item] = events[-1]["response"]["output"]
    assert item["status"] == "incomplete"
    assert events[-1]["response"]["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}


async def test_truncate_and_delete_items_of_a_split_response() -> None:
    behavior = fast(split_reply_items=True, delta_ms=100, speed=10.0)
    async with FakeRealtimeServer(behavior) as server, session(server) as client:
        await client.append(TURN)
        events = await client.until("response.output_audio.delta")
        while events[-1]["type"] != "response.output_audio.delta" or events[-1]["output_index"] != 1:
            events.append(await client.recv())
        first = next(e for e in events if e["type"] == "response.output_item.added")["item"]["id"]
        second = events[-1]["item_id"]
        truncate = {"type": "conversation.item.truncate", "content_index": 0, "audio_end_ms": 50}
        await client.send(truncate | {"item_id": first})
        await client.until("conversation.item.truncated")
        await client.send(truncate | {"item_id": second})
        await client.until("conversation.item.truncated")
        await client.send({"type": "conversation.item.delete", "item_id": first})
        assert (await client.until("conversation.item.deleted"))[-1]["item_id"] == first
        await client.send({"type": "conversation.item.delete", "item_id": second})  # still being spoken
        assert (await client.until("conversation.item.deleted"))[-1]["item_id"] == second
        events = await client.until("response.done")
        assert "conversation.item.done" not in types(events)  # the item left the conversation
        assert [item["id"] for item in events[-1]["response"]["output"]] == [first, second]
        await client.send(truncate | {"item_id": second})
        assert (await client.error())["message"] == f"Item with item_id not found: {second}"
    assert [t["item_id"] for t in server.sessions[0].truncations] == [first, second]


# 4. failed and incomplete responses


async def test_failed_responses_are_counted_per_connection() -> None:
    async with FakeRealtimeServer(fast(fail_responses=frozenset({2}))) as server, session(server) as client:
        await client.send({"type": "response.create"})  # response 1, the greeting
        assert (await client.until("response.done"))[-1]["response"]["status"] == "completed"
        await client.append(TURN)  # response 2 fails
        events = await client.until("response.done")
        kinds = types(events)
        assert kinds[kinds.index("response.created") :] == ["response.created", "response.done"]
        done = events[-1]["response"]
        assert (done["status"], done["output"]) == ("failed", [])
        assert done["status_details"] == {
            "type": "failed",
            "error": {
                "type": "server_error",
                "code": "server_error",
                "message": "The server had an error while processing your request. Sorry about that! You can retry "
                "your request, or contact us through our help center at help.openai.com if the error persists.",
            },
        }
        assert done["usage"]["total_tokens"] == 0
        await client.send({"type": "response.create"})  # response 3 is fine again
        assert (await client.until("response.done"))[-1]["response"]["status"] == "completed"


async def test_quota_exceeded() -> None:
    async with FakeRealtimeServer(fast(quota_exceeded=True)) as server:
        client = AsyncOpenAI(api_key="sk-test", websocket_base_url=server.url.removesuffix("/realtime"))
        async with client.realtime.connect(model="gpt-realtime") as conn:
            await conn.session.update(session=GA_SESSION["session"])
            await conn.response.create()
            async for event in conn:
                if event.type == "response.done":
                    break
    assert event.type == "response.done"
    assert event.response.status == "failed" and event.response.output == []
    assert event.response.status_details is not None and event.response.status_details.error is not None
    error = event.response.status_details.error
    assert (error.type, error.code) == ("insufficient_quota", "insufficient_quota")
    assert error.message is not None
    assert error.message.startswith("You exceeded your current quota, please check your plan and billing details.")


async def test_incomplete_response_stops_halfway() -> None:
    behavior = fast(incomplete_responses=frozenset({1}), ms_per_char=10, delta_ms=20)
    async with FakeRealtimeServer(behavior) as server, session(server) as client:
        await client.send({"type": "response.create"})
        events = await client.until("response.done")
        done = events[-1]["response"]
        assert done["status"] == "incomplete"
        assert done["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
        assert done["output"][0]["status"] == "incomplete"
        full = len(server.behavior.greeting) * 10 * 8
        assert 0.4 * full <= len(audio_of(events)) <= 0.6 * full
        assert server.behavior.greeting.startswith(transcript_of(events))


# 5. session expiry; 6. the beta shape refused; 7. the API key; 8. unknown models


async def test_session_expires() -> None:
    async with FakeRealtimeServer(fast(session_expires_after_s=0.1)) as server, session(server) as client:
        error = await client.error()
        assert error == {
            "type": "invalid_request_error",
            "code": "session_expired",
            "message": "Your session hit the maximum duration of 60 minutes.",
            "param": None,
            "event_id": None,
        }
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv(within=2)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_beta_shape_refused() -> None:
    headers = {"Authorization": "Bearer sk-test", "OpenAI-Beta": "realtime=v1"}
    async with FakeRealtimeServer(fast(accepts_beta=False)) as server:
        error, close = await refused_at_upgrade(server, "?model=gpt-4o-realtime-preview", headers)
        assert (error["type"], error["code"]) == ("invalid_request_error", "beta_api_shape_disabled")
        assert (
            error["message"] == "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
        )
        assert (close.code, close.reason) == (4000, "invalid_request_error.beta_api_shape_disabled")
        assert server.sessions[0].server_events_of("session.created") == []
        async with session(server) as client:  # the GA shape is served as before
            await client.quiet()


async def test_api_key() -> None:
    key, wrong = "sk-proj-right0123456789abcdefXYZ", "sk-proj-wrong0123456789abcdefABC"
    async with FakeRealtimeServer(fast(api_key=key, reject_api_key_in_band=False)) as server:
        with pytest.raises(InvalidStatus) as rejected:
            async with connect(
                f"{server.url}?model=gpt-realtime", additional_headers={"Authorization": f"Bearer {wrong}"}
            ):
                pass
        response = rejected.value.response
        assert response.status_code == 401 and response.headers["Content-Type"] == "application/json"
        error = json.loads(response.body)["error"]
        assert list(error) == ["message", "type", "param", "code"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "invalid_api_key")
        assert error["message"].startswith("Incorrect API key provided: sk-proj-") and wrong not in error["message"]
        assert error["message"].endswith(
            "ABC. You can find your API key at https://platform.openai.com/account/api-keys."
        )
        async with connect(
            f"{server.url}?model=gpt-realtime", additional_headers={"Authorization": f"Bearer {key}"}
        ) as ws:
            assert (await Client(ws, "ga").recv())["type"] == "session.created"

        server.behavior.reject_api_key_in_band = True  # the live endpoint's way
        error, close = await refused_at_upgrade(server, "?model=gpt-realtime", {"Authorization": f"Bearer {wrong}"})
        assert error["code"] == "invalid_api_key" and wrong not in error["message"]
        assert (close.code, close.reason) == (3000, "invalid_request_error.invalid_api_key")


async def test_unknown_and_retired_models() -> None:
    headers = {"Authorization": "Bearer sk-test"}
    async with FakeRealtimeServer(fast(retired_models=frozenset({"gpt-4o-realtime-preview"}))) as server:
        error, close = await refused_at_upgrade(server, "?model=gpt-nope", headers)
        assert (error["code"], error["message"]) == (
            "invalid_model",
            'Model "gpt-nope" is not supported in realtime mode. '
            "See https://platform.openai.com/docs/models for a list of supported models.",
        )
        assert (close.code, close.reason) == (4000, "invalid_request_error.invalid_model")
        error, close = await refused_at_upgrade(server, "?model=gpt-4o-realtime-preview", headers)
        assert error["code"] == "model_not_found"
        assert error["message"].startswith("The model `gpt-4o-realtime-preview` has been deprecated")
        assert (close.code, close.reason) == (4004, "invalid_request_error.model_not_found")
        async with session(server):  # a listed model is served
            pass


# 9. idle timeout


async def test_idle_timeout_prompts_the_caller() -> None:
    update = ga_update(input={"turn_detection": {"type": "server_vad", "idle_timeout_ms": 300}})
    behavior = fast(greeting="Hi.", ms_per_char=100)  # 300 ms of audio, sent at once
    loop = asyncio.get_running_loop()
    async with FakeRealtimeServer(behavior) as server, session(server, update) as client:
        await client.send({"type": "response.create"})
        await client.until("response.done")
        done_at = loop.time()
        await client.append(silence(200))  # the line's quiet goes on
        events = await client.until("input_audio_buffer.timeout_triggered")
        waited = loop.time() - done_at
        assert waited >= 0.5  # 300 ms of playback after the first delta, then 300 ms of quiet
        triggered = events[-1]
        assert 0 <= triggered["audio_start_ms"] <= triggered["audio_end_ms"] <= 200
        events = await client.until("response.done")
        assert types(events)[:4] == [
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
            "response.created",
        ]
        assert events[0]["item_id"] == events[1]["item"]["id"] == triggered["item_id"]
        assert events[1]["item"]["role"] == "user"
        assert transcript_of(events) == "Are you still there?"
        await client.until("input_audio_buffer.timeout_triggered")  # and again after the re-prompt
        await client.until("response.done")

        # Speech cancels the timer.
        quiet_turns = {"type": "server_vad", "idle_timeout_ms": 300, "create_response": False}
        await client.send(ga_update(input={"turn_detection": quiet_turns}))
        await client.until("session.updated")
        await client.send({"type": "response.create"})
        await client.until("response.done")
        await client.append(TURN)
        events = await client.until("conversation.item.input_audio_transcription.completed")
        assert "input_audio_buffer.timeout_triggered" not in types(events)
        await client.quiet(0.8)


# 10. usage


def check_usage(usage: Event, dialect: Dialect = "ga") -> None:
    details_in, details_out = usage["input_token_details"], usage["output_token_details"]
    assert usage["input_tokens"] == details_in["text_tokens"] + details_in["audio_tokens"]
    assert usage["output_tokens"] == details_out["text_tokens"] + details_out["audio_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert details_in["cached_tokens"] <= usage["input_tokens"]
    if dialect == "ga":
        cached = details_in["cached_tokens_details"]
        assert details_in["cached_tokens"] == cached["text_tokens"] + cached["audio_tokens"]
    else:
        assert "cached_tokens_details" not in details_in


async def test_usage() -> None:
    async with FakeRealtimeServer(fast()) as server, session(server) as client:
        await client.send({"type": "response.create"})
        greeting = (await client.until("response.done"))[-1]["response"]["usage"]
        await client.append(TURN)
        answer = (await client.until("response.done"))[-1]["response"]["usage"]
        await client.send({"type": "response.create", "response": {"instructions": "Reply by saying exactly: Bye."}})
        bye = (await client.until("response.done"))[-1]["response"]["usage"]
    for usage in (greeting, answer, bye):
        check_usage(usage)
    assert greeting["output_token_details"]["audio_tokens"] > 0
    assert answer["output_token_details"]["audio_tokens"] > bye["output_token_details"]["audio_tokens"]
    assert answer["input_token_details"]["audio_tokens"] > greeting["input_token_details"]["audio_tokens"]
    assert bye["input_tokens"] > answer["input_tokens"] > greeting["input_tokens"]  # the conversation grows
    assert bye["input_token_details"]["cached_tokens"] > 0

    async with FakeRealtimeServer(fast()) as server, session(server, BETA_SESSION, beta=True) as client:
        await client.send({"type": "response.create"})
        check_usage((await client.until("response.done"))[-1]["response"]["usage"], "beta")


# Conformance of everything the fake sends in these scenarios.


async def test_new_scenarios_conform_to_the_openai_types() -> None:
    """Every event of the scenarios above, whether or not a test read it, validates against the SDK's types."""
    recorded: list[FakeRealtimeServer] = []

    async def run(behavior: FakeBehavior, update: Event | None, beta: bool = False, **actions: Any) -> None:
        async with FakeRealtimeServer(behavior) as server, session(server, update, beta=beta) as client:
            recorded.append(server)
            await client.send({"type": "response.create"})
            await client.until("response.done")
            if actions.get("turn"):
                await client.append(TURN)
                await client.until("response.done")

    await run(fast(split_reply_items=True), GA_SESSION, turn=True)
    await run(fast(split_reply_items=True), BETA_SESSION, beta=True, turn=True)
    await run(fast(fail_responses=frozenset({1}), incomplete_responses=frozenset({2})), GA_SESSION, turn=True)
    await run(fast(incomplete_responses=frozenset({1})), BETA_SESSION, beta=True)
    await run(fast(quota_exceeded=True), BETA_SESSION, beta=True)
    await run(fast(ms_per_char=5), ga_update(input={"format": PCM_24K}, output={"format": {"type": "audio/pcma"}}))
    await run(fast(ms_per_char=5), None)
    idle = ga_update(input={"turn_detection": {"type": "server_vad", "idle_timeout_ms": 50}})
    async with FakeRealtimeServer(fast(greeting="Hi.", ms_per_char=10)) as server, session(server, idle) as client:
        recorded.append(server)
        await client.send({"type": "response.create"})
        await client.until("input_audio_buffer.timeout_triggered")
        await client.until("response.done")
    async with FakeRealtimeServer(fast(session_expires_after_s=0.05)) as server, session(server) as client:
        recorded.append(server)
        with pytest.raises(ConnectionClosed):
            await client.until("never")
    async with FakeRealtimeServer(fast(accepts_beta=False, retired_models=frozenset({"gpt-realtime-mini"}))) as server:
        recorded.append(server)
        await refused_at_upgrade(server, "", {"Authorization": "Bearer x", "OpenAI-Beta": "realtime=v1"})
        await refused_at_upgrade(server, "?model=gpt-realtime-mini", {"Authorization": "Bearer x"})
        async with session(server, update=None) as client:
            bad = copy.deepcopy(GA_SESSION)
            bad["session"]["audio"]["output"]["voice"] = "nova"
            await client.send(bad)
            await client.error()

    checked = 0
    for server in recorded:
        for record in server.sessions:
            for event in record.server_events:
                validate_server_event(event, record.dialect)
                checked += 1
    kinds = {event["type"] for server in recorded for record in server.sessions for event in record.server_events}
    assert {"input_audio_buffer.timeout_triggered", "error", "response.done"} <= kinds
    assert checked > 200
