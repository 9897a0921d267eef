"""What several test modules share: ``callbridge serve`` as a subprocess with the fakes around it, the calls it
carries, and waiting for something another task or process does.

Test modules import from here, never from each other; pytest fixtures stay in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn
from fastapi import FastAPI, Request, Response

from callbridge.service.webhooks import new_secret
from callbridge.telephony import g711 as audio
from callbridge.telephony.rest import TwilioCalls
from callbridge.testing.caller import CallRecording, SimulatedCaller
from callbridge.testing.conformance import validate_client_event
from callbridge.testing.fake_realtime import FakeBehavior, FakeRealtimeServer, FakeSession
from callbridge.testing.fake_twilio import FakeTwilio, RecordedRequest

from conftest import secret

AUTH_TOKEN = secret("e2e-twilio-token-" + secrets.token_hex(8))
SECRET = secret("e2e-callbridge-secret-" + secrets.token_hex(8))
OPENAI_KEY = secret("sk-e2e-" + secrets.token_hex(16))
API_TOKEN = secret("api-" + secrets.token_hex(8))
WEBHOOK_SECRET = secret(new_secret())  # Standard Webhooks: whsec_ and base64
ACCOUNT_SID = "AC" + "7" * 32
CALLBRIDGE = Path(sys.executable).with_name("callbridge")
GREETING = "Hello, you have reached the test line."
FALLBACK_SAY = "Sorry, our assistant is not available right now. Please call again later."


def free_port() -> int:
    """A local TCP port nothing listens on (for a server to bind, or for a connection to be refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,  # noqa: ASYNC109 - a predicate is polled: there is no awaitable for asyncio.timeout
    *,
    what: str | None = None,
    interval: float = 0.01,
) -> None:
    """Poll ``predicate`` until it is true, for state another task or process changes with nothing to await on.

    Fails the test with ``what`` (or the predicate's source) once ``timeout`` seconds have passed without it.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            if what is None:
                try:
                    what = inspect.getsource(predicate).strip()
                except (OSError, TypeError):
                    what = repr(predicate)
            raise AssertionError(f"not true within {timeout} s: {what}")
        await asyncio.sleep(interval)


# --- callbridge serve as a subprocess ------------------------------------------------------------------------


@dataclass
class Service:
    """A running ``callbridge serve`` subprocess and its JSON log."""

    base_url: str
    log_path: Path
    fake: FakeRealtimeServer
    process: asyncio.subprocess.Process
    _logs: list[dict[str, Any]] = field(default_factory=list)

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]
        return [line for line in lines if event is None or line.get("event") == event]

    async def wait_for_logs(self, event: str, count: int, seconds: float = 5.0, **fields: Any) -> list[dict[str, Any]]:
        """The log lines of ``event`` (with these ``fields``, if given) once there are ``count`` of them (calls
        finish asynchronously); fewer if ``seconds`` pass first, for the test's own assertion to report."""

        def matching() -> list[dict[str, Any]]:
            return [line for line in self.logs(event) if all(line.get(k) == v for k, v in fields.items())]

        deadline = time.monotonic() + seconds
        while len(lines := matching()) < count and time.monotonic() < deadline:  # noqa: ASYNC110 - a file
            await asyncio.sleep(0.05)
        return lines

    def caller(self) -> SimulatedCaller:
        return SimulatedCaller(self.base_url, AUTH_TOKEN)


