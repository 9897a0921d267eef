"""Answering-machine detection in the session: silence until the verdict, the greeting for a person, the voicemail
word for word for a machine, then the hang-up."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from callbridge.core import events as ev
from callbridge.core.commands import AppendAudio, Command, EndCall, RecordEvent
from callbridge.core.context import AgentConfig, CallContext
from callbridge.core.session import HOST_SAY

from conftest import CALL_SID, Harness, audio, of_type, twilio_messages

VOICEMAIL = "Hi Ada, this is Bright Dental about your appointment tomorrow at 10 am. Please call us back."
AGENT = AgentConfig(
    greeting="Hello, this is Bright Dental.",
    turn_detection={"type": "server_vad", "idle_timeout_ms": 8000},
)


def outbound(voicemail: str | None = VOICEMAIL) -> CallContext:
    return CallContext(
        call_sid=CALL_SID,
        direction="outbound",
        caller="+12025550100",
        called="+12025550123",
        machine_detection=True,
        voicemail=voicemail,
    )


def pending(voicemail: str | None = VOICEMAIL) -> tuple[Harness, list[Command]]:
    harness = Harness(AGENT)
    commands = harness.go_live(outbound(voicemail))
    return harness, commands


def said(commands: Sequence[Command]) -> list[str]:
    return [event.get("response", {}).get("instructions") or "" for event in of_type(list(commands), "response.create")]


def ended(commands: Sequence[Command]) -> list[EndCall]:
    return [command for command in commands if isinstance(command, EndCall)]


def amd_events(commands: Sequence[Command]) -> list[dict[str, object]]:
    return [command.data for command in commands if isinstance(command, RecordEvent) and command.kind == "amd"]


def test_while_the_verdict_is_pending_the_agent_listens_and_says_nothing() -> None:
    harness, commands = pending()
    (update,) = of_type(commands, "session.update")
    detection = update["session"]["audio"]["input"]["turn_detection"]
    assert detection["create_response"] is False and detection["interrupt_response"] is False
    assert "idle_timeout_ms" not in detection
    assert said(commands) == []
    # The caller's (or the machine's) audio reaches the model and is recorded.
    assert [type(c) for c in harness.handle(ev.TwilioMedia(audio(20), 1000))] == [AppendAudio]
    # What the host application asks for is held, not lost.
    assert said(harness.handle(ev.HostSay("A word from the host."))) == []


def test_a_person_gets_the_greeting_at_once_then_what_was_held() -> None:
    harness, _ = pending()
    harness.handle(ev.HostSay("A word from the host."))
    commands = harness.handle(ev.AmdVerdict("human", 1800), at=harness.now + 2)
    (update,) = of_type(commands, "session.update")
    detection = update["session"]["audio"]["input"]["turn_detection"]
    assert "create_response" not in detection and detection["idle_timeout_ms"] == 8000
    assert [text.endswith("saying exactly: Hello, this is Bright Dental.") for text in said(commands)] == [True]
    assert amd_events(commands)[0]["answered_by"] == "human"
    harness.speak("resp_greeting", "item_greeting", chunks=1)
    commands = harness.handle(ev.RealtimeResponseDone("resp_greeting", "completed"))
    assert said(commands) == [HOST_SAY + "A word from the host."]


def test_unknown_and_no_verdict_count_as_a_person() -> None:
    harness, _ = pending()
    assert len(said(harness.handle(ev.AmdVerdict("unknown")))) == 1
    harness, _ = pending()
    assert harness.session.next_deadline() == harness.now + 6.0
    commands = harness.handle(ev.Tick(), at=harness.now + 6.0)
    assert len(said(commands)) == 1 and amd_events(commands)[0]["timed_out"] is True
    # A verdict after that is kept, and changes nothing.
    late = harness.handle(ev.AmdVerdict("machine_end_beep"))
    assert said(late) == [] and ended(late) == [] and amd_events(late)[0]["acted"] is False


def test_a_machine_gets_the_message_word_for_word_then_the_call_ends() -> None:
    harness, _ = pending()
    commands = harness.handle(ev.AmdVerdict("machine_start", 900))
    assert said(commands) == [] and ended(commands) == []
    commands = harness.handle(ev.AmdVerdict("machine_end_beep", 7400), at=harness.now + 7)
    assert said(commands) == [HOST_SAY + VOICEMAIL]
    sent = harness.speak("resp_vm", "item_vm", chunks=3)
    # The machine's beep or noise does not cut the message.
    assert twilio_messages(harness.handle(ev.RealtimeSpeechStarted("item_noise", 100))) == []
    done = harness.handle(ev.RealtimeResponseDone("resp_vm", "completed"))
    assert ended(done) == []  # still playing
    marks = [message["mark"]["name"] for message in twilio_messages(sent + done) if message["event"] == "mark"]
    (end,) = ended(harness.handle(ev.TwilioMark(marks[-1])))
    assert end.reason == "voicemail_left" and end.hang_up


def test_a_long_message_is_not_cut_by_the_goodbye_limit() -> None:
    message = "Please call us back. " * 20  # about 30 s of speech
    harness, _ = pending(message)
    harness.handle(ev.AmdVerdict("machine_end_silence"))
    harness.speak("resp_vm", "item_vm", chunks=3)
    assert ended(harness.handle(ev.Tick(), at=harness.now + 20)) == []


def test_a_machine_without_a_message_is_hung_up_on() -> None:
    harness, _ = pending(voicemail=None)
    (end,) = ended(harness.handle(ev.AmdVerdict("machine_end_other")))
    assert end.reason == "machine_detected" and end.hang_up


def test_a_fax_is_hung_up_on() -> None:
    harness, _ = pending()
    (end,) = ended(harness.handle(ev.AmdVerdict("fax")))
    assert end.reason == "fax" and end.hang_up


def test_a_machine_whose_greeting_never_ends_gets_the_message_all_the_same() -> None:
    harness, _ = pending()
    harness.handle(ev.AmdVerdict("machine_start"), at=harness.now + 1)
    assert harness.handle(ev.Tick(), at=harness.now + 6) == []  # not a person: it is a machine
    commands = harness.handle(ev.Tick(), at=harness.now + 30)
    assert said(commands) == [HOST_SAY + VOICEMAIL]


def test_a_verdict_before_the_model_is_ready_is_applied_once_it_is() -> None:
    harness = Harness(AGENT)
    harness.handle(ev.TwilioConnected())
    harness.handle(harness.start_event(outbound()))
    harness.handle(ev.RealtimeConnected())
    assert said(harness.handle(ev.AmdVerdict("human"))) == []
    commands = harness.handle(ev.RealtimeSessionUpdated())
    assert len(said(commands)) == 1 and amd_events(commands)[0]["answered_by"] == "human"


def test_inbound_calls_and_calls_without_detection_greet_at_once() -> None:
    harness = Harness(AGENT)
    assert len(said(harness.go_live())) == 1
    ignored = harness.handle(ev.AmdVerdict("machine_end_beep"))
    assert ended(ignored) == [] and amd_events(ignored)[0]["acted"] is False


def test_a_verdict_before_the_stream_started_is_applied_once_live() -> None:
    harness = Harness(AGENT)
    harness.handle(ev.TwilioConnected())
    assert said(harness.handle(ev.AmdVerdict("machine_end_beep"))) == []  # the call's context is not known yet
    harness.handle(harness.start_event(outbound()))
    harness.handle(ev.RealtimeConnected())
    assert said(harness.handle(ev.RealtimeSessionUpdated())) == [HOST_SAY + VOICEMAIL]


def test_a_verdict_on_record_before_the_stream_came_is_applied_once_live() -> None:
    harness = Harness(AGENT)
    harness.handle(ev.TwilioConnected())
    harness.handle(harness.start_event(replace(outbound(), answered_by="human")))
    harness.handle(ev.RealtimeConnected())
    commands = harness.handle(ev.RealtimeSessionUpdated())
    assert [text.endswith("saying exactly: Hello, this is Bright Dental.") for text in said(commands)] == [True]
