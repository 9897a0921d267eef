"""Schemathesis against the published OpenAPI of a running ``callbridge serve``: no 500s, auth enforced."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from callbridge.testing.fake_twilio import FakeTwilio
from support import free_port

from conftest import secret

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.fuzz]

ACCOUNT_SID = "AC" + "5" * 32
AUTH_TOKEN = secret("fuzz-twilio-token")
API_TOKEN = secret("fuzz-api-token")


@pytest.fixture(scope="module")
def fake_twilio_url() -> Iterator[str]:
    """A fake Twilio REST API on its own event loop, in a thread (schemathesis drives the API synchronously)."""
    loop = asyncio.new_event_loop()
    urls: list[str] = []
    ready = threading.Event()
    stop = asyncio.Event()

    async def run() -> None:
        async with FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio:
            urls.append(twilio.base_url)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the fake Twilio REST API did not start"
    yield urls[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(5)


@pytest.fixture(scope="module")
def api_url(fake_twilio_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = {
        **os.environ,
        "CALLBRIDGE_PUBLIC_URL": url,
        "CALLBRIDGE_REALTIME_URL": "ws://127.0.0.1:9/v1/realtime",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_API_BASE_URL": fake_twilio_url,
        "CALLBRIDGE_API_TOKEN": API_TOKEN,
        "CALLBRIDGE_SECRET": secret("fuzz-callbridge-secret"),
        "CALLBRIDGE_LOG_LEVEL": "warning",
    }
    log = (folder / "serve.log").open("wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("callbridge")), "serve", "--port", str(port)],
        env=environment,
        cwd=folder,
        stdout=log,
        stderr=log,
    )
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"callbridge serve did not start: {(folder / 'serve.log').read_text()}")
        yield url
    finally:
        process.terminate()
        process.wait()
        log.close()


def test_no_server_errors(api_url: str) -> None:
    """Every operation, with generated bodies, paths and queries: never a 5xx."""
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operations.append(result.ok())
    assert len([op for op in operations if op.path.startswith("/api/")]) == 25
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case[Any]) -> None:
            response = case.call(headers={"Authorization": f"Bearer {API_TOKEN}"})
            case.validate_response(response, checks=[not_a_server_error])

        check()


def test_every_api_route_requires_the_token(api_url: str) -> None:
    spec = httpx.get(f"{api_url}/openapi.json").json()
    routes = [(method, path) for path, item in spec["paths"].items() for method in item if path.startswith("/api/")]
    assert len(routes) == 25
    for method, path in routes:
        concrete = path.replace("{call_sid}", "CA" + "0" * 32).replace("{delivery_id}", "1")
        concrete = concrete.replace("{campaign_id}", "cmp_0").replace("{number}", "+12025550123")
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.request(method, f"{api_url}{concrete}", headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)


def test_bodies_that_cannot_be_signed_are_refused(api_url: str) -> None:
    headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
    surrogate = '{"to": "+15550100009", "from": "+15550100001", "say": "\\ud99f"}'
    huge = (
        '{"to": "+15550100009", "from": "+15550100001", '
        '"context": {"metadata": {"n": 95976728519310280612816655282341937152}}}'
    )
    for body in (surrogate, huge):
        response = httpx.post(f"{api_url}/api/calls", content=body, headers=headers)
        assert response.status_code == 422, response.text
