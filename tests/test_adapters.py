"""The thin adapters: wire formats, TwiML, signatures, signed parameters, dialects, tools, settings."""

from __future__ import annotations

import asyncio
import secrets
import xml.etree.ElementTree as ET

import orjson
import pytest
from twilio.request_validator import RequestValidator

from callbridge.config import Settings
from callbridge.core import events as ev
from callbridge.core.commands import CreateItem, Message, UpdateSession
from callbridge.core.context import AgentConfig, CallContext, ContextItem, ParameterError
from callbridge.realtime.client_events import client_event, encode
from callbridge.realtime.dialect import ga_event_type, headers_for
from callbridge.realtime.protocol import SERVER_EVENT_TYPES, parse_server_event
from callbridge.service.tools import ToolContext, ToolRegistry
from callbridge.telephony.media_streams import parse_twilio_message
from callbridge.telephony.params import MAX_PARAMETER_CHARS, PARAMETER_NAME, StreamParameterSigner
from callbridge.telephony.signatures import TwilioSignatures
from callbridge.telephony.twiml import connect_stream_twiml
from callbridge.testing.conformance import server_event_types, validate_client_event

# --- Twilio frames ----------------------------------------------------------------------------------------


def test_parse_twilio_start_and_media() -> None:
    start = parse_twilio_message(
        orjson.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "start": {
                    "accountSid": "AC1",
                    "streamSid": "MZ1",
                    "callSid": "CA1",
                    "tracks": ["inbound"],
                    "customParameters": {"callbridge": "tok"},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
                "streamSid": "MZ1",
            }
        )
    )
    assert start == ev.TwilioStart("MZ1", "CA1", "AC1", {"callbridge": "tok"})
    media = parse_twilio_message(
        '{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"1","timestamp":"40","payload":"AAA="},"streamSid":"MZ1"}'
    )
    assert media == ev.TwilioMedia("AAA=", 40)


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        '{"event":"media"}',
        '{"event":"media","media":{"payload":5}}',
        '{"event":"start","start":{"callSid":"CA1"}}',
        '{"event":"start","start":{"callSid":"CA1","streamSid":"MZ","customParameters":[1]}}',
        '{"event":"mark","mark":{}}',
        '{"event":"surprise"}',
        '{"event":"media","media":{"payload":"AA==","timestamp":"soon"}}',
    ],
)
def test_malformed_twilio_frames_become_invalid_messages(raw: str) -> None:
    assert isinstance(parse_twilio_message(raw), ev.TwilioInvalidMessage)


# --- Realtime events --------------------------------------------------------------------------------------


def test_parse_realtime_events_in_both_dialects() -> None:
    delta = {
        "type": "response.output_audio.delta",
        "response_id": "r",
        "item_id": "i",
        "output_index": 0,
        "content_index": 0,
        "delta": "AAA=",
        "event_id": "e",
    }
    assert parse_server_event(orjson.dumps(delta)) == ev.RealtimeAudioDelta("r", "i", "AAA=")
    beta = {**delta, "type": "response.audio.delta"}
    assert parse_server_event(orjson.dumps(beta), "beta") == ev.RealtimeAudioDelta("r", "i", "AAA=")
    assert isinstance(parse_server_event(orjson.dumps(beta), "ga"), ev.RealtimeOther)
    error = {
        "type": "error",
        "event_id": "e",
        "error": {
            "type": "invalid_request_error",
            "code": "response_cancel_not_active",
            "message": "Cancellation failed",
            "event_id": "cb_3",
        },
    }
    assert parse_server_event(orjson.dumps(error)) == ev.RealtimeError(
        "response_cancel_not_active", "Cancellation failed", "cb_3", "invalid_request_error"
    )
    call = {
        "type": "response.output_item.done",
        "response_id": "r",
        "output_index": 0,
        "event_id": "e",
        "item": {
            "id": "i",
            "type": "function_call",
            "status": "completed",
            "call_id": "c",
            "name": "n",
            "arguments": "{}",
        },
    }
    assert parse_server_event(orjson.dumps(call)) == ev.RealtimeFunctionCallDone("r", "i", "c", "n", "{}", "completed")


def test_the_known_server_events_are_the_openai_package_s() -> None:
    beta_as_ga = {ga_event_type("beta", kind) for kind in server_event_types("beta")}
    assert server_event_types("ga") | beta_as_ga == SERVER_EVENT_TYPES


