"""A local fake of Twilio's Calls REST resource, for tests that must not touch the network.

It serves the documented endpoints of ``https://api.twilio.com/2010-04-01`` that call control uses, the way
Twilio does: HTTP basic auth with the account SID and auth token, form-encoded parameters, call resources and
Twilio's error JSON (``code``, ``message``, ``more_info``, ``status``). Every request is recorded in
:attr:`FakeTwilio.requests` and every call in :attr:`FakeTwilio.calls`.

- ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json``: create a call (``To``, ``From`` and one of ``Twiml``,
  ``Url`` or ``ApplicationSid``); 201 with the call, status ``queued``.
- ``POST .../Calls/{CallSid}.json``: update a call: ``Status`` (``completed`` or ``canceled``), ``Twiml``, ``Url``.
- ``GET .../Calls/{CallSid}.json``: fetch a call.
- ``GET .../Calls.json``: list calls, newest first, filtered by ``To`` and ``From`` (one page).

**Unscripted numbers.** A call to a number nobody scripted does not progress by itself: set
``fake.calls[sid].status`` to play its life (``"in-progress"``, ``"completed"``, …).

**Scripted numbers.** :meth:`FakeTwilio.script` (or ``outcomes=`` at construction) says what happens to the calls
to a number, one outcome per successive call: :class:`Human` (answers; a :class:`SimulatedCaller` plays its
script on the ``<Connect><Stream>`` of the call's inline ``Twiml``), :class:`Machine` (an answering machine: its
greeting, then it records what it hears; :class:`Voicemail`), :class:`NoAnswer`, :class:`Busy`, :class:`Failed`.
The fake then plays the call out by itself, as Twilio would: the call resource's status moves along, and the
status callbacks (``StatusCallback``, ``StatusCallbackEvent``) and asynchronous answering-machine-detection
callbacks (``MachineDetection``, ``AsyncAmd=true``, ``AsyncAmdStatusCallback``) are sent, signed with
``X-Twilio-Signature`` over the URL as given in the create request. ``service_url`` names where the service really
listens when those URLs name its public address: requests and the stream go there, keeping path and query.

- Status callbacks: the events asked for among ``initiated``, ``ringing``, ``answered``, ``completed``
  (``completed`` is always sent, as Twilio does; it carries the final ``CallStatus``: ``completed``, ``busy``,
  ``no-answer``, ``failed`` or ``canceled``). Parameters: ``CallSid``, ``AccountSid``, ``From``, ``To``,
  ``Caller``, ``Called``, ``CallStatus``, ``Direction=outbound-api``, ``ApiVersion``,
  ``CallbackSource=call-progress-events``, ``Timestamp`` (RFC 2822), ``SequenceNumber`` (from 0, per call),
  ``CallDuration`` (seconds) on the final one, and ``AnsweredBy`` once detection has given a verdict.
  ``StatusCallbackMethod=GET`` sends them as a query string (signed over the whole URL).
- AMD callbacks (``CallSid``, ``AccountSid``, ``AnsweredBy``, ``MachineDetectionDuration`` in ms since answer):
  for a human, ``human`` (or the scripted ``answered_by``) :attr:`Human.amd_after_s` after answer; for a machine,
  the verdict of the mode asked for, ``machine_start`` with ``Enable`` (:attr:`Machine.start_after_s` after answer),
  ``machine_end_beep`` with ``DetectMessageEnd`` (when the greeting ends), or the scripted
  :attr:`Machine.verdicts`, each at its time, in order. Twilio sends one verdict per call; a list of several is a
  test's way to replay what a service must survive. A verdict not reached before the call ends is never sent.
  Without ``AsyncAmd=true`` (synchronous detection) no AMD callback is sent: the call's TwiML starts only once the
  verdict is known (the machine's greeting goes on meanwhile), and ``answered_by`` is on the resource.
- The end of a call: the callee hangs up (a :class:`~callbridge.testing.caller.HangUp` step, or the machine's
  :attr:`Machine.max_message_s`); the service ends it through REST (``Status=completed``: the stream gets ``stop``
  and closes, like a real line); the service closes the stream's WebSocket (Twilio goes on with the TwiML after
  ``<Connect>``, and with nothing after it the call is over); a REST redirect (``Twiml``) ends the stream and runs
  the new TwiML: TwiML of only ``<Say>``, ``<Play>``, ``<Pause>``, ``<Hangup>`` and ``<Reject>`` ends the call,
  anything else (``<Dial>``: the call moved to a human) keeps it in progress until it is ended through REST.
  ``TimeLimit`` (default 4 hours) ends a call after that long in progress.

Assumed rather than observed, and simplified:

- Timing: ``initiated`` :data:`SETUP_S` after the create, ``ringing`` :data:`SETUP_S` later, the answer
  ``ring_s`` after ringing; a ``ring_s`` at or over the create's ``Timeout`` (default 60 s) rings out as
  ``no-answer``. :class:`Busy` and :class:`Failed` calls never ring: ``initiated`` then the final callback.
- ``CallDuration`` is the whole seconds (rounded) from answer to end, 0 for a call never answered. Callbacks of
  one call are sent one after the other (so they arrive in order), each with Twilio's 15-second timeout; a failed
  one is recorded with ``status_code=None`` and not retried.
- A redirect to a new ``<Connect><Stream>``, ``Url`` or ``ApplicationSid`` TwiML is not fetched nor connected:
  the call is held in progress. A ``Twiml`` without a ``<Connect><Stream>`` runs as above.
- ``creates_per_second``: Twilio queues calls beyond an account's calls-per-second and answers 429 (20429,
  "Too Many Requests") to a client that sends too many requests; this fake models the limit as that 429 for a
  create beyond ``creates_per_second`` accepted creates in any sliding one-second window, and creates nothing.

Example::

    from callbridge.telephony.rest import TwilioCalls
    from callbridge.testing.fake_twilio import FakeTwilio


    async def test_hang_up() -> None:
        async with FakeTwilio("AC" + "0" * 32, "token") as twilio:
            calls = TwilioCalls(twilio.account_sid, twilio.auth_token, api_base_url=twilio.base_url)
            sid = await calls.create(to="+15550100002", from_="+15550100001", twiml="<Response/>")
            await calls.hang_up(sid)
            await calls.aclose()
        assert twilio.calls[sid].status == "canceled"  # it was still queued

Scripted::

    async with FakeTwilio(sid, token, service_url=service.base_url) as twilio:
        twilio.script("+15550100009", NoAnswer(ring_s=0.5), Human(CallScript([Pause(2000), HangUp()])))
        ...  # the service places two calls to +15550100009
        first = await twilio.ended(first_sid)  # the final status callback has been sent
        assert [c.params["CallStatus"] for c in first.status_callbacks] == ["initiated", "ringing", "no-answer"]
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import math
import socket
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from twilio.request_validator import RequestValidator

from callbridge.telephony.g711 import BYTES_PER_MS, tone
from callbridge.testing.caller import (
    FRAME_MS,
    CallRecording,
    CallScript,
    HangUp,
    Pause,
    Say,
    SimulatedCaller,
)

__all__ = [
    "Busy",
    "Failed",
    "FakeCall",
    "FakeTwilio",
    "Human",
    "Machine",
    "NoAnswer",
    "Outcome",
    "RecordedRequest",
    "SentCallback",
    "Voicemail",
]

API_VERSION = "2010-04-01"
MAX_TWIML_CHARS = 4000
ENDED_STATUSES = frozenset({"completed", "canceled", "busy", "failed", "no-answer"})
LIVE_STATUSES = frozenset({"ringing", "in-progress"})
"""What :attr:`FakeTwilio.peak_live` counts: calls ringing or answered, not ended."""
SETUP_S = 0.05
"""From the create to ``initiated``, and from ``initiated`` to ``ringing``."""
DEFAULT_TIMEOUT_S = 60
DEFAULT_TIME_LIMIT_S = 4 * 3600
CALLBACK_TIMEOUT_S = 15.0
_NOT_ANSWERED = frozenset({"queued", "initiated", "ringing"})
_ENDING_VERBS = frozenset({"Say", "Play", "Pause", "Hangup", "Reject"})
_CALL_SUBRESOURCES = {
    "events": "Events",
    "notifications": "Notifications",
    "payments": "Payments",
    "recordings": "Recordings",
    "siprec": "Siprec",
    "streams": "Streams",
    "transcriptions": "Transcriptions",
    "user_defined_message_subscriptions": "UserDefinedMessageSubscriptions",
    "user_defined_messages": "UserDefinedMessages",
}

EndedBy = Literal["callee", "rest", "stream", "redirect", "twiml", "time_limit", "closed"]
"""Who ended an answered call: the callee hung up (its script, the machine's maximum message); the service through
REST (``Status=completed``); the service closing the stream's WebSocket; a redirect to TwiML that ends; TwiML that
ran out without a stream (or whose stream could not open); ``TimeLimit``; the fake closing with the call live."""


# --- Outcomes -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Human:
    """A person answers after ``ring_s`` and follows ``script`` on the call's ``<Connect><Stream>``."""

    script: CallScript
    ring_s: float = 1.0
    amd_after_s: float = 1.5
    """When AMD was asked for: the verdict comes this long after answer (Twilio needs about 1.5-3 s)."""
    answered_by: str = "human"
    """The verdict: ``human``, or ``unknown`` (Twilio's answer to silence)."""


@dataclass(frozen=True, slots=True)
class Machine:
    """An answering machine answers after ``ring_s``: its greeting (μ-law, or a tone of that many ms as a stand-in
    for speech), then it records in silence until the call ends, or ``max_message_s`` after the greeting."""

    greeting: bytes | int = 3000
    verdicts: tuple[str, ...] | None = None
    """AMD verdicts, sent in order; ``None``: Twilio's one verdict for the ``MachineDetection`` asked for."""
    ring_s: float = 1.0
    start_after_s: float = 1.0
    """When a verdict other than ``machine_end_*`` comes, after answer (at most when the greeting ends)."""
    end_after_s: float = 0.0
    """When a ``machine_end_*`` verdict comes, after the greeting ended (the beep)."""
    max_message_s: float = 30.0

    @property
    def greeting_audio(self) -> bytes:
        return tone(self.greeting) if isinstance(self.greeting, int) else self.greeting

    @property
    def greeting_ms(self) -> int:
        """The greeting's length as played: whole 20 ms frames (a last partial frame is padded)."""
        frames = math.ceil(len(self.greeting_audio) / (FRAME_MS * BYTES_PER_MS))
        return frames * FRAME_MS


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """Rings out: ``no-answer`` after ``ring_s``, or after the create's ``Timeout`` (60 s by default) if ``None``."""

    ring_s: float | None = None


@dataclass(frozen=True, slots=True)
class Busy:
    """The line is busy: ``initiated``, then ``busy``."""


@dataclass(frozen=True, slots=True)
class Failed:
    """Twilio could not place the call: ``initiated``, then ``failed``."""


Outcome = Human | Machine | NoAnswer | Busy | Failed


# --- What the fake records ------------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    form: dict[str, list[str]]
    """Body parameters; each name maps to all its values in order (``StatusCallbackEvent`` repeats)."""
    content_type: str
    auth_ok: bool
    """Basic auth carried this account's SID and auth token."""
    status: int = 0
    """The status code of the fake's response."""
    at: float = field(default_factory=time.monotonic)

    def value(self, name: str) -> str | None:
        """The parameter's single (first) value."""
        values = self.form.get(name)
        return values[0] if values else None


@dataclass
class SentCallback:
    """A request the fake sent to the service, and what it got back."""

    kind: Literal["status", "amd"]
    url: str
    """As given in the create request (the signature is computed over it)."""
    method: str
    params: dict[str, str]
    status_code: int | None = None
    """The answer's status; ``None`` when the request failed (``error`` says how)."""
    error: str | None = None
    at: float = 0.0
    """``time.monotonic()`` when it was sent."""


@dataclass
class Voicemail:
    """What an answering machine heard: everything after its greeting (the beep) is the message."""

    recording: CallRecording
    greeting_ms: int

    @property
    def message_audio(self) -> bytes:
        """The agent audio played after the greeting ended, in order."""
        audio, position = bytearray(), 0
        for at_s, count in self.recording.heard_timeline:
            if round(at_s * 1000) >= self.greeting_ms:
                audio += self.recording.heard_audio[position : position + count]
            position += count
        return bytes(audio)

    @property
    def message_ms(self) -> int:
        return len(self.message_audio) // BYTES_PER_MS

    @property
    def heard_during_greeting_ms(self) -> int:
        """Agent audio played over the greeting: lost to the message."""
        return (len(self.recording.heard_audio) - len(self.message_audio)) // BYTES_PER_MS

    @property
    def hung_up_at_s(self) -> float:
        """When the line ended, in seconds since the stream started."""
        return self.recording.duration_s

    @property
    def hung_up_after_greeting_s(self) -> float:
        return self.recording.duration_s - self.greeting_ms / 1000


@dataclass
class FakeCall:
    """A call resource's state, and for a scripted call what happened on it."""

    sid: str
    account_sid: str
    to: str
    from_: str
    status: str = "queued"
    twiml: str | None = None
    url: str | None = None
    application_sid: str | None = None
    status_callback: str | None = None
    status_callback_events: list[str] = field(default_factory=list)
    machine_detection: str | None = None
    time_limit: int | None = None
    params: dict[str, list[str]] = field(default_factory=dict)
    """Every parameter of the create request."""
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))
    date_updated: datetime = field(default_factory=lambda: datetime.now(UTC))
    start_time: datetime | None = None
    end_time: datetime | None = None
    answered_by: str | None = None
    outcome: Outcome | None = None
    """What was scripted for this call (``None``: unscripted, it does nothing by itself)."""
    attempt: int = 0
    """The how-manieth call to this number it is (from 1)."""
    statuses: list[str] = field(default_factory=lambda: ["queued"])
    """Every status the call went through, in order."""
    callbacks: list[SentCallback] = field(default_factory=list)
    recording: CallRecording | None = None
    """The stream as the simulated callee lived it (a human's or the machine's)."""
    voicemail: Voicemail | None = None
    ended_by: EndedBy | None = None
    stream_error: str | None = None
    """Why the ``<Connect><Stream>`` could not be played, when it could not."""
    redirects: list[str] = field(default_factory=list)
    """The TwiML of each REST redirect, in order."""
    _changed: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False, compare=False)
    _done: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False, compare=False)

    @property
    def status_callbacks(self) -> list[SentCallback]:
        return [callback for callback in self.callbacks if callback.kind == "status"]

    @property
    def amd_callbacks(self) -> list[SentCallback]:
        return [callback for callback in self.callbacks if callback.kind == "amd"]

    def duration_s(self) -> int:
        if self.start_time is None or self.end_time is None:
            return 0
        return round((self.end_time - self.start_time).total_seconds())

    def resource(self) -> dict[str, Any]:
        """The call as Twilio's JSON represents it."""
        base = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{self.sid}"
        return {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": self.answered_by,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": format_datetime(self.date_created),
            "date_updated": format_datetime(self.date_updated),
            "direction": "outbound-api",
            "duration": None if self.end_time is None else str(self.duration_s()),
            "end_time": None if self.end_time is None else format_datetime(self.end_time),
            "forwarded_from": None,
            "from": self.from_,
            "from_formatted": self.from_,
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": None,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": self.sid,
            "start_time": None if self.start_time is None else format_datetime(self.start_time),
            "status": self.status,
            "subresource_uris": {key: f"{base}/{name}.json" for key, name in _CALL_SUBRESOURCES.items()},
            "to": self.to,
            "to_formatted": self.to,
            "trunk_sid": None,
            "uri": f"{base}.json",
        }

    def one(self, name: str) -> str | None:
        """A create parameter's single (first) value."""
        values = self.params.get(name)
        return values[0] if values else None


