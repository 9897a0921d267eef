"""Standard Webhooks on everything callbridge sends the host application, and the outbox that delivers webhooks:
backoff with full jitter, the same ``webhook-id`` on every attempt, dead after the last attempt, retried by hand."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from callbridge.config import Settings
from callbridge.service.webhooks import BACKOFF_CAP_S, backoff_delay, check_secret, new_secret
from callbridge.telephony import g711 as audio
from callbridge.testing.caller import CallScript, HangUp, Pause, Say
from callbridge.testing.fake_realtime import FakeBehavior
from support import CALLBRIDGE, WEBHOOK_SECRET, WebhookReceiver, api, free_port, receiving, service, wait_until

# --- the delay between attempts ------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_spreads_twelve_attempts_over_about_a_day() -> None:
    highest = [backoff_delay(failed, 60.0, draw=lambda low, high: high) for failed in range(1, 12)]
    assert highest == [60.0 * 2**n for n in range(9)] + [BACKOFF_CAP_S, BACKOFF_CAP_S]
    assert 23 * 3600 <= sum(highest) <= 25 * 3600  # the 11 waits between the 12 attempts, at their longest
    assert backoff_delay(1, 60.0, draw=lambda low, high: low) == 0.0
    assert backoff_delay(10_000, 60.0, draw=lambda low, high: high) == BACKOFF_CAP_S  # no overflow


def test_backoff_is_drawn_at_random_within_its_bounds() -> None:
    draws = random.Random(7)
    for failed in range(1, 30):
        ceiling = min(BACKOFF_CAP_S, 60.0 * 2 ** (failed - 1))
        delays = [backoff_delay(failed, 60.0, draw=draws.uniform) for _ in range(50)]
        assert all(0.0 <= delay <= ceiling for delay in delays), failed
        assert len(set(delays)) > 1  # jitter: deliveries that failed together do not come back together


# --- the key -------------------------------------------------------------------------------------------------


def test_a_url_to_send_to_needs_the_key() -> None:
    with pytest.raises(ValidationError, match="CALLBRIDGE_WEBHOOK_URL set without CALLBRIDGE_WEBHOOK_SECRET"):
        Settings(webhook_url="https://app.example/hooks", _env_file=None)
    with pytest.raises(ValidationError, match="CALLBRIDGE_CONTEXT_URL set without CALLBRIDGE_WEBHOOK_SECRET"):
        Settings(context_url="https://app.example/context", _env_file=None)
    signed = Settings(webhook_url="https://app.example/hooks", webhook_secret=new_secret(), _env_file=None)
    assert signed.webhook_secret is not None
    with pytest.raises(ValidationError, match="whsec_"):
        Settings(webhook_secret="hook-secret", _env_file=None)
    assert Settings(webhook_secret="", _env_file=None).webhook_secret is None  # empty is unset


def test_callbridge_secret_prints_a_new_key() -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("CALLBRIDGE_")}
    printed = [
        subprocess.run([str(CALLBRIDGE), "secret"], capture_output=True, text=True, check=True, env=environment)
        for _ in range(2)
    ]
    keys = [done.stdout.strip() for done in printed]
    assert keys[0] != keys[1]
    for key in keys:
        assert key.startswith("whsec_")
        check_secret(key)
        Webhook(key)  # the reference library takes it


# --- the outbox, through callbridge serve --------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
async def test_a_delivery_dies_after_its_attempts_and_a_retry_delivers_it(tmp_path: Path) -> None:
    port = free_port()
    receiver = WebhookReceiver(up=False)
    env = {
        "CALLBRIDGE_WEBHOOK_URL": f"http://127.0.0.1:{port}/hooks",
        "CALLBRIDGE_WEBHOOK_MAX_ATTEMPTS": "3",
        "CALLBRIDGE_WEBHOOK_BACKOFF_SECONDS": "0.2",
    }
    db = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    behavior = FakeBehavior(transcripts=["Hello."], ms_per_char=20)
    script = CallScript([Pause(1000), Say(audio.tone(600, 330)), Pause(1500), HangUp()])
    async with (
        receiving(receiver, port),
        service(tmp_path, behavior, db, **env) as (running, _),
        api(running) as client,
    ):
        call = await running.caller().place_call(script, max_duration_s=30)

        async def dead() -> list[dict[str, object]]:
            page = await client.get("/api/webhooks/deliveries", params={"status": "dead"})
            assert page.status_code == 200, page.text
            entries: list[dict[str, object]] = page.json()["entries"]
            return entries

        for _ in range(300):  # each wait is at most 0.2 s, then 0.4 s; the outbox polls every second
            if await dead():
                break
            await asyncio.sleep(0.1)
        (entry,) = await dead()
        assert (entry["status"], entry["attempts"], entry["last_status"]) == ("dead", 3, 503)
        assert entry["dead_at"] is not None and "503" in str(entry["last_error"])
        assert len(receiver.attempts) == 3
        # Every attempt was signed afresh, with the one webhook-id of the delivery, which the API shows.
        payloads = [Webhook(WEBHOOK_SECRET).verify(body, headers) for body, headers in receiver.attempts]
        assert {headers["webhook-id"] for _, headers in receiver.attempts} == {entry["webhook_id"]}
        assert all(payload["call"]["call_sid"] == call.call_sid for payload in payloads)
        assert (await client.get("/api/webhooks/deliveries", params={"status": "pending"})).json()["entries"] == []

        receiver.up = True
        retried = await client.post(f"/api/webhooks/deliveries/{entry['id']}/retry")
        assert retried.status_code == 200, retried.text
        assert (retried.json()["status"], retried.json()["attempts"]) == ("pending", 0)
        await wait_until(lambda: receiver.accepted, 15, what="the retried delivery delivered")
        body, headers = receiver.attempts[-1]
        assert headers["webhook-id"] == entry["webhook_id"]  # the receiver can tell it has seen it
        assert Webhook(WEBHOOK_SECRET).verify(body, headers)["event"] == "call.ended"

        async def delivered() -> list[dict[str, object]]:
            page = await client.get("/api/webhooks/deliveries", params={"status": "delivered"})
            found: list[dict[str, object]] = page.json()["entries"]
            return found

        for _ in range(100):  # the receiver has answered; the outbox records it just after
            if await delivered():
                break
            await asyncio.sleep(0.05)
        (done,) = await delivered()
        assert (done["id"], done["last_status"]) == (entry["id"], 204)
        assert await dead() == []
        again = await client.post(f"/api/webhooks/deliveries/{entry['id']}/retry")
        assert again.status_code == 409 and again.json()["detail"]
        assert (await client.post("/api/webhooks/deliveries/999999/retry")).status_code == 404
        assert (await client.get("/api/webhooks/deliveries", params={"status": "lost"})).status_code == 422
        assert (await client.get("/api/webhooks/deliveries", params={"cursor": "nope"})).status_code == 422
        unauthorized = await client.get("/api/webhooks/deliveries", headers={"Authorization": "Bearer wrong"})
        assert unauthorized.status_code == 401
    assert len(receiver.accepted) == 1
    assert running.logs("webhook.dead")