@asynccontextmanager
async def serve(
    tmp_path: Path, behavior: FakeBehavior, *, workers: str = "1", port: str | None = None, **env: str
) -> AsyncIterator[Service]:
    """``callbridge serve`` against a fake Realtime server playing ``behavior``, once it answers ``/healthz``;
    ``env`` adds to or overrides its environment. On the way out it is sent SIGTERM (it drains) and waited for."""
    async with FakeRealtimeServer(behavior) as fake:
        port = port or str(free_port())  # a string, as ``workers``: the environment's values pass through ``**env``
        base_url = f"http://127.0.0.1:{port}"
        environment = {
            **os.environ,
            "CALLBRIDGE_PUBLIC_URL": base_url,
            "CALLBRIDGE_REALTIME_URL": fake.url,
            "CALLBRIDGE_SECRET": SECRET,
            "OPENAI_API_KEY": OPENAI_KEY,  # sent to the fake; it must never show in a log
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "CALLBRIDGE_DRAIN_SECONDS": "5",
            "CALLBRIDGE_LOG_FORMAT": "json",
            "CALLBRIDGE_AGENT_GREETING": GREETING,
            **env,
        }
        log_path = tmp_path / f"serve-{port}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *(str(CALLBRIDGE), "serve", "--port", str(port), "--workers", workers),
                env=environment,
                stdout=log,
                stderr=log,
                cwd=tmp_path,
            )
        service = Service(base_url, log_path, fake, process)
        try:
            async with httpx.AsyncClient() as client:
                for _ in range(200):
                    if process.returncode is not None:
                        raise RuntimeError(f"callbridge serve exited: {log_path.read_text()}")
                    try:
                        if (await client.get(f"{base_url}/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
                else:
                    raise RuntimeError("callbridge serve did not start")
            yield service
        finally:
            if process.returncode is None:
                process.terminate()  # drains: a call still live gets the fallback first
                try:
                    await asyncio.wait_for(process.wait(), 20)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def no_live_call(running: Service) -> None:
    """Until the service carries no call (its record written): ``/readyz`` counts the live calls."""
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            if (await client.get(f"{running.base_url}/readyz")).json()["active_calls"] == 0:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("a call is still live")


async def wait_closed(sessions: list[FakeSession], seconds: float = 3.0) -> None:
    """Until the service has closed each of these Realtime connections."""
    await asyncio.wait_for(asyncio.gather(*(session.closed.wait() for session in sessions)), seconds)


async def cli(running: Service, *arguments: str, status: int = 0) -> str:
    """``callbridge ARGUMENTS --url --token`` against the service: its output (stderr when it fails)."""
    process = await asyncio.create_subprocess_exec(
        *(str(CALLBRIDGE), *arguments, "--url", running.base_url, "--token", API_TOKEN),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == status, (stdout.decode(), stderr.decode())
    return (stdout if status == 0 else stderr).decode()


def serve_refused(tmp_path: Path, *, workers: str = "1", **env: str) -> list[str]:
    """``callbridge serve`` with ``env`` added, which must refuse to start with exit status 2 (a configuration
    mistake): the lines it wrote to stderr."""
    environment = {**os.environ, "CALLBRIDGE_DATABASE_URL": "sqlite://", **env}
    done = subprocess.run(
        [str(CALLBRIDGE), "serve", "--port", "9", "--workers", workers],
        env=environment,
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr.decode()
    return done.stderr.decode().strip().splitlines()


# --- the calls-API configuration: fake Twilio REST, a context resolver, an agents file -------------------------

RESOLVER = """
import asyncio

async def resolve(context):
    if context.caller == "+15550100666":  # a host app that hangs
        await asyncio.sleep(30)
    if context.reference == "customer-42":
        return {
            "name": "Ada",
            "greeting": "Hello Ada, this is Bright Dental calling about your appointment tomorrow.",
            "items": [{"role": "user", "text": "Last visit: a cleaning in May."}],
        }
    return None
"""

AGENTS = """
default_agent = "reception"

[agents.reception]
tools = ["end_call", "transfer_call"]
transfer_number = "+15550109999"
"""


@asynccontextmanager
async def service(
    tmp_path: Path, behavior: FakeBehavior, db: str, *, workers: str = "1", **env: str
) -> AsyncIterator[tuple[Service, FakeTwilio]]:
    """:func:`serve` with the REST API on (``API_TOKEN``), the database ``db``, a fake Twilio REST API, the
    context resolver ``RESOLVER``, the agents file ``AGENTS`` and post-call webhooks signed with ``WEBHOOK_SECRET``."""
    (tmp_path / "host_app.py").write_text(RESOLVER)
    (tmp_path / "agents.toml").write_text(AGENTS)
    async with FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        environment = {
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_API_BASE_URL": twilio.base_url,
            "CALLBRIDGE_API_TOKEN": API_TOKEN,
            "CALLBRIDGE_DATABASE_URL": db,
            "CALLBRIDGE_CONTEXT_FUNCTION": "host_app:resolve",
            "CALLBRIDGE_AGENTS_FILE": str(tmp_path / "agents.toml"),
            "CALLBRIDGE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
            **env,
        }
        async with serve(tmp_path, behavior, workers=workers, **environment) as running:
            yield running, twilio


def api(running: Service) -> httpx.AsyncClient:
    """A client of the service's REST API, with its token."""
    return httpx.AsyncClient(base_url=running.base_url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10)


async def place_outbound(client: httpx.AsyncClient, twilio: FakeTwilio) -> tuple[str, RecordedRequest]:
    """``POST /api/calls`` to +15550100009 for the reference ``customer-42``: the call's SID, and the create
    request (fake) Twilio received for it."""
    created = await client.post(
        "/api/calls",
        json={"to": "+15550100009", "from": "+15550100001", "context": {"reference": "customer-42"}},
    )
    assert created.status_code == 201, created.text
    (create,) = [r for r in twilio.requests if r.method == "POST" and r.path.endswith("/Calls.json")]
    return created.json()["call_sid"], create


def stream_of(twiml: str) -> tuple[str, dict[str, str]]:
    """The ``<Connect><Stream>`` URL of a TwiML document, and its ``<Parameter>`` values."""
    stream = ET.fromstring(twiml).find("Connect/Stream")
    assert stream is not None
    return stream.attrib["url"], {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}


async def twilio_call(twilio: FakeTwilio) -> str:
    """A call (fake) Twilio knows, in progress, so callbridge can redirect or hang it up."""
    rest = TwilioCalls(ACCOUNT_SID, AUTH_TOKEN, api_base_url=twilio.base_url)
    call_sid = await rest.create(to="+15550100002", from_="+15550100001", twiml="<Response/>")
    await rest.aclose()
    twilio.calls[call_sid].status = "in-progress"
    return call_sid


def redirects(twilio: FakeTwilio, call_sid: str) -> list[ET.Element]:
    """The TwiML callbridge redirected a live call to (its fallback), in order."""
    return [
        ET.fromstring(request.form["Twiml"][0])
        for request in twilio.requests
        if request.path.endswith(f"/Calls/{call_sid}.json") and "Twiml" in request.form
    ]


# --- what a call carried -------------------------------------------------------------------------------------


def agent_items(session: FakeSession) -> list[tuple[str, int]]:
    """(item_id, audio bytes) of each agent audio item the fake streamed, in order."""
    sizes: dict[str, int] = {}
    for event in session.server_events:
        if event["type"] in ("response.output_audio.delta", "response.audio.delta"):
            sizes[event["item_id"]] = sizes.get(event["item_id"], 0) + len(base64.b64decode(event["delta"]))
    return list(sizes.items())


def assert_conformant(session: FakeSession) -> None:
    """No error from the fake, and every event the service sent it matches the Realtime schemas."""
    assert session.errors == [], session.errors
    for event in session.client_events:
        validate_client_event(event, session.dialect)


def _mark_ends(marks: list[str], item_id: str) -> list[int]:
    """The byte offsets within the item that the service's marks of ``item_id`` (named ``<item_id>:<end byte>``)
    stand for, in the order the caller echoed them."""
    ends = []
    for name in marks:
        item, _, end = name.rpartition(":")
        if item == item_id:
            ends.append(int(end))
    return ends


def assert_greeting_heard_then_cut_at_what_was_heard(recording: CallRecording, session: FakeSession) -> None:
    """The opening-hours call: the greeting heard in full, then one barge-in that cleared Twilio's buffer and
    truncated the answer at what the caller actually heard.

    "What was heard" is what the caller's mark echoes told the service, so it is bounded on both sides by what
    the caller did, in bytes and in the order of its messages, never by comparing two processes' clocks:

    - at least every mark of the answer the caller had played and echoed before it sent the first frame of its
      barge-in (that frame is what made the model detect speech, and the service reads the stream in order), but
      the last of them: that one's message may have come in behind audio the caller had already played;
    - at most the first mark the clear flushed (audio never confirmed as played; between two confirmed marks the
      service interpolates, up to the next one), what had reached the caller, and what the model sent.
    """
    (_greeting_item, greeting_bytes), (interrupted_item, interrupted_bytes) = agent_items(session)[:2]
    assert len(recording.heard_audio) >= greeting_bytes
    (clear,) = recording.clears
    (truncation,) = session.truncations
    assert truncation["item_id"] == interrupted_item
    end_ms = truncation["audio_end_ms"]
    assert 0 < end_ms < interrupted_bytes / audio.BYTES_PER_MS  # cut short: the caller did not hear it all
    assert end_ms <= truncation["audio_ms_sent_for_item"]

    received_at_clear = clear.heard_bytes_at_clear + clear.discarded_bytes - greeting_bytes
    assert end_ms <= received_at_clear // audio.BYTES_PER_MS, (truncation, clear)
    flushed = _mark_ends(recording.marks_flushed, interrupted_item)
    assert flushed, recording.marks_flushed  # Twilio echoes pending marks on clear; they were not counted as played
    assert end_ms <= flushed[0] // audio.BYTES_PER_MS, (truncation, flushed)

    (barge_in_at_s,) = [at_s for name, at_s in recording.step_times if name == "SayWhenHearing:triggered"]
    heard_before_barge_in = sum(
        count for at_s, count in recording.heard_timeline if round(at_s * 1000) < round(barge_in_at_s * 1000)
    )
    confirmed = sorted(
        end
        for end in _mark_ends(recording.marks_played, interrupted_item)
        if greeting_bytes + end <= heard_before_barge_in
    )
    assert len(confirmed) >= 2, (confirmed, heard_before_barge_in)  # the answer played a while before the barge-in
    assert end_ms >= confirmed[-2] // audio.BYTES_PER_MS, (truncation, confirmed)


def assert_opening_hours_transcript(lines: list[dict[str, Any]]) -> None:
    """The opening-hours call's logged transcript lines: both sides, the agent's answer marked interrupted."""
    assert [(line["speaker"], line["interrupted"]) for line in lines if line["speaker"] == "agent"] == [
        ("agent", False),
        ("agent", True),
        ("agent", False),
    ]
    texts = {line["text"] for line in lines}
    assert GREETING in texts
    assert {"I would like to know your opening hours.", "Stop, just the weekend please."} <= texts


def opening_hours() -> FakeBehavior:
    """A caller asks for the opening hours, then barges in on the long answer to ask about the weekend."""
    return FakeBehavior(
        transcripts=["I would like to know your opening hours.", "Stop, just the weekend please."],
        reply=lambda text: (
            "We are open on Saturdays from nine until one."
            if "weekend" in text
            else "We are open Monday to Friday from eight in the morning until six in the evening, "
            "and on Saturdays from nine until one."
        ),
        greeting=GREETING,
        ms_per_char=40,
    )


# --- databases -----------------------------------------------------------------------------------------------

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@contextlib.asynccontextmanager
async def database(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database for one test."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
        return
    name = f"callbridge_{secrets.token_hex(6)}"
    try:
        admin = await asyncpg.connect(PG_ADMIN)
    except OSError as exc:
        raise RuntimeError(f"PostgreSQL is not reachable at {PG_ADMIN}: {exc}") from exc
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


# --- the host application's webhook endpoint -----------------------------------------------------------------


class WebhookReceiver:
    """The host application's webhook endpoint (any path): refuses (503) its first ``failures`` requests and any
    while ``up`` is false; keeps every attempt, and what it accepted, as ``(body, headers)``."""

    def __init__(self, failures: int = 0, *, up: bool = True) -> None:
        self.failures = failures
        self.up = up
        self.attempts: list[tuple[bytes, dict[str, str]]] = []
        self.accepted: list[tuple[bytes, dict[str, str]]] = []
        self.app = FastAPI()
        self.app.post("/{path:path}")(self.hook)

    async def hook(self, request: Request) -> Response:
        attempt = (await request.body(), dict(request.headers))
        self.attempts.append(attempt)
        if not self.up or self.failures > 0:
            self.failures -= 1
            return Response(status_code=503)
        self.accepted.append(attempt)
        return Response(status_code=204)

    @property
    def ids(self) -> list[str]:
        """The ``webhook-id`` of every attempt."""
        return [headers["webhook-id"] for _, headers in self.attempts]


@asynccontextmanager
async def receiving(receiver: WebhookReceiver, port: int) -> AsyncIterator[None]:
    """The receiver under uvicorn on ``port``, for the block's life."""
    server = uvicorn.Server(uvicorn.Config(receiver.app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started or task.done(), what="the webhook receiver started")  # no event to await
    if task.done():
        task.result()  # it failed to start: its error
    try:
        yield
    finally:
        server.should_exit = True
        await task