class _TwilioError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JSONResponse:
        body = {
            "code": self.code,
            "message": self.message,
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
            "status": self.status,
        }
        headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _not_found(path: str) -> _TwilioError:
    return _TwilioError(404, 20404, f"The requested resource {path} was not found")


def _check_twiml(twiml: str) -> None:
    if len(twiml) > MAX_TWIML_CHARS:
        raise _TwilioError(400, 32018, f"Twiml size exceeded maximum allowed value of {MAX_TWIML_CHARS} characters")


def _twiml_ends_call(verbs: Iterable[ET.Element]) -> bool:
    """Whether TwiML made of these verbs runs out by itself (the call is then over) rather than holding the call."""
    return all(verb.tag in _ENDING_VERBS for verb in verbs)


def _verbs_after_connect(twiml: str | None) -> list[ET.Element]:
    """The verbs Twilio runs once the ``<Connect>`` of this TwiML is over."""
    root = _parse(twiml)
    if root is None:
        return []
    verbs = list(root)
    connect = next((i for i, verb in enumerate(verbs) if verb.tag == "Connect"), None)
    return verbs if connect is None else verbs[connect + 1 :]


def _parse(twiml: str | None) -> ET.Element | None:
    if twiml is None:
        return None
    try:
        return ET.fromstring(twiml)
    except ET.ParseError:
        return None  # Twilio ends a call whose TwiML it cannot parse (error 12100)


