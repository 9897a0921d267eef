"""A deterministic agent brain: intents, slot filling, confirmations, tools — no language model.

It is what the local engine thinks with. It understands a caller by matching words against each intent's example
phrases (which also build the recognizer's language model, so the two agree on the domain), fills slots such as
a day and a time, calls the session's tools when it has what they need, reads their JSON output, and falls back
to "sorry, I didn't catch that". Anything with :meth:`Brain.respond`'s signature can replace it, e.g. a brain
backed by a local LLM.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Protocol

from callbridge.realtime.server import ToolCall, TurnContext

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "today", "tomorrow")
PARTS_OF_DAY = ("morning", "afternoon", "evening")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
YES = {"yes", "yeah", "yep", "sure", "works", "fine", "good", "okay", "ok", "correct", "perfect", "great"}
NO = {"no", "nope", "not", "don't", "nothing"}
_STOP = {"i", "a", "an", "the", "to", "me", "my", "you", "your", "is", "are", "do", "it", "please", "on", "at", "in"}


class Brain(Protocol):
    """Decides each response of one call."""

    def respond(self, context: TurnContext) -> str | ToolCall: ...

    def phrases(self) -> list[str]:
        """What callers are expected to say: the recognizer's language model is built from these."""
        ...


@dataclass(frozen=True)
class Intent:
    name: str
    examples: tuple[str, ...]
    answer: str = ""


@dataclass(frozen=True)
class BookingAgent:
    """The configuration of an appointment-booking agent (the demo's, by default)."""

    business: str = "Bright Dental"
    greeting: str = "Hello, thanks for calling Bright Dental. How can I help you today?"
    ask_when: str = "Sure. What day and time would suit you?"
    ask_time: str = "And at what time on {day}?"
    offer: str = "{day} at {time} is free. Shall I book it for you?"
    taken: str = "Sorry, {day} at {time} is taken. Would another time suit you?"
    booked: str = "Done. You are booked for {day} at {time}. Is there anything else I can help you with?"
    declined: str = "No problem. Is there anything else I can help you with?"
    fallback: str = "Sorry, I didn't catch that. Could you say it again?"
    goodbye: str = "Thank you for calling Bright Dental. Goodbye!"
    availability_tool: str = "check_availability"
    booking_tool: str = "book_appointment"
    intents: tuple[Intent, ...] = (
        Intent(
            "book",
            (
                "i'd like to book an appointment",
                "i want to make an appointment",
                "can i book an appointment",
                "i need to schedule a visit",
                "book me in please",
            ),
        ),
        Intent(
            "hours",
            (
                "what are your opening hours",
                "when are you open",
                "what time do you close",
                "are you open on saturday",
            ),
            answer=(
                "Of course. We are open Monday to Friday from eight in the morning until six in the evening, "
                "and on Saturdays from nine until one. We are closed on Sundays and on public holidays. "
                "During the summer we also stay open late on Thursdays, until eight in the evening."
            ),
        ),
        Intent("goodbye", ("goodbye", "bye", "thank you goodbye", "thanks bye", "that's all thank you")),
    )
    fillers: tuple[str, ...] = (
        "yes",
        "yes please",
        "yeah that's fine",
        "that works",
        "sounds good",
        "no",
        "no thank you",
        "not really",
        "please",
        "thank you",
        "sorry",
        "actually",
        "hi",
        "hello",
        "um",
    )

    def phrases(self) -> list[str]:
        examples = [example for intent in self.intents for example in intent.examples]
        # Callers wrap what they mean in greetings and politeness: "hi, I'd like to book an appointment please".
        phrases = examples + [f"{example} please" for example in examples]
        phrases += [f"{opener} {example}" for opener in ("hi", "hello", "actually", "sorry") for example in examples]
        yes, no = ("yes", "yeah", "yes please", "sure"), ("no", "no thank you", "no thanks")
        agree = ("that works", "that's fine", "sounds good", "perfect")
        phrases += [f"{y} {a}" for y in yes for a in agree] + [f"{n} goodbye" for n in no]
        phrases += list(self.fillers)
        times = [*NUMBERS, *(f"{n} o'clock" for n in NUMBERS), *(f"{n} thirty" for n in NUMBERS)]
        times += [f"half past {n}" for n in NUMBERS] + [f"{n} pm" for n in NUMBERS] + [f"{n} am" for n in NUMBERS]
        for day in DAYS:
            phrases += [day, f"next {day}", f"are you open on {day}"]
            phrases += [f"{day} {part}" for part in PARTS_OF_DAY]
            phrases += [f"{day} at {time}" for time in times]
            phrases += [f"{day} {part} at {time}" for part in PARTS_OF_DAY for time in times[:12]]
        phrases += [f"at {time} please" for time in times]
        return phrases


