"""Benchmark of the bridge itself: how many concurrent phone calls ``callbridge serve`` carries per CPU core.

    .venv/bin/python benchmarks/relay.py [--calls 20,50,100] [--delta-ms 20] [--workers 1[,2]] [--repeat 1]
                                         [--recording] [--no-bare] [--warmup-s 3] [--window-s 10]
                                         [--json results.json]
    .venv/bin/python benchmarks/relay.py --soak 600 --calls 150 [--delta-ms 20] [--response-s 4] [--json soak.json]

What runs. Each round starts three kinds of OS process, each pinned with ``os.sched_setaffinity``:

- a minimal fake Realtime server (this file, ``--role fake``; CPU 0). It speaks the GA protocol with real events:
  ``session.created`` on connect, ``session.updated`` after ``session.update``, then, for as long as the
  session lasts, one response after another (``response.created``, ``response.output_audio.delta`` events with
  ``type``, ``event_id``, ``response_id``, ``item_id``, ``output_index``, ``content_index``, ``delta``, and
  ``response.done``), a new response every ``--response-s`` seconds of audio. With ``--delta-ms 20`` (the worst
  case) each delta is 20 ms / 160 bytes and they are sent at real-time pace, back to back; with larger deltas
  (``--delta-ms 200``: realistic model chunking) they are sent ``--speed`` times faster than real time (2x by
  default), bursting ahead of playback as the hosted model does, and the next response starts when the previous
  one would have finished playing. It reads every ``input_audio_buffer.append`` (decoding its base64 audio)
  and ignores every other client event beyond its ``type``.
- the system under test: ``callbridge serve`` (the real service, signatures checked, on CPU 1, or on both CPUs
  with 2 workers; ``--workers 1,2`` runs both, one after the other), with call recording off
  (``CALLBRIDGE_RECORD_CALLS=false``); with ``--recording``, the same service again with every call recorded
  (``bridge+rec``: the recordings written to the round's temporary directory), so that recording's cost is the
  difference between the two, measured in the same run; then, right after it at the same N, a bare
  relay: a ~60-line pass-through with no checks, marks or state, on picows as callbridge's audio path
  (``benchmarks/bare_relay_picows.py``), the floor the bridge is compared with; ``--bare-stack websockets`` runs
  the same relay on the ``websockets`` library (``benchmarks/bare_relay.py``), as most Python relays are built;
  ``--no-bare`` skips it.
- the load generator (this file, ``--role generator``; CPU 0), one asyncio loop placing N calls the way Twilio
  does: the signed ``/twilio/voice`` webhook, the ``<Stream>`` of the TwiML it answers, a signed WebSocket,
  ``connected`` and ``start``, then one 160-byte ``media`` frame every 20 ms per call on an absolute schedule.
  Calls start spread over ``--ramp-s`` seconds (with random jitter) so they do not tick in lockstep. It plays
  the agent audio it receives like a phone: each ``mark`` is echoed when the audio sent before it would have
  finished playing (at the next 20 ms tick after that), and a ``clear`` flushes (echoes) every pending mark.

The fake server and the generator run on picows (a compiled WebSocket stack, as callbridge's audio path) and on
uvloop when it is installed (so does ``callbridge serve``: uvicorn picks it), with everything per frame done in
callbacks, so that they cost far less per call than the system under test: each helper has one timer for all its
calls (a heap of due times: each call's next 20 ms tick, each session's next delta; it wakes at the earliest and
runs everything due), and each message is handled as soon as it is read; tasks are only for placing calls (the
webhook and the WebSocket handshake). The two messages sent per frame (``media``, ``response.output_audio.delta``)
are written from byte templates identical to what orjson makes of the same dicts. Flow control is websockets':
a helper whose 32 KiB write buffer to the system under test is full sends nothing more on that connection until
it has drained (counted as a slow send). Both helpers share CPU 0, so the loopback TCP they do (each message's
send also runs the receiving side of the kernel's stack) bounds how many calls they carry: about 200 on the
2-core machine this was written on, where a round with more is flagged SATURATED.

Latency. Every 160-byte audio frame starts with ``time.monotonic_ns()`` at sending, as 8 little-endian bytes
(CLOCK_MONOTONIC is system-wide on Linux, so processes can compare them); the rest is μ-law silence (0xFF). The
bridge relays the base64 payload untouched, so the far end decodes it and reads the timestamp: the added one-way
latency is the receive time minus the embedded send time. A larger delta carries one timestamp per 160-byte frame,
all set to when the delta was sent. This includes the sending and receiving loops' own lag; the bare relay's run
has exactly the same overhead, so compare the two.

What is measured, over a steady-state window (``--window-s``) that starts ``--warmup-s`` after every call is up
(its first agent audio arrived):

- bridge CPU: utime + stime from ``/proc/<pid>/stat`` of the serve process and all its descendants (workers),
  **CPU ms per call-second** = CPU ms / (N x window seconds), and **calls per core** = 1000 / that;
- added one-way latency p50 / p99 / max, caller→model (measured in the fake) and model→caller (in the generator);
- RSS (VmRSS, summed over the process tree) idle and at N calls → **RSS per call** in KiB. Idle is read after a
  warm-up (four calls per worker, carried for a second and hung up), so that what a process loads once on its first
  call is not counted as a cost of every call; the reading before the warm-up is printed beside it;
- frames whose send time falls inside the window, sent and received in each direction → **frames lost** (the
  receivers keep counting for a 1 s grace period after the window for frames still in flight);
- errors: failed webhooks, refused or unexpectedly closed sockets (with close codes), protocol surprises, and the
  serve process's warning/error log lines by event;
- the generator's and the fake's own CPU use and loop lag (how late each 20 ms tick fires, not counting time its
  call's previous send spent blocked, which is reported apart as slow sends). When either used more
  than 85 % of a core or its tick lag p99 exceeds 5 ms, the round is SATURATED: the load, not the bridge, was the
  limit, and the bridge figures of that N are not reported.

Each N of ``--calls`` gets a fresh serve, fake server and generator per configuration (each worker count of
``--workers``, and the bare relay). ``--repeat K`` runs every configuration K times, interleaved so that a slow spell
of this shared machine hits all of them, and summarises each by the medians of its rounds; the scaling from one
worker count to the next is their capacity ratio, W cores / (CPU ms per call-second) against the same for the
first count. The headline is the highest N whose rounds of the first worker count were all measured (not
saturated, every call up) with median p99 ≤ 10 ms both ways. Text goes to stdout; ``--json PATH`` also writes
every number as JSON (``--json -``: to stdout, after the text). Every process started is stopped on exit, on errors
and on Ctrl-C.

Soak mode: ``--soak SECONDS`` asks whether a call's cost grows with its length. One round, one N (``--calls``), one
worker, no bare relay: the fake server, ``callbridge serve``, the four warm-up calls, then the N calls placed over
``--ramp-s`` as above and carried for SECONDS (at least 80, rounded up to whole 10 s intervals) from the moment
every call is up: no hang-ups, no new calls. The load is the usual one, stationary: per call, caller audio every 20
ms throughout (the fake has no voice detection, so there are no turns as such, no barge-ins and no ``clear``), and
the fake's responses back to back, each ``--response-s`` (4 s) of agent audio, the next starting once the previous
one has played: a ``response.created`` ... ``response.done`` every 4 s per call, with its marks echoed as they play.
Every 10 s the serve process tree's VmRSS (and RssAnon, its heap part) and utime + stime are read from /proc. The
report gives both series (seconds since every call was up; RSS MiB; CPU ms per call-second over the 10 s before),
the least-squares slope of each after the first minute (MiB per minute; CPU ms per call-second per minute), the RSS
growth after the first minute (the last sample minus the one at 60 s), and the CPU per call-second of the last
minute against the second (60-120 s), as a ratio and in percent (with ``--soak`` of 120 s or more; the two minutes
overlap below 180 s). The last 10 s interval is also measured as a round's window (latency, frames, marks, errors,
the helpers' load), and a warning says when calls or sessions were no longer all open at the end. The other load on
the machine in each interval is printed beside it: on a shared machine a CPU step that coincides with it is noise.
The run ends by itself after the soak, ``--json`` as above.
With ``--recording``, the soak's calls are recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import contextlib
import ctypes
import dataclasses
import heapq
import itertools
import math
import os
import platform
import random
import resource
import secrets
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import orjson
from picows import (
    WSCloseCode,
    WSFrame,
    WSInvalidStatusError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
    ws_create_server,
)
from twilio.request_validator import RequestValidator

FRAME_MS = 20
FRAME_BYTES = 160  # 20 ms of 8 kHz μ-law
FRAME_NS = FRAME_MS * 1_000_000
NS_PER_BYTE = 125_000  # one μ-law sample: 1/8000 s
STAMP_BYTES = 8
FILLER = b"\xff" * (FRAME_BYTES - STAMP_BYTES)  # μ-law silence after the timestamp
PLAUSIBLE_NS = 60 * 1_000_000_000  # a timestamp older than this (or in the future) is not one of ours
GRACE_NS = 1_000_000_000  # receivers keep counting window frames this long after the window
STALL_NS = 2_000_000  # a send slower than this waited for the peer (flow control) or was preempted
SATURATED_CORE_USE = 0.85
SATURATED_LAG_MS = 5.0
HEADLINE_P99_MS = 10.0
WRITE_LIMIT = 2**15  # a helper's write buffer high-water mark (websockets' default): over it, its sender waits
TIMER_SLACK_NS = 500_000  # half the event loop's 1 ms timer resolution
OPEN_TIMEOUT_S = 30.0
HERE = Path(__file__).resolve().parent
CALLBRIDGE = Path(sys.executable).with_name("callbridge")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
Target = Literal["bridge", "record", "bare"]
"""callbridge serve without recording, the same with every call recorded, the bare relay."""


# --- Shared by every role -------------------------------------------------------------------------------------


def stamped_frame(now_ns: int) -> bytes:
    return now_ns.to_bytes(STAMP_BYTES, "little") + FILLER


# base64 turns each 3 bytes into 4 characters on its own, so a frame's base64 is that of its first 9 bytes (the
# stamp and one filler byte) followed by that of the constant rest: only 9 bytes need encoding per frame.
FILLER_TAIL_B64 = binascii.b2a_base64(FILLER[1:], newline=False)


def stamped_frame_b64(now_ns: int) -> bytes:
    """``base64(stamped_frame(now_ns))``, computed cheaply."""
    return binascii.b2a_base64(now_ns.to_bytes(STAMP_BYTES, "little") + FILLER[:1], newline=False) + FILLER_TAIL_B64


def record_stamps(audio: bytes, now: int, window: Window, latency: list[int]) -> int:
    """Read the timestamp at the start of each 160-byte frame of audio received at ``now``: the added latency of
    each frame sent in the window goes to ``latency``; returns how many frames carried no plausible timestamp."""
    malformed = 0
    start, end = window.start_ns, window.end_ns
    for offset in range(0, len(audio) - STAMP_BYTES + 1, FRAME_BYTES):
        stamp = int.from_bytes(audio[offset : offset + STAMP_BYTES], "little")
        if not 0 <= now - stamp < PLAUSIBLE_NS:
            malformed += 1
        elif start <= stamp <= end:
            latency.append(now - stamp)
    return malformed


async def sleep_until(due_ns: int) -> int:
    """Sleep until the monotonic clock reaches ``due_ns``; returns the time it woke."""
    now = time.monotonic_ns()
    if due_ns > now:
        await asyncio.sleep((due_ns - now) / 1e9)
        now = time.monotonic_ns()
    return now


def run_loop(main: Awaitable[None], use_uvloop: bool) -> None:
    """Run ``main`` on uvloop when asked and installed, else on asyncio's own loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:

        async def wrapped() -> None:
            await main

        runner.run(wrapped())


