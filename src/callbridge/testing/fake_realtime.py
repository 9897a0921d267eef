"""A scriptable fake of the OpenAI Realtime API, for tests that must not touch the network.

It is :class:`~callbridge.realtime.server.RealtimeServer` — the full protocol, with the service's event order and
its errors — driven by a scripted agent: energy-based voice activity detection, each caller turn "transcribed" as
the next entry of :attr:`FakeBehavior.transcripts`, and replies "spoken" as a 300 Hz tone whose length follows
the reply text. Each connection is recorded as a :class:`FakeSession` for assertions.

It also does what the real service does when things are not simple: it refuses a ``session.update`` with a value
the service refuses (and keeps the previous configuration), sends audio in the session's format (16-bit PCM at
24 kHz unless the session asks for G.711), and can be told to split long replies into several items, fail or cut
short chosen responses, run out of quota, expire the session, refuse the beta shape, a wrong API key or an unknown
or retired model, and re-prompt a silent caller after ``idle_timeout_ms``: see :class:`FakeBehavior`.

Example::

    from openai import AsyncOpenAI

    from callbridge.telephony.g711 import silence, tone
    from callbridge.testing.fake_realtime import FakeBehavior, FakeRealtimeServer


    async def test_agent_answers() -> None:
        behavior = FakeBehavior(transcripts=["I need a plumber"], speed=0)
        async with FakeRealtimeServer(behavior) as server:
            client = AsyncOpenAI(api_key="test", websocket_base_url=server.url.removesuffix("/realtime"))
            async with client.realtime.connect(model="gpt-realtime") as conn:
                ...  # session.update, then append tone(300) + silence(600) as base64
        assert server.sessions[0].server_events_of("response.done")
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from callbridge.realtime.server import RealtimeServer, ServerOptions, ServerSession, ToolCall, TurnContext
from callbridge.telephony.g711 import rms, tone

__all__ = ["FakeBehavior", "FakeRealtimeServer", "FakeSession", "ScriptedAgent"]

FakeSession = ServerSession
_TONE_HZ = 300.0


def _echo_reply(transcript: str) -> str:
    return f"You said: {transcript.rstrip('.!?')}. Is there anything else I can help you with today?"


@dataclass
class FakeBehavior:
    """What the fake hears and says. Shared by every connection to one server."""

    transcripts: list[str] = field(default_factory=list)
    """Caller transcript for each caller turn, in order; past the end, ``"(caller turn N)"``."""
    reply: Callable[[str], str] = _echo_reply
    """Caller transcript -> the agent's reply text."""
    greeting: str = "Hello! Thanks for calling. How can I help you today?"
    """Spoken for a ``response.create`` before any caller turn, unless the response's instructions contain
    ``saying exactly: X``, in which case X is spoken."""
    ms_per_char: int = 60
    """Agent audio per character of reply text."""
    delta_ms: int = 100
    """Audio per ``response.output_audio.delta``."""
    speed: float = 1.0
    """Delta pacing: 1.0 is real time, 2.0 twice as fast, 0 sends as fast as the socket allows."""
    speech_rms_threshold: float = 1000.0
    """Energy VAD threshold (16-bit RMS of a 20 ms frame); the session's ``threshold`` is not used."""
    tool_cues: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Keyword in the caller transcript -> (function name, arguments JSON): call that function instead of
    speaking. The response after the ``function_call_output`` says ``"Here is what I found: <output>"``."""
    error_on_turn: int | None = None
    """Send a ``server_error`` instead of transcribing and answering caller turn N (1-based)."""
    close_after_s: float | None = None
    """Close the connection with code 1011 this long after ``session.created``."""
    close_abruptly: bool = False
    """At ``close_after_s``, drop the TCP connection without a close frame, as a killed server process does."""
    retired_models: frozenset[str] = frozenset()
    """Models past their shutdown date. A connection whose ``?model=`` is among them gets ``model_not_found`` and is
    closed; a ``session.update`` whose transcription model is among them gets ``invalid_value``, as for a model the
    ``openai`` package does not list."""
    split_reply_items: bool = False
    """Stream a spoken reply of several sentences as one assistant audio item per sentence, all in one response,
    as the service does with long replies."""
    fail_responses: frozenset[int] = frozenset()
    """Responses (1-based, counting every response of a connection, greetings included) that fail:
    ``response.created``, then ``response.done`` ``failed`` with a ``server_error`` and no output."""
    incomplete_responses: frozenset[int] = frozenset()
    """Responses that stop after about half their audio: ``incomplete``, reason ``max_output_tokens``."""
    quota_exceeded: bool = False
    """Every response fails with ``insufficient_quota``, as when an account has run out of credit."""
    session_expires_after_s: float | None = None
    """Send ``session_expired`` ("Your session hit the maximum duration of 60 minutes.") this long after
    ``session.created``, then close with code 1001."""
    accepts_beta: bool = True
    """Serve ``OpenAI-Beta: realtime=v1`` connections. api.openai.com no longer does: set False to get its
    ``beta_api_shape_disabled`` error and close 4000."""
    api_key: str | None = None
    """The one API key accepted; another bearer token is refused as the live Realtime endpoint refuses it: after
    the upgrade, with an ``error`` event (``invalid_api_key``, the key masked) and close code 3000."""
    reject_api_key_in_band: bool = True
    """False: refuse a wrong key at the handshake instead, with HTTP 401 and OpenAI's JSON error body (as the REST
    API and some gateways in front of the Realtime API do)."""
    idle_prompt: str = "Are you still there?"
    """What the response after ``server_vad``'s ``idle_timeout_ms`` says."""

    def transcript(self, turn: int) -> str:
        return self.transcripts[turn - 1] if turn <= len(self.transcripts) else f"(caller turn {turn})"


