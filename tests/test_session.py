"""The call session, event by event: every behaviour of the bridge as a deterministic unit test."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import replace

import pytest

from callbridge.core import events as ev
from callbridge.core.commands import (
    EndCall,
    Log,
    OpenRealtime,
    RecordEvent,
    RecordTranscript,
    ResolveContext,
    RunTool,
    TransferCall,
)
from callbridge.core.context import AgentConfig, CallContext, ContextItem
from callbridge.core.session import GOODBYE_LIMIT_S, b64_audio_bytes
from callbridge.core.transcript import cut_to_heard

from conftest import CALL_SID, STREAM_SID, Harness, audio, of_type, realtime_events, twilio_messages


def lines(commands: Sequence[object]) -> list[RecordTranscript]:
    return [c for c in commands if isinstance(c, RecordTranscript)]


def ends(commands: Sequence[object]) -> list[EndCall]:
    return [c for c in commands if isinstance(c, EndCall)]


def logs(commands: Sequence[object], event: str) -> list[Log]:
    return [c for c in commands if isinstance(c, Log) and c.event == event]


# --- admission -------------------------------------------------------------------------------------------


def test_valid_start_opens_realtime(harness: Harness) -> None:
    commands = harness.handle(harness.start_event())
    assert any(isinstance(c, OpenRealtime) for c in commands)
    assert harness.session.phase == "connecting"
    assert harness.session.context is not None and harness.session.context.caller == "+15550100001"


def test_start_without_parameters_is_refused(harness: Harness) -> None:
    commands = harness.handle(ev.TwilioStart(STREAM_SID, CALL_SID, custom_parameters={}))
    assert [e.twilio_close_code for e in ends(commands)] == [1008]
    assert not any(isinstance(c, OpenRealtime) for c in commands)
    assert logs(commands, "security.stream_refused")[0].fields["reason"] == "stream parameters absent"


def test_tampered_parameters_are_refused(harness: Harness) -> None:
    start = harness.start_event()
    token = start.custom_parameters["callbridge"]
    tampered = replace(
        start, custom_parameters={"callbridge": token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]}
    )
    commands = harness.handle(tampered)
    assert ends(commands)[0].twilio_close_code == 1008
    assert "tampered" in logs(commands, "security.stream_refused")[0].fields["reason"]


def test_expired_parameters_are_refused(harness: Harness) -> None:
    start = harness.start_event()
    commands = harness.handle(start, at=harness.now + 601)
    assert "expired" in logs(commands, "security.stream_refused")[0].fields["reason"]
    assert not any(isinstance(c, OpenRealtime) for c in commands)


def test_parameters_of_another_call_are_refused(harness: Harness) -> None:
    start = harness.start_event(call_sid="CA" + "9" * 32)
    commands = harness.handle(replace(start, call_sid=CALL_SID))
    assert "another call" in logs(commands, "security.stream_refused")[0].fields["reason"]


def test_second_start_is_ignored_and_counted(harness: Harness) -> None:
    harness.go_live()
    commands = harness.handle(harness.start_event())
    assert logs(commands, "twilio.duplicate_start")
    assert not any(isinstance(c, OpenRealtime) for c in commands)
    assert harness.session.stats.protocol_errors == 1
    assert harness.session.phase == "live"


def test_media_before_start_is_counted_not_forwarded(harness: Harness) -> None:
    commands = harness.handle(ev.TwilioMedia(audio(20)))
    commands += harness.handle(ev.TwilioMedia(audio(20)))
    assert realtime_events(commands) == []
    assert harness.session.stats.frames_before_start == 2
    assert len(logs(commands, "twilio.media_before_start")) == 1


# --- configuration and greeting ---------------------------------------------------------------------------


def test_realtime_connected_sends_session_update_context_and_greeting() -> None:
    agent = AgentConfig(instructions="Be brief.", voice="cedar", greeting="Hi, this is Ada.")
    harness = Harness(agent)
    harness.handle(
        harness.start_event(
            CallContext(
                call_sid=CALL_SID,
                caller="+1555",
                name="Grace",
                items=(ContextItem("user", "Earlier I asked about my order."),),
            )
        )
    )
    commands = harness.handle(ev.RealtimeConnected())
    assert [e["type"] for e in realtime_events(commands)] == ["session.update"]  # alone, until it is confirmed
    commands += harness.handle(ev.RealtimeSessionUpdated())
    kinds = [e["type"] for e in realtime_events(commands)]
    assert kinds == [
        "session.update",
        "conversation.item.create",
        "conversation.item.create",
        "response.create",
    ]
    session = realtime_events(commands)[0]["session"]
    assert session["type"] == "realtime"
    assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["input"]["noise_reduction"] == {"type": "far_field"}
    assert session["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "cedar"}
    assert session["instructions"] == "Be brief."
    facts = realtime_events(commands)[1]["item"]
    assert facts["role"] == "system" and "Grace" in facts["content"][0]["text"]
    assert facts["content"][0]["type"] == "input_text"
    assert "Hi, this is Ada." in realtime_events(commands)[3]["response"]["instructions"]


def test_context_overrides_instructions_and_greeting(harness: Harness) -> None:
    context = CallContext(call_sid=CALL_SID, instructions="Remind about the 3 pm appointment.", greeting="Hello Sam!")
    harness.handle(harness.start_event(context))
    commands = harness.handle(ev.RealtimeConnected()) + harness.handle(ev.RealtimeSessionUpdated())
    assert of_type(commands, "session.update")[0]["session"]["instructions"] == "Remind about the 3 pm appointment."
    assert "Hello Sam!" in of_type(commands, "response.create")[0]["response"]["instructions"]


def test_agent_that_waits_for_the_caller_sends_no_greeting() -> None:
    harness = Harness(AgentConfig(speaks_first=False))
    harness.handle(harness.start_event())
    harness.handle(ev.RealtimeConnected())
    assert of_type(harness.handle(ev.RealtimeSessionUpdated()), "response.create") == []


def test_tools_are_declared_in_the_session() -> None:
    tool = {
        "type": "function",
        "name": "lookup",
        "description": "Look up.",
        "parameters": {"type": "object", "properties": {}},
    }
    harness = Harness(AgentConfig(tools=(tool,)))
    harness.handle(harness.start_event())
    session = of_type(harness.handle(ev.RealtimeConnected()), "session.update")[0]["session"]
    assert session["tools"] == [tool] and "tool_choice" not in session  # sent only when configured
    chosen = Harness(AgentConfig(tools=(tool,), tool_choice="required"))
    chosen.handle(chosen.start_event())
    assert of_type(chosen.handle(ev.RealtimeConnected()), "session.update")[0]["session"]["tool_choice"] == "required"


# --- caller audio ----------------------------------------------------------------------------------------


def test_audio_before_ready_is_buffered_then_flushed_in_order(harness: Harness) -> None:
    harness.handle(harness.start_event())
    payloads = [audio(20, byte) for byte in (1, 2, 3)]
    for n, payload in enumerate(payloads):
        assert harness.handle(ev.TwilioMedia(payload, timestamp_ms=20 * n)) == []
    harness.handle(ev.RealtimeConnected())
    commands = harness.handle(ev.RealtimeSessionUpdated())
    assert [e["audio"] for e in of_type(commands, "input_audio_buffer.append")] == payloads
    live = harness.handle(ev.TwilioMedia(audio(20, 9)))
    assert of_type(live, "input_audio_buffer.append")[0]["audio"] == audio(20, 9)


def test_pre_ready_buffer_is_bounded_and_drops_oldest() -> None:
    harness = Harness(pre_ready_buffer_ms=60)
    harness.handle(harness.start_event())
    payloads = [audio(20, byte) for byte in range(1, 6)]
    dropped_logs = []
    for payload in payloads:
        dropped_logs += logs(harness.handle(ev.TwilioMedia(payload)), "audio.buffer_overflow")
    harness.handle(ev.RealtimeConnected())
    flushed = of_type(harness.handle(ev.RealtimeSessionUpdated()), "input_audio_buffer.append")
    assert [e["audio"] for e in flushed] == payloads[2:]
    assert harness.session.stats.frames_buffered_dropped == 2
    assert len(dropped_logs) == 2


def test_caller_audio_passes_through_untouched(harness: Harness) -> None:
    harness.go_live()
    odd = "gAB/AP8A"  # any base64 string reaches the model as the very same string
    assert of_type(harness.handle(ev.TwilioMedia(odd)), "input_audio_buffer.append")[0]["audio"] is odd


# --- agent audio and marks -------------------------------------------------------------------------------


def test_agent_audio_goes_to_twilio_with_named_marks(harness: Harness) -> None:
    harness.go_live()
    commands = harness.speak("resp_1", "item_1", chunks=2)
    messages = twilio_messages(commands)
    assert [m["event"] for m in messages] == ["media", "mark", "media", "mark"]
    assert all(m["streamSid"] == STREAM_SID for m in messages)
    assert [m["mark"]["name"] for m in messages if m["event"] == "mark"] == ["item_1:800", "item_1:1600"]


def test_small_deltas_share_a_mark_every_100_ms_and_keep_the_precision(harness: Harness) -> None:
    harness.go_live()
    # The model's smallest deltas, all at once (it runs ahead of playback, as the hosted model does).
    commands = harness.speak("resp_1", "item_1", chunks=13, chunk_ms=20)
    messages = twilio_messages(commands)
    media = [base64.b64decode(m["media"]["payload"]) for m in messages if m["event"] == "media"]
    # The first 40 ms go at once (Twilio has nothing queued); the rest are joined in twos; the 13th is held.
    assert [len(chunk) for chunk in media] == [160, 160, 320, 320, 320, 320, 320]
    assert b"".join(media) == bytes([0x7F]) * 160 * 12
    assert [m["mark"]["name"] for m in messages if m["event"] == "mark"] == ["item_1:960", "item_1:1920"]
    # The end of the response sends what is held, and its mark.
    done = twilio_messages(harness.handle(ev.RealtimeResponseDone("resp_1", "completed")))
    assert [m["event"] for m in done] == ["media", "mark"] and done[1]["mark"]["name"] == "item_1:2080"
    # What was heard is still known to the 20 ms frame: the last echo plus the time the next chunk has played.
    harness.handle(ev.TwilioMark("item_1:960"), at=harness.now + 0.12)
    assert harness.session.played_ms("item_1", harness.now + 0.03) == 150
    commands = harness.handle(ev.RealtimeSpeechStarted("item_c1", 900), at=harness.now + 0.03)
    (truncate,) = of_type(commands, "conversation.item.truncate")
    assert truncate["audio_end_ms"] == 150


def test_deltas_at_playback_pace_are_never_held(harness: Harness) -> None:
    """When each delta arrives as the one before it finishes playing, holding it would only add latency."""
    harness.go_live()
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    sizes = []
    for n in range(10):
        commands = harness.handle(ev.RealtimeAudioDelta("resp_1", "item_1", audio(20)), at=harness.now + 0.02)
        sizes += [len(m["media"]["payload"]) for m in twilio_messages(commands) if m["event"] == "media"]
        assert harness.session.flush_deadline() is None, n
    assert sizes == [len(audio(20))] * 10


def test_a_short_delta_is_held_one_frame_at_most(harness: Harness) -> None:
    harness.go_live()
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    harness.handle(ev.RealtimeAudioDelta("resp_1", "item_1", audio(100)))  # 100 ms queued at Twilio
    assert twilio_messages(harness.handle(ev.RealtimeAudioDelta("resp_1", "item_1", audio(20)))) == []
    deadline = harness.session.next_deadline()
    assert deadline is not None and deadline == pytest.approx(harness.now + 0.02)
    (media,) = twilio_messages(harness.handle(ev.Tick(), at=deadline))
    assert media["event"] == "media" and media["media"]["payload"] == audio(20)
    assert harness.session.next_deadline() == harness.now - 0.02 + 55 * 60  # only the rollover is timed now
    # Deltas of 40 ms or more pass at once, untouched.
    harness.handle(ev.RealtimeAudioDelta("resp_1", "item_1", audio(100)))
    big = audio(60)
    (sent,) = [m for m in twilio_messages(harness.handle(ev.RealtimeAudioDelta("resp_1", "item_1", big)))]
    assert sent["media"]["payload"] is big


def test_b64_audio_length() -> None:
    for n in range(0, 12):
        assert b64_audio_bytes(audio(0) + __import__("base64").b64encode(b"x" * n).decode()) == n


def test_marks_confirm_playback(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=3)
    harness.handle(ev.TwilioMark("item_1:800"), at=harness.now + 0.1)
    assert harness.session.played_ms("item_1", harness.now) == 100
    # Halfway through the second chunk, the played position is interpolated.
    assert harness.session.played_ms("item_1", harness.now + 0.05) == 150
    # And never beyond the chunk that is playing.
    assert harness.session.played_ms("item_1", harness.now + 5) == 200


# --- barge-in --------------------------------------------------------------------------------------------


def test_less_than_a_millisecond_heard_is_nothing_heard(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=1, chunk_ms=40)
    commands = harness.handle(ev.RealtimeSpeechStarted("item_c1", 0), at=harness.now + 0.0001)  # one byte played
    assert [m["event"] for m in twilio_messages(commands)] == ["clear"]
    assert of_type(commands, "conversation.item.truncate") == []  # never a truncation to 0 ms


def test_interrupt_before_any_audio_played(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=3)
    commands = harness.handle(ev.RealtimeSpeechStarted("item_c1", 500))
    assert [m["event"] for m in twilio_messages(commands)] == ["clear"]
    assert of_type(commands, "conversation.item.truncate") == []  # nothing was heard: nothing to truncate
    assert of_type(commands, "response.cancel") == []  # the server cancels by itself (interrupt_response)
    assert harness.session.stats.barge_ins == 1
    # Late deltas of the interrupted response are dropped.
    assert harness.handle(ev.RealtimeAudioDelta("resp_1", "item_1", audio(100))) == []
    # Flushed marks echoed after the clear are not playback.
    harness.handle(ev.TwilioMark("item_1:800"))
    assert harness.session.played_ms("item_1", harness.now) == 0
    done = harness.handle(ev.RealtimeAudioTranscriptDone("item_1", "Hello there, how can I help?"))
    assert lines(done) == []  # the caller heard none of it


def test_interrupt_mid_item_truncates_at_the_played_position(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=5)
    harness.handle(ev.RealtimeAudioTranscriptDone("item_1", "one two three four five six seven eight nine ten"))
    harness.handle(ev.TwilioMark("item_1:800"), at=harness.now + 0.1)
    harness.handle(ev.TwilioMark("item_1:1600"), at=harness.now + 0.1)
    commands = harness.handle(ev.RealtimeSpeechStarted("item_c1", 900), at=harness.now + 0.05)
    assert [m["event"] for m in twilio_messages(commands)] == ["clear"]
    truncate = of_type(commands, "conversation.item.truncate")
    assert truncate == [
        {
            "type": "conversation.item.truncate",
            "event_id": truncate[0]["event_id"],
            "item_id": "item_1",
            "content_index": 0,
            "audio_end_ms": 250,
        }
    ]
    (line,) = lines(commands)
    assert line.line.interrupted and line.line.speaker == "agent"
    assert line.line.text == "one two three four five"  # 250 of 500 ms heard
    assert line.line.end_ms - line.line.start_ms == 250


def test_interrupt_after_everything_played_does_nothing(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=2)
    harness.handle(ev.RealtimeAudioTranscriptDone("item_1", "All done."))
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    harness.handle(ev.TwilioMark("item_1:800"), at=harness.now + 0.1)
    settled = harness.handle(ev.TwilioMark("item_1:1600"), at=harness.now + 0.1)
    assert [line.line.text for line in lines(settled)] == ["All done."]
    commands = harness.handle(ev.RealtimeSpeechStarted("item_c1", 900))
    assert twilio_messages(commands) == [] and realtime_events(commands) == []
    assert harness.session.stats.barge_ins == 0


def test_interrupt_when_all_audio_sent_but_not_played(harness: Harness) -> None:
    """The model finished; Twilio is still playing: clear and truncate, but no cancel."""
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=4)
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    harness.handle(ev.TwilioMark("item_1:800"), at=harness.now + 0.1)
    commands = harness.handle(ev.RealtimeSpeechStarted("item_c1", 200), at=harness.now)
    assert [m["event"] for m in twilio_messages(commands)] == ["clear"]
    assert of_type(commands, "response.cancel") == []
    assert of_type(commands, "conversation.item.truncate")[0]["audio_end_ms"] == 100


def test_interrupt_cancels_only_when_the_server_does_not(manual_cancel_harness: Harness) -> None:
    harness = manual_cancel_harness
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=3)
    commands = harness.handle(ev.RealtimeSpeechStarted("item_c1", 100))
    assert len(of_type(commands, "response.cancel")) == 1
    assert harness.session.stats.cancels == 1
    # No cancel once the response is over.
    harness.handle(ev.RealtimeResponseDone("resp_1", "cancelled"))
    harness.speak("resp_2", "item_2", chunks=1)
    harness.handle(ev.RealtimeResponseDone("resp_2", "completed"))
    commands = harness.handle(ev.RealtimeSpeechStarted("item_c2", 900))
    assert of_type(commands, "response.cancel") == []
    assert [m["event"] for m in twilio_messages(commands)] == ["clear"]


def test_two_interrupts_in_a_row(manual_cancel_harness: Harness) -> None:
    harness = manual_cancel_harness
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=5)
    harness.handle(ev.TwilioMark("item_1:800"), at=harness.now + 0.1)
    first = harness.handle(ev.RealtimeSpeechStarted("item_c1", 100), at=harness.now)
    assert len(of_type(first, "response.cancel")) == 1
    assert len(of_type(first, "conversation.item.truncate")) == 1
    # The server's response.done has not arrived yet; the caller's VAD fires again.
    second = harness.handle(ev.RealtimeSpeechStarted("item_c2", 900), at=harness.now + 0.2)
    assert twilio_messages(second) == []
    assert realtime_events(second) == []
    assert harness.session.stats.cancels == 1 and harness.session.stats.truncations == 1


def test_new_response_after_interrupt_plays_normally(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=3)
    harness.handle(ev.RealtimeSpeechStarted("item_c1", 100))
    harness.handle(ev.RealtimeResponseDone("resp_1", "cancelled"))
    commands = harness.speak("resp_2", "item_2", chunks=1)
    assert [m["event"] for m in twilio_messages(commands)] == ["media", "mark"]


# --- transcripts -----------------------------------------------------------------------------------------


def test_caller_lines_carry_offsets_from_call_start(harness: Harness) -> None:
    harness.handle(ev.TwilioConnected())
    harness.handle(harness.start_event())
    harness.handle(ev.TwilioMedia(audio(20), timestamp_ms=40))  # buffered before the model was ready
    harness.handle(ev.RealtimeConnected())
    harness.handle(ev.RealtimeSessionUpdated())
    harness.handle(ev.RealtimeSpeechStarted("item_c1", 1000))
    harness.handle(ev.RealtimeSpeechStopped("item_c1", 2500))
    (line,) = lines(harness.handle(ev.RealtimeInputTranscriptionCompleted("item_c1", " I'd like to book. ")))
    assert (line.line.speaker, line.line.text, line.line.start_ms, line.line.end_ms) == (
        "caller",
        "I'd like to book.",
        1040,
        2540,
    )


def test_failed_transcription_still_records_a_line(harness: Harness) -> None:
    harness.go_live()
    harness.handle(ev.RealtimeSpeechStarted("item_c1", 0))
    commands = harness.handle(ev.RealtimeInputTranscriptionFailed("item_c1", "audio unintelligible"))
    (line,) = lines(commands)
    assert line.line.failed and line.line.text == ""


def test_agent_line_waits_until_heard(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=2)
    assert lines(harness.handle(ev.RealtimeAudioTranscriptDone("item_1", "Hello!"))) == []
    assert lines(harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))) == []
    harness.handle(ev.TwilioMark("item_1:800"), at=harness.now + 0.1)
    (line,) = lines(harness.handle(ev.TwilioMark("item_1:1600"), at=harness.now + 0.1))
    assert line.line.text == "Hello!" and not line.line.interrupted
    assert line.line.end_ms - line.line.start_ms == 200


def test_cut_to_heard() -> None:
    assert cut_to_heard("hello there friend", 0, 100) == ""
    assert cut_to_heard("hello there friend", 100, 100) == "hello there friend"
    assert cut_to_heard("hello there friend", 50, 100) == "hello"


# --- tools -----------------------------------------------------------------------------------------------


def test_tool_call_during_a_response(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=1)
    call = ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "lookup", '{"id": 7}', "completed")
    commands = harness.handle(call)
    assert [c for c in commands if isinstance(c, RunTool)] == [RunTool("call_1", "lookup", '{"id": 7}')]
    # The tool answers while the response is still active: output now, response.create only after done.
    commands = harness.handle(ev.ToolFinished("call_1", '{"status": "shipped"}'))
    output = of_type(commands, "conversation.item.create")[0]["item"]
    assert output == {"type": "function_call_output", "call_id": "call_1", "output": '{"status": "shipped"}'}
    assert of_type(commands, "response.create") == []
    commands = harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    assert len(of_type(commands, "response.create")) == 1


def test_two_tools_in_one_response_get_one_response_create(harness: Harness) -> None:
    harness.go_live()
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_a", "call_a", "a", "{}", "completed"))
    harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_b", "call_b", "b", "{}", "completed"))
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    assert of_type(harness.handle(ev.ToolFinished("call_a", "1")), "response.create") == []
    assert len(of_type(harness.handle(ev.ToolFinished("call_b", "2")), "response.create")) == 1


def test_incomplete_function_call_is_not_run(harness: Harness) -> None:
    harness.go_live()
    commands = harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "x", '{"a"', "incomplete"))
    assert not [c for c in commands if isinstance(c, RunTool)]


def test_tool_error_output_reaches_the_model(harness: Harness) -> None:
    harness.go_live()
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "x", "{}", "completed"))
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    commands = harness.handle(ev.ToolFinished("call_1", '{"error": "boom"}', ok=False))
    assert of_type(commands, "conversation.item.create")[0]["item"]["output"] == '{"error": "boom"}'
    assert len(of_type(commands, "response.create")) == 1
    assert harness.session.phase == "live"


def test_server_response_racing_ours_is_retried_after_it(harness: Harness) -> None:
    harness.go_live()
    harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "x", "{}", "completed"))
    assert len(of_type(harness.handle(ev.ToolFinished("call_1", "{}")), "response.create")) == 1
    harness.handle(ev.RealtimeError("conversation_already_has_active_response", "busy"))
    harness.handle(ev.RealtimeResponseCreated("resp_2"))
    assert len(of_type(harness.handle(ev.RealtimeResponseDone("resp_2", "completed")), "response.create")) == 1


def test_stop_during_a_tool_call(harness: Harness) -> None:
    harness.go_live()
    harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "x", "{}", "completed"))
    commands = harness.handle(ev.TwilioStop())
    assert ends(commands)[0].reason == "caller_hung_up"
    assert harness.handle(ev.ToolFinished("call_1", "{}")) == []  # nothing is sent after the end


# --- errors and the end ----------------------------------------------------------------------------------


def test_realtime_error_mid_call_is_logged_and_the_call_goes_on(harness: Harness) -> None:
    harness.go_live()
    commands = harness.handle(ev.RealtimeError("server_error", "The server had an error", "cb_3"))
    assert logs(commands, "realtime.error")[0].level == "error"
    assert not ends(commands)
    assert of_type(harness.handle(ev.TwilioMedia(audio(20))), "input_audio_buffer.append")


def test_realtime_close_ends_the_call_when_reconnecting_fails() -> None:
    harness = Harness(hang_up_when_model_ends=True, reconnect_delays_s=(0.0, 0.5))
    harness.go_live()
    opens = [c for c in harness.handle(ev.RealtimeClosed(1011, "server error")) if isinstance(c, OpenRealtime)]
    assert opens == [OpenRealtime(0.0)]  # lost mid-call: reconnect at once
    assert [c for c in harness.handle(ev.RealtimeConnectFailed("refused")) if isinstance(c, OpenRealtime)] == [
        OpenRealtime(0.5)
    ]
    (end,) = ends(harness.handle(ev.RealtimeConnectFailed("refused")))
    assert end.reason == "realtime_unavailable" and end.hang_up


def test_realtime_close_closes_the_stream_by_default() -> None:
    harness = Harness(reconnect_delays_s=())
    harness.go_live()
    (end,) = ends(harness.handle(ev.RealtimeClosed(1000, "")))
    assert not end.hang_up and end.twilio_close_code == 1000 and end.reason == "realtime_closed"


def test_connection_refused_at_start_is_retried() -> None:
    harness = Harness(reconnect_delays_s=(0.0, 1.0))
    harness.handle(harness.start_event())
    assert [c for c in harness.handle(ev.RealtimeConnectFailed("refused")) if isinstance(c, OpenRealtime)] == [
        OpenRealtime(0.0)
    ]
    assert of_type(harness.handle(ev.RealtimeConnected()), "session.update")
    assert of_type(harness.handle(ev.RealtimeSessionUpdated()), "response.create")  # the greeting, once


def test_lost_connection_reconnects_and_replays_the_conversation(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=1)
    harness.handle(ev.RealtimeAudioTranscriptDone("item_1", "Hello, how can I help?"))
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    harness.handle(ev.TwilioMark("item_1:800"), at=harness.now + 0.1)
    harness.handle(ev.RealtimeSpeechStarted("item_c1", 0))
    harness.handle(ev.RealtimeInputTranscriptionCompleted("item_c1", "I need a plumber."))
    harness.speak("resp_2", "item_2", chunks=2)  # an answer is streaming when the connection drops
    commands = harness.handle(ev.RealtimeClosed(1006, "abnormal closure"))
    assert [c for c in commands if isinstance(c, OpenRealtime)] == [OpenRealtime(0.0)] and not ends(commands)
    # While the model is away, caller audio is kept; the agent audio already at Twilio plays on.
    assert realtime_events(harness.handle(ev.TwilioMedia(audio(20, 5), timestamp_ms=9000))) == []
    assert harness.handle(ev.RealtimeAudioDelta("resp_2", "item_2", audio(100))) == []  # a stale delta
    assert of_type(harness.handle(ev.RealtimeConnected()), "session.update")
    commands = harness.handle(ev.RealtimeSessionUpdated())
    items = [e["item"] for e in of_type(commands, "conversation.item.create")]
    replayed = [(item["role"], item["content"][0]["text"]) for item in items[1:]]
    assert replayed == [("assistant", "Hello, how can I help?"), ("user", "I need a plumber.")]
    assert items[1]["content"][0]["type"] == "output_text"
    assert of_type(commands, "response.create") == []  # no second greeting
    flushed = of_type(commands, "input_audio_buffer.append")
    assert [e["audio"] for e in flushed] == [audio(20, 5)]
    assert harness.session.phase == "live"
    # The old answer still plays at Twilio; a barge-in clears it but truncates nothing in the new session.
    commands = harness.handle(ev.RealtimeSpeechStarted("item_c2", 100))
    assert [m["event"] for m in twilio_messages(commands)] == ["clear"]
    assert of_type(commands, "conversation.item.truncate") == []


def test_hang_up_flushes_partly_heard_agent_line(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=4)
    harness.handle(ev.RealtimeAudioTranscriptDone("item_1", "alpha beta gamma delta"))
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    harness.handle(ev.TwilioMark("item_1:800"), at=harness.now + 0.1)
    harness.handle(ev.TwilioMark("item_1:1600"), at=harness.now + 0.1)
    commands = harness.handle(ev.TwilioStop())
    (line,) = lines(commands)
    assert line.line.interrupted and line.line.text == "alpha beta"


def test_nothing_happens_after_the_end(harness: Harness) -> None:
    harness.go_live()
    harness.handle(ev.TwilioStop())
    assert harness.handle(ev.TwilioMedia(audio(20))) == []
    assert harness.handle(ev.RealtimeAudioDelta("resp_1", "item_1", audio(20))) == []


def test_invalid_twilio_frames_are_counted(harness: Harness) -> None:
    harness.go_live()
    commands = harness.handle(ev.TwilioInvalidMessage("binary frame"))
    assert logs(commands, "twilio.invalid_message") and harness.session.stats.protocol_errors == 1


def test_unknown_mark_is_counted(harness: Harness) -> None:
    harness.go_live()
    assert logs(harness.handle(ev.TwilioMark("never-sent")), "twilio.unknown_mark")


# --- agents, context resolution, key presses, call control ----------------------------------------------


def test_agent_is_chosen_by_the_signed_parameters() -> None:
    sales = AgentConfig(name="sales", instructions="Sell.", voice="cedar")
    harness = Harness(agents={"sales": sales})
    harness.handle(harness.start_event(CallContext(call_sid=CALL_SID, agent="sales")))
    session = of_type(harness.handle(ev.RealtimeConnected()), "session.update")[0]["session"]
    assert session["instructions"] == "Sell." and session["audio"]["output"]["voice"] == "cedar"
    unknown = Harness(agents={"sales": sales})
    unknown.handle(unknown.start_event(CallContext(call_sid=CALL_SID, agent="nobody")))
    assert unknown.session.agent.name == "default"


def test_context_is_resolved_in_parallel_with_the_model_connection() -> None:
    harness = Harness(resolve_context=True)
    commands = harness.handle(harness.start_event(CallContext(call_sid=CALL_SID, reference="customer-42")))
    (resolve,) = [c for c in commands if isinstance(c, ResolveContext)]
    assert resolve.context.reference == "customer-42"
    assert any(isinstance(c, OpenRealtime) for c in commands)
    assert realtime_events(harness.handle(ev.RealtimeConnected())) == []  # waits for the context
    resolved = CallContext(name="Ada", greeting="Hi Ada!", items=(ContextItem("user", "Last time: a refund."),))
    commands = harness.handle(ev.ContextResolved(resolved))
    assert [e["type"] for e in realtime_events(commands)] == ["session.update"]
    commands += harness.handle(ev.RealtimeSessionUpdated())
    kinds = [e["type"] for e in realtime_events(commands)]
    assert kinds == ["session.update", "conversation.item.create", "conversation.item.create", "response.create"]
    assert "Ada" in realtime_events(commands)[1]["item"]["content"][0]["text"]
    assert "Hi Ada!" in of_type(commands, "response.create")[0]["response"]["instructions"]
    assert harness.handle(ev.ContextResolved(None)) == []  # a late second answer changes nothing


def test_failed_resolution_keeps_the_defaults() -> None:
    harness = Harness(resolve_context=True)
    harness.handle(harness.start_event())
    harness.handle(ev.ContextResolved(None))
    commands = harness.handle(ev.RealtimeConnected())
    assert of_type(commands, "session.update")[0]["session"]["instructions"] == AgentConfig().instructions


def test_key_presses_reach_the_model_and_the_record(harness: Harness) -> None:
    harness.go_live()
    commands = harness.handle(ev.TwilioDtmf("5"))
    item = of_type(commands, "conversation.item.create")[0]["item"]
    assert item["role"] == "user" and "5" in item["content"][0]["text"]
    assert len(of_type(commands, "response.create")) == 1  # the caller waits in silence for an answer
    assert [c.data for c in commands if isinstance(c, RecordEvent)] == [{"digit": "5"}]


def _call_control_harness(**agent: object) -> Harness:
    harness = Harness(AgentConfig(builtin_tools=("end_call", "transfer_call"), **agent))  # type: ignore[arg-type]
    harness.go_live()
    return harness


def test_end_call_says_goodbye_then_hangs_up() -> None:
    harness = _call_control_harness()
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    commands = harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "end_call", "{}", "completed"))
    assert not [c for c in commands if isinstance(c, RunTool)]  # handled by callbridge itself
    assert json.loads(of_type(commands, "conversation.item.create")[0]["item"]["output"])["ok"] is True
    assert len(of_type(harness.handle(ev.RealtimeResponseDone("resp_1", "completed")), "response.create")) == 1
    harness.speak("resp_2", "item_bye", chunks=2)  # "Goodbye!"
    assert ends(harness.handle(ev.RealtimeResponseDone("resp_2", "completed"))) == []  # still playing
    harness.handle(ev.TwilioMark("item_bye:800"))
    (end,) = ends(harness.handle(ev.TwilioMark("item_bye:1600")))
    assert end.reason == "agent_ended_call" and end.hang_up


def test_a_goodbye_never_said_still_ends_the_call() -> None:
    harness = _call_control_harness()
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "end_call", "{}", "completed"))
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    harness.speak("resp_2", "item_bye", chunks=2)  # a goodbye whose playback Twilio never confirms
    # No caller audio is needed to notice the time: the session's deadline wakes it.
    deadline = harness.session.next_deadline()
    assert deadline is not None and deadline == pytest.approx(harness.now + GOODBYE_LIMIT_S)
    assert ends(harness.handle(ev.Tick(), at=deadline - 1)) == []
    (end,) = ends(harness.handle(ev.Tick(), at=deadline))
    assert end.reason == "agent_ended_call" and end.hang_up


def test_transfer_call_tells_the_caller_then_redirects() -> None:
    harness = _call_control_harness(transfer_number="+15550109999")
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "transfer_call", "{}", "completed"))
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    harness.handle(ev.RealtimeResponseCreated("resp_2"))  # "Let me put you through."
    commands = harness.handle(ev.RealtimeResponseDone("resp_2", "completed"))  # no audio left to play
    transfers = [c for c in commands if isinstance(c, TransferCall)]
    assert transfers == [TransferCall("+15550109999")]
    assert commands.index(transfers[0]) < commands.index(ends(commands)[0])  # redirect before the stream closes
    assert ends(commands)[0].reason == "transferred" and not ends(commands)[0].hang_up


def test_transfer_without_a_number_is_refused_to_the_model() -> None:
    harness = _call_control_harness()
    commands = harness.handle(
        ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "transfer_call", "{}", "completed")
    )
    assert json.loads(of_type(commands, "conversation.item.create")[0]["item"]["output"])["ok"] is False
    harness.handle(ev.RealtimeResponseCreated("resp_2"))
    assert ends(harness.handle(ev.RealtimeResponseDone("resp_2", "completed"))) == []


def test_tool_calls_and_barge_ins_are_recorded(harness: Harness) -> None:
    harness.go_live()
    harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "lookup", '{"id": 1}', "completed"))
    commands = harness.handle(ev.ToolFinished("call_1", '{"found": true}'))
    assert [c.data for c in commands if isinstance(c, RecordEvent)] == [
        {"name": "lookup", "arguments": '{"id": 1}', "output": '{"found": true}', "ok": True}
    ]
    harness.speak("resp_2", "item_2", chunks=2)
    commands = harness.handle(ev.RealtimeSpeechStarted("item_c", 0))
    assert [c.kind for c in commands if isinstance(c, RecordEvent)] == ["barge_in"]


def test_the_application_can_hang_up(harness: Harness) -> None:
    harness.go_live()
    (end,) = ends(harness.handle(ev.HangupRequested("crm_closed_the_ticket")))
    assert end.reason == "crm_closed_the_ticket" and end.hang_up