@dataclass(frozen=True, slots=True)
class Latency:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_ns: list[int]) -> Latency:
        if not samples_ns:
            return cls(0, math.nan, math.nan, math.nan)
        ordered = sorted(samples_ns)

        def quantile(q: float) -> float:
            return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] / 1e6

        return cls(len(ordered), quantile(0.5), quantile(0.99), ordered[-1] / 1e6)

    @classmethod
    def load(cls, data: dict[str, Any]) -> Latency:
        def number(value: Any) -> float:
            return math.nan if value is None else float(value)

        return cls(int(data["count"]), number(data["p50_ms"]), number(data["p99_ms"]), number(data["max_ms"]))


@dataclass(slots=True)
class Window:
    """The steady-state window and when to report, in monotonic ns; nothing is counted before it is known."""

    start_ns: int = 0
    end_ns: int = -1
    report_ns: int = 0

    def __contains__(self, at_ns: int) -> bool:
        return self.start_ns <= at_ns <= self.end_ns

    @classmethod
    def parse(cls, line: str) -> Window:
        _, start, end, report = line.split()
        return cls(int(start), int(end), int(report))


async def read_window() -> Window:
    """The orchestrator writes ``window <start> <end> <report>`` on stdin; EOF means it is gone: exit."""
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            raise SystemExit(0)
        if line.startswith("window "):
            return Window.parse(line)


class TickClock:
    """A helper's lateness: how late each scheduled send woke, once it was due and its previous send was done.

    Time blocked in one call's send (flow control: the peer does not read fast enough, or the process was
    preempted mid-send) does not count against that call's next tick; such sends are counted apart, as stalls.
    Every other call's ticks still see the loop's lateness.
    """

    def __init__(self) -> None:
        self.window = Window()
        self.lag: list[int] = []
        self.stalls = 0
        self.stalled_ns = 0

    def woke(self, due: int, free_at: int, now: int) -> bool:
        """Record a tick; True when it falls in the window."""
        window = self.window
        if window.start_ns <= now <= window.end_ns:
            self.lag.append(now - max(due, free_at))
            return True
        return False

    def sent(self, began: int) -> int:
        """Record the end of a tick's sends; returns when the sender is free again."""
        ended = time.monotonic_ns()
        window = self.window
        if ended - began > STALL_NS and window.start_ns <= began <= window.end_ns:
            self.stalls += 1
            self.stalled_ns += ended - began
        return ended

    def report(self) -> Ticks:
        return Ticks(Latency.of(self.lag), self.stalls, self.stalled_ns / 1e6)


@dataclass(frozen=True, slots=True)
class Ticks:
    lag: Latency
    stalls: int
    stalled_ms: float

    @classmethod
    def load(cls, data: dict[str, Any]) -> Ticks:
        return cls(Latency.load(data["lag"]), int(data["stalls"]), float(data["stalled_ms"]))


def say(kind: str, data: object = None) -> None:
    """One line to the orchestrator: ``kind`` and, optionally, JSON."""
    payload = "" if data is None else " " + orjson.dumps(data).decode()
    print(f"{kind}{payload}", flush=True)


# The two messages sent once per frame per call, written the way orjson writes them (compact, keys in this order)
# but without building a dict per frame; every other message is a dict given to orjson.
MEDIA = (
    b'{"event":"media","sequenceNumber":"%d","streamSid":"%b",'
    b'"media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%b"}}'
)
DELTA = (
    b'{"type":"response.output_audio.delta","event_id":"event_%d","response_id":"%b","item_id":"%b",'
    b'"output_index":0,"content_index":0,"delta":"%b"}'
)


def send_event(transport: WSTransport, event: dict[str, Any]) -> None:
    """One JSON text frame, written at once (orjson gives bytes; WebSocket peers expect text)."""
    transport.send(WSMsgType.TEXT, orjson.dumps(event))


def close_code(transport: WSTransport) -> int:
    """The close code the peer sent, 1006 when it sent none (as websockets' ``close_code``)."""
    handshake = transport.close_handshake
    if handshake is None or handshake.recv is None:
        return 1006
    code: int = handshake.recv.code.value
    return code


Job = Callable[[int, int], "int | None"]