def test_malformed_realtime_event_is_an_error_not_an_exception() -> None:
    for raw in ("{", "[]", '{"type":"response.output_audio.delta"}'):
        assert isinstance(parse_server_event(raw), ev.RealtimeError)


def test_session_update_in_each_dialect() -> None:
    """The beta dialect is a serializer of its own: flat audio fields, format names, no idle timeout."""
    agent = AgentConfig(
        model="gpt-realtime",
        voice="alloy",
        transcription_model="whisper-1",
        noise_reduction=None,
        turn_detection={"type": "server_vad", "idle_timeout_ms": 5000},
    )
    command = UpdateSession("cb_1", agent, "Hi")
    ga = client_event(command, "ga")
    validate_client_event(ga, "ga")
    assert ga["session"]["audio"] == {
        "input": {
            "format": {"type": "audio/pcmu"},
            "turn_detection": {"type": "server_vad", "idle_timeout_ms": 5000},
            "transcription": {"model": "whisper-1"},
        },
        "output": {"format": {"type": "audio/pcmu"}, "voice": "alloy"},
    }
    beta = client_event(command, "beta")
    validate_client_event(beta, "beta")
    assert beta["session"] == {
        "modalities": ["audio", "text"],
        "instructions": "Hi",
        "input_audio_format": "g711_ulaw",
        "output_audio_format": "g711_ulaw",
        "voice": "alloy",
        "turn_detection": {"type": "server_vad"},
        "input_audio_transcription": {"model": "whisper-1"},
    }
    assert orjson.loads(encode(command, "beta")) == beta


def test_assistant_text_in_each_dialect() -> None:
    command = CreateItem("cb_2", Message("assistant", "Hello"))
    assert client_event(command, "ga")["item"]["content"] == [{"type": "output_text", "text": "Hello"}]
    assert client_event(command, "beta")["item"]["content"] == [{"type": "text", "text": "Hello"}]
    for dialect in ("ga", "beta"):
        validate_client_event(client_event(command, dialect), dialect)


def test_handshake_headers() -> None:
    assert headers_for("beta", "k") == {"Authorization": "Bearer k", "OpenAI-Beta": "realtime=v1"}
    assert headers_for("ga", "k") == {"Authorization": "Bearer k"}


# --- signed parameters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("outbound", [False, True])
def test_parameters_carry_a_short_reference_never_the_context(outbound: bool) -> None:
    """Whatever the context holds (here the REST API's maxima), the parameter stays within 256 characters: the
    context lives in the call record."""
    signer = StreamParameterSigner("s3cret" * 8, ttl_seconds=600)
    context = CallContext(
        call_sid=None if outbound else "CA" + "f" * 32,
        direction="outbound" if outbound else "inbound",
        agent="a" * 64,
        reference="r" * 200,
        caller="+15550100001",
        called="+15550100002",
        name="n" * 100,
        instructions="i" * 1500,
        greeting="g" * 300,
        items=tuple(ContextItem("user", "t" * 1000) for _ in range(10)),
        metadata={f"key{n}": "v" * 500 for n in range(40)},
        binding=secrets.token_urlsafe(16) if outbound else None,
    )
    parameters = signer.mint(context, now=1000)
    assert list(parameters) == [PARAMETER_NAME]
    assert len(parameters[PARAMETER_NAME]) <= MAX_PARAMETER_CHARS
    assert "Ada" not in parameters[PARAMETER_NAME]
    call_sid = "CA" + "f" * 32
    assert signer.verify(parameters, call_sid, now=1599) == CallContext(call_sid=call_sid, binding=context.binding)


def test_parameters_refused_when_expired_foreign_or_resigned() -> None:
    signer = StreamParameterSigner("s3cret", ttl_seconds=60)
    parameters = signer.mint(CallContext(call_sid="CA1"), now=1000)
    with pytest.raises(ParameterError, match="expired"):
        signer.verify(parameters, "CA1", now=1061)
    with pytest.raises(ParameterError, match="another call"):
        signer.verify(parameters, "CA2", now=1001)
    with pytest.raises(ParameterError, match="tampered"):
        StreamParameterSigner("other", 60).verify(parameters, "CA1", now=1001)
    with pytest.raises(ParameterError, match="absent"):
        signer.verify({}, "CA1", now=1001)
    # Outbound calls have no SID when the TwiML is made: such parameters are not bound.
    unbound = signer.mint(CallContext(), now=1000)
    assert signer.verify(unbound, "CA9", now=1001).call_sid == "CA9"