@dataclass
class BookingBrain:
    """One call's conversation state for a :class:`BookingAgent`."""

    agent: BookingAgent = field(default_factory=BookingAgent)
    day: str | None = None
    time: str | None = None
    booking: bool = False  # collecting day and time
    offered: bool = False  # asked "shall I book it?"
    pending_tool: str | None = None

    def phrases(self) -> list[str]:
        return self.agent.phrases()

    def respond(self, context: TurnContext) -> str | ToolCall:
        if context.tool_output is not None:
            return self._after_tool(context.tool_output)
        if not context.caller_transcripts:
            return self.agent.greeting
        return self._understand(_words(context.caller_transcripts[-1]), context.tools)

    def _understand(self, words: list[str], tools: list[str]) -> str | ToolCall:
        day, time = _day(words), _time(words)
        intent = self._intent(words)
        if intent is not None and intent.name == "goodbye" and not (YES & set(words)):
            return self.agent.goodbye
        if intent is not None and intent.answer:
            return intent.answer
        if self.offered and (YES & set(words) or NO & set(words)):
            self.offered = False
            if NO & set(words) and not (YES & set(words)):
                return self.agent.declined
            return self._call(self.agent.booking_tool, tools) or self._booked()
        if (intent is not None and intent.name == "book") or day or time or self.booking:
            self.booking = True
            self.day, self.time = day or self.day, time or self.time
            if self.day and self.time:
                return self._call(self.agent.availability_tool, tools) or self._offer(available=True)
            if self.day:
                return self.agent.ask_time.format(day=self.day)
            if intent is not None or self.time:
                return self.agent.ask_when
        if intent is not None and intent.name == "goodbye":
            return self.agent.goodbye
        return self.agent.fallback

    def _intent(self, words: list[str]) -> Intent | None:
        """The intent whose examples share the most content words with the utterance (none below two)."""
        content = set(words) - _STOP
        best, best_score = None, 0.0
        for intent in self.agent.intents:
            vocabulary = {word for example in intent.examples for word in _words(example)} - _STOP
            score = len(content & vocabulary) + (1.5 if intent.name == "goodbye" and "bye" in content else 0)
            if score > best_score:
                best, best_score = intent, score
        return best if best_score >= 2 or (best is not None and best.name == "goodbye" and best_score) else None

    def _call(self, tool: str, tools: list[str]) -> ToolCall | None:
        if tool not in tools:
            return None  # the session does not offer it: decide without it
        self.pending_tool = tool
        return ToolCall(tool, json.dumps({"day": self.day, "time": self.time}))

    def _after_tool(self, output: str) -> str:
        tool, self.pending_tool = self.pending_tool, None
        try:
            result = json.loads(output)
        except ValueError:
            result = {}
        if not isinstance(result, dict) or "error" in result:
            return self.agent.fallback
        if tool == self.agent.booking_tool:
            return self._booked()
        return self._offer(available=bool(result.get("available", True)))

    def _offer(self, available: bool) -> str:
        slot = {"day": (self.day or "").capitalize(), "time": self.time or ""}
        if not available:
            self.time = None
            return self.agent.taken.format(**slot)
        self.offered = True
        return self.agent.offer.format(**slot)

    def _booked(self) -> str:
        slot = {"day": (self.day or "").capitalize(), "time": self.time or ""}
        self.booking, self.day, self.time = False, None, None
        return self.agent.booked.format(**slot)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _day(words: list[str]) -> str | None:
    return next((word for word in words if word in DAYS), None)


def _time(words: list[str]) -> str | None:
    """A spoken time such as "three", "three thirty", "half past three", "three pm" → "3 pm"."""
    for index, word in enumerate(words):
        if word not in NUMBERS:
            continue
        hour = NUMBERS.index(word) + 1
        before, after = words[max(0, index - 2) : index], words[index + 1 : index + 2]
        minutes = ":30" if after == ["thirty"] or before == ["half", "past"] else ""
        morning = "am" in words[index + 1 : index + 3] or "morning" in words
        suffix = "am" if morning else "pm" if hour < 8 or hour == 12 or "pm" in words or "afternoon" in words else "am"
        return f"{hour}{minutes} {suffix}"
    return None
