"""Test doubles for what a test machine cannot reach, and strict checks of both wire protocols.

- :class:`FakeRealtimeServer` — the OpenAI Realtime API on loopback, with its refusals and odd behaviours;
- :class:`SimulatedCaller` — Twilio placing a call: signed webhook, signed media stream, real-time audio;
- :class:`FakeTwilio` — Twilio's Calls REST API on loopback, and outbound calls played out by themselves for the
  numbers given an outcome (:class:`Human`, :class:`Machine`, :class:`NoAnswer`, :class:`Busy`, :class:`Failed`);
- :mod:`conformance` — client events checked against the ``openai`` package's types, messages to Twilio against
  the Media Streams schema.

Names load on first use (the Realtime server imports the conformance checks, which import this package).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from callbridge.testing import conformance
    from callbridge.testing.caller import SimulatedCaller
    from callbridge.testing.fake_realtime import FakeBehavior, FakeRealtimeServer
    from callbridge.testing.fake_twilio import Busy, Failed, FakeTwilio, Human, Machine, NoAnswer

__all__ = [
    "Busy",
    "Failed",
    "FakeBehavior",
    "FakeRealtimeServer",
    "FakeTwilio",
    "Human",
    "Machine",
    "NoAnswer",
    "SimulatedCaller",
    "conformance",
]

_MODULES = {
    "FakeBehavior": "callbridge.testing.fake_realtime",
    "FakeRealtimeServer": "callbridge.testing.fake_realtime",
    "FakeTwilio": "callbridge.testing.fake_twilio",
    "Human": "callbridge.testing.fake_twilio",
    "Machine": "callbridge.testing.fake_twilio",
    "NoAnswer": "callbridge.testing.fake_twilio",
    "Busy": "callbridge.testing.fake_twilio",
    "Failed": "callbridge.testing.fake_twilio",
    "SimulatedCaller": "callbridge.testing.caller",
}


def __getattr__(name: str) -> Any:
    if name == "conformance":
        return importlib.import_module("callbridge.testing.conformance")
    if name not in _MODULES:
        raise AttributeError(f"module 'callbridge.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