def _has_stream(twiml: str | None) -> bool:
    root = _parse(twiml)
    return root is not None and root.tag == "Response" and root.find("./Connect/Stream") is not None


# --- The fake -------------------------------------------------------------------------------------------------


class FakeTwilio:
    """Twilio's Calls endpoints under uvicorn on a free local port: ``async with FakeTwilio(sid, token) as t``.

    Error codes and messages follow Twilio's: 20003 ``Authenticate`` (401), 20404 (404), 21201 no ``To``,
    21205 no ``Url`` (nor ``Twiml`` or ``ApplicationSid``), 21213 no ``From``, checked in that order;
    32018 ``Twiml`` over 4000 characters; 21220 update of a call that has ended; 20429 (429) beyond
    ``creates_per_second``. Assumed rather than observed: the HTTP status (400) of 32018, the message of 21213, 404
    for a path naming another account, and 20001 for a ``Status`` other than ``completed`` or ``canceled``.
    ``completed`` and ``canceled`` both end a call that has not been answered yet as ``canceled``; on a call in
    progress, only ``completed`` ends it.

    What a test reads: :attr:`calls` (each :class:`FakeCall` with its outcome, statuses, callbacks, recording and
    voicemail), :attr:`callbacks` (every callback sent, in order), :attr:`create_times` (``time.monotonic()`` of
    each accepted create), :attr:`peak_live` (the most calls ringing or in progress at once), and
    :meth:`ended` to wait for a scripted call's final callback.
    """

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        service_url: str | None = None,
        creates_per_second: int | None = None,
        outcomes: Mapping[str, Outcome | Sequence[Outcome]] | None = None,
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.service_url = service_url.rstrip("/") if service_url else None
        self.creates_per_second = creates_per_second
        self.requests: list[RecordedRequest] = []
        self.calls: dict[str, FakeCall] = {}
        self.callbacks: list[SentCallback] = []
        self.create_times: list[float] = []
        self.peak_live = 0
        self.base_url = ""
        self._outcomes: dict[str, deque[Outcome]] = {}
        self._attempts: dict[str, int] = {}
        self._window: deque[float] = deque()
        self._failures: list[int] = []
        self._runners: set[asyncio.Task[None]] = set()
        self._closing = False
        self._validator = RequestValidator(auth_token)
        self._http: httpx.AsyncClient | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._app = self._build_app()
        for number, scripted in (outcomes or {}).items():
            self.script(number, *([scripted] if isinstance(scripted, Outcome) else scripted))

    def script(self, number: str, *outcomes: Outcome) -> None:
        """What happens to the next calls to ``number``, one outcome per call, after those scripted before.

        Once they are used up, calls to the number are unscripted again (they stay ``queued``).
        """
        self._outcomes.setdefault(number, deque()).extend(outcomes)

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        """Answer the next ``n`` requests with ``status`` (Twilio's 20xxx code for it) before anything else."""
        self._failures.extend([status] * n)

    @property
    def live(self) -> int:
        """Calls ringing or in progress now."""
        return sum(call.status in LIVE_STATUSES for call in self.calls.values())

    async def ended(self, call_sid: str, timeout: float = 30.0) -> FakeCall:  # noqa: ASYNC109 - a test's bound
        """The scripted call once it is over and its final status callback has been answered (or has failed)."""
        call = self.calls[call_sid]
        await asyncio.wait_for(call._done.wait(), timeout)
        return call

    async def __aenter__(self) -> FakeTwilio:
        listener = socket.create_server(("127.0.0.1", 0))
        config = uvicorn.Config(self._app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]))
        self._http = httpx.AsyncClient(timeout=CALLBACK_TIMEOUT_S)
        self.base_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        return self  # the socket listens already: requests wait in its backlog until uvicorn accepts them

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Calls still live end (``closed``) and send their final callback, for a few seconds at most."""
        self._closing = True
        for call in self.calls.values():
            call._changed.set()
        if self._runners:
            _, pending = await asyncio.wait(self._runners, timeout=5)
            for runner in pending:
                runner.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server = self._task = None

    # --- REST ---------------------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        calls_path = f"/{API_VERSION}/Accounts/{{account_sid}}/Calls"

        @app.post(f"{calls_path}.json", status_code=201)
        async def create_call(request: Request, account_sid: str) -> JSONResponse:
            return await self._handle(request, account_sid, None, 201)

        @app.get(f"{calls_path}.json")
        async def list_calls(request: Request, account_sid: str) -> JSONResponse:
            return self._list(request, account_sid)

        @app.post(f"{calls_path}/{{call_sid}}.json")
        async def update_call(request: Request, account_sid: str, call_sid: str) -> JSONResponse:
            return await self._handle(request, account_sid, call_sid, 200)

        @app.get(f"{calls_path}/{{call_sid}}.json")
        async def fetch_call(request: Request, account_sid: str, call_sid: str) -> JSONResponse:
            return await self._handle(request, account_sid, call_sid, 200)

        return app

    async def _handle(self, request: Request, account_sid: str, call_sid: str | None, ok_status: int) -> JSONResponse:
        body = (await request.body()).decode()
        form: dict[str, list[str]] = {}
        for name, value in parse_qsl(body, keep_blank_values=True):
            form.setdefault(name, []).append(value)
        recorded = RecordedRequest(
            method=request.method,
            path=request.url.path,
            form=form,
            content_type=request.headers.get("content-type", ""),
            auth_ok=self._auth_ok(request.headers.get("authorization")),
        )
        self.requests.append(recorded)
        try:
            if self._failures:
                status = self._failures.pop(0)
                raise _TwilioError(status, 20000 + status, "Scripted failure")
            if not recorded.auth_ok:
                raise _TwilioError(401, 20003, "Authenticate")
            if account_sid != self.account_sid:
                raise _not_found(recorded.path)
            if call_sid is None:
                call = self._create(form)
            else:
                found = self.calls.get(call_sid)
                if found is None:
                    raise _not_found(recorded.path)
                call = found
                if request.method == "POST":
                    self._update(call, form)
            response = JSONResponse(call.resource(), status_code=ok_status)
        except _TwilioError as error:
            response = error.response()
        recorded.status = response.status_code
        return response

    def _list(self, request: Request, account_sid: str) -> JSONResponse:
        """``GET .../Calls.json``: the account's calls, newest first, filtered by ``To`` and ``From``; one page of
        ``PageSize`` (default 50, at most 1000)."""
        query = request.query_params
        recorded = RecordedRequest(
            method="GET",
            path=request.url.path,
            form={name: query.getlist(name) for name in query},
            content_type="",
            auth_ok=self._auth_ok(request.headers.get("authorization")),
        )
        self.requests.append(recorded)
        if not recorded.auth_ok:
            response = _TwilioError(401, 20003, "Authenticate").response()
        elif account_sid != self.account_sid:
            response = _not_found(recorded.path).response()
        else:
            size = min(int(query.get("PageSize", "50") or 50), 1000)
            found = [
                call
                for call in sorted(self.calls.values(), key=lambda call: call.date_created, reverse=True)
                if query.get("To") in (None, call.to) and query.get("From") in (None, call.from_)
            ][:size]
            uri = f"{recorded.path}?PageSize={size}&Page=0"
            body = {
                "calls": [call.resource() for call in found],
                "end": max(len(found) - 1, 0),
                "first_page_uri": uri,
                "next_page_uri": None,
                "page": 0,
                "page_size": size,
                "previous_page_uri": None,
                "start": 0,
                "uri": uri,
            }
            response = JSONResponse(body)
        recorded.status = response.status_code
        return response

    def _auth_ok(self, header: str | None) -> bool:
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user == self.account_sid and password == self.auth_token

    def _check_rate(self) -> float:
        """The time of this create, or a 429 when ``creates_per_second`` were accepted in the last second."""
        now = time.monotonic()
        while self._window and now - self._window[0] >= 1.0:
            self._window.popleft()
        if self.creates_per_second is not None and len(self._window) >= self.creates_per_second:
            raise _TwilioError(429, 20429, "Too Many Requests")
        return now

    def _create(self, form: dict[str, list[str]]) -> FakeCall:
        def one(name: str) -> str | None:
            return form[name][0] if form.get(name) else None

        to, from_, twiml, url, application_sid = (one(n) for n in ("To", "From", "Twiml", "Url", "ApplicationSid"))
        if not to:
            raise _TwilioError(400, 21201, "No 'To' number is specified")
        if not (twiml or url or application_sid):
            raise _TwilioError(400, 21205, "Url parameter is required.")
        if not from_:
            raise _TwilioError(400, 21213, "No 'From' number is specified")
        if twiml is not None:
            _check_twiml(twiml)
        now = self._check_rate()
        time_limit = one("TimeLimit")
        call = FakeCall(
            sid="CA" + uuid.uuid4().hex,
            account_sid=self.account_sid,
            to=to,
            from_=from_,
            twiml=twiml,
            url=url,
            application_sid=application_sid,
            status_callback=one("StatusCallback"),
            # Twilio takes the events as repeated parameters or space-separated in one.
            status_callback_events=[event for value in form.get("StatusCallbackEvent", []) for event in value.split()],
            machine_detection=one("MachineDetection"),
            time_limit=int(time_limit) if time_limit else None,
            params=form,
        )
        self._window.append(now)
        self.create_times.append(now)
        self.calls[call.sid] = call
        self._attempts[to] = call.attempt = self._attempts.get(to, 0) + 1
        scripted = self._outcomes.get(to)
        if scripted:
            call.outcome = scripted.popleft()
            runner = asyncio.create_task(_CallRun(self, call, call.outcome).run())
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        return call

    def _update(self, call: FakeCall, form: dict[str, list[str]]) -> None:
        if call.status in ENDED_STATUSES:
            raise _TwilioError(400, 21220, "Call is not in-progress. Cannot redirect.")
        status, twiml, url = (form[name][0] if form.get(name) else None for name in ("Status", "Twiml", "Url"))
        if status is not None and status not in ("completed", "canceled"):
            raise _TwilioError(400, 20001, f"Invalid Status: {status}")
        if twiml is not None:
            _check_twiml(twiml)
        now = datetime.now(UTC)
        if twiml is not None:
            call.twiml, call.url = twiml, None
            call.redirects.append(twiml)
        elif url is not None:
            call.twiml, call.url = None, url
            call.redirects.append("")
        if status is not None:
            if call.status in _NOT_ANSWERED:
                self._set_status(call, "canceled")
            elif status == "completed":
                self._set_status(call, "completed")
                call.ended_by = call.ended_by or "rest"
        call.date_updated = now
        call._changed.set()  # a scripted call's runner looks at what changed

    def _set_status(self, call: FakeCall, status: str) -> None:
        now = datetime.now(UTC)
        call.status, call.date_updated = status, now
        call.statuses.append(status)
        if status == "in-progress":
            call.start_time = now
        if status in ENDED_STATUSES and call.end_time is None:
            call.end_time = now
        self.peak_live = max(self.peak_live, self.live)

    # --- sending to the service ---------------------------------------------------------------------------

    def _local(self, url: str) -> str:
        """Where a URL naming the service's public address really goes: ``service_url``, same path and query."""
        if self.service_url is None:
            return url
        base, parts = urlsplit(self.service_url), urlsplit(url)
        return urlunsplit((base.scheme, base.netloc, parts.path or "/", parts.query, ""))

    async def _send(self, callback: SentCallback, call: FakeCall) -> None:
        """Send one callback, signed as Twilio signs it, and record it with its answer."""
        assert self._http is not None
        callback.at = time.monotonic()
        call.callbacks.append(callback)
        self.callbacks.append(callback)
        try:
            if callback.method == "GET":
                separator = "&" if urlsplit(callback.url).query else "?"
                url = f"{callback.url}{separator}{urlencode(callback.params)}"
                headers = self._headers(self._validator.compute_signature(url, {}))
                response = await self._http.get(self._local(url), headers=headers)
            else:
                headers = self._headers(self._validator.compute_signature(callback.url, callback.params))
                response = await self._http.post(self._local(callback.url), data=callback.params, headers=headers)
            callback.status_code = response.status_code
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            callback.error = f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _headers(signature: str) -> dict[str, str]:
        return {"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"}


