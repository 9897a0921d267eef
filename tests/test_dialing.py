"""The dialer's rules: outcomes, retries, pacing."""

from __future__ import annotations

import pytest

from callbridge.service.dialing import Pacer, RetryPolicy, outcome


@pytest.mark.parametrize(
    ("status", "reason", "answered_by", "expected"),
    [
        ("completed", "caller_hung_up", "human", "answered"),
        ("completed", "agent_ended_call", None, "answered"),
        ("completed", "voicemail_left", "machine_end_beep", "voicemail_left"),
        ("completed", "machine_hung_up", "machine_end_silence", "failed"),
        ("completed", "fax", "fax", "failed"),
        ("completed", "interrupted", "human", "failed"),  # callbridge lost it: tried again
        ("no-answer", "no-answer", None, "no-answer"),
        ("busy", "busy", None, "busy"),
        ("failed", "failed", None, "failed"),
        ("canceled", "canceled", None, "failed"),
    ],
)
def test_outcomes(status: str, reason: str, answered_by: str | None, expected: str) -> None:
    assert outcome(status, reason, answered_by) == expected


def test_an_answered_call_that_never_reached_the_agent_failed() -> None:
    assert outcome("completed", "completed", None, reached_agent=False) == "failed"
    assert outcome("no-answer", "no-answer", None, reached_agent=False) == "no-answer"


def test_retries_follow_the_backoff_then_exhaust() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_s=(30.0, 120.0))
    assert policy.after("busy", 1) == ("scheduled", 30.0)
    assert policy.after("busy", 2) == ("scheduled", 120.0)
    assert policy.after("busy", 3) == ("exhausted", None)
    assert policy.after("answered", 1) == ("answered", None)
    assert policy.after("voicemail_left", 1) == ("voicemail_left", None)  # not retried by default
    assert policy.after("no-answer", 1) == ("scheduled", 30.0)


def test_the_last_backoff_repeats_and_retry_on_is_honoured() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_s=(10.0,), on=frozenset({"voicemail_left"}))
    assert policy.after("voicemail_left", 3) == ("scheduled", 10.0)
    assert policy.after("busy", 1) == ("busy", None)
    assert policy.after("no-answer", 1) == ("no_answer", None)


def test_pacing_spaces_creates_and_slows_down_on_429() -> None:
    pacer = Pacer(calls_per_second=2)
    assert pacer.wait(0.0) == 0
    pacer.placed(0.0)
    assert pacer.wait(0.0) == pytest.approx(0.525)
    pacer.placed(0.525)
    pacer.throttled(0.6)
    assert pacer.rate == 1.0
    assert pacer.wait(0.6) == pytest.approx(1.05)
    pacer.throttled(0.6, retry_after=5)
    assert pacer.rate == 0.5
    assert pacer.wait(0.6) == pytest.approx(5)
    for at in range(10, 30):
        pacer.placed(float(at) * 3)
    assert pacer.rate == 2  # won back, never past the limit


def test_no_second_holds_more_creates_than_the_rate() -> None:
    pacer, now, creates = Pacer(calls_per_second=3), 0.0, []
    for _ in range(50):
        now += pacer.wait(now)
        creates.append(now)
        pacer.placed(now)
    assert all(later - earlier >= 1.0 for earlier, later in zip(creates, creates[3:], strict=False))
