"""Live events end to end: ``callbridge serve --workers 2`` with Redis, a client of one worker following a call the
other carries, its reconnection with ``Last-Event-ID``, refused ids; without Redis, the webhook's copy of each line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from httpx_sse import ServerSentEvent, aconnect_sse

from callbridge.telephony import g711 as audio
from callbridge.testing.caller import CallScript, HangUp, Pause, Say
from callbridge.testing.fake_realtime import FakeBehavior
from support import API_TOKEN, CALLBRIDGE, GREETING, Service, api, free_port, service, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/5"
Received = list[tuple[float, ServerSentEvent]]


def behavior() -> FakeBehavior:
    return FakeBehavior(
        transcripts=["I would like to know your opening hours.", "And on Sundays?"],
        reply=lambda text: "We are closed on Sundays." if "Sundays" in text else "We open at nine.",
        greeting=GREETING,
        ms_per_char=30,
    )


def two_turns() -> CallScript:
    """Five lines: the greeting, a question and its answer, a pause (the client is away), a question, its answer."""
    return CallScript(
        [Pause(2500), Say(audio.tone(900, 330)), Pause(3500), Say(audio.tone(700, 440)), Pause(2500), HangUp()]
    )


async def listen(running: Service, path: str, received: Received, opened: asyncio.Future[str], **headers: str) -> None:
    """Follow a live stream on a connection of its own, keeping each event with the time it arrived."""
    async with api(running) as client, aconnect_sse(client, "GET", path, headers=headers) as source:
        source.response.raise_for_status()
        opened.set_result(source.response.headers["x-callbridge-worker"])
        async for event in source.aiter_sse():
            received.append((time.time(), event))


@contextlib.asynccontextmanager
async def following(running: Service, path: str, received: Received, **headers: str) -> AsyncIterator[str]:
    """:func:`listen` while inside; yields the pid of the worker that serves the stream."""
    opened: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(listen(running, path, received, opened, **headers))
    try:
        yield await asyncio.wait_for(asyncio.shield(opened), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def lines(received: Received) -> list[tuple[float, ServerSentEvent]]:
    return [(at, event) for at, event in received if event.event == "transcript.line"]


def committed(running: Service) -> list[tuple[float, str]]:
    """When each transcript line was committed (logged after its write), and its text."""
    logged = running.logs("transcript.line")
    return [(datetime.fromisoformat(line["timestamp"]).timestamp(), line["text"]) for line in logged]


async def carrier(client: httpx.AsyncClient, call_sid: str) -> str:
    """The pid of the worker that carries the call, from its record's owner (host:pid:start)."""
    owner: list[str] = []

    async def owned() -> bool:
        response = await client.get(f"/api/calls/{call_sid}")
        if response.status_code == 200 and response.json()["owner"]:
            owner.append(response.json()["owner"])
        return bool(owner)

    for _ in range(200):
        if await owned():
            return owner[0].split(":")[1]
        await asyncio.sleep(0.05)
    raise AssertionError("the call was never carried")


async def refused_ids(running: Service, client: httpx.AsyncClient, call_sid: str) -> None:
    garbage = f"garbage-{secrets.token_hex(8)}"
    future = f"{int(time.time() * 1000) + 3_600_000}-0"
    for value, reason in [(garbage, "event id"), (future, "future"), ("1-0;DROP", "event id")]:
        response = await client.get(f"/api/calls/{call_sid}/live", headers={"Last-Event-ID": value})
        assert response.status_code == 400 and reason in response.json()["detail"], response.text
    assert (await client.get("/api/live", headers={"Last-Event-ID": garbage})).status_code == 400
    async with httpx.AsyncClient(base_url=running.base_url) as anonymous:
        assert (await anonymous.get(f"/api/calls/{call_sid}/live")).status_code == 401
    assert (await client.get(f"/api/calls/CA{'0' * 32}/live")).status_code == 404
    assert len(await running.wait_for_logs("live.bad_last_event_id", 4)) == 4
    assert garbage not in running.log_path.read_text()


