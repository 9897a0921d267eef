"""The local engine's deterministic brain: intents, slots, tools, fallbacks."""

from __future__ import annotations

import json

from callbridge.engine.agent import split_sentences
from callbridge.engine.brain import BookingBrain
from callbridge.realtime.server import ToolCall, TurnContext

TOOLS = ["check_availability", "book_appointment"]


def turn(brain: BookingBrain, heard: list[str], tool_output: str | None = None, tools: list[str] = TOOLS) -> object:
    return brain.respond(TurnContext(heard, tool_output, "", tools))


def test_booking_conversation_with_tools() -> None:
    brain = BookingBrain()
    heard: list[str] = []
    assert "How can I help" in str(turn(brain, heard))
    heard.append("hi i'd like to book an appointment please")
    assert turn(brain, heard) == brain.agent.ask_when
    heard.append("tuesday afternoon at three please")
    call = turn(brain, heard)
    assert call == ToolCall("check_availability", json.dumps({"day": "tuesday", "time": "3 pm"}))
    assert turn(brain, heard, '{"day": "tuesday", "time": "3 pm", "available": true}') == (
        "Tuesday at 3 pm is free. Shall I book it for you?"
    )
    heard.append("actually what are your opening hours")
    assert "Monday to Friday" in str(turn(brain, heard))
    heard.append("yes please that works")
    assert turn(brain, heard) == ToolCall("book_appointment", json.dumps({"day": "tuesday", "time": "3 pm"}))
    assert "booked for Tuesday at 3 pm" in str(turn(brain, heard, '{"booked": true}'))
    heard.append("no thank you goodbye")
    assert turn(brain, heard) == brain.agent.goodbye


def test_without_tools_the_brain_decides_itself() -> None:
    brain = BookingBrain()
    assert "Sure" in str(turn(brain, ["i want to make an appointment"], tools=[]))
    assert "Friday at 10 am is free" in str(turn(brain, ["i want to make an appointment", "friday at ten"], tools=[]))


def test_slot_filling_asks_for_what_is_missing() -> None:
    brain = BookingBrain()
    assert turn(brain, ["can i book for monday"]) == "And at what time on monday?"
    assert turn(brain, ["can i book for monday", "half past nine in the morning"]) == ToolCall(
        "check_availability", json.dumps({"day": "monday", "time": "9:30 am"})
    )


def test_taken_slot_and_fallbacks() -> None:
    brain = BookingBrain()
    turn(brain, ["book me in please", "sunday at two"])
    assert "taken" in str(turn(brain, ["book me in please", "sunday at two"], '{"available": false}'))
    assert turn(BookingBrain(), ["the weather is purple"]) == BookingBrain().agent.fallback
    assert turn(brain, ["x"], '{"error": "boom"}') == brain.agent.fallback


def test_phrases_cover_the_domain() -> None:
    phrases = BookingBrain().phrases()
    assert "what are your opening hours" in phrases and "tuesday afternoon at three" in phrases


def test_split_sentences() -> None:
    assert split_sentences("Sure. What day? Fine!") == ["Sure.", "What day?", "Fine!"]
