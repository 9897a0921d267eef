"""Property tests: any sequence of peer events leaves the session consistent and its output well-formed."""

from __future__ import annotations

import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callbridge.core import events as ev
from callbridge.core.commands import CancelResponse, EndCall, PlayAudio, SendMark, TruncateItem
from callbridge.core.context import AgentConfig
from callbridge.core.session import b64_audio_bytes
from callbridge.telephony.media_streams import parse_twilio_message

from conftest import Harness, audio

pytestmark = [pytest.mark.fuzz]

ITEMS = st.sampled_from(["item_1", "item_2", "item_3"])
RESPONSES = st.sampled_from(["resp_1", "resp_2", "resp_3"])

EVENTS = st.one_of(
    st.builds(ev.TwilioMedia, st.sampled_from([audio(20), audio(20, 3)]), st.integers(0, 10_000)),
    st.builds(ev.TwilioMark, st.sampled_from(["item_1:800", "item_1:1600", "item_2:800", "bogus"])),
    st.builds(ev.TwilioDtmf, st.sampled_from(["1", "#"])),
    st.just(ev.TwilioConnected()),
    st.just(ev.TwilioInvalidMessage("junk")),
    st.just(ev.RealtimeSessionUpdated()),
    st.builds(ev.RealtimeSpeechStarted, ITEMS, st.integers(0, 10_000)),
    st.builds(ev.RealtimeSpeechStopped, ITEMS, st.integers(0, 10_000)),
    st.builds(ev.RealtimeResponseCreated, RESPONSES),
    st.builds(ev.RealtimeResponseDone, RESPONSES, st.sampled_from(["completed", "cancelled"])),
    st.builds(ev.RealtimeAudioDelta, RESPONSES, ITEMS, st.sampled_from([audio(100), audio(40)])),
    st.builds(ev.RealtimeAudioTranscriptDone, ITEMS, st.text(max_size=40)),
    st.builds(ev.RealtimeInputTranscriptionCompleted, ITEMS, st.text(max_size=40)),
    st.builds(
        ev.RealtimeFunctionCallDone,
        RESPONSES,
        ITEMS,
        st.just("call_1"),
        st.just("f"),
        st.just("{}"),
        st.sampled_from(["completed", "incomplete"]),
    ),
    st.builds(ev.ToolFinished, st.just("call_1"), st.just("{}")),
    st.builds(ev.RealtimeError, st.sampled_from(["server_error", "response_cancel_not_active"]), st.just("x")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(EVENTS, st.floats(0, 0.5)), max_size=60), st.booleans())
def test_any_event_sequence_keeps_the_session_sound(steps: list[tuple[ev.Event, float]], server_cancels: bool) -> None:
    agent = AgentConfig(turn_detection={"type": "server_vad", "interrupt_response": server_cancels})
    harness = Harness(agent)
    harness.go_live()
    truncated: dict[str, int] = {}
    sent_bytes: dict[str, int] = {}  # per item, the agent audio relayed to Twilio
    for event, pause in steps:
        for command in harness.handle(event, at=harness.now + pause):  # Harness validates every wire message
            if isinstance(command, TruncateItem):
                item = command.item_id
                assert item not in truncated, "an item is truncated at most once"
                truncated[item] = command.audio_end_ms
                assert 0 < command.audio_end_ms * 8 <= sent_bytes.get(item, 0), "never beyond what was sent"
            if isinstance(command, CancelResponse):
                assert not server_cancels
            assert not isinstance(command, EndCall), "peer events alone never end a live call"
            if isinstance(command, PlayAudio):
                assert isinstance(event, ev.RealtimeAudioDelta)
                sent_bytes[event.item_id] = sent_bytes.get(event.item_id, 0) + b64_audio_bytes(command.payload)
            if isinstance(command, SendMark):  # a mark never names more than was sent
                item, end = command.name.rsplit(":", 1)
                assert int(end) == sent_bytes[item]
    assert harness.session.phase == "live"


@given(st.binary(max_size=300) | st.text(max_size=300))
def test_twilio_parser_never_raises(raw: bytes | str) -> None:
    """Garbage is refused by a check that names what is wrong, never by the catch-all behind the checks (which
    would hide a gap in them), and the reason stays short."""
    event = parse_twilio_message(raw)
    if isinstance(event, ev.TwilioInvalidMessage):
        assert not event.reason.startswith("internal parser error"), event.reason
        assert len(event.reason) <= 200
    else:
        assert isinstance(event, typing.get_args(ev.TwilioEvent))
