"""The receiver examples work as written: ``examples/python_receiver`` runs as its own uvicorn process behind
``callbridge serve``, verifies every request and answers it (the context, the post-call webhook, an HTTP tool);
``examples/ruby_receiver`` is valid Ruby."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from callbridge.service.webhooks import WebhookSigner
from callbridge.telephony import g711 as audio
from callbridge.testing.caller import CallScript, HangUp, Pause, Say
from callbridge.testing.fake_realtime import FakeBehavior
from support import WEBHOOK_SECRET, api, free_port, place_outbound, service, wait_closed, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

AGENTS = """
default_agent = "shop"

[agents.shop]
tools = ["lookup_order", "end_call"]

[tools.lookup_order]
description = "Look up an order by its number."
url = "{receiver}/callbridge/tools/lookup_order"
parameters = {{ type = "object", properties = {{ order_id = {{ type = "integer" }} }}, required = ["order_id"] }}
"""


@asynccontextmanager
async def python_receiver(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """``uvicorn app:app`` in the example's folder, as its README runs it; its base URL and its log."""
    port = free_port()
    log_path = tmp_path / f"receiver-{port}.log"
    environment = {**os.environ, "CALLBRIDGE_WEBHOOK_SECRET": WEBHOOK_SECRET}
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)),
            cwd=EXAMPLES / "python_receiver",
            env=environment,
            stdout=log,
            stderr=log,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                if process.returncode is not None:
                    raise RuntimeError(f"the receiver exited: {log_path.read_text()}")
                try:
                    await client.get(f"{base_url}/docs")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the receiver did not start")
        yield base_url, log_path
    finally:
        process.terminate()
        await process.wait()


async def test_the_python_receiver_verifies_and_answers_every_request(tmp_path: Path) -> None:
    behavior = FakeBehavior(
        transcripts=["Where is my order 42?"],
        tool_cues={"order": ("lookup_order", '{"order_id": 42}')},
        ms_per_char=20,
    )
    async with python_receiver(tmp_path) as (receiver, receiver_log):
        async with httpx.AsyncClient(base_url=receiver) as client:
            body = json.dumps({"call_sid": "CA1", "reference": "customer-42"}).encode()
            unsigned = await client.post("/callbridge/context", content=body)
            assert unsigned.status_code == 401  # nothing is read before the signature is verified
            forged = WebhookSigner("whsec_" + "Zm9yZ2Vk" * 4).headers(body)
            assert (await client.post("/callbridge/context", content=body, headers=forged)).status_code == 401
            signed = await client.post(
                "/callbridge/context", content=body, headers=WebhookSigner(WEBHOOK_SECRET).headers(body)
            )
            assert signed.status_code == 200 and signed.json()["name"] == "Ada"

        (tmp_path / "shop.toml").write_text(AGENTS.format(receiver=receiver))
        env = {
            "CALLBRIDGE_CONTEXT_FUNCTION": "",
            "CALLBRIDGE_CONTEXT_URL": f"{receiver}/callbridge/context",
            "CALLBRIDGE_WEBHOOK_URL": f"{receiver}/callbridge/webhooks",
            "CALLBRIDGE_AGENTS_FILE": str(tmp_path / "shop.toml"),
        }
        db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
        async with service(tmp_path, behavior, db, **env) as (running, twilio), api(running) as client:
            call_sid, create = await place_outbound(client, twilio)
            twiml = create.form["Twiml"][0]
            script = CallScript([Pause(3000), Say(audio.tone(800, 330)), Pause(5000), HangUp()])
            await running.caller().place_call(script, twiml=twiml, call_sid=call_sid, max_duration_s=30)
            await wait_closed(running.fake.sessions)
            await running.wait_for_logs("call.summary", 1)
            lines = (await client.get(f"/api/calls/{call_sid}/transcript")).json()["lines"]

            # The context the receiver answered: the agent greeted Ada as the receiver said to.
            assert lines[0]["speaker"] == "agent"
            assert lines[0]["text"] == "Hello Ada, this is Bright Dental calling about your appointment tomorrow."
            # The tool: the model's call went to the receiver, and its answer came back to the model.
            (session,) = running.fake.sessions
            outputs = [
                json.loads(event["item"]["output"])
                for event in session.client_events
                if event["type"] == "conversation.item.create" and event["item"]["type"] == "function_call_output"
            ]
            assert outputs == [{"order_id": 42, "found": True, "status": "shipped", "delivery": "Thursday"}]
            assert "shipped" in lines[-1]["text"] and "Thursday" in lines[-1]["text"]
            # The post-call webhook: verified and taken by the receiver (it logs only what it verified).
            await wait_until(lambda: f"call.ended {call_sid}" in receiver_log.read_text(), 15, what="call.ended")
    log = receiver_log.read_text()
    assert f"lookup_order 42 for {call_sid}" in log and f"context for {call_sid} (reference customer-42)" in log
    (ended,) = [line for line in log.splitlines() if f"call.ended {call_sid}" in line]
    assert "Where is my order 42?" in ended and "refused a request" in log  # the unsigned and forged ones above


def test_the_ruby_receiver_is_valid_ruby() -> None:
    ruby = shutil.which("ruby")
    assert ruby, "ruby is not installed (make install-test installs Debian's)"
    checked = subprocess.run([ruby, "-c", str(EXAMPLES / "ruby_receiver" / "app.rb")], capture_output=True, text=True)
    assert checked.returncode == 0 and "Syntax OK" in checked.stdout, checked.stderr
    gemfile = (EXAMPLES / "ruby_receiver" / "Gemfile").read_text()
    assert '"standardwebhooks"' in gemfile and '"sinatra"' in gemfile