class Ticker:
    """Every scheduled send of a helper process on one timer, rather than a task per call sleeping per frame.

    A job is called as ``job(due, now)`` once its due time has come, ``now`` being the monotonic clock read just
    before that call (a job run after others in the same wake-up sees the time they took as lateness), and returns
    when it is due next (None: never). The timer wakes at the earliest due time and runs every job due by then,
    or due within half the event loop's 1 ms timer resolution, as ``asyncio.sleep`` would have.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.heap: list[tuple[int, int, Job]] = []
        self.order = itertools.count()  # jobs due at the same time run in the order they were scheduled
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0
        self.running = False

    def at(self, due: int, job: Job) -> None:
        heapq.heappush(self.heap, (due, next(self.order), job))
        if not self.running and (self.timer is None or due < self.timer_due):
            self.arm(due)

    def arm(self, due: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_due = due
        self.timer = self.loop.call_later(max(0, due - time.monotonic_ns()) / 1e9, self.run)

    def run(self) -> None:
        self.timer = None
        self.running = True
        heap = self.heap
        try:
            while heap and heap[0][0] <= (now := time.monotonic_ns()) + TIMER_SLACK_NS:
                due, _, job = heapq.heappop(heap)
                following = job(due, now)
                if following is not None:
                    heapq.heappush(heap, (following, next(self.order), job))
        finally:
            self.running = False
            if heap:
                self.arm(heap[0][0])


class Peer(WSListener):
    """One WebSocket (picows) of a helper, with the manners websockets had here.

    Whole messages (fragments are joined) go to ``message`` with the time they were read; a CLOSE is answered with
    the same code and the connection dropped. Flow control is websockets' too: over a 32 KiB write buffer the
    sender waits. Sends are synchronous, so a step (``step``, run by the ``Ticker``) makes all its sends, and,
    when the write buffer is then over its high-water mark, the next step waits until it has drained, the wait
    counting as a slow send (as time blocked in websockets' ``send`` did).
    """

    clock: TickClock
    ticker: Ticker

    def __init__(self) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.closed = False
        self.paused = False
        self.blocked: tuple[int, int] | None = None  # (when the blocked step began, when the next one is due)
        self.free_at = 0
        self.fragments: list[bytes] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        transport.underlying_transport.set_write_buffer_limits(high=WRITE_LIMIT)
        self.transport = transport
        self.opened(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = time.monotonic_ns()
        kind = frame.msg_type
        if kind == WSMsgType.TEXT or kind == WSMsgType.BINARY:
            if frame.fin:
                self.message(frame.get_payload_as_bytes(), now)
            else:
                self.fragments = [frame.get_payload_as_bytes()]
        elif kind == WSMsgType.CONTINUATION:
            self.fragments.append(frame.get_payload_as_bytes())
            if frame.fin:
                whole, self.fragments = b"".join(self.fragments), []
                self.message(whole, now)
        elif kind == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.ended(close_code(transport))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.blocked is not None and not self.closed:
            began, due = self.blocked
            self.blocked = None
            self.free_at = self.clock.sent(began)
            self.ticker.at(due, self.step)

    def sent(self, began: int, due: int) -> int | None:
        """End of a step that began at ``began``: the next is due at ``due``, or once the write buffer drained."""
        if self.paused:
            self.blocked = (began, due)
            return None
        self.free_at = self.clock.sent(began)
        return due

    def opened(self, transport: WSTransport) -> None:
        raise NotImplementedError

    def message(self, data: bytes, now: int) -> None:
        raise NotImplementedError

    def step(self, due: int, now: int) -> int | None:
        raise NotImplementedError

    def ended(self, code: int) -> None:
        raise NotImplementedError


# --- The fake Realtime server ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FakeConfig:
    delta_ms: int
    speed: float
    response_s: float
    port: int = 0


@dataclass(frozen=True, slots=True)
class FakeReport:
    sessions: int
    sessions_open: int
    caller_frames: int
    """Caller frames received whose send time is in the window."""
    caller_latency: Latency
    agent_frames: int
    """Agent frames sent in the window."""
    ticks: Ticks
    """How late each delta was sent, against its schedule."""
    malformed: int


class FakeServer:
    def __init__(self, config: FakeConfig, ticker: Ticker) -> None:
        self.config = config
        self.ticker = ticker
        self.window = Window()
        self.ids = itertools.count(1)
        self.sessions = 0
        self.sessions_open = 0
        self.caller_latency: list[int] = []  # one per caller frame sent in the window and received
        self.agent_frames = 0
        self.clock = TickClock()
        self.malformed = 0
        # Responses back to back, each ``response_s`` of audio long, deltas paced at ``speed`` x real time.
        self.frames_per_delta = max(1, config.delta_ms // FRAME_MS)
        self.deltas = max(1, round(config.response_s * 1000 / (self.frames_per_delta * FRAME_MS)))
        self.delta_period_ns = self.frames_per_delta * FRAME_NS / config.speed
        self.response_ns = self.deltas * self.frames_per_delta * FRAME_NS  # the next starts once this one has played

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self.ids)}"

    def report(self) -> FakeReport:
        return FakeReport(
            sessions=self.sessions,
            sessions_open=self.sessions_open,
            caller_frames=len(self.caller_latency),
            caller_latency=Latency.of(self.caller_latency),
            agent_frames=self.agent_frames,
            ticks=self.clock.report(),
            malformed=self.malformed,
        )


class FakeSession(Peer):
    """One Realtime session: ``session.created`` at once, ``session.updated`` for each ``session.update``, and from
    the first one on, the agent's responses, one step of the fake's ticker per delta."""

    def __init__(self, fake: FakeServer) -> None:
        super().__init__()
        self.fake = fake
        self.clock = fake.clock
        self.ticker = fake.ticker
        self.session_id = ""
        self.streaming = False
        self.first = 0  # when the first response began: response k begins at first + k x its length
        self.responses = 0  # responses begun
        self.index = 0  # the current response's next delta; 0: the next step begins a response
        self.begin = 0  # when the current response began: its delta i is due at begin + i x the delta period
        self.response: dict[str, Any] = {}
        self.response_id = b""
        self.item_id = b""

    def opened(self, transport: WSTransport) -> None:
        fake = self.fake
        fake.sessions += 1
        fake.sessions_open += 1
        self.session_id = fake.new_id("sess")
        created = {"object": "realtime.session", "id": self.session_id, "type": "realtime", "model": "gpt-realtime"}
        send_event(transport, {"type": "session.created", "event_id": fake.new_id("event"), "session": created})

    def message(self, data: bytes, now: int) -> None:
        event = orjson.loads(data)
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            fake = self.fake
            fake.malformed += record_stamps(binascii.a2b_base64(event["audio"]), now, fake.window, fake.caller_latency)
        elif kind == "session.update":
            assert self.transport is not None
            session = {**event.get("session", {}), "object": "realtime.session", "id": self.session_id}
            updated = {"type": "session.updated", "event_id": self.fake.new_id("event"), "session": session}
            send_event(self.transport, updated)
            if not self.streaming:
                self.streaming = True
                self.first = time.monotonic_ns()
                self.ticker.at(self.first, self.step)
        # Any other client event (conversation.item.create, response.create...) is not needed here.

    def step(self, due: int, now: int) -> int | None:
        """Send what is due: a response's start (``response.created``) and its first delta, a delta, or the last
        delta and ``response.done``; returns when the next is due."""
        if self.closed:
            return None
        fake, transport = self.fake, self.transport
        assert transport is not None
        if self.index == 0:
            self.begin = due = now
            response_id, item_id = fake.new_id("resp"), fake.new_id("item")
            self.response_id, self.item_id = response_id.encode(), item_id.encode()
            self.response = {"object": "realtime.response", "id": response_id, "status": "in_progress", "output": []}
            created = {"type": "response.created", "event_id": fake.new_id("event"), "response": self.response}
            send_event(transport, created)
            now = self.free_at = time.monotonic_ns()
        if fake.clock.woke(due, self.free_at, now):
            fake.agent_frames += fake.frames_per_delta
        if fake.frames_per_delta == 1:
            audio = stamped_frame_b64(now)
        else:
            audio = binascii.b2a_base64(stamped_frame(now) * fake.frames_per_delta, newline=False)
        transport.send(WSMsgType.TEXT, DELTA % (next(fake.ids), self.response_id, self.item_id, audio))
        self.index += 1
        if self.index < fake.deltas:
            return self.sent(now, self.begin + int(self.index * fake.delta_period_ns))
        following = self.sent(now, self.first + (self.responses + 1) * fake.response_ns)
        done = {**self.response, "status": "completed"}
        send_event(transport, {"type": "response.done", "event_id": fake.new_id("event"), "response": done})
        self.index = 0
        self.responses += 1
        return following

    def ended(self, code: int) -> None:
        self.fake.sessions_open -= 1


async def fake_main(config: FakeConfig) -> None:
    fake = FakeServer(config, Ticker())
    server = await ws_create_server(
        lambda request: FakeSession(fake),
        "127.0.0.1",
        config.port,
        max_frame_size=2**24,
        websocket_handshake_timeout=10,
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        say(f"listening {port}")
        fake.window = fake.clock.window = await read_window()
        await sleep_until(fake.window.report_ns)
        say("report", fake.report())
        await read_window()  # serve until the orchestrator stops this process (or its stdin closes)


# --- The load generator ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GeneratorConfig:
    calls: int
    base_url: str
    """Where the webhook is POSTed (and the stream's host); signatures are computed over it too."""
    direct_ws_url: str | None
    """The bare relay: connect here at once, with no webhook and no signature."""
    ramp_s: float
    ready_timeout_s: float


@dataclass(frozen=True, slots=True)
class GeneratorReport:
    calls: int
    calls_up: int
    calls_open: int
    caller_frames: int
    """Caller frames sent in the window."""
    agent_frames: int
    """Agent frames received whose send time is in the window."""
    agent_latency: Latency
    ticks: Ticks
    """How late each 20 ms caller tick fired, against its absolute schedule."""
    errors: dict[str, int]
    marks_received: int
    marks_echoed: int
    clears: int
    malformed: int
    media_messages: int
    """Agent audio messages received (the bridge may join the model's deltas)."""
    media_bytes: int


class Generator:
    def __init__(self, config: GeneratorConfig, auth_token: str, ticker: Ticker) -> None:
        self.config = config
        self.ticker = ticker
        self.validator = RequestValidator(auth_token)
        self.account_sid = "AC" + uuid.uuid4().hex
        self.window = Window()
        self.hanging_up = False
        self.settled = 0
        self.all_settled = asyncio.Event()
        self.all_closed = asyncio.Event()
        self.calls: list[Call] = []
        self.calls_up = 0
        self.calls_open = 0
        self.caller_frames = 0
        self.agent_latency: list[int] = []  # one per agent frame sent in the window and received
        self.clock = TickClock()
        self.errors: Counter[str] = Counter()
        self.marks_received = 0
        self.marks_echoed = 0
        self.clears = 0
        self.malformed = 0
        self.media_messages = 0
        self.media_bytes = 0

    def settle(self, error: str | None = None) -> None:
        if error is not None:
            self.errors[error] += 1
        else:
            self.calls_up += 1
        self.settled += 1
        if self.settled == self.config.calls:
            self.all_settled.set()

    async def place(self, index: int, client: httpx.AsyncClient) -> None:
        config = self.config
        await asyncio.sleep(index * config.ramp_s / config.calls + random.uniform(0, FRAME_MS / 1000))
        call_sid, stream_sid = "CA" + uuid.uuid4().hex, "MZ" + uuid.uuid4().hex
        parameters: dict[str, str] = {}
        headers: dict[str, str] = {}
        if config.direct_ws_url is not None:
            url = config.direct_ws_url
        else:
            try:
                twiml = await self.webhook(client, call_sid)
                stream_url, parameters = parse_twiml(twiml)
            except Exception as exc:
                self.settle(f"webhook failed: {type(exc).__name__}: {str(exc)[:120]}")
                return
            headers["X-Twilio-Signature"] = self.validator.compute_signature(stream_url, {})
            url = "ws://" + urlsplit(config.base_url).netloc + urlsplit(stream_url).path
        call = Call(self, call_sid, stream_sid, parameters)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                await ws_connect(
                    lambda: call,
                    url,
                    extra_headers=headers,
                    max_frame_size=2**24,
                    websocket_handshake_timeout=OPEN_TIMEOUT_S,
                )
        except WSInvalidStatusError as exc:
            self.settle(f"stream refused: HTTP {int(exc.response.status) if exc.response is not None else '?'}")
        except Exception as exc:
            self.settle(f"stream failed: {type(exc).__name__}")
        # From here on the call runs on callbacks: Call.opened, Call.step, Call.message, Call.ended.

    async def webhook(self, client: httpx.AsyncClient, call_sid: str) -> str:
        params = {
            "CallSid": call_sid,
            "AccountSid": self.account_sid,
            "From": "+15550100001",
            "To": "+15550100002",
            "CallStatus": "ringing",
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
        }
        url = f"{self.config.base_url}/twilio/voice"
        headers = {"X-Twilio-Signature": self.validator.compute_signature(url, params)}
        response = await client.post(url, data=params, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")
        return str(response.text)

    def hang_up(self) -> None:
        """Every open call sends ``stop`` and closes with 1000, as Twilio does when the caller hangs up."""
        self.hanging_up = True
        for call in self.calls:
            call.hang_up()
        if self.calls_open == 0:
            self.all_closed.set()

    def report(self) -> GeneratorReport:
        return GeneratorReport(
            calls=self.config.calls,
            calls_up=self.calls_up,
            calls_open=self.calls_open,
            caller_frames=self.caller_frames,
            agent_frames=len(self.agent_latency),
            agent_latency=Latency.of(self.agent_latency),
            ticks=self.clock.report(),
            errors=dict(self.errors),
            marks_received=self.marks_received,
            marks_echoed=self.marks_echoed,
            clears=self.clears,
            malformed=self.malformed,
            media_messages=self.media_messages,
            media_bytes=self.media_bytes,
        )


def parse_twiml(twiml: str) -> tuple[str, dict[str, str]]:
    stream = ET.fromstring(twiml).find("./Connect/Stream")
    if stream is None or not stream.get("url"):
        raise ValueError(f"no <Connect><Stream> in the TwiML: {twiml[:200]}")
    return str(stream.get("url")), {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}


class Call(Peer):
    """One media stream: a step of the generator's ticker every 20 ms (echo the marks that played, send a frame),
    and the messages the bridge sends, read as they arrive."""

    def __init__(self, generator: Generator, call_sid: str, stream_sid: str, parameters: dict[str, str]) -> None:
        super().__init__()
        self.gen = generator
        self.clock = generator.clock
        self.ticker = generator.ticker
        self.call_sid = call_sid
        self.stream_sid = stream_sid
        self.stream_sid_bytes = stream_sid.encode()
        self.parameters = parameters
        self.sequence = itertools.count(1)
        self.up = False
        self.t0 = 0
        self.ticks = 0  # frames sent
        self.played_until_ns = 0  # when the agent audio received so far will have finished playing
        self.marks: deque[tuple[int, str]] = deque()  # (when its audio has played, name)

    def opened(self, transport: WSTransport) -> None:
        gen = self.gen
        gen.calls_open += 1
        gen.calls.append(self)
        send_event(transport, {"event": "connected", "protocol": "Call", "version": "1.0.0"})
        send_event(transport, self.start_message())
        self.t0 = time.monotonic_ns()
        self.free_at = self.t0
        self.ticker.at(self.t0, self.step)

    def start_message(self) -> dict[str, Any]:
        start = {
            "accountSid": self.gen.account_sid,
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": self.parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        return {
            "event": "start",
            "sequenceNumber": str(next(self.sequence)),
            "start": start,
            "streamSid": self.stream_sid,
        }

    def header(self) -> dict[str, str]:
        return {"sequenceNumber": str(next(self.sequence)), "streamSid": self.stream_sid}

    def step(self, due: int, now: int) -> int | None:
        """Tick k is due at t0 + k x 20 ms: an absolute schedule, so a late tick is caught up, never drifts."""
        gen, transport = self.gen, self.transport
        if gen.hanging_up or self.closed:
            return None
        assert transport is not None
        if gen.clock.woke(due, self.free_at, now):
            gen.caller_frames += 1
        marks = self.marks
        while marks and marks[0][0] <= now:
            _, name = marks.popleft()
            send_event(transport, {"event": "mark", **self.header(), "mark": {"name": name}})
            gen.marks_echoed += 1
        tick = self.ticks
        payload = stamped_frame_b64(now)
        media = MEDIA % (next(self.sequence), self.stream_sid_bytes, tick + 1, tick * FRAME_MS, payload)
        transport.send(WSMsgType.TEXT, media)
        self.ticks = tick + 1
        return self.sent(now, self.t0 + self.ticks * FRAME_NS)

    def message(self, data: bytes, now: int) -> None:
        gen = self.gen
        try:
            message = orjson.loads(data)
            event = message.get("event")
            if event == "media":
                audio = binascii.a2b_base64(message["media"]["payload"])
            elif event == "mark":
                name = message["mark"]["name"]
        except Exception as exc:
            gen.errors[f"unreadable message from the server: {type(exc).__name__}"] += 1
            return
        if event == "media":
            gen.media_messages += 1
            gen.media_bytes += len(audio)
            self.played_until_ns = max(self.played_until_ns, now) + len(audio) * NS_PER_BYTE
            gen.malformed += record_stamps(audio, now, gen.window, gen.agent_latency)
            if not self.up:
                self.up = True
                gen.settle()
        elif event == "mark":
            gen.marks_received += 1
            self.marks.append((self.played_until_ns, name))
        elif event == "clear":  # flush: every pending mark is echoed at the next tick
            gen.clears += 1
            self.played_until_ns = now
            self.marks = deque((now, name) for _, name in self.marks)
        else:
            gen.errors[f"unexpected message from the server: {event!r}"] += 1

    def hang_up(self) -> None:
        transport = self.transport
        if self.closed or transport is None or transport.is_close_frame_sent:
            return
        stop = {"accountSid": self.gen.account_sid, "callSid": self.call_sid}
        send_event(transport, {"event": "stop", **self.header(), "stop": stop})
        transport.send_close(WSCloseCode.OK)  # the bridge answers with its CLOSE, then the connection is dropped

    def ended(self, code: int) -> None:
        gen = self.gen
        gen.calls_open -= 1
        if not gen.hanging_up:
            gen.errors[f"stream closed by the server: code {code}"] += 1
        if not self.up:
            gen.settle(f"closed before agent audio: code {code}")
        if gen.hanging_up and gen.calls_open == 0:
            gen.all_closed.set()


async def generator_main(config: GeneratorConfig) -> None:
    generator = Generator(config, os.environ["BENCH_TWILIO_AUTH_TOKEN"], Ticker())
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        placing = [asyncio.create_task(generator.place(index, client)) for index in range(config.calls)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(generator.all_settled.wait(), config.ramp_s + config.ready_timeout_s)
        say("ready", {"calls_up": generator.calls_up, "errors": dict(generator.errors)})
        generator.window = generator.clock.window = await read_window()
        await sleep_until(generator.window.report_ns)
        say("report", generator.report())
        generator.hang_up()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(generator.all_closed.wait(), 10)
        for task in placing:
            task.cancel()
        await asyncio.gather(*placing, return_exceptions=True)


# --- The orchestrator: processes, /proc, rounds ---------------------------------------------------------------


class RoundFailed(Exception):
    pass


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (uvicorn's workers are children of the serve process)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total * 1_000_000_000 // CLOCK_TICKS


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_stat() -> dict[int, tuple[int, int]]:
    """Per CPU, from /proc/stat: (busy, stolen) ns since boot."""
    stats: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            user, nice, system, _, _, irq, softirq, steal = (int(value) for value in values[:8])
            busy = user + nice + system + irq + softirq
            stats[int(name[3:])] = (busy * 1_000_000_000 // CLOCK_TICKS, steal * 1_000_000_000 // CLOCK_TICKS)
    return stats


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_started_groups: set[int] = set()  # process groups still to stop, should the orchestrator die abruptly


def _kill_leftovers() -> None:
    for group in list(_started_groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    _started_groups.clear()


def _child_setup(cpus: set[int]) -> Callable[[], None]:
    """Runs in the child before exec: pin it, let it open many sockets, and have it die with this process."""

    def setup() -> None:
        os.sched_setaffinity(0, cpus)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return setup


@dataclass(slots=True)
class Child:
    name: str
    process: asyncio.subprocess.Process

    async def expect(self, kind: str, within_s: float) -> str:
        """The rest of the next stdout line starting with ``kind``."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + within_s
        while True:
            try:
                raw = await asyncio.wait_for(self.process.stdout.readline(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                raise RoundFailed(f"{self.name}: no '{kind}' within {within_s:.0f} s") from None
            if not raw:
                code = await self.process.wait()
                raise RoundFailed(f"{self.name} exited with code {code} before '{kind}'")
            line = raw.decode().strip()
            if line == kind or line.startswith(kind + " "):
                return line[len(kind) :].strip()

    async def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()


class Processes:
    """Every process a round starts, each in its own process group; all stopped on exit, whatever happened."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    async def __aenter__(self) -> Processes:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_all()

    async def start(self, name: str, argv: list[str], cpus: set[int], env: dict[str, str] | None = None) -> Child:
        with (self.log_dir / f"{name}.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=self.log_dir,
                start_new_session=True,
                preexec_fn=_child_setup(cpus),
            )
        _started_groups.add(process.pid)
        child = Child(name, process)
        self.children.append(child)
        return child

    async def stop(self, child: Child, grace_s: float = 10.0) -> None:
        process = child.process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # workers outliving their supervisor
        _started_groups.discard(process.pid)

    async def stop_all(self) -> None:
        for child in reversed(self.children):
            await asyncio.shield(self.stop(child))
        self.children.clear()


def role_argv(role: str, config: object, use_uvloop: bool) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--role-config"]
    return [*argv, orjson.dumps(config).decode(), "--uvloop" if use_uvloop else "--no-uvloop"]


# --- Rounds ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    calls: list[int]
    delta_ms: int
    speed: float
    response_s: float
    workers: list[int]
    repeat: int
    bare: bool
    bare_stack: str
    recording: bool
    ramp_s: float
    warmup_s: float
    window_s: float
    use_uvloop: bool
    json_path: Path | None
    soak_s: float | None = None
    """``--soak``: one N, one worker, every call carried this long, the serve tree sampled every 10 s."""


@dataclass(frozen=True, slots=True)
class HelperUse:
    """A helper process (generator, fake server) during the window: its core use and its loop's lateness."""

    core_use: float
    tick_lag: Latency
    send_stalls: int
    """Sends slower than 2 ms (flow control from the system under test, or preemption)."""
    stalled_ms: float


@dataclass(slots=True)
class RoundResult:
    target: Target
    calls: int
    workers: int = 1
    calls_up: int = 0
    window_s: float = 0.0
    cpu_ms: float = math.nan
    cpu_ms_per_call_second: float = math.nan
    calls_per_core: float = math.nan
    core_use: float = math.nan
    caller_to_model: Latency = field(default_factory=lambda: Latency.of([]))
    model_to_caller: Latency = field(default_factory=lambda: Latency.of([]))
    rss_cold_kib: int = 0
    """Just started, before the warm-up calls."""
    rss_idle_kib: int = 0
    """After the warm-up calls have come and gone: what a first call loads once is not a cost per call."""
    rss_loaded_kib: int = 0
    rss_per_call_kib: float = math.nan
    caller_frames_sent: int = 0
    caller_frames_received: int = 0
    agent_frames_sent: int = 0
    agent_frames_received: int = 0
    marks_received: int = 0
    marks_echoed: int = 0
    clears: int = 0
    agent_ms_per_message: float = math.nan
    """Agent audio per media message the caller's side received, over the whole round (20: one per 20 ms delta)."""
    errors: dict[str, int] = field(default_factory=dict)
    server_log: dict[str, int] = field(default_factory=dict)
    cpu_busy: dict[str, float] = field(default_factory=dict)
    """Each CPU's busy share during the window, whoever used it."""
    other_load_cores: float = math.nan
    """CPU time of processes not started by this benchmark during the window (a noisy machine), in cores."""
    steal_cores: float = math.nan
    generator: HelperUse | None = None
    fake: HelperUse | None = None
    saturated: list[str] = field(default_factory=list)
    failed: str | None = None
    duration_s: float = 0.0

    @property
    def caller_frames_lost(self) -> int:
        return self.caller_frames_sent - self.caller_frames_received

    @property
    def agent_frames_lost(self) -> int:
        return self.agent_frames_sent - self.agent_frames_received

    @property
    def measured(self) -> bool:
        """Figures worth reporting: the load held, every call was up."""
        return self.failed is None and not self.saturated and self.calls_up == self.calls

    @property
    def headline_ok(self) -> bool:
        p99s = (self.caller_to_model.p99_ms, self.model_to_caller.p99_ms)
        return self.measured and all(p99 <= HEADLINE_P99_MS for p99 in p99s)

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data |= {
            "caller_frames_lost": self.caller_frames_lost,
            "agent_frames_lost": self.agent_frames_lost,
            "measured": self.measured,
            "headline_ok": self.headline_ok,
        }
        if not self.measured:  # refused: the load, not the system under test, may have been the limit
            for key in ("cpu_ms", "cpu_ms_per_call_second", "calls_per_core", "rss_per_call_kib"):
                data[key] = None
        return data


def server_log_events(path: Path) -> dict[str, int]:
    """Warning and error lines of the serve process, by level and event."""
    counts: Counter[str] = Counter()
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = orjson.loads(line)
                counts[f"{record.get('level', '?')} {record.get('event', '?')}"] += 1
            except orjson.JSONDecodeError:
                if line.strip():
                    counts["unparsed " + line.strip()[:80]] += 1
    return dict(counts)


async def wait_healthy(child: Child, base_url: str, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if child.process.returncode is not None:
                raise RoundFailed(f"callbridge serve exited with code {child.process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(f"{base_url}/healthz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RoundFailed("callbridge serve did not answer /healthz")


async def start_target(
    result: RoundResult, processes: Processes, options: Options, realtime_url: str, token: str
) -> tuple[Child, GeneratorConfig]:
    target, workers = result.target, result.workers
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    ready_timeout = 30 + options.calls[-1] / 20
    if target == "bare":
        script = "bare_relay_picows.py" if options.bare_stack == "picows" else "bare_relay.py"
        argv = [sys.executable, str(HERE / script), "--port", str(port), "--realtime-url", realtime_url]
        argv.append("--uvloop" if options.use_uvloop else "--no-uvloop")
        child = await processes.start("bare", argv, {1})
        await child.expect("listening", 30)
        return child, GeneratorConfig(0, base_url, f"ws://127.0.0.1:{port}/", options.ramp_s, ready_timeout)
    env = {key: value for key, value in os.environ.items() if key != "OPENAI_API_KEY"}
    env |= {
        "CALLBRIDGE_PUBLIC_URL": base_url,
        "CALLBRIDGE_REALTIME_URL": realtime_url,
        "CALLBRIDGE_SECRET": secrets.token_hex(16),
        "TWILIO_AUTH_TOKEN": token,
        "CALLBRIDGE_DATABASE_URL": f"sqlite+aiosqlite:///{processes.log_dir}/bench.db",
        "CALLBRIDGE_MAX_CALLS": "100000",
        "CALLBRIDGE_LOG_LEVEL": "warning",
        "CALLBRIDGE_LOG_FORMAT": "json",
        "CALLBRIDGE_AGENT_GREETING": "Hello, thanks for calling.",
        "CALLBRIDGE_RECORD_CALLS": "true" if target == "record" else "false",
        "CALLBRIDGE_RECORDINGS_DIR": str(processes.log_dir / "recordings"),
    }
    argv = [str(CALLBRIDGE), "serve", "--port", str(port)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    cpus = {1} if workers == 1 else set(range(min(workers, os.cpu_count() or 2)))
    child = await processes.start("serve", argv, cpus, env)
    await wait_healthy(child, base_url)
    return child, GeneratorConfig(0, base_url, None, options.ramp_s, ready_timeout)


async def run_round(target: Target, calls: int, workers: int, options: Options) -> RoundResult:
    result = RoundResult(target, calls, workers)
    began = time.monotonic()
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix=f"relay-bench-{target}-{calls}-") as tmp:
        log_dir = Path(tmp)
        try:
            async with Processes(log_dir) as processes:
                await measure_round(result, processes, options, token)
        except RoundFailed as exc:
            result.failed = str(exc)
            result.server_log = server_log_events(log_dir / "serve.log")
    result.duration_s = time.monotonic() - began
    return result


async def start_load(
    result: RoundResult, processes: Processes, options: Options, token: str
) -> tuple[Child, Child, Child]:
    """The fake, the system under test (its RSS read before and after the warm-up calls) and the load generator
    with every call up: (fake, target, generator)."""
    fake_config = FakeConfig(options.delta_ms, options.speed, options.response_s)
    fake = await processes.start("fake", role_argv("fake", fake_config, options.use_uvloop), {0})
    fake_port = int(await fake.expect("listening", 30))
    target, generator_config = await start_target(result, processes, options, f"ws://127.0.0.1:{fake_port}", token)
    await asyncio.sleep(1.0)  # settle before the RSS readings
    result.rss_cold_kib = rss_kib(process_tree(target.process.pid))
    await warm_up(processes, generator_config, options, token, calls=4 * result.workers)
    await asyncio.sleep(1.0)
    result.rss_idle_kib = rss_kib(process_tree(target.process.pid))
    generator_config = dataclasses.replace(generator_config, calls=result.calls)
    argv = role_argv("generator", generator_config, options.use_uvloop)
    generator = await processes.start("generator", argv, {0}, {**os.environ, "BENCH_TWILIO_AUTH_TOKEN": token})
    ready = orjson.loads(await generator.expect("ready", options.ramp_s + generator_config.ready_timeout_s + 10))
    if ready["calls_up"] < result.calls:
        raise RoundFailed(f"only {ready['calls_up']} of {result.calls} calls came up: {ready['errors']}")
    return fake, target, generator


async def measure_round(result: RoundResult, processes: Processes, options: Options, token: str) -> None:
    fake, target, generator = await start_load(result, processes, options, token)

    start = time.monotonic_ns() + int(options.warmup_s * 1e9)
    end = start + int(options.window_s * 1e9)
    for child in (fake, generator):
        await child.tell(f"window {start} {end} {end + GRACE_NS}")
    await sleep_until(start)
    pids = {
        "target": process_tree(target.process.pid),
        "generator": [generator.process.pid],
        "fake": [fake.process.pid],
    }
    pids["benchmark"] = [os.getpid()]
    cpu_before, stat_before = {name: cpu_ns(group) for name, group in pids.items()}, cpu_stat()
    wall_before = time.monotonic_ns()
    await sleep_until(end)
    pids["target"] = process_tree(target.process.pid)
    cpu = {name: cpu_ns(group) - cpu_before[name] for name, group in pids.items()}
    stat = cpu_stat()
    wall_ns = time.monotonic_ns() - wall_before
    busy = {index: stat[index][0] - stat_before[index][0] for index in stat}
    result.cpu_busy = {f"cpu{index}": busy[index] / wall_ns for index in sorted(busy)}
    result.other_load_cores = max(0, sum(busy.values()) - sum(cpu.values())) / wall_ns
    result.steal_cores = sum(stat[index][1] - stat_before[index][1] for index in stat) / wall_ns
    result.rss_loaded_kib = rss_kib(pids["target"])

    generator_report = load_generator_report(orjson.loads(await generator.expect("report", 30)))
    fake_report = load_fake_report(orjson.loads(await fake.expect("report", 30)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(generator.process.wait(), 15)  # the generator hangs up every call and exits
    await asyncio.sleep(0.5)  # let the server log the calls' ends
    result.server_log = server_log_events(processes.log_dir / "serve.log")
    fill_result(result, options, cpu, wall_ns, generator_report, fake_report)


async def warm_up(processes: Processes, config: GeneratorConfig, options: Options, token: str, calls: int) -> None:
    """A few calls placed, carried for a second and hung up before anything is measured.

    What a process's first call loads once (modules imported on first use, code pages, the store's first writes)
    then counts in the idle RSS rather than as a cost per call; ``rss_cold_kib`` keeps the reading from before.
    Four calls per worker, since which worker accepts a connection is the kernel's choice.
    """
    argv = role_argv("generator", dataclasses.replace(config, calls=calls, ramp_s=0.5), options.use_uvloop)
    generator = await processes.start("warmup", argv, {0}, {**os.environ, "BENCH_TWILIO_AUTH_TOKEN": token})
    ready = orjson.loads(await generator.expect("ready", config.ready_timeout_s + 10))
    if ready["calls_up"] < calls:
        raise RoundFailed(f"warm-up: only {ready['calls_up']} of {calls} calls came up: {ready['errors']}")
    now = time.monotonic_ns()
    await generator.tell(f"window {now} {now + 1_000_000_000} {now + 1_000_000_000}")
    await generator.expect("report", 30)
    try:
        await asyncio.wait_for(generator.process.wait(), 15)  # it hangs up and exits
    except TimeoutError:
        raise RoundFailed("warm-up: the calls did not end") from None


def load_generator_report(data: dict[str, Any]) -> GeneratorReport:
    return GeneratorReport(
        **{**data, "agent_latency": Latency.load(data["agent_latency"]), "ticks": Ticks.load(data["ticks"])}
    )


def load_fake_report(data: dict[str, Any]) -> FakeReport:
    return FakeReport(
        **{**data, "caller_latency": Latency.load(data["caller_latency"]), "ticks": Ticks.load(data["ticks"])}
    )


def helper_use(core_use: float, ticks: Ticks) -> HelperUse:
    return HelperUse(core_use, ticks.lag, ticks.stalls, ticks.stalled_ms)


def fill_result(
    result: RoundResult,
    options: Options,
    cpu: dict[str, int],
    wall_ns: int,
    generator: GeneratorReport,
    fake: FakeReport,
) -> None:
    window_s = wall_ns / 1e9
    result.window_s = window_s
    result.calls_up = min(generator.calls_up, generator.calls_open)
    result.cpu_ms = cpu["target"] / 1e6
    result.core_use = cpu["target"] / wall_ns
    result.cpu_ms_per_call_second = result.cpu_ms / (result.calls * window_s)
    result.calls_per_core = 1000 / result.cpu_ms_per_call_second if result.cpu_ms_per_call_second else math.inf
    result.caller_to_model = fake.caller_latency
    result.model_to_caller = generator.agent_latency
    result.rss_per_call_kib = (result.rss_loaded_kib - result.rss_idle_kib) / result.calls
    result.caller_frames_sent, result.caller_frames_received = generator.caller_frames, fake.caller_frames
    result.agent_frames_sent, result.agent_frames_received = fake.agent_frames, generator.agent_frames
    result.marks_received, result.marks_echoed, result.clears = (
        generator.marks_received,
        generator.marks_echoed,
        generator.clears,
    )
    if generator.media_messages:
        result.agent_ms_per_message = generator.media_bytes / 8 / generator.media_messages
    result.errors = dict(generator.errors)
    if generator.malformed or fake.malformed:
        result.errors["audio with an implausible timestamp"] = generator.malformed + fake.malformed
    result.generator = helper_use(cpu["generator"] / wall_ns, generator.ticks)
    result.fake = helper_use(cpu["fake"] / wall_ns, fake.ticks)
    for name, use in (("load generator", result.generator), ("fake Realtime server", result.fake)):
        if use.core_use > SATURATED_CORE_USE:
            result.saturated.append(f"the {name} used {use.core_use:.0%} of a core (limit {SATURATED_CORE_USE:.0%})")
        if not use.tick_lag.p99_ms <= SATURATED_LAG_MS:
            result.saturated.append(
                f"the {name}'s tick lag p99 was {use.tick_lag.p99_ms:.1f} ms (limit {SATURATED_LAG_MS:.0f} ms)"
            )


# --- Soak: does a call's cost grow with its length? -----------------------------------------------------------

SOAK_SAMPLE_S = 10  # the serve process tree is read this often
SOAK_SETTLE_S = 60  # the first minute after every call is up: trends are read after it
MINUTE_S = 60
SOAK_MIN_S = SOAK_SETTLE_S + 2 * SOAK_SAMPLE_S  # two CPU intervals after the first minute: a slope


@dataclass(frozen=True, slots=True)
class Reading:
    """The cumulative counters of one sample: CPU ns per process group, /proc/stat, the serve tree's memory."""

    at_ns: int
    cpu: dict[str, int]
    stat: dict[int, tuple[int, int]]
    rss_kib: int
    anon_kib: int


@dataclass(frozen=True, slots=True)
class SoakSample:
    """One reading of the serve process tree, ``t_s`` after every call was up."""

    t_s: float
    rss_mib: float
    """VmRSS, summed over the tree."""
    anon_mib: float
    """RssAnon, the part of VmRSS that is heap and stacks rather than mapped files (code pages loaded late)."""
    cpu_ms: float
    """The tree's utime + stime since every call was up."""
    cpu_ms_per_call_second: float | None
    """Over the interval since the previous sample; None for the first."""
    core_use: float | None
    other_load_cores: float | None
    """CPU time of processes not started here during that interval (a noisy machine shows here), in cores."""


@dataclass(frozen=True, slots=True)
class SoakFigures:
    rss_slope_mib_per_minute: float | None
    """Least squares over the samples from 60 s on."""
    cpu_slope_per_minute: float | None
    """Least squares over the 10 s intervals after 60 s, in CPU ms per call-second per minute."""
    rss_at_settle_mib: float | None
    rss_at_end_mib: float | None
    rss_growth_mib: float | None
    """The last sample minus the one at 60 s."""
    cpu_second_minute: float | None
    """CPU ms per call-second from 60 to 120 s."""
    cpu_last_minute: float | None
    """CPU ms per call-second over the last 60 s."""
    cpu_last_over_second: float | None
    cpu_change_percent: float | None
    minutes_overlap: bool
    """The soak was shorter than 180 s: its second and last minutes overlap."""


@dataclass(slots=True)
class SoakResult:
    calls: int
    duration_s: float
    """How long every call was carried once all were up (``--soak`` rounded up to whole 10 s intervals)."""
    end: RoundResult
    """The last 10 s interval, measured as a round's window: latency, frames, marks, errors, the helpers' use."""
    samples: list[SoakSample] = field(default_factory=list)
    calls_open_at_end: int | None = None
    sessions_open_at_end: int | None = None
    """Realtime sessions the fake still had open at the end."""

    def figures(self) -> SoakFigures:
        return soak_figures(self.samples, self.calls)


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """VmRSS and RssAnon, summed over ``pids``."""
    rss = anon = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1])
    return rss, anon


def take_reading(target: Child, helpers: dict[str, list[int]]) -> Reading:
    if target.process.returncode is not None:
        raise RoundFailed(f"callbridge serve exited with code {target.process.returncode} during the soak")
    tree = process_tree(target.process.pid)
    cpu = {"target": cpu_ns(tree)} | {name: cpu_ns(pids) for name, pids in helpers.items()}
    rss, anon = memory_kib(tree)
    return Reading(time.monotonic_ns(), cpu, cpu_stat(), rss, anon)


def soak_sample(t0_ns: int, calls: int, reading: Reading, first: Reading, previous: Reading | None) -> SoakSample:
    cpu_ms = (reading.cpu["target"] - first.cpu["target"]) / 1e6
    per_call: float | None = None
    core_use: float | None = None
    other: float | None = None
    if previous is not None:
        wall_ns = reading.at_ns - previous.at_ns
        used = {name: reading.cpu[name] - previous.cpu[name] for name in reading.cpu}
        per_call = used["target"] / 1e6 / (calls * wall_ns / 1e9)
        core_use = used["target"] / wall_ns
        busy = sum(reading.stat[cpu][0] - previous.stat[cpu][0] for cpu in reading.stat)
        other = max(0, busy - sum(used.values())) / wall_ns
    return SoakSample(
        t_s=(reading.at_ns - t0_ns) / 1e9,
        rss_mib=reading.rss_kib / 1024,
        anon_mib=reading.anon_kib / 1024,
        cpu_ms=cpu_ms,
        cpu_ms_per_call_second=per_call,
        core_use=core_use,
        other_load_cores=other,
    )


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of ``(seconds, value)`` points, per minute; None with fewer than two."""
    if len(points) < 2:
        return None
    return statistics.linear_regression([t for t, _ in points], [v for _, v in points]).slope * MINUTE_S


def soak_figures(samples: list[SoakSample], calls: int) -> SoakFigures:
    settle = SOAK_SETTLE_S // SOAK_SAMPLE_S  # the index of the sample at 60 s (samples[0] is at 0 s)
    minute = MINUTE_S // SOAK_SAMPLE_S
    after = samples[settle:]
    rss_slope = slope_per_minute([(s.t_s, s.rss_mib) for s in after])
    cpu_points = [(s.t_s, s.cpu_ms_per_call_second) for s in after[1:] if s.cpu_ms_per_call_second is not None]
    cpu_slope = slope_per_minute(cpu_points)

    def rate(first: SoakSample, last: SoakSample) -> float:
        return (last.cpu_ms - first.cpu_ms) / (calls * (last.t_s - first.t_s))

    second = last = ratio = change = None
    if len(samples) > 2 * minute:  # a sample at 120 s: the second minute is whole
        second = rate(samples[minute], samples[2 * minute])
        last = rate(samples[-1 - minute], samples[-1])
        if second > 0:
            ratio = last / second
            change = (ratio - 1) * 100
    settled = samples[settle] if len(samples) > settle else None
    return SoakFigures(
        rss_slope_mib_per_minute=rss_slope,
        cpu_slope_per_minute=cpu_slope,
        rss_at_settle_mib=settled.rss_mib if settled is not None else None,
        rss_at_end_mib=samples[-1].rss_mib if samples else None,
        rss_growth_mib=samples[-1].rss_mib - settled.rss_mib if settled is not None else None,
        cpu_second_minute=second,
        cpu_last_minute=last,
        cpu_last_over_second=ratio,
        cpu_change_percent=change,
        minutes_overlap=bool(samples) and samples[-1].t_s < 3 * MINUTE_S - SOAK_SAMPLE_S / 2,
    )


async def run_soak(options: Options) -> SoakResult:
    assert options.soak_s is not None
    calls = options.calls[0]
    intervals = math.ceil(options.soak_s / SOAK_SAMPLE_S)
    soak = SoakResult(
        calls, intervals * SOAK_SAMPLE_S, RoundResult("record" if options.recording else "bridge", calls, 1)
    )
    began = time.monotonic()
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix=f"relay-soak-{calls}-") as tmp:
        log_dir = Path(tmp)
        try:
            async with Processes(log_dir) as processes:
                await measure_soak(soak, intervals, processes, options, token)
        except RoundFailed as exc:
            soak.end.failed = str(exc)
            soak.end.server_log = server_log_events(log_dir / "serve.log")
    soak.end.duration_s = time.monotonic() - began
    return soak


async def measure_soak(soak: SoakResult, intervals: int, processes: Processes, options: Options, token: str) -> None:
    """One round whose calls all stay up for the whole soak, the serve tree read every 10 s; the helpers' window
    (latency, frames, their own load) is the last interval."""
    result = soak.end
    fake, target, generator = await start_load(result, processes, options, token)

    t0 = time.monotonic_ns()
    end = t0 + intervals * SOAK_SAMPLE_S * 1_000_000_000
    start = end - SOAK_SAMPLE_S * 1_000_000_000
    for child in (fake, generator):  # they carry every call until the window's report time, then hang up
        await child.tell(f"window {start} {end} {end + GRACE_NS}")
    helpers = {"generator": [generator.process.pid], "fake": [fake.process.pid], "benchmark": [os.getpid()]}
    readings = [take_reading(target, helpers)]
    soak.samples.append(soak_sample(t0, result.calls, readings[0], readings[0], None))
    for index in range(1, intervals + 1):
        await sleep_until(t0 + index * SOAK_SAMPLE_S * 1_000_000_000)
        readings.append(take_reading(target, helpers))
        sample = soak_sample(t0, result.calls, readings[-1], readings[0], readings[-2])
        soak.samples.append(sample)
        print(
            f"[soak] {sample.t_s:4.0f} s: RSS {sample.rss_mib:.1f} MiB, "
            f"{sample.cpu_ms_per_call_second:.2f} CPU ms per call-second",
            file=sys.stderr,
            flush=True,
        )

    before, after = readings[-2], readings[-1]
    wall_ns = after.at_ns - before.at_ns
    cpu = {name: after.cpu[name] - before.cpu[name] for name in after.cpu}
    busy = {index: after.stat[index][0] - before.stat[index][0] for index in after.stat}
    result.cpu_busy = {f"cpu{index}": busy[index] / wall_ns for index in sorted(busy)}
    result.other_load_cores = max(0, sum(busy.values()) - sum(cpu.values())) / wall_ns
    result.steal_cores = sum(after.stat[index][1] - before.stat[index][1] for index in after.stat) / wall_ns
    result.rss_loaded_kib = after.rss_kib

    generator_report = load_generator_report(orjson.loads(await generator.expect("report", 30)))
    fake_report = load_fake_report(orjson.loads(await fake.expect("report", 30)))
    soak.calls_open_at_end, soak.sessions_open_at_end = generator_report.calls_open, fake_report.sessions_open
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(generator.process.wait(), 15)
    await asyncio.sleep(0.5)
    result.server_log = server_log_events(processes.log_dir / "serve.log")
    fill_result(result, options, cpu, wall_ns, generator_report, fake_report)


# --- Report ---------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def delta_mode(options: Options) -> str:
    size = options.delta_ms * FRAME_BYTES // FRAME_MS
    kind = "worst case" if options.delta_ms <= FRAME_MS else "realistic model chunking"
    return (
        f"agent audio in {options.delta_ms} ms ({size}-byte) deltas at {options.speed:g}x real-time pace, "
        f"a new {options.response_s:g} s response once the previous one has played ({kind})"
    )


def describe(result: RoundResult) -> list[str]:
    head = f"N={result.calls:<5} {label(result.target, result.workers):<6}"
    if result.failed is not None:
        return [f"{head} FAILED: {result.failed}"]
    lines: list[str] = []
    helpers = f"load generator {helper_text(result.generator)}; fake Realtime server {helper_text(result.fake)}"
    if not result.measured:
        why = result.saturated or [f"only {result.calls_up} of {result.calls} calls were up through the window"]
        lines.append(f"{head} SATURATED, figures not reported: {'; '.join(why)}")
        lines += [f"{'':13}{helpers}", f"{'':13}{machine_text(result)}"]
        return lines
    c2m, m2c = result.caller_to_model, result.model_to_caller
    lines += [
        f"{head} CPU {result.cpu_ms:.0f} ms in {result.window_s:.1f} s ({result.core_use:.0%} of a core): "
        f"{result.cpu_ms_per_call_second:.2f} CPU ms per call-second -> {result.calls_per_core:.0f} calls per core",
        f"{'':13}added latency caller->model p50 {c2m.p50_ms:.2f} / p99 {c2m.p99_ms:.2f} / max {c2m.max_ms:.1f} ms; "
        f"model->caller p50 {m2c.p50_ms:.2f} / p99 {m2c.p99_ms:.2f} / max {m2c.max_ms:.1f} ms",
        f"{'':13}RSS idle {result.rss_idle_kib / 1024:.1f} MiB (after the warm-up calls; "
        f"{result.rss_cold_kib / 1024:.1f} MiB before it), at N {result.rss_loaded_kib / 1024:.1f} MiB "
        f"-> {result.rss_per_call_kib:.0f} KiB per call",
        f"{'':13}frames caller->model {result.caller_frames_received}/{result.caller_frames_sent} "
        f"(lost {result.caller_frames_lost}), model->caller {result.agent_frames_received}/{result.agent_frames_sent} "
        f"(lost {result.agent_frames_lost}); marks {result.marks_received} received, {result.marks_echoed} echoed; "
        f"clears {result.clears}; agent audio {result.agent_ms_per_message:.1f} ms per media message",
        f"{'':13}errors: {counts_text(result.errors)}; server warnings: {counts_text(result.server_log)}",
        f"{'':13}{helpers}",
        f"{'':13}{machine_text(result)}",
    ]
    return lines


def machine_text(result: RoundResult) -> str:
    busy = ", ".join(f"{name} {share:.0%}" for name, share in result.cpu_busy.items())
    return (
        f"machine during the window: busy {busy}; processes not ours used {result.other_load_cores:.2f} core, "
        f"steal {result.steal_cores:.2f} core"
    )


def helper_text(use: HelperUse | None) -> str:
    if use is None:
        return "n/a"
    stalls = f", {use.send_stalls} slow sends (flow control or preemption)" if use.send_stalls else ""
    return f"{use.core_use:.0%} of a core, tick lag p99 {use.tick_lag.p99_ms:.2f} ms{stalls}"


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in sorted(counts.items())) or "none"


def label(target: Target, workers: int) -> str:
    name = "bridge+rec" if target == "record" else target
    return name if workers == 1 else f"{name} ({workers} workers)"


@dataclass(frozen=True, slots=True)
class Summary:
    """The medians of one configuration's measured rounds at one N."""

    target: Target
    workers: int
    calls: int
    rounds: int
    """Rounds measured (not saturated or failed), of ``--repeat``."""
    cpu_ms_per_call_second: float
    calls_per_core: float
    caller_to_model_p99_ms: float
    model_to_caller_p99_ms: float
    rss_per_call_kib: float
    headline_ok: bool
    """Every round measured, and the median p99 within 10 ms each way."""

    @classmethod
    def of(cls, results: list[RoundResult], repeat: int) -> Summary | None:
        measured = [result for result in results if result.measured]
        if not measured:
            return None
        first = measured[0]
        cpu = statistics.median([result.cpu_ms_per_call_second for result in measured])
        p99s = (
            statistics.median([result.caller_to_model.p99_ms for result in measured]),
            statistics.median([result.model_to_caller.p99_ms for result in measured]),
        )
        return cls(
            first.target,
            first.workers,
            first.calls,
            len(measured),
            cpu,
            1000 / cpu if cpu else math.inf,
            *p99s,
            statistics.median([result.rss_per_call_kib for result in measured]),
            len(measured) == repeat and all(p99 <= HEADLINE_P99_MS for p99 in p99s),
        )

    def text(self) -> str:
        name = label(self.target, self.workers)
        return (
            f"{name}: {self.cpu_ms_per_call_second:.2f} CPU ms per call-second -> {self.calls_per_core:.0f} calls "
            f"per core; p99 {self.caller_to_model_p99_ms:.2f} / {self.model_to_caller_p99_ms:.2f} ms; "
            f"{self.rss_per_call_kib:.0f} KiB per call ({self.rounds} round{'s' if self.rounds != 1 else ''})"
        )


def report(options: Options, results: list[RoundResult], elapsed_s: float) -> dict[str, Any]:
    info = machine()
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, Python {info['python']}, Linux {info['kernel']}")
    print(f"mode: {delta_mode(options)}; caller audio 20 ms frames at real-time pace")
    pinning = ", ".join(f"{workers} worker(s) on CPU {'1' if workers == 1 else '0-1'}" for workers in options.workers)
    print(
        f"bridge: callbridge serve, {pinning}; load generator and fake server on CPU 0; "
        f"window {options.window_s:g} s after {options.warmup_s:g} s of warm-up; marks echoed when played; "
        f"each configuration {options.repeat} time(s), interleaved"
    )
    summaries: list[Summary] = []
    derived: dict[str, dict[str, float | None]] = {}
    for calls in options.calls:
        print()
        at_n = [result for result in results if result.calls == calls]
        for result in at_n:
            for line in describe(result):
                print(line)
        by_config: dict[tuple[Target, int], list[RoundResult]] = {}
        for result in at_n:
            by_config.setdefault((result.target, result.workers), []).append(result)
        found = {key: Summary.of(group, options.repeat) for key, group in by_config.items()}
        medians = {key: summary for key, summary in found.items() if summary is not None}
        summaries += medians.values()
        kind = "median of measured rounds" if options.repeat > 1 else "summary"
        for summary in medians.values():
            print(f"{'':13}{kind}, {summary.text()}")
        one = medians.get(("bridge", options.workers[0]))
        bare = medians.get(("bare", 1))
        figures: dict[str, float | None] = {"bridge_to_bare_cpu_ratio": None}
        if one is not None and bare is not None and bare.cpu_ms_per_call_second > 0:
            ratio = one.cpu_ms_per_call_second / bare.cpu_ms_per_call_second
            figures["bridge_to_bare_cpu_ratio"] = ratio
            print(f"{'':13}bridge/bare CPU ratio at N={calls}: {ratio:.2f}x")
        if options.recording:
            figures |= recording_cost(calls, one, medians.get(("record", options.workers[0])), bare)
        for workers in options.workers[1:]:
            more = medians.get(("bridge", workers))
            key = f"capacity_{workers}_workers_over_{options.workers[0]}"
            figures[key] = None
            if one is not None and more is not None:
                # Capacity on W cores is W / (CPU per call-second): the ratio of the two.
                scaling = (workers * one.cpu_ms_per_call_second) / (options.workers[0] * more.cpu_ms_per_call_second)
                figures[key] = scaling
                print(
                    f"{'':13}{workers} workers carry {scaling:.2f}x what {options.workers[0]} carries at N={calls} "
                    f"({workers} cores / {more.cpu_ms_per_call_second:.2f} ms against {options.workers[0]} / "
                    f"{one.cpu_ms_per_call_second:.2f} ms per call-second)"
                )
        derived[str(calls)] = figures
    print()
    headline_workers = options.workers[0]
    candidates = [s for s in summaries if s.target == "bridge" and s.workers == headline_workers and s.headline_ok]
    best = max(candidates, key=lambda summary: summary.calls, default=None)
    headline: dict[str, Any] | None = None
    if best is None:
        print("no N qualifies for a headline (a round saturated or failed, or the median p99 > 10 ms)")
    else:
        headline = dataclasses.asdict(best)
        print(
            f"HEADLINE: {best.calls_per_core:.0f} calls per core ({best.cpu_ms_per_call_second:.2f} CPU ms per "
            f"call-second, {best.rss_per_call_kib:.0f} KiB RSS per call, {label('bridge', headline_workers)})"
        )
        print(
            f"calls per core = 1000 / CPU ms per call-second, measured at N={best.calls} (the highest N the load "
            "generator sustains unsaturated on this machine; conservative, since cost per call falls as load rises)"
        )
    print(f"benchmark took {elapsed_s:.0f} s")
    return {
        "machine": info,
        "mode": delta_mode(options),
        "options": dataclasses.asdict(options) | {"json_path": str(options.json_path) if options.json_path else None},
        "rounds": [result.as_json() for result in results],
        "summaries": [dataclasses.asdict(summary) for summary in summaries],
        "figures_by_calls": derived,
        "headline": headline,
        "elapsed_s": elapsed_s,
    }


def recording_cost(
    calls: int, without: Summary | None, recorded: Summary | None, bare: Summary | None
) -> dict[str, float | None]:
    """What recording every call adds (``--recording``): CPU per call-second, and the recorded bridge against the
    bare relay."""
    figures: dict[str, float | None] = {"recording_cpu_ms_per_call_second": None, "record_to_bare_cpu_ratio": None}
    if recorded is not None and bare is not None and bare.cpu_ms_per_call_second > 0:
        ratio = recorded.cpu_ms_per_call_second / bare.cpu_ms_per_call_second
        figures["record_to_bare_cpu_ratio"] = ratio
        print(f"{'':13}bridge+rec/bare CPU ratio at N={calls}: {ratio:.2f}x")
    if recorded is not None and without is not None:
        cost = recorded.cpu_ms_per_call_second - without.cpu_ms_per_call_second
        figures["recording_cpu_ms_per_call_second"] = cost
        print(
            f"{'':13}recording costs {cost:+.3f} CPU ms per call-second at N={calls} "
            f"({cost / without.cpu_ms_per_call_second:+.1%}: {recorded.cpu_ms_per_call_second:.2f} against "
            f"{without.cpu_ms_per_call_second:.2f} without)"
        )
    return figures


def optional(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:{spec}}{unit}"


def soak_report(options: Options, soak: SoakResult, elapsed_s: float) -> dict[str, Any]:
    info = machine()
    result = soak.end
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, Python {info['python']}, Linux {info['kernel']}")
    print(
        f"soak: N={soak.calls} calls carried for {soak.duration_s:g} s once all were up (no hang-ups, no new calls); "
        f"callbridge serve, 1 worker on CPU 1, recording {'on' if options.recording else 'off'}; load generator and "
        "fake server on CPU 0"
    )
    print(
        f"load: {delta_mode(options)}; caller audio 20 ms frames at real-time pace throughout; marks echoed when played"
    )
    print(
        f"RSS idle {result.rss_idle_kib / 1024:.1f} MiB (after the warm-up calls; {result.rss_cold_kib / 1024:.1f} "
        "MiB before it)"
    )
    print()
    print(f"{'t s':>6} {'RSS MiB':>9} {'anon MiB':>9} {'CPU ms/call-s':>14} {'core use':>9} {'other load':>11}")
    for sample in soak.samples:
        print(
            f"{sample.t_s:6.0f} {sample.rss_mib:9.1f} {sample.anon_mib:9.1f} "
            f"{optional(sample.cpu_ms_per_call_second, '.3f'):>14} {optional(sample.core_use, '.0%'):>9} "
            f"{optional(sample.other_load_cores, '.2f'):>11}"
        )
    print(
        "(t: since every call was up; CPU ms per call-second and core use over the 10 s before t; anon: RssAnon; "
        "other load: cores used by processes not started here)"
    )
    print()
    figures = soak.figures()
    print(
        f"RSS after the first minute: {optional(figures.rss_at_settle_mib, '.1f')} MiB at {SOAK_SETTLE_S} s -> "
        f"{optional(figures.rss_at_end_mib, '.1f')} MiB at the end: growth {optional(figures.rss_growth_mib, '+.2f')}"
        f" MiB; slope {optional(figures.rss_slope_mib_per_minute, '+.3f')} MiB per minute"
    )
    print(
        f"CPU after the first minute: slope {optional(figures.cpu_slope_per_minute, '+.4f')} CPU ms per "
        "call-second per minute"
    )
    if figures.cpu_second_minute is None:
        print(f"CPU last minute vs second minute: n/a (needs --soak {2 * MINUTE_S} or more)")
    else:
        overlap = "; the soak is under 180 s, so the two minutes overlap" if figures.minutes_overlap else ""
        print(
            f"CPU per call-second, last minute vs second minute: {optional(figures.cpu_last_minute, '.3f')} vs "
            f"{optional(figures.cpu_second_minute, '.3f')} ms: ratio {optional(figures.cpu_last_over_second, '.3f')}"
            f" ({optional(figures.cpu_change_percent, '+.1f')} %){overlap}"
        )
    if soak.calls_open_at_end is not None and (
        soak.calls_open_at_end != soak.calls or soak.sessions_open_at_end != soak.calls
    ):
        print(
            f"WARNING: {soak.calls_open_at_end} of {soak.calls} calls and {soak.sessions_open_at_end} Realtime "
            "sessions were still open at the end: the per-call figures divide by calls that were not all there"
        )
    print()
    print(f"last {SOAK_SAMPLE_S} s of the soak:")
    for line in describe(result):
        print(line)
    print(f"benchmark took {elapsed_s:.0f} s")
    return {
        "machine": info,
        "mode": "soak",
        "load": delta_mode(options),
        "options": dataclasses.asdict(options) | {"json_path": str(options.json_path) if options.json_path else None},
        "soak": {
            "calls": soak.calls,
            "duration_s": soak.duration_s,
            "sample_s": SOAK_SAMPLE_S,
            "settle_s": SOAK_SETTLE_S,
            "rss_cold_kib": result.rss_cold_kib,
            "rss_idle_kib": result.rss_idle_kib,
            "calls_open_at_end": soak.calls_open_at_end,
            "sessions_open_at_end": soak.sessions_open_at_end,
            "samples": [dataclasses.asdict(sample) for sample in soak.samples],
            "figures": dataclasses.asdict(figures),
            "last_interval": result.as_json(),
        },
        "elapsed_s": elapsed_s,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``--json PATH``; ``-`` prints it to stdout, after the text."""
    encoded = orjson.dumps(data, option=orjson.OPT_INDENT_2)
    if str(path) == "-":
        sys.stdout.write(encoded.decode() + "\n")
        sys.stdout.flush()
    else:
        path.write_bytes(encoded)


async def orchestrate(options: Options) -> None:
    os.sched_setaffinity(0, {0})  # keep CPU 1 for the system under test
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    began = time.monotonic()
    if options.soak_s is not None:
        print(f"[soak] N={options.calls[0]} for {options.soak_s:g} s ...", file=sys.stderr, flush=True)
        soak = await run_soak(options)
        data = soak_report(options, soak, time.monotonic() - began)
        if options.json_path is not None:
            write_json(options.json_path, data)
        return
    results: list[RoundResult] = []
    targets: list[Target] = ["bridge", "record"] if options.recording else ["bridge"]
    configurations: list[tuple[Target, int]] = [(target, workers) for workers in options.workers for target in targets]
    if options.bare:
        configurations.append(("bare", 1))
    for calls in options.calls:
        for _ in range(options.repeat):  # interleaved, so that a slow spell of the machine hits every configuration
            for target, workers in configurations:
                name = label(target, workers)
                print(f"[round] N={calls} {name} ...", file=sys.stderr, flush=True)
                result = await run_round(target, calls, workers, options)
                results.append(result)
                print(f"[round] N={calls} {name} took {result.duration_s:.0f} s", file=sys.stderr, flush=True)
    data = report(options, results, time.monotonic() - began)
    if options.json_path is not None:
        write_json(options.json_path, data)


def parse_options(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="How many concurrent calls callbridge carries per CPU core (see the module docstring)."
    )
    parser.add_argument("--calls", default="20,50,100", help="comma-separated numbers of concurrent calls")
    parser.add_argument("--delta-ms", type=int, default=20, help="agent audio per delta (20: worst case)")
    parser.add_argument("--speed", type=float, help="delta pace, x real time (default: 1 at 20 ms, else 2)")
    parser.add_argument("--response-s", type=float, default=4.0, help="agent audio per response")
    parser.add_argument(
        "--workers",
        default="1",
        help="comma-separated worker counts (callbridge serve --workers), each run at every N: 1,2 shows the scaling",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds per configuration and N, interleaved (medians)")
    parser.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True, help="also run the bare relay")
    parser.add_argument(
        "--recording",
        action="store_true",
        help="also run callbridge serve with every call recorded (bridge+rec), interleaved: recording's cost",
    )
    parser.add_argument(
        "--bare-stack",
        choices=["websockets", "picows"],
        default="picows",
        help="the bare relay's WebSocket stack: picows (callbridge's) or websockets (as most Python relays)",
    )
    parser.add_argument("--ramp-s", type=float, default=3.0, help="calls start spread over this long")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True, help="in the helpers")
    parser.add_argument("--json", type=Path, dest="json_path", help="also write every figure as JSON here (-: stdout)")
    parser.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help=f"soak mode: one N (--calls) carried this long on 1 worker, RSS and CPU read every {SOAK_SAMPLE_S} s",
    )
    parser.add_argument("--role", choices=["fake", "generator"], help=argparse.SUPPRESS)
    parser.add_argument("--role-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    calls = sorted({int(part) for part in args.calls.split(",") if part.strip()})
    if not calls or min(calls) < 1:
        parser.error("--calls needs positive numbers")
    workers = [int(part) for part in args.workers.split(",") if part.strip()]
    if not workers or min(workers) < 1 or len(set(workers)) != len(workers):
        parser.error("--workers needs distinct positive numbers")
    if args.repeat < 1:
        parser.error("--repeat needs a positive number")
    if args.delta_ms < FRAME_MS or args.delta_ms % FRAME_MS:
        parser.error("--delta-ms must be a multiple of 20")
    speed = args.speed if args.speed is not None else (1.0 if args.delta_ms == FRAME_MS else 2.0)
    if args.soak is not None:
        if args.soak < SOAK_MIN_S:
            parser.error(f"--soak needs at least {SOAK_MIN_S} s: its trends are read after the first minute")
        if len(calls) != 1:
            parser.error("--soak takes one number of calls")
        if workers != [1] or args.repeat != 1:
            parser.error("--soak runs one worker, once: no --workers or --repeat")
    options = Options(
        calls=calls,
        delta_ms=args.delta_ms,
        speed=speed,
        response_s=args.response_s,
        workers=workers,
        repeat=args.repeat,
        bare=args.bare,
        recording=args.recording,
        bare_stack=args.bare_stack,
        ramp_s=args.ramp_s,
        warmup_s=args.warmup_s,
        window_s=args.window_s,
        use_uvloop=args.uvloop,
        json_path=args.json_path,
        soak_s=args.soak,
    )
    return options, args


def main() -> None:
    options, args = parse_options()
    if args.role == "fake":
        fake_config = FakeConfig(**orjson.loads(args.role_config))
        run_loop(fake_main(fake_config), options.use_uvloop)
        return
    if args.role == "generator":
        generator_config = GeneratorConfig(**orjson.loads(args.role_config))
        run_loop(generator_main(generator_config), options.use_uvloop)
        return
    try:
        asyncio.run(orchestrate(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every process started was stopped", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        _kill_leftovers()


if __name__ == "__main__":
    main()
