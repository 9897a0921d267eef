"""The fake Realtime server over real sockets, and the conformance validators it relies on."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from callbridge.audio import silence, tone
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