async def test_a_client_of_one_worker_follows_a_call_the_other_carries_and_resumes_after_its_last_event(
    tmp_path: Path,
) -> None:
    redis = {"CALLBRIDGE_REDIS_URL": REDIS_URL, "CALLBRIDGE_REDIS_PREFIX": f"test-{secrets.token_hex(6)}"}
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    async with service(tmp_path, behavior(), db, workers="2", **redis) as (running, _), api(running) as client:
        call_sid = "CA" + uuid.uuid4().hex
        call = asyncio.create_task(running.caller().place_call(two_turns(), call_sid=call_sid, max_duration_s=30))
        pid = await carrier(client, call_sid)
        before: Received = []
        for _ in range(40):  # new connections until the kernel hands one to the other worker
            async with following(running, f"/api/calls/{call_sid}/live", before) as worker:
                if worker == pid:
                    before.clear()
                    continue
                opened_at = time.time()
                await wait_until(lambda: len(lines(before)) >= 3, 10, what="three lines from the other worker")
                break
        else:
            raise AssertionError("no connection reached the worker that does not carry the call")
        last_id = before[-1][1].id
        await wait_until(lambda: len(committed(running)) >= 4, 10, what="the fourth line committed while away")
        after: Received = []
        async with following(running, f"/api/calls/{call_sid}/live", after, **{"Last-Event-ID": last_id}):
            await wait_until(lambda: lines(after), 5, what="the missed line")
            missed = [event.json()["text"] for _, event in lines(after)]
            await refused_ids(running, client, call_sid)
            await call
            await wait_until(lambda: any(event.event == "call.ended" for _, event in after), 10, what="the end")
        texts = [text for _, text in committed(running)]

    assert len(texts) == 5 and texts[0] == GREETING
    assert [event.json()["text"] for _, event in lines(before)] == texts[:3]
    assert missed == [texts[3]]  # the line that completed while the client was away, and only it
    assert [event.json()["text"] for _, event in lines(after)] == texts[3:]  # then the rest, nothing twice
    ids = [event.id for _, event in before + after]
    assert len(ids) == len(set(ids))
    commits = {text: at for at, text in committed(running)}
    for at, event in lines(before):
        if commits[event.json()["text"]] > opened_at:
            assert at - commits[event.json()["text"]] < 1.0, event.data
    ended = next(event.json() for _, event in after if event.event == "call.ended")
    assert ended["end_reason"] == "caller_hung_up"


