"""Live call control end to end: ``callbridge serve --workers 2`` with Redis, a simulated call carried by one of the
workers, and say, instruct and transfer sent to the shared port, landing on either worker; without Redis, the worker
that does not carry the call says so; ``callbridge say`` and ``callbridge instruct`` against a live call."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from callbridge.testing.caller import CallRecording, CallScript, Pause
from callbridge.testing.fake_realtime import FakeBehavior, FakeSession
from callbridge.testing.fake_twilio import FakeTwilio
from support import CALLBRIDGE, GREETING, Service, api, cli, redirects, service, twilio_call, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/5"
TRANSFER_TO = "+15550107777"


def behavior() -> FakeBehavior:
    return FakeBehavior(greeting=GREETING, ms_per_char=10, speed=0)


def redis() -> dict[str, str]:
    return {"CALLBRIDGE_REDIS_URL": REDIS_URL, "CALLBRIDGE_REDIS_PREFIX": f"test-{secrets.token_hex(6)}"}


def database(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"


async def live_call(
    running: Service, twilio: FakeTwilio, hang_up: asyncio.Event | None = None
) -> tuple[str, asyncio.Task[CallRecording]]:
    """A call Twilio knows, connected to the agent and live (its greeting said); the caller stays on, silent, until
    ``hang_up`` is set."""
    call_sid = await twilio_call(twilio)
    sessions_before = len(running.fake.sessions)
    script = CallScript([Pause(500)])
    placed = running.caller().place_call(script, call_sid=call_sid, max_duration_s=60, hang_up=hang_up)
    call = asyncio.create_task(placed)
    await wait_until(lambda: len(running.fake.sessions) > sessions_before, 10, what="the model connected")
    session = running.fake.sessions[sessions_before]
    await wait_until(lambda: session.server_events_of("response.done"), 10, what="the greeting")
    async with api(running) as client:  # on record as carried (by whom): what the other worker goes by
        for _ in range(200):
            if (await client.get(f"/api/calls/{call_sid}")).json()["owner"]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the call was never on record as carried")
    return call_sid, call


def said(session: FakeSession) -> list[str]:
    """The instructions of each response.create the service sent the model."""
    return [
        (event.get("response") or {}).get("instructions") or ""
        for event in session.client_events
        if event["type"] == "response.create"
    ]


def system_messages(session: FakeSession) -> list[str]:
    return [
        part.get("text", "")
        for event in session.client_events
        if event["type"] == "conversation.item.create" and event["item"].get("role") == "system"
        for part in event["item"]["content"]
    ]


async def fresh(running: Service, path: str, body: dict[str, Any]) -> httpx.Response:
    """One request on a connection of its own: the kernel hands each new connection to either worker."""
    async with api(running) as client:
        return await client.post(path, json=body)


async def from_both_workers(running: Service, path: str, texts: list[str], body: dict[str, Any]) -> set[str]:
    """Send the command (a new text each time) on fresh connections until both workers have taken one, at least
    twice in all; every answer is a 202 from the worker that carries the call. Returns the answering pids."""
    pids: set[str] = set()
    carriers: set[str] = set()
    for attempt in range(40):
        text = f"{path.rsplit('/', 1)[-1]} number {attempt}."
        response = await fresh(running, path, {**body, "text": text})
        assert response.status_code == 202, response.text
        pids.add(response.headers["x-callbridge-worker"])
        carriers.add(response.json()["carried_by"])
        texts.append(text)
        if len(pids) == 2 and len(texts) >= 2:
            break
    assert len(pids) == 2, "no request reached the worker that does not carry the call"
    assert len(carriers) == 1, carriers  # one process carries the call and took every command
    return pids


async def test_say_instruct_and_transfer_reach_the_call_from_either_worker_through_redis(tmp_path: Path) -> None:
    async with (
        service(tmp_path, behavior(), database(tmp_path), workers="2", **redis()) as (running, twilio),
        api(running) as client,
    ):
        call_sid, call = await live_call(running, twilio)
        session = running.fake.sessions[-1]
        base = f"/api/calls/{call_sid}"
        spoken: list[str] = []
        await from_both_workers(running, f"{base}/say", spoken, {})
        told: list[str] = []
        await from_both_workers(running, f"{base}/instruct", told, {"respond": False})

        too_long = await fresh(running, f"{base}/say", {"text": "x" * 4001})
        assert too_long.status_code == 422 and "4000" in too_long.text
        unknown = await fresh(running, f"/api/calls/CA{'0' * 32}/say", {"text": "Hello?"})
        assert unknown.status_code == 404
        after = await fresh(running, f"{base}/say", {"text": "Still here.", "interrupt": True})  # the call goes on
        assert after.status_code == 202, after.text

        def all_said() -> bool:
            instructions = "\n".join(said(session))
            return all(f"saying exactly: {text}" in instructions for text in [*spoken, "Still here."])

        await wait_until(all_said, 15, what="every say reached the model as a response.create")
        assert set(told) <= set(system_messages(session))

        transfer = await fresh(running, f"{base}/transfer", {"to": TRANSFER_TO, "say": "Putting you through now."})
        assert transfer.status_code == 202, transfer.text
        recording = await asyncio.wait_for(call, 30)
        assert recording.ended_by == "server"
        assert any("saying exactly: Putting you through now." in text for text in said(session))
        (dial,) = [twiml.find("Dial") for twiml in redirects(twilio, call_sid) if twiml.find("Dial") is not None]
        assert dial is not None and dial.text == TRANSFER_TO

        async def recorded_end() -> dict[str, Any]:
            record: dict[str, Any] = (await client.get(base)).json()
            return record

        for _ in range(100):
            if (record := await recorded_end())["end_reason"]:
                break
            await asyncio.sleep(0.05)
        assert record["end_reason"] == "transferred"
        for path, body in [("say", {"text": "Hello?"}), ("transfer", {"to": TRANSFER_TO})]:
            ended = await fresh(running, f"{base}/{path}", body)
            assert ended.status_code == 409 and ended.json()["code"] == "not_live", ended.text
        kinds = [event["kind"] for event in (await client.get(f"{base}/events")).json()]
    assert kinds.count("say") == len(spoken) + 1 and kinds.count("instruct") == len(told)
    assert "transfer" in kinds


async def test_without_redis_the_worker_that_does_not_carry_the_call_refuses_it_here(tmp_path: Path) -> None:
    async with service(tmp_path, behavior(), database(tmp_path), workers="2") as (running, twilio):
        hang_up = asyncio.Event()
        call_sid, call = await live_call(running, twilio, hang_up)
        outcomes: dict[int, httpx.Response] = {}
        for attempt in range(40):
            response = await fresh(running, f"/api/calls/{call_sid}/say", {"text": f"Attempt {attempt}."})
            outcomes.setdefault(response.status_code, response)
            if len(outcomes) == 2:
                break
        hang_up.set()
        await asyncio.wait_for(call, 10)
    assert set(outcomes) == {202, 409}, {status: r.text for status, r in outcomes.items()}
    carried_by = outcomes[202].json()["carried_by"]
    refused = outcomes[409].json()
    assert refused["code"] == "not_live_here" and carried_by in refused["detail"], refused


async def test_callbridge_say_and_instruct_reach_a_live_call(tmp_path: Path) -> None:
    async with service(tmp_path, behavior(), database(tmp_path)) as (running, twilio):
        call_sid, call = await live_call(running, twilio)
        session = running.fake.sessions[-1]
        said_out = await cli(running, "say", call_sid, "Your table is ready.", "--interrupt")
        told_out = await cli(running, "instruct", call_sid, "The order was just refunded.", "--respond")
        await wait_until(lambda: any("exactly: Your table is ready." in text for text in said(session)), 10)
        assert "The order was just refunded." in system_messages(session)
        unknown = await cli(running, "say", f"CA{'0' * 32}", "Hello?", status=4)
        transfer = await fresh(running, f"/api/calls/{call_sid}/transfer", {"to": TRANSFER_TO})
        assert transfer.status_code == 202
        await asyncio.wait_for(call, 30)
        ended = await cli(running, "instruct", call_sid, "Too late.", status=4)
    assert said_out.startswith(f"{call_sid}: say taken") and told_out.startswith(f"{call_sid}: instruct taken")
    assert "404" in unknown and "no such call" in unknown
    assert "409" in ended and "ended" in ended


def test_the_help_of_say_and_instruct_reads_cleanly() -> None:
    for command, flag in [("say", "--interrupt"), ("instruct", "--respond")]:
        done = subprocess.run([str(CALLBRIDGE), command, "--help"], capture_output=True, text=True, check=True)
        assert "{CALL_SID} {TEXT}" in done.stdout and flag in done.stdout and "--url URL" in done.stdout, done.stdout
        for noise in ("<str>", "<bool>", "``", "[]"):
            assert noise not in done.stdout, noise
