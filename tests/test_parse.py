"""Reading the wire: both parsers' schemas, base64 as RFC 4648 has it, reasons that name the field, and nothing
kept of the buffer a message arrived in."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest

from callbridge.core import events as ev
from callbridge.realtime.dialect import BETA_TO_GA_EVENT_NAMES, Dialect
from callbridge.realtime.protocol import MALFORMED, SERVER_EVENT_TYPES, parse_server_event
from callbridge.telephony.media_streams import parse_twilio_message

STREAM_SID = "MZ" + "2" * 32


def media(payload: Any, **fields: Any) -> str:
    return json.dumps({"event": "media", "streamSid": STREAM_SID, "media": {"payload": payload, **fields}})


def delta(payload: Any, kind: str = "response.output_audio.delta") -> str:
    return json.dumps({"type": kind, "response_id": "resp_1", "item_id": "item_1", "delta": payload})


def reason(event: ev.TwilioEvent | ev.RealtimeEvent) -> str:
    match event:
        case ev.TwilioInvalidMessage(text):
            return text
        case ev.RealtimeError(code, message) if code == MALFORMED:
            return message
    raise AssertionError(f"not refused: {event!r}")


@pytest.mark.parametrize(
    "payload",
    [
        "AAAA==",  # padding after a whole quad
        "AAAA====",
        "AAAAA",  # not a multiple of four
        "AAAAAA=",
        "AA==AAAA",  # data after the padding
        "AAA",
        " AAAA",
        "AA\nAA",
        "AA-_",  # the URL-safe alphabet
        "ÀAAA",
    ],
)
def test_audio_must_be_base64_as_rfc_4648_has_it(payload: str) -> None:
    assert "at `$.media.payload`" in reason(parse_twilio_message(media(payload)))
    assert "at `$.delta`" in reason(parse_server_event(delta(payload)))


@pytest.mark.parametrize("payload", ["", "AA==", "AAA=", "AAAA", "+/+/", "f39/fw=="])
def test_base64_is_passed_on_as_it_came(payload: str) -> None:
    assert parse_twilio_message(media(payload, timestamp="20")) == ev.TwilioMedia(payload, 20)
    assert parse_server_event(delta(payload)) == ev.RealtimeAudioDelta("resp_1", "item_1", payload)


def test_base64_with_json_escapes_is_read_as_json() -> None:
    escaped = '{"event": "media", "media": {"payload": "\\u0041A\\/\\/"}}'
    assert parse_twilio_message(escaped) == ev.TwilioMedia("AA//")


def test_nothing_is_kept_of_the_buffer_a_message_arrived_in() -> None:
    """The WebSocket layer hands over a memoryview valid only during the call: every string must be a copy."""
    twilio = bytearray(media("AAAA", timestamp="40").encode())
    model = bytearray(delta("AAAA").encode())
    parsed_twilio = parse_twilio_message(memoryview(twilio))
    parsed_model = parse_server_event(memoryview(model))
    twilio[:] = b"x" * len(twilio)
    model[:] = b"x" * len(model)
    assert parsed_twilio == ev.TwilioMedia("AAAA", 40)
    assert parsed_model == ev.RealtimeAudioDelta("resp_1", "item_1", "AAAA")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"event": "mark", "mark": {"name": "' + "x" * 257 + '"}}', "$.mark.name"),
        ('{"event": "mark", "mark": {"name": ""}}', "$.mark.name"),
        ('{"event": "media", "media": {"payload": "AAAA", "timestamp": "-5"}}', "$.media.timestamp"),
        ('{"event": "media", "media": {"payload": "AAAA", "timestamp": 9007199254740993}}', "$.media.timestamp"),
        ('{"event": "media", "media": {"payload": "AAAA", "timestamp": true}}', "$.media.timestamp"),
        ('{"event": "start", "start": {"streamSid": "MZ1", "callSid": "CA1\\n"}}', "$.start.callSid"),
        ('{"event": "start", "start": {"streamSid": "MZ1", "callSid": "' + "C" * 65 + '"}}', "$.start.callSid"),
        ('{"event": "dtmf", "dtmf": {"digit": "55"}}', "$.dtmf.digit"),
        ('{"event": 7}', "$.event"),
        ('{"event": "surprise"}', "$.event"),
    ],
)
def test_a_refused_twilio_frame_names_the_field(raw: str, field: str) -> None:
    text = reason(parse_twilio_message(raw))
    assert f"at `{field}`" in text and len(text) <= 200, text


def test_a_start_frame_is_checked_as_a_whole() -> None:
    parameters = {f"p{n}": "v" for n in range(33)}
    start = {"streamSid": "MZ1", "callSid": "CA1", "customParameters": parameters}
    assert "customParameters" in reason(parse_twilio_message(json.dumps({"event": "start", "start": start})))
    start = {"streamSid": "MZ1", "callSid": "CA1", "mediaFormat": {"encoding": "x" * 65}}
    assert "mediaFormat.encoding" in reason(parse_twilio_message(json.dumps({"event": "start", "start": start})))
    start = {"streamSid": "MZ1", "callSid": "CA1", "mediaFormat": {"sampleRate": "16000"}}
    parsed = parse_twilio_message(json.dumps({"event": "start", "start": start}))
    assert parsed == ev.TwilioStart("MZ1", "CA1", sample_rate=16000)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"type": "response.output_audio.delta", "response_id": "", "item_id": "i", "delta": "AAAA"}, "$.response_id"),
        ({"type": "input_audio_buffer.speech_started", "item_id": "i", "audio_start_ms": -1}, "$.audio_start_ms"),
        ({"type": "conversation.item.truncated", "item_id": "i"}, "`audio_end_ms`"),
        (
            {"type": "response.done", "response": {"id": "r", "usage": {"input_token_details": {"text_tokens": 1.5}}}},
            "$.response.usage.input_token_details.text_tokens",
        ),
        (
            {"type": "response.done", "response": {"id": "r", "output": [{"type": "message", "role": "assistant"}]}},
            "$.response.output[].id",
        ),
        ({"type": "response.output_item.done", "response_id": "r", "item": {"type": "function_call"}}, "$.item"),
        (
            {"type": "response.output_item.done", "response_id": "r", "item": {"type": "function_call", "id": ""}},
            "$.item.id",
        ),
        ({"type": "error", "error": {"event_id": "e" * 257}}, "$.error.event_id"),
        ({"type": 5}, "$.type"),
    ],
)
def test_a_malformed_realtime_event_names_the_field(event: dict[str, Any], field: str) -> None:
    text = reason(parse_server_event(json.dumps(event)))
    assert (field if field.startswith("`") else f"at `{field}`") in text and len(text) <= 200, text


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_every_server_event_type_is_in_the_schema(dialect: Dialect) -> None:
    """A documented event the session does not act on is a known RealtimeOther, in either dialect; one the session
    acts on is parsed (and without its fields, refused as malformed); an undocumented type is an unknown one."""
    names = {name: name for name in SERVER_EVENT_TYPES}
    if dialect == "beta":
        names |= BETA_TO_GA_EVENT_NAMES
    for wire_name, ga_name in names.items():
        match parse_server_event(json.dumps({"type": wire_name, "extra": [1, {"x": None}]}), dialect):
            case ev.RealtimeOther(kind, known):
                assert (kind, known) == (ga_name, True)
            case ev.RealtimeError(code) as error if ga_name != "error":
                assert code == MALFORMED, error
            case parsed:
                assert ga_name in ("session.created", "error"), parsed
    assert parse_server_event('{"type": "response.output_audio.delta.x"}', dialect) == ev.RealtimeOther(
        "response.output_audio.delta.x", known=False
    )


def test_a_beta_name_is_an_unknown_event_in_the_ga_dialect() -> None:
    assert parse_server_event(delta("AAAA", "response.audio.delta"), "ga") == ev.RealtimeOther(
        "response.audio.delta", known=False
    )
    assert parse_server_event(delta("AAAA", "response.audio.delta"), "beta") == ev.RealtimeAudioDelta(
        "resp_1", "item_1", "AAAA"
    )


def test_fields_the_session_does_not_read_are_skipped_unchecked() -> None:
    """Numbers past what a reader holds (valid JSON) where the session reads nothing do not refuse the message; where
    it reads one, they do."""
    raw = '{"event": "mark", "sequenceNumber": 100000000000000000000000000000, "mark": {"name": "item_1:800"}}'
    assert parse_twilio_message(raw) == ev.TwilioMark("item_1:800")
    event = '{"type": "response.created", "response": {"id": "r", "max_output_tokens": 1e400}}'
    assert parse_server_event(event) == ev.RealtimeResponseCreated("r")
    event = '{"type": "input_audio_buffer.speech_started", "item_id": "i", "audio_start_ms": 1e400}'
    assert "at `$.audio_start_ms`" in reason(parse_server_event(event))


@pytest.mark.parametrize(
    "raw",
    [
        '"\ud800"',  # a lone surrogate: only a str can hold one
        '{"event": "stop", "x": ' + "[" * 5000 + "]" * 5000 + "}",
        b'{"event": "mark", "mark": {"name": "\xff"}}',
        b"",
        b"\x00",
    ],
)
def test_hostile_bytes_are_refused_with_a_reason(raw: str | bytes) -> None:
    text = reason(parse_twilio_message(raw))
    assert text.startswith("not JSON"), text
    text = reason(parse_server_event(raw, "beta"))
    assert text and "internal" not in text, text


@pytest.mark.parametrize(
    ("dialect", "kind", "speaker"),
    [
        ("ga", "response.output_audio_transcript.delta", "agent"),
        ("beta", "response.audio_transcript.delta", "agent"),
        ("ga", "conversation.item.input_audio_transcription.delta", "caller"),
    ],
)
def test_transcript_deltas(dialect: Dialect, kind: str, speaker: Literal["agent", "caller"]) -> None:
    raw = json.dumps({"type": kind, "event_id": "e1", "item_id": "item_7", "content_index": 0, "delta": "Hel"})
    assert parse_server_event(raw, dialect) == ev.RealtimeTranscriptDelta(speaker, "item_7", "Hel")