class _CallRun:
    """One scripted call played out: its life, its callbacks (sent in order by one task), its stream."""

    def __init__(self, twilio: FakeTwilio, call: FakeCall, outcome: Outcome) -> None:
        self.twilio = twilio
        self.call = call
        self.outcome = outcome
        self.sequence = 0
        self.outbox: asyncio.Queue[SentCallback | None] = asyncio.Queue()
        self.answered_at = 0.0
        self.greeting_over: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.stop = asyncio.Event()  # ends the simulated callee's line
        self.watcher: asyncio.Task[None] | None = None
        self.streamed_redirects = 0  # redirects before the stream began: its TwiML already includes them
        detection = call.machine_detection
        self.amd = detection in ("Enable", "DetectMessageEnd")
        self.async_amd = self.amd and (call.one("AsyncAmd") or "").lower() == "true"

    async def run(self) -> None:
        sender = asyncio.create_task(self._sender())
        try:
            await self._play()
        finally:
            if self.watcher is not None:
                self.watcher.cancel()
            call = self.call
            if call.status not in ENDED_STATUSES:  # the fake closed, or it failed
                if call.start_time is not None:
                    call.ended_by = call.ended_by or "closed"
                self.twilio._set_status(call, "canceled" if call.start_time is None else "completed")
            self._status("completed")
            self.outbox.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            self.call._done.set()

    # --- the call's life ----------------------------------------------------------------------------------

    async def _play(self) -> None:
        call, outcome = self.call, self.outcome
        if await self._wait(SETUP_S):
            return
        self._advance("initiated")
        if isinstance(outcome, Busy | Failed):
            if not await self._wait(SETUP_S):
                self.twilio._set_status(call, "busy" if isinstance(outcome, Busy) else "failed")
            return
        if await self._wait(SETUP_S):
            return
        self._advance("ringing")
        timeout_s = float(call.one("Timeout") or DEFAULT_TIMEOUT_S)
        ring_s = timeout_s if isinstance(outcome, NoAnswer) and outcome.ring_s is None else outcome.ring_s
        assert ring_s is not None
        if await self._wait(min(ring_s, timeout_s)):
            return
        if isinstance(outcome, NoAnswer) or ring_s >= timeout_s:
            self.twilio._set_status(call, "no-answer")
            return
        self.answered_at = time.monotonic()
        self._advance("in-progress")
        await self._answered(outcome)

    async def _answered(self, outcome: Human | Machine) -> None:
        verdicts = self._verdicts(outcome)
        detection = asyncio.create_task(self._detect(verdicts))
        try:
            skip_ms = 0
            if self.amd and not self.async_amd and verdicts:  # synchronous: the TwiML waits for the verdict
                wait_s = verdicts[-1][1]
                if await self._wait(wait_s):
                    return
                skip_ms = round(wait_s * 1000)
            await self._stream(outcome, skip_ms)
            await self._after_stream()
        finally:
            detection.cancel()
            await asyncio.gather(detection, return_exceptions=True)

    async def _stream(self, outcome: Human | Machine, skip_ms: int) -> None:
        """The callee on the TwiML's ``<Connect><Stream>``, until one side or the service ends it."""
        call = self.call
        if call.twiml is None or not _has_stream(call.twiml):
            return  # nothing to stream: the TwiML runs as it is
        stream_url = ET.fromstring(call.twiml).find("./Connect/Stream")
        assert stream_url is not None
        public = urlsplit(stream_url.get("url", ""))
        origin = urlunsplit(
            ({"ws": "http", "wss": "https"}.get(public.scheme, public.scheme), public.netloc, "", "", "")
        )
        caller = SimulatedCaller(
            self.twilio.service_url or origin,
            self.twilio.auth_token,
            public_url=origin,
            from_=call.from_,
            to=call.to,
            account_sid=call.account_sid,
        )
        limit_s = float(call.time_limit or DEFAULT_TIME_LIMIT_S) - (time.monotonic() - self.answered_at)
        self.streamed_redirects = len(call.redirects)
        self._watch_line()
        try:
            recording = await caller.place_call(
                self._script(outcome, skip_ms),
                twiml=call.twiml,
                call_sid=call.sid,
                max_duration_s=max(limit_s, 0.001),
                hang_up=self.stop,
                on_event=self._on_stream_event,
            )
        except Exception as exc:  # the stream could not be played: Twilio reports it and goes on with the TwiML
            call.stream_error = f"{type(exc).__name__}: {exc}"
            return
        call.recording = recording
        if isinstance(outcome, Machine):
            call.voicemail = Voicemail(recording, max(outcome.greeting_ms - skip_ms, 0))
        if recording.ended_by == "caller":
            call.ended_by = call.ended_by or "callee"
        elif recording.ended_by == "timeout":
            call.ended_by = call.ended_by or "time_limit"

    def _script(self, outcome: Human | Machine, skip_ms: int) -> CallScript:
        if isinstance(outcome, Human):
            return outcome.script
        greeting = outcome.greeting_audio[skip_ms * BYTES_PER_MS :]
        return CallScript([Say(greeting), Pause(round(outcome.max_message_s * 1000)), HangUp()])

    def _on_stream_event(self, kind: str, data: dict[str, Any]) -> None:
        """The machine's silence after its greeting begins (its ``Pause`` step): the greeting is over, the beep."""
        if kind == "step" and data.get("step") == "Pause" and not self.greeting_over.done():
            self.greeting_over.set_result(time.monotonic())

    async def _after_stream(self) -> None:
        """The stream is over (or there was none): the call ends, or goes on with the TwiML that follows."""
        call = self.call
        while call.status not in ENDED_STATUSES:
            if call.ended_by in ("callee", "time_limit", "closed") or self.twilio._closing:
                call.ended_by = call.ended_by or "closed"
                break
            redirected = len(call.redirects) > self.streamed_redirects
            verbs: list[ET.Element] | None
            if call.twiml is None:  # a Url or an application: not fetched, the call is held
                verbs = None
            elif redirected:  # the new TwiML from its start (unparseable TwiML ends the call, as Twilio's 12100)
                verbs = list(_parse(call.twiml) or [])
            else:  # what follows the <Connect> whose stream ended
                verbs = _verbs_after_connect(call.twiml)
            if verbs is not None and _twiml_ends_call(verbs):
                closed = call.recording is not None and call.recording.ended_by == "server"
                call.ended_by = call.ended_by or ("redirect" if redirected else "stream" if closed else "twiml")
                break
            call._changed.clear()  # held (a <Dial>, a URL): until the service ends it or redirects again
            await call._changed.wait()
        if call.status not in ENDED_STATUSES:
            self.twilio._set_status(call, "completed")

    async def _wait(self, seconds: float) -> bool:
        """Sleep; ``True`` (stop now) if the call ended meanwhile (canceled through REST) or the fake closes."""
        call = self.call
        deadline = time.monotonic() + seconds
        while call.status not in ENDED_STATUSES and not self.twilio._closing:
            call._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call._changed.wait(), remaining)
        return True

    def _advance(self, status: str) -> None:
        self.twilio._set_status(self.call, status)
        self._status({"in-progress": "answered"}.get(status, status))

    def _watch_line(self) -> None:
        """End the callee's line when the call is ended or redirected through REST, or the fake closes."""

        async def watch() -> None:
            call = self.call
            redirects = len(call.redirects)
            while call.status not in ENDED_STATUSES and len(call.redirects) == redirects and not self.twilio._closing:
                call._changed.clear()
                await call._changed.wait()
            self.stop.set()

        self.watcher = asyncio.create_task(watch())

    # --- answering machine detection ----------------------------------------------------------------------

    def _verdicts(self, outcome: Human | Machine) -> list[tuple[str, float]]:
        """``(AnsweredBy, seconds after answer)`` of each verdict. For the end of a greeting on a live stream this
        is an estimate: :meth:`_detect` waits for the moment the stream leaves the greeting."""
        if not self.amd:
            return []
        if isinstance(outcome, Human):
            return [(outcome.answered_by, outcome.amd_after_s)]
        default = ("machine_start",) if self.call.machine_detection == "Enable" else ("machine_end_beep",)
        greeting_s = outcome.greeting_ms / 1000
        return [
            (
                verdict,
                greeting_s + outcome.end_after_s
                if verdict.startswith("machine_end")
                else min(outcome.start_after_s, greeting_s),
            )
            for verdict in (outcome.verdicts or default)
        ]

    async def _detect(self, verdicts: list[tuple[str, float]]) -> None:
        """Give each verdict at its time. With asynchronous detection the end of a machine's greeting is the moment
        its stream's timeline leaves the greeting (never before an agent's audio played then counts as after it)."""
        call, outcome = self.call, self.outcome
        for answered_by, after_s in verdicts:
            at = self.answered_at + after_s
            if answered_by.startswith("machine_end") and isinstance(outcome, Machine) and self.async_amd:
                with contextlib.suppress(TimeoutError):  # no stream: timed from the answer
                    over = await asyncio.wait_for(asyncio.shield(self.greeting_over), after_s + 5)
                    at = over + outcome.end_after_s
            await asyncio.sleep(max(at - time.monotonic(), 0))
            if call.status in ENDED_STATUSES:
                return
            call.answered_by = answered_by
            if self.async_amd and call.one("AsyncAmdStatusCallback"):
                params = {
                    "CallSid": call.sid,
                    "AccountSid": call.account_sid,
                    "AnsweredBy": answered_by,
                    "MachineDetectionDuration": str(round((time.monotonic() - self.answered_at) * 1000)),
                }
                url = call.one("AsyncAmdStatusCallback") or ""
                self.outbox.put_nowait(SentCallback("amd", url, "POST", params))

    # --- status callbacks ---------------------------------------------------------------------------------

    def _status(self, event: str) -> None:
        """Queue the status callback of ``event`` if the create asked for it (``completed`` always)."""
        call = self.call
        if not call.status_callback or (event != "completed" and event not in call.status_callback_events):
            return
        params = {
            "CallSid": call.sid,
            "AccountSid": call.account_sid,
            "From": call.from_,
            "To": call.to,
            "Caller": call.from_,
            "Called": call.to,
            "CallStatus": call.status,
            "Direction": "outbound-api",
            "ApiVersion": API_VERSION,
            "CallbackSource": "call-progress-events",
            "Timestamp": format_datetime(datetime.now(UTC)),
            "SequenceNumber": str(self.sequence),
        }
        if event == "completed":
            params["CallDuration"] = str(call.duration_s())
        if call.answered_by is not None:
            params["AnsweredBy"] = call.answered_by
        self.sequence += 1
        method = (call.one("StatusCallbackMethod") or "POST").upper()
        self.outbox.put_nowait(SentCallback("status", call.status_callback, method, params))

    async def _sender(self) -> None:
        while (callback := await self.outbox.get()) is not None:
            await self.twilio._send(callback, self.call)
