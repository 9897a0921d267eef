from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import pytest

from callbridge.core import events as ev
from callbridge.core.commands import Command, RealtimeCommand, TwilioCommand
from callbridge.core.context import AgentConfig, CallContext
from callbridge.core.session import CallSession, SessionConfig
from callbridge.realtime.client_events import client_event
from callbridge.telephony.outbound import twilio_message
from callbridge.telephony.params import StreamParameterSigner
from callbridge.testing.conformance import validate_client_event, validate_twilio_message

SECRET = "test-secret"
CALL_SID = "CA" + "1" * 32
STREAM_SID = "MZ" + "2" * 32

SUITE_SECRETS: set[str] = set()


def secret(value: str) -> str:
    """Register a secret a test configures (key, token, signing secret): no log of the suite may contain it."""
    SUITE_SECRETS.add(value)
    return value


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole suite: grep every log the services under test wrote for every secret they were given."""
    yield
    logs = [path for path in tmp_path_factory.getbasetemp().rglob("*.log") if path.is_file()]
    leaks = [
        f"{path.name}: {value[:4]}…" for path in logs for value in SUITE_SECRETS if value.encode() in path.read_bytes()
    ]
    assert not leaks, f"secrets found in logs: {leaks}"
    print(f"\nno secret in {len(logs)} service logs ({len(SUITE_SECRETS)} secrets checked)")


def audio(ms: int, byte: int = 0x7F) -> str:
    """Base64 μ-law of the given duration."""
    return base64.b64encode(bytes([byte]) * (ms * 8)).decode()


class Harness:
    """Drives a session like the driver does, checking every command against the wire schemas."""

    def __init__(self, agent: AgentConfig | None = None, **config: Any) -> None:
        self.signer = StreamParameterSigner(SECRET, ttl_seconds=600)
        self.session = CallSession(
            SessionConfig(agent=agent or AgentConfig(), verify_parameters=self._verify, **config)
        )
        self.now = 1000.0
        self.records: dict[str, CallContext] = {}  # what the service would keep on record, by call SID

    def _verify(self, parameters: Mapping[str, str], call_sid: str) -> CallContext:
        """The parameters prove the call; its context comes from the record, as the service loads it."""
        signed = self.signer.verify(parameters, call_sid, now=self.now)  # the harness's clock is the wall clock
        return replace(self.records.get(call_sid, CallContext()), call_sid=signed.call_sid, binding=signed.binding)

    def handle(self, event: ev.Event, at: float | None = None) -> list[Command]:
        if at is not None:
            self.now = at
        commands = self.session.handle(event, self.now)
        for command in commands:
            if isinstance(command, RealtimeCommand):
                validate_client_event(client_event(command, "ga"), "ga")
                validate_client_event(client_event(command, "beta"), "beta")
            elif isinstance(command, TwilioCommand):
                assert self.session.stream_sid is not None, "nothing goes to Twilio before its stream started"
                validate_twilio_message(twilio_message(command, self.session.stream_sid))
        return commands

    def start_event(self, context: CallContext | None = None, call_sid: str = CALL_SID) -> ev.TwilioStart:
        context = context or CallContext(call_sid=call_sid, caller="+15550100001", called="+15550100002")
        self.records[call_sid] = context
        return ev.TwilioStart(STREAM_SID, call_sid, custom_parameters=self.signer.mint(context, self.now))

    def go_live(self, context: CallContext | None = None) -> list[Command]:
        """connected → start → Realtime connected → session.updated; returns the commands of the last three."""
        self.handle(ev.TwilioConnected())
        commands = self.handle(self.start_event(context))
        commands += self.handle(ev.RealtimeConnected())
        commands += self.handle(ev.RealtimeSessionUpdated())
        assert self.session.phase == "live"
        return commands

    def speak(self, response_id: str, item_id: str, chunks: int, chunk_ms: int = 100) -> list[Command]:
        """The model streams ``chunks`` audio deltas of one item."""
        commands = self.handle(ev.RealtimeResponseCreated(response_id))
        for _ in range(chunks):
            commands += self.handle(ev.RealtimeAudioDelta(response_id, item_id, audio(chunk_ms)))
        return commands


def realtime_events(commands: list[Command]) -> list[dict[str, Any]]:
    return [client_event(c, "ga") for c in commands if isinstance(c, RealtimeCommand)]


def twilio_messages(commands: list[Command]) -> list[dict[str, Any]]:
    return [twilio_message(c, STREAM_SID) for c in commands if isinstance(c, TwilioCommand)]


def of_type(commands: list[Command], kind: str) -> list[dict[str, Any]]:
    return [e for e in realtime_events(commands) if e["type"] == kind]


@pytest.fixture
def harness() -> Harness:
    return Harness()


@pytest.fixture
def manual_cancel_harness() -> Harness:
    agent = AgentConfig()
    agent = replace(agent, turn_detection={"type": "server_vad", "interrupt_response": False})
    return Harness(agent)