class Hooks:
    """The host application's webhook endpoint, keeping each payload."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.app = FastAPI()
        self.app.post("/hooks")(self.hook)

    async def hook(self, request: Request) -> Response:
        self.payloads.append(json.loads(await request.body()))
        return Response(status_code=204)


async def test_each_line_is_posted_to_the_webhook_and_one_process_streams_without_redis(tmp_path: Path) -> None:
    port = free_port()
    hooks = Hooks()
    server = uvicorn.Server(uvicorn.Config(hooks.app, host="127.0.0.1", port=port, log_config=None))
    serving = asyncio.create_task(server.serve())
    env = {
        "CALLBRIDGE_WEBHOOK_URL": f"http://127.0.0.1:{port}/hooks",
        "CALLBRIDGE_WEBHOOK_EVENTS": "transcript.line, call.ended",
    }
    script = CallScript([Pause(1000), Say(audio.tone(600, 330)), Pause(2000), HangUp()])
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    try:
        async with service(tmp_path, FakeBehavior(transcripts=["Hello."], ms_per_char=20), db, **env) as (running, _):
            recording = await running.caller().place_call(script, max_duration_s=30)
            await wait_until(lambda: any(p["event"] == "call.ended" for p in hooks.payloads), 15, what="the end")
            received: Received = []
            async with following(running, f"/api/calls/{recording.call_sid}/live", received):
                await wait_until(lambda: any(event.event == "call.ended" for _, event in received), 5)
            watched = await watch(running, recording.call_sid)
    finally:
        server.should_exit = True
        await serving

    posted = [(p["event"], p.get("data", {}).get("speaker")) for p in hooks.payloads]
    said = [("transcript.line", "agent"), ("transcript.line", "caller"), ("transcript.line", "agent")]
    assert posted == [*said, ("call.ended", None)]
    assert {p.get("call_sid") or p["call"]["call_sid"] for p in hooks.payloads} == {recording.call_sid}
    kinds = [event.event for _, event in received]
    # Started first, ended after every line (Twilio's stream-status callback may still add an event after it).
    assert kinds[0] == "call.started" and "call.ended" in kinds, kinds
    assert "transcript.line" not in kinds[kinds.index("call.ended") :], kinds
    phases = [event.json().get("phase") for _, event in received if event.event == "call.updated"]
    # After call.started: connecting (unless the model confirmed first), then live, then ended.
    assert [phase for phase in phases if phase] in (["connecting", "live", "ended"], ["live", "ended"]), phases
    assert [event.json()["speaker"] for _, event in lines(received)] == ["agent", "caller", "agent"]
    # While the agent speaks, its words so far: each a beginning of one of its lines.
    partials = [event.json() for _, event in received if event.event == "transcript.partial"]
    agent_lines = [event.json()["text"] for _, event in lines(received) if event.json()["speaker"] == "agent"]
    assert partials and all(p["speaker"] == "agent" for p in partials), kinds
    assert all(any(line.startswith(p["text"]) for line in agent_lines) for p in partials), (partials, agent_lines)
    # callbridge watch replays the call (it has ended) and stops at its end.
    spoken = [event.json()["text"] for _, event in lines(received)]
    printed = [line for line in watched.splitlines() if ": " in line and "s " in line and not line.startswith("…")]
    assert [line.split(": ", 1)[1] for line in printed] == spoken, watched
    assert "started" in watched and "end_reason=caller_hung_up" in watched


async def watch(running: Service, call_sid: str) -> str:
    """``callbridge watch CALL_SID`` against the service, once it has exited (at the call's end)."""
    process = await asyncio.create_subprocess_exec(
        *(str(CALLBRIDGE), "watch", call_sid, "--url", running.base_url, "--token", API_TOKEN),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def test_watch_help_reads_cleanly() -> None:
    done = subprocess.run([str(CALLBRIDGE), "watch", "--help"], capture_output=True, text=True, check=True)
    assert "[CALL_SID]" in done.stdout and "--url URL" in done.stdout and "--token TOKEN" in done.stdout
    for noise in ("<str>", "<bool>", "``", "[]"):
        assert noise not in done.stdout, noise


async def test_with_redis_down_calls_go_on_and_the_lost_events_are_logged_and_counted(tmp_path: Path) -> None:
    dead = {"CALLBRIDGE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/5"}  # nothing listens there
    script = CallScript([Pause(1000), Say(audio.tone(600, 330)), Pause(2000), HangUp()])
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    behavior = FakeBehavior(transcripts=["Hello."], ms_per_char=20)
    async with service(tmp_path, behavior, db, **dead) as (running, _), api(running) as client:
        recording = await running.caller().place_call(script, max_duration_s=30)
        await running.wait_for_logs("call.summary", 1)
        transcript = (await client.get(f"/api/calls/{recording.call_sid}/transcript")).json()["lines"]
        await wait_until(lambda: running.logs("live.redis_unavailable"), 5, what="the outage logged")
        exposition = (await client.get("/metrics")).text
    assert [line["speaker"] for line in transcript] == ["agent", "caller", "agent"]
    assert running.logs("call.summary")[0]["reason"] == "caller_hung_up"
    lost = [line for line in exposition.splitlines() if line.startswith("callbridge_live_events_lost_total{")]
    assert any('reason="failed",type="transcript.line"' in line for line in lost), lost