class ScriptedAgent:
    """The fake's mind and voice: scripted transcripts and replies, tones for speech."""

    def __init__(self, behavior: FakeBehavior) -> None:
        self.behavior = behavior

    def hears_speech(self, frame: bytes) -> bool:
        return rms(frame) >= self.behavior.speech_rms_threshold

    async def transcribe(self, audio: bytes, turn: int) -> str:
        return self.behavior.transcript(turn)

    def plan(self, context: TurnContext) -> str | ToolCall:
        if context.tool_output is not None:
            return f"Here is what I found: {context.tool_output}"
        if not context.caller_transcripts:
            return self.behavior.greeting
        heard = context.caller_transcripts[-1]
        for keyword, (name, arguments) in self.behavior.tool_cues.items():
            if keyword.lower() in heard.lower():
                return ToolCall(name, arguments)
        return self.behavior.reply(heard)

    async def speak(self, text: str) -> AsyncGenerator[tuple[str, bytes], None]:
        behavior = self.behavior
        yield text, tone(max(behavior.delta_ms, len(text) * behavior.ms_per_char), _TONE_HZ)


class FakeRealtimeServer(RealtimeServer):
    """Serves the fake on ``ws://host:port/v1/realtime``; use as an async context manager or start()/stop()."""

    def __init__(self, behavior: FakeBehavior | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.behavior = behavior or FakeBehavior()
        super().__init__(self._new_agent, self._options(), host, port)

    def _options(self) -> ServerOptions:
        behavior = self.behavior
        return ServerOptions(
            delta_ms=behavior.delta_ms,
            speed=behavior.speed,
            error_on_turn=behavior.error_on_turn,
            close_after_s=behavior.close_after_s,
            close_abruptly=behavior.close_abruptly,
            split_reply_items=behavior.split_reply_items,
            fail_responses=behavior.fail_responses,
            incomplete_responses=behavior.incomplete_responses,
            quota_exceeded=behavior.quota_exceeded,
            session_expires_after_s=behavior.session_expires_after_s,
            accepts_beta=behavior.accepts_beta,
            api_key=behavior.api_key,
            reject_api_key_in_band=behavior.reject_api_key_in_band,
            check_model=True,
            retired_models=behavior.retired_models,
            idle_prompt=behavior.idle_prompt,
        )

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.options = self._options()  # the API key is checked at the handshake, before the agent is made
        return super()._check_request(connection, request)

    def _new_agent(self) -> ScriptedAgent:
        # Options are read per connection, so tests may change the behavior after the server started.
        self.options = self._options()
        return ScriptedAgent(self.behavior)