# --- TwiML and signatures ---------------------------------------------------------------------------------


def test_twiml_connects_the_stream_with_parameters() -> None:
    xml = connect_stream_twiml("wss://bridge.example/twilio/media-stream", {"callbridge": "a&b<c>"}, say="Hello")
    root = ET.fromstring(xml)
    assert [child.tag for child in root] == ["Say", "Connect"]
    stream = root.find("Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://bridge.example/twilio/media-stream"
    parameter = stream.find("Parameter")
    assert parameter is not None and parameter.attrib == {"name": "callbridge", "value": "a&b<c>"}
    with pytest.raises(ValueError, match="query"):
        connect_stream_twiml("wss://bridge.example/twilio/media-stream?token=1", {})


def test_signatures() -> None:
    signatures = TwilioSignatures("token")
    url, params = "https://bridge.example/twilio/voice", {"CallSid": "CA1", "From": "+1"}
    signature = RequestValidator("token").compute_signature(url, params)
    assert signatures.valid(url, params, signature)
    assert not signatures.valid(url, {**params, "From": "+2"}, signature)
    assert not signatures.valid("https://evil.example/twilio/voice", params, signature)
    assert not signatures.valid(url, params, None)
    assert not TwilioSignatures(None).valid(url, params, signature)


def test_stream_url_is_derived_from_the_public_url() -> None:
    assert Settings(public_url="https://bridge.example/", _env_file=None).stream_url == (
        "wss://bridge.example/twilio/media-stream"
    )
    assert Settings(public_url="http://127.0.0.1:8080", _env_file=None).stream_url == (
        "ws://127.0.0.1:8080/twilio/media-stream"
    )
    with pytest.raises(ValueError):
        Settings(public_url="bridge.example", _env_file=None)


def test_settings_build_the_agent() -> None:
    settings = Settings(
        turn_detection="semantic_vad",
        vad_eagerness="low",
        transcription_model="",
        _env_file=None,
    )
    agent = settings.agent()
    assert agent.turn_detection == {"type": "semantic_vad", "eagerness": "low", "interrupt_response": True}
    assert agent.transcription_model is None and agent.server_cancels_on_speech


# --- tools ------------------------------------------------------------------------------------------------

registry = ToolRegistry()


@registry.tool
async def lookup_order(order_id: int, context: ToolContext, include_items: bool = False) -> dict[str, object]:
    """Look up an order by its number.

    Args:
        order_id: the order number the caller reads out
        include_items: whether to list the items
    """
    if order_id == 13:
        raise LookupError("no such order")
    return {"order_id": order_id, "call": context.call_sid, "items": ["kettle"] if include_items else []}


@registry.tool
def slow() -> str:
    """Never answers in time."""
    import time

    time.sleep(0.5)
    return "late"


def test_tool_schema_from_hints_and_docstring() -> None:
    (schema, _) = registry.schemas
    assert schema == {
        "type": "function",
        "name": "lookup_order",
        "description": "Look up an order by its number.",
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": {"type": "integer", "description": "the order number the caller reads out"},
                "include_items": {
                    "type": "boolean",
                    "default": False,
                    "description": "whether to list the items",
                },
            },
            "required": ["order_id"],
        },
    }
    tool_event = {"type": "session.update", "session": {"type": "realtime", "tools": list(registry.schemas)}}
    validate_client_event(tool_event, "ga")


def test_tool_runs_and_reports_errors() -> None:
    context = ToolContext("CA1", CallContext())

    async def run(name: str, arguments: str, limit: float = 1.0) -> tuple[bool, dict[str, object]]:
        ok, output = await registry.run(name, arguments, context, limit)
        return ok, orjson.loads(output)

    async def scenario() -> None:
        assert await run("lookup_order", '{"order_id": 7, "include_items": true}') == (
            True,
            {"order_id": 7, "call": "CA1", "items": ["kettle"]},
        )
        ok, output = await run("lookup_order", '{"order_id": 13}')
        assert not ok and "LookupError" in str(output["error"])
        ok, output = await run("lookup_order", '{"order_id": "seven"}')
        assert not ok and "invalid arguments" in str(output["error"])
        ok, output = await run("lookup_order", "{not json")
        assert not ok
        ok, output = await run("nope", "{}")
        assert not ok and "unknown tool" in str(output["error"])
        ok, output = await run("slow", "{}", limit=0.05)
        assert not ok and "did not answer" in str(output["error"])

    asyncio.run(scenario())
