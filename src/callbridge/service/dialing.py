"""The dialer's rules, without I/O: what an attempt's end means for its contact, and how fast calls may be placed.

Kept apart from the loop that claims attempts and calls Twilio, so that each rule is a plain, fast test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

Outcome = Literal["answered", "voicemail_left", "no-answer", "busy", "failed"]
"""How one attempt ended, as a campaign's ``retry.on`` names it."""

ContactStatus = Literal[
    "pending",
    "scheduled",
    "in_progress",
    "answered",
    "voicemail_left",
    "no_answer",
    "busy",
    "failed",
    "dnc",
    "exhausted",
]
CONTACT_STATUSES: tuple[ContactStatus, ...] = get_args(ContactStatus)

_STATUS_OF_OUTCOME: dict[Outcome, ContactStatus] = {
    "answered": "answered",
    "voicemail_left": "voicemail_left",
    "no-answer": "no_answer",
    "busy": "busy",
    "failed": "failed",
}


INTERRUPTED = "interrupted"
"""The end reason of a call whose process died while it ran (the orphans found at the next start)."""


def outcome(
    call_status: str, end_reason: str | None, answered_by: str | None = None, *, reached_agent: bool = True
) -> Outcome:
    """An attempt's outcome from its call's final Twilio status and how callbridge ended it (``reached_agent``:
    whether its media stream ever reached callbridge)."""
    if call_status == "no-answer":
        return "no-answer"
    if call_status == "busy":
        return "busy"
    if call_status in ("failed", "canceled"):
        return "failed"
    if end_reason == "voicemail_left":
        return "voicemail_left"
    if end_reason == INTERRUPTED or not reached_agent:
        return "failed"  # callbridge lost the call (its process died), or never had it: nobody talked to them
    if end_reason == "fax" or (answered_by or "").startswith(("machine", "fax")):
        return "failed"  # a machine that got no message (the campaign hangs up on machines), or a fax
    return "answered"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_s: Sequence[float] = (1800.0, 7200.0)
    """The wait before the 2nd, 3rd… attempt; the last one repeats."""
    on: frozenset[Outcome] = frozenset({"no-answer", "busy", "failed"})

    def after(self, result: Outcome, attempts: int) -> tuple[ContactStatus, float | None]:
        """The contact's status after its ``attempts``-th attempt ended with ``result``, and, when it is to be
        called again, the seconds to wait."""
        if result not in self.on:
            return _STATUS_OF_OUTCOME[result], None
        if attempts >= self.max_attempts:
            return "exhausted", None
        wait = self.backoff_s[min(attempts, len(self.backoff_s)) - 1] if self.backoff_s else 0.0
        return "scheduled", wait


class Pacer:
    """How fast the dialer may create calls: at most ``calls_per_second``, and slower after Twilio's 429.

    Twilio queues creates beyond an account's calls-per-second, and answers 429 (error 20429) when too many are
    queued. A 429 halves the rate; each call placed afterwards wins back a tenth of the configured rate. Creates are
    spaced a twentieth wider than the rate asks, so that network jitter never brings two of them closer at Twilio.
    The clock is the caller's (monotonic seconds).
    """

    MARGIN = 1.05

    def __init__(self, calls_per_second: float, floor: float = 0.05) -> None:
        self.limit = calls_per_second
        self.rate = calls_per_second
        self._floor = min(floor, calls_per_second)
        self._next = 0.0

    def wait(self, now: float) -> float:
        """Seconds until the next create may go (0: now)."""
        return max(0.0, self._next - now)

    def placed(self, now: float) -> None:
        """A create went out at ``now``."""
        self._next = max(now, self._next) + self.MARGIN / self.rate
        self.rate = min(self.limit, self.rate + self.limit / 10)

    def throttled(self, now: float, retry_after: float | None = None) -> None:
        """Twilio answered 429: slow down, and wait at least ``retry_after`` when it said so."""
        self.rate = max(self._floor, self.rate / 2)
        self._next = max(self._next, now + max(retry_after or 0.0, self.MARGIN / self.rate))
