"""The session against what the real Realtime API does: refusals, multi-item responses, failures, expiry, idle
callers, slow tools, usage, and a call whose state stays bounded however long it lasts."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from callbridge.core import events as ev
from callbridge.core.commands import (
    EndCall,
    OpenRealtime,
    RealtimeCommand,
    RecordEvent,
    RecordTranscript,
    RunTool,
    ShowPartial,
)
from callbridge.core.context import AgentConfig
from callbridge.core.session import HISTORY_CHARS, IDLE_GOODBYE, ROLLOVER_HARD_STOP_S, UNTRANSCRIBED_TURN
from callbridge.core.usage import TokenUsage

from conftest import Harness, audio, of_type, realtime_events, twilio_messages


def ends(commands: Sequence[object]) -> list[EndCall]:
    return [c for c in commands if isinstance(c, EndCall)]


def recorded(commands: Sequence[object], kind: str) -> list[RecordEvent]:
    return [c for c in commands if isinstance(c, RecordEvent) and c.kind == kind]


def lines(commands: Sequence[object]) -> list[RecordTranscript]:
    return [c for c in commands if isinstance(c, RecordTranscript)]


def connected(harness: Harness) -> str:
    """Start the call and connect the model; returns the ``event_id`` of the ``session.update``."""
    harness.handle(ev.TwilioConnected())
    harness.handle(harness.start_event())
    (update,) = of_type(harness.handle(ev.RealtimeConnected()), "session.update")
    event_id: str = update["event_id"]
    return event_id


# --- a session is live only once the model confirmed it ----------------------------------------------------


def test_nothing_but_the_update_goes_before_the_model_confirms_it(harness: Harness) -> None:
    connected(harness)
    # The model answers with audio before confirming (it would be PCM16 at 24 kHz): none of it reaches the caller.
    assert harness.handle(ev.RealtimeAudioDelta("resp_0", "item_0", audio(100))) == []
    assert harness.session.stats.deltas_unconfirmed == 1
    assert realtime_events(harness.handle(ev.TwilioMedia(audio(20)))) == []  # caller audio waits too
    commands = harness.handle(ev.RealtimeSessionUpdated("audio/pcmu", "audio/pcmu"))
    assert [e["type"] for e in realtime_events(commands)] == [
        "conversation.item.create",
        "response.create",
        "input_audio_buffer.append",
    ]
    assert harness.session.phase == "live"


def test_a_rejected_update_sends_the_caller_to_the_fallback(harness: Harness) -> None:
    update_id = connected(harness)
    error = ev.RealtimeError(
        "invalid_value", "Invalid value: 'marine'.", event_id=update_id, param="session.audio.output.voice"
    )
    commands = harness.handle(error)
    (end,) = ends(commands)
    assert end.reason == "realtime_session_rejected" and end.fallback
    (event,) = recorded(commands, "realtime_session_rejected")
    assert event.data == {
        "code": "invalid_value",
        "message": "Invalid value: 'marine'.",
        "param": "session.audio.output.voice",
    }
    assert not of_type(commands, "response.create") and not of_type(commands, "conversation.item.create")
    assert harness.handle(ev.RealtimeAudioDelta("resp_1", "item_1", audio(100))) == []


def test_an_error_about_another_event_is_not_fatal(harness: Harness) -> None:
    connected(harness)
    commands = harness.handle(ev.RealtimeError("invalid_value", "Bad.", event_id="cb_999"))
    assert not ends(commands) and harness.session.phase == "connecting"


@pytest.mark.parametrize(("input_format", "output_format"), [("audio/pcmu", "audio/pcm"), ("audio/pcm", "audio/pcmu")])
def test_a_session_not_in_mulaw_is_not_usable(harness: Harness, input_format: str, output_format: str) -> None:
    connected(harness)
    commands = harness.handle(ev.RealtimeSessionUpdated(input_format, output_format))
    assert [end.reason for end in ends(commands)] == ["realtime_session_rejected"]
    assert recorded(commands, "realtime_session_rejected")[0].data["code"] == "unsupported_audio_format"


def test_a_session_not_confirmed_in_time_ends_with_the_fallback() -> None:
    harness = Harness(ready_timeout_s=8.0)
    started = harness.now
    connected(harness)
    assert harness.session.next_deadline() == started + 8.0
    assert harness.handle(ev.Tick(), at=started + 7.0) == []
    commands = harness.handle(ev.Tick(), at=started + 8.0)
    assert [(end.reason, end.fallback) for end in ends(commands)] == [("realtime_not_ready", True)]
    assert harness.session.next_deadline() is None


def test_every_client_event_names_itself(harness: Harness) -> None:
    commands = harness.go_live()
    commands += harness.handle(ev.TwilioMedia(audio(20)))
    commands += harness.handle(ev.TwilioDtmf("1"))
    ids = [c.event_id for c in commands if isinstance(c, RealtimeCommand)]
    assert len(ids) == len(set(ids)) >= 5


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ev.RealtimeError("beta_api_shape_disabled", "The beta shape is disabled."), "realtime_beta_refused"),
        (ev.RealtimeError("invalid_api_key", "Incorrect API key provided."), "realtime_auth_failed"),
        (ev.RealtimeConnectFailed("HTTP 401", status=401, code="invalid_api_key"), "realtime_auth_failed"),
        (ev.RealtimeConnectFailed("HTTP 403", status=403), "realtime_auth_failed"),
        (ev.RealtimeError("model_not_found", "The model does not exist."), "realtime_model_not_found"),
    ],
)
def test_errors_a_retry_cannot_fix_end_the_call_at_once(error: ev.Event, reason: str) -> None:
    harness = Harness()
    harness.handle(harness.start_event())
    commands = harness.handle(error)
    assert [(end.reason, end.fallback) for end in ends(commands)] == [(reason, True)]
    assert not [c for c in commands if isinstance(c, OpenRealtime)]  # not retried


# --- barge-in takes back everything unheard ------------------------------------------------------------------


def test_barge_in_takes_back_every_item_of_a_long_reply(harness: Harness) -> None:
    harness.go_live()
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    for item in ("item_a", "item_b", "item_c"):  # one response, three audio items of 200 ms each
        harness.handle(ev.RealtimeAudioDelta("resp_1", item, audio(100)))
        harness.handle(ev.RealtimeAudioDelta("resp_1", item, audio(100)))
        harness.handle(ev.RealtimeAudioTranscriptDone(item, f"Sentence {item[-1]} has five words."))
    harness.handle(ev.TwilioMark("item_a:800"), at=harness.now + 0.1)
    played_a = harness.handle(ev.TwilioMark("item_a:1600"), at=harness.now + 0.1)
    assert not lines(played_a)  # the response still streams: a line is final only once the response is done
    # 50 ms into item_b the caller speaks; item_c was received but not a millisecond of it was heard.
    commands = harness.handle(ev.RealtimeSpeechStarted("item_caller", 1000), at=harness.now + 0.05)
    assert [m["event"] for m in twilio_messages(commands)] == ["clear"]
    (truncate,) = of_type(commands, "conversation.item.truncate")
    assert (truncate["item_id"], truncate["audio_end_ms"]) == ("item_b", 50)
    assert [e["item_id"] for e in of_type(commands, "conversation.item.delete")] == ["item_c"]
    assert [(line.line.item_id, line.line.interrupted) for line in lines(commands)] == [("item_b", True)]
    # The server cancels the response; its output also has an item whose audio never came: it goes too.
    done = ev.RealtimeResponseDone("resp_1", "cancelled", output_item_ids=("item_a", "item_b", "item_c", "item_d"))
    commands = harness.handle(done)
    assert [e["item_id"] for e in of_type(commands, "conversation.item.delete")] == ["item_d"]
    # item_a was heard whole: recorded whole, never truncated or deleted.
    assert [(line.line.item_id, line.line.interrupted) for line in lines(commands)] == [("item_a", False)]
    assert harness.session.stats.truncations == 1 and harness.session.stats.deletions == 2


def test_an_item_not_heard_at_all_is_deleted_never_truncated_to_zero(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=2)
    commands = harness.handle(ev.RealtimeSpeechStarted("item_caller", 0))  # the same instant: 0 ms heard
    assert of_type(commands, "conversation.item.truncate") == []
    assert [e["item_id"] for e in of_type(commands, "conversation.item.delete")] == ["item_1"]
    harness.handle(ev.RealtimeAudioTranscriptDone("item_1", "Never heard."))
    assert not lines(harness.handle(ev.RealtimeResponseDone("resp_1", "cancelled")))


# --- failed and incomplete responses --------------------------------------------------------------------------


def failed(response_id: str, code: str = "server_error") -> ev.RealtimeResponseDone:
    details = {"type": "failed", "error_type": code, "error_code": code, "error_message": "It broke."}
    return ev.RealtimeResponseDone(response_id, "failed", status_details=details)


def test_a_failed_greeting_is_retried_once_then_the_fallback() -> None:
    harness = Harness(AgentConfig(greeting="Hello from Ada."))
    commands = harness.go_live()
    (greeting,) = of_type(commands, "response.create")
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    commands = harness.handle(failed("resp_1"))
    assert recorded(commands, "response_failed")[0].data["status_details"]["error_code"] == "server_error"
    (retry,) = of_type(commands, "response.create")
    assert retry["response"] == greeting["response"]  # the greeting again, word for word
    assert not ends(commands)
    harness.handle(ev.RealtimeResponseCreated("resp_2"))
    assert [end.reason for end in ends(harness.handle(failed("resp_2")))] == ["realtime_response_failed"]


def test_a_failure_after_audio_is_recorded_not_retried(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=1)
    commands = harness.handle(failed("resp_1"))
    assert recorded(commands, "response_failed") and not of_type(commands, "response.create")


def test_quota_exhausted_is_not_retried(harness: Harness) -> None:
    harness.go_live()
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    commands = harness.handle(failed("resp_1", "insufficient_quota"))
    assert [end.reason for end in ends(commands)] == ["realtime_quota_exceeded"]


def test_an_incomplete_response_is_recorded(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=1)
    details = {"type": "incomplete", "reason": "max_output_tokens"}
    commands = harness.handle(ev.RealtimeResponseDone("resp_1", "incomplete", status_details=details))
    assert recorded(commands, "response_incomplete")[0].data["status_details"] == details
    assert harness.session.stats.responses_incomplete == 1


# --- session expiry, rollover, replay ---------------------------------------------------------------------------


def test_an_expired_session_moves_to_a_new_one_with_the_conversation(harness: Harness) -> None:
    harness.go_live()
    harness.speak("resp_1", "item_1", chunks=1)
    harness.handle(ev.RealtimeAudioTranscriptDone("item_1", "Hello there."))
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    harness.handle(ev.TwilioMark("item_1:800"), at=harness.now + 0.1)
    commands = harness.handle(
        ev.RealtimeError("session_expired", "Your session hit the maximum duration of 60 minutes.")
    )
    assert [c for c in commands if isinstance(c, OpenRealtime)] == [OpenRealtime(replace=True)]
    assert not ends(commands) and not recorded(commands, "error")
    assert recorded(commands, "realtime_rollover")[0].data["reason"] == "expired"
    # The old connection's close is not a loss: the bridge closed it. The new session gets the conversation.
    harness.handle(ev.RealtimeConnected())
    items = [e["item"] for e in of_type(harness.handle(ev.RealtimeSessionUpdated()), "conversation.item.create")]
    assert items[-1]["content"][0]["text"] == "Hello there."


def test_rollover_waits_for_a_quiet_moment_then_forces_one_between_turns() -> None:
    harness = Harness(rollover_after_s=100.0)
    harness.go_live()
    live_at = harness.now
    harness.speak("resp_1", "item_1", chunks=5)  # 500 ms of audio still playing at Twilio, never confirmed
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    assert harness.session.next_deadline() == live_at + 100.0
    assert not [c for c in harness.handle(ev.Tick(), at=live_at + 100.0) if isinstance(c, OpenRealtime)]
    assert harness.session.next_deadline() == live_at + 100.0 + ROLLOVER_HARD_STOP_S
    commands = harness.handle(ev.Tick(), at=live_at + 100.0 + ROLLOVER_HARD_STOP_S)
    assert [c for c in commands if isinstance(c, OpenRealtime)] == [OpenRealtime(replace=True)]


def test_replay_without_transcription_still_says_the_caller_spoke() -> None:
    harness = Harness(AgentConfig(transcription_model=None))
    harness.go_live()
    harness.handle(ev.RealtimeSpeechStarted("item_c1", 0))
    harness.handle(ev.RealtimeSpeechStopped("item_c1", 900))
    harness.speak("resp_1", "item_1", chunks=1)
    harness.handle(ev.RealtimeAudioTranscriptDone("item_1", "Sure, let me help."))
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    harness.handle(ev.TwilioMark("item_1:800"), at=harness.now + 0.1)
    harness.handle(ev.RealtimeClosed(1006, "lost"))
    harness.handle(ev.RealtimeConnected())
    items = [e["item"] for e in of_type(harness.handle(ev.RealtimeSessionUpdated()), "conversation.item.create")]
    assert [(item["role"], item["content"][0]["text"]) for item in items[1:]] == [
        ("user", UNTRANSCRIBED_TURN),
        ("assistant", "Sure, let me help."),
    ]


# --- idle callers, slow tools ----------------------------------------------------------------------------------


def test_an_idle_caller_is_re_prompted_then_the_agent_says_goodbye() -> None:
    agent = AgentConfig(turn_detection={"type": "server_vad", "idle_timeout_ms": 6000}, idle_hangup_after=2)
    harness = Harness(agent)
    harness.go_live()
    for n in (1, 2):  # the server re-prompts by itself ("Are you still there?")
        assert recorded(harness.handle(ev.RealtimeTimeoutTriggered(f"item_idle{n}")), "caller_idle")
        assert harness.handle(ev.RealtimeResponseCreated(f"resp_prompt{n}")) == []
        harness.handle(ev.RealtimeResponseDone(f"resp_prompt{n}", "completed"))
    harness.handle(ev.RealtimeTimeoutTriggered("item_idle3"))
    # The third time the server's re-prompt is cancelled and replaced by a goodbye.
    cancel = of_type(harness.handle(ev.RealtimeResponseCreated("resp_prompt3")), "response.cancel")
    assert [e["response_id"] for e in cancel] == ["resp_prompt3"]
    assert harness.handle(ev.RealtimeAudioDelta("resp_prompt3", "item_p3", audio(100))) == []
    (goodbye,) = of_type(harness.handle(ev.RealtimeResponseDone("resp_prompt3", "cancelled")), "response.create")
    assert IDLE_GOODBYE in goodbye["response"]["instructions"]
    harness.speak("resp_bye", "item_bye", chunks=1)
    harness.handle(ev.RealtimeResponseDone("resp_bye", "completed"))
    (end,) = ends(harness.handle(ev.TwilioMark("item_bye:800"), at=harness.now + 0.1))
    assert end.reason == "caller_idle" and end.hang_up


def test_speaking_resets_the_idle_count() -> None:
    agent = AgentConfig(turn_detection={"type": "server_vad", "idle_timeout_ms": 6000}, idle_hangup_after=1)
    harness = Harness(agent)
    harness.go_live()
    harness.handle(ev.RealtimeTimeoutTriggered("item_idle1"))
    harness.handle(ev.RealtimeSpeechStarted("item_c1", 0))
    harness.handle(ev.RealtimeTimeoutTriggered("item_idle2"))
    assert not of_type(harness.handle(ev.RealtimeResponseCreated("resp_2")), "response.cancel")


def test_a_slow_tool_gets_one_filler_and_its_answer_still_arrives() -> None:
    harness = Harness(AgentConfig(tool_filler_after_ms=1500))
    harness.go_live()
    started = harness.now
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    commands = harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "lookup", "{}", "completed"))
    assert [c.name for c in commands if isinstance(c, RunTool)] == ["lookup"]
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    assert harness.session.next_deadline() == pytest.approx(started + 1.5)
    (filler,) = of_type(harness.handle(ev.Tick(), at=started + 1.5), "response.create")
    assert "One moment while I check." in filler["response"]["instructions"]
    harness.handle(ev.RealtimeResponseCreated("resp_filler"))
    commands = harness.handle(ev.ToolFinished("call_1", '{"found": true}'))  # while the filler plays
    assert of_type(commands, "conversation.item.create") and not of_type(commands, "response.create")
    assert len(of_type(harness.handle(ev.RealtimeResponseDone("resp_filler", "completed")), "response.create")) == 1
    assert not of_type(harness.handle(ev.Tick(), at=started + 10), "response.create")  # once only


# --- usage, bounded state ---------------------------------------------------------------------------------------


def test_usage_is_summed_over_responses(harness: Harness) -> None:
    harness.go_live()
    for n in (1, 2):
        usage = TokenUsage(input_text=100, input_audio=20, input_cached=64, output_text=5, output_audio=50, responses=1)
        harness.handle(ev.RealtimeResponseCreated(f"resp_{n}"))
        harness.handle(ev.RealtimeResponseDone(f"resp_{n}", "completed", usage=usage))
    assert harness.session.usage.as_record() == {
        "input_tokens": 240,
        "output_tokens": 110,
        "total_tokens": 350,
        "input_text_tokens": 200,
        "input_audio_tokens": 40,
        "input_cached_tokens": 128,
        "output_text_tokens": 10,
        "output_audio_tokens": 100,
        "responses": 2,
    }


def test_a_long_call_keeps_no_more_state_than_a_short_one(harness: Harness) -> None:
    """A thousand turns, with barge-ins, untranscribed turns and tool calls: what the session holds stays small."""
    harness.go_live()
    session = harness.session
    for turn in range(1000):
        rid, item = f"resp_{turn}", f"item_{turn}"
        harness.handle(ev.RealtimeSpeechStarted(f"caller_{turn}", turn * 1000))
        harness.handle(ev.RealtimeSpeechStopped(f"caller_{turn}", turn * 1000 + 500))
        if turn % 3:
            harness.handle(ev.RealtimeInputTranscriptionCompleted(f"caller_{turn}", "words " * 20))
        harness.speak(rid, item, chunks=3)
        harness.handle(ev.RealtimeAudioTranscriptDone(item, "An answer of some length. " * 4))
        if turn % 4 == 0:  # interrupted while playing
            harness.handle(ev.RealtimeSpeechStarted(f"barge_{turn}", turn * 1000 + 700), at=harness.now + 0.05)
            harness.handle(ev.RealtimeResponseDone(rid, "cancelled", output_item_ids=(item,)))
        else:
            harness.handle(ev.RealtimeResponseDone(rid, "completed", output_item_ids=(item,)))
            for end in (800, 1600, 2400):
                harness.handle(ev.TwilioMark(f"{item}:{end}"), at=harness.now + 0.1)
    assert len(session._items) <= 1
    assert not session._dropped_items and not session._deleted_items and not session._interrupted_responses
    assert not session._responses_with_audio and not session._pending_marks
    assert len(session._caller_turns) <= 32 and len(session._control_events) <= 64
    assert session._history_chars <= HISTORY_CHARS


def test_items_without_a_transcript_are_settled_too(harness: Harness) -> None:
    """A model that sends no transcript (or a fake that does not) must not leave every item behind."""
    harness.go_live()
    for turn in range(200):
        harness.speak(f"resp_{turn}", f"item_{turn}", chunks=1)
        harness.handle(ev.RealtimeResponseDone(f"resp_{turn}", "completed"))
        harness.handle(ev.TwilioMark(f"item_{turn}:800"), at=harness.now + 0.1)
    assert not harness.session._items


def test_interim_text_goes_out_at_most_ten_times_a_second(harness: Harness) -> None:
    """Each delta adds to its line's text; what goes out is the whole line so far, at most every 0.1 s per call,
    and nothing of a line once it has completed."""
    harness.go_live()
    start = harness.now
    shown: list[ShowPartial] = []
    for n, word in enumerate(["Hello", " there,", " how", " can", " I", " help?"]):
        commands = harness.handle(ev.RealtimeTranscriptDelta("agent", "item_1", word), at=start + n * 0.04)
        shown += [c for c in commands if isinstance(c, ShowPartial)]
    assert [(p.speaker, p.item_id, p.text) for p in shown] == [
        ("agent", "item_1", "Hello"),
        ("agent", "item_1", "Hello there, how can"),  # 0.12 s after the first; the rest comes with the line
    ]
    harness.handle(ev.RealtimeInputTranscriptionCompleted("item_2", "Yes."), at=start + 1)
    commands = harness.handle(ev.RealtimeTranscriptDelta("caller", "item_3", "Ok"), at=start + 2)
    assert [c for c in commands if isinstance(c, ShowPartial)] == [ShowPartial("caller", "item_3", "Ok")]
