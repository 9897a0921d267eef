"""``<Stream statusCallback>``: Twilio's stream-started, stream-stopped and stream-error requests, end to end over
real sockets (``callbridge serve`` as a subprocess, the fake Realtime server, simulated callers)."""

from __future__ import annotations

import secrets
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import pytest
from twilio.request_validator import RequestValidator

from callbridge.telephony.twiml import connect_stream_twiml
from callbridge.testing.caller import STREAM_ERRORS, CallRefused, CallScript, HangUp, Pause
from callbridge.testing.fake_realtime import FakeBehavior
from support import AUTH_TOKEN, Service, serve

from conftest import secret

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

API_TOKEN = secret("stream-status-api-" + secrets.token_hex(8))
ACCOUNT_SID = "AC" + "5" * 32


def new_call_sid() -> str:
    return "CA" + uuid.uuid4().hex


def api(running: Service) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=running.base_url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10)


async def signed_post(running: Service, path: str, form: dict[str, str], *, signature: str | None = None) -> int:
    """A webhook as Twilio sends it: form-encoded, signed over the public URL (``signature`` overrides that)."""
    url = f"{running.base_url}{path}"
    if signature is None:
        signature = RequestValidator(AUTH_TOKEN).compute_signature(url, form)
    headers = {"X-Twilio-Signature": signature} if signature else {}
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.post(url, data=form, headers=headers)).status_code


async def voice_webhook(running: Service, call_sid: str) -> str:
    """Twilio's incoming-call request: callbridge records the call and answers the TwiML."""
    form = {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "From": "+15550100001", "To": "+15550100002"}
    url = f"{running.base_url}/twilio/voice"
    headers = {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(url, form)}
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(url, data=form, headers=headers)
    assert response.status_code == 200, response.text
    return response.text


def stream_status_form(call_sid: str, event: str, **extra: str) -> dict[str, str]:
    return {
        "AccountSid": ACCOUNT_SID,
        "CallSid": call_sid,
        "StreamSid": "MZ" + uuid.uuid4().hex,
        "StreamName": "callbridge",
        "StreamEvent": event,
        "Timestamp": "2025-01-01T00:00:00.000Z",
        **extra,
    }


async def events_of(running: Service, call_sid: str) -> list[dict[str, Any]]:
    async with api(running) as client:
        response = await client.get(f"/api/calls/{call_sid}/events")
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()
    return events


def stream_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event["kind"].startswith("stream_")]


def test_stream_status_callback_on_the_stream() -> None:
    twiml = connect_stream_twiml(
        "wss://bridge.example/twilio/media-stream", {"cb": "x"}, status_callback="https://bridge.example/s?a=1&b=2"
    )
    stream = ET.fromstring(twiml).find("Connect/Stream")
    assert stream is not None
    assert stream.attrib == {
        "url": "wss://bridge.example/twilio/media-stream",
        "statusCallback": "https://bridge.example/s?a=1&b=2",
        "statusCallbackMethod": "POST",
    }
    plain = ET.fromstring(connect_stream_twiml("wss://bridge.example/twilio/media-stream", {})).find("Connect/Stream")
    assert plain is not None and "statusCallback" not in plain.attrib


async def test_a_call_records_its_stream_starting_and_stopping(tmp_path: Path) -> None:
    behavior = FakeBehavior(ms_per_char=20)
    async with serve(tmp_path, behavior, CALLBRIDGE_API_TOKEN=API_TOKEN) as running:
        seen: list[dict[str, Any]] = []
        recording = await running.caller().place_call(
            CallScript([Pause(1500), HangUp()]),
            max_duration_s=30,
            on_event=lambda kind, data: seen.append(data) if kind == "stream_status" else None,
        )
        # The TwiML callbridge answered names its status callback on the <Stream>.
        stream = ET.fromstring(recording.twiml).find("Connect/Stream")
        assert stream is not None
        assert stream.get("statusCallback") == f"{running.base_url}/twilio/stream-status"
        assert stream.get("statusCallbackMethod") == "POST"
        # The caller reported the stream's life there, as Twilio does, and callbridge took both.
        assert recording.stream_status_callbacks == [("stream-started", 204), ("stream-stopped", 204)]
        assert seen == [
            {"event": "stream-started", "status_code": 204},
            {"event": "stream-stopped", "status_code": 204},
        ]
        await running.wait_for_logs("call.summary", 1)
        recorded = stream_events(await events_of(running, recording.call_sid))
        assert [event["kind"] for event in recorded] == ["stream_started", "stream_stopped"]
        for event in recorded:
            assert event["data"]["stream_sid"] == recording.stream_sid
            assert event["data"]["name"] == recording.stream_sid  # the <Stream> has no name of its own
            assert event["data"]["timestamp"].endswith("Z")
            assert "code" not in event["data"]
        assert running.logs("twilio.stream_started") and running.logs("twilio.stream_stopped")
        assert not running.logs("twilio.stream_error")


async def test_a_stream_error_is_recorded_and_logged_with_its_code(tmp_path: Path) -> None:
    behavior = FakeBehavior(ms_per_char=20)
    async with serve(tmp_path, behavior, CALLBRIDGE_API_TOKEN=API_TOKEN) as running:
        call_sid = new_call_sid()
        await voice_webhook(running, call_sid)
        message = "Stream - WebSocket - Handshake Error (31920)"
        form = stream_status_form(call_sid, "stream-error", StreamError=message)
        assert await signed_post(running, "/twilio/stream-status", form) == 204

        (event,) = stream_events(await events_of(running, call_sid))
        assert event["kind"] == "stream_error"
        assert event["data"] == {
            "stream_sid": form["StreamSid"],
            "name": "callbridge",
            "timestamp": "2025-01-01T00:00:00.000Z",
            "message": message,
            "code": 31920,
        }
        (line,) = await running.wait_for_logs("twilio.stream_error", 1)
        assert (line["level"], line["code"], line["message"], line["call_sid"]) == ("error", 31920, message, call_sid)

        # An error without a code in it is kept as it came, with no code.
        form = stream_status_form(call_sid, "stream-error", StreamError="something went wrong")
        assert await signed_post(running, "/twilio/stream-status", form) == 204
        errors = stream_events(await events_of(running, call_sid))
        assert [(event["data"]["message"], event["data"]["code"]) for event in errors] == [
            (message, 31920),
            ("something went wrong", None),
        ]


async def test_a_misconfigured_stream_url_shows_as_a_stream_error(tmp_path: Path) -> None:
    """The simulated caller, like Twilio, reports a refused WebSocket handshake to the status callback."""
    behavior = FakeBehavior(ms_per_char=20)
    async with serve(tmp_path, behavior, CALLBRIDGE_API_TOKEN=API_TOKEN) as running:
        call_sid = new_call_sid()
        twiml = await voice_webhook(running, call_sid)
        wrong = twiml.replace("/twilio/media-stream", "/twilio/media-streams")
        assert wrong != twiml
        with pytest.raises(CallRefused):
            await running.caller().place_call(CallScript([Pause(500)]), twiml=wrong, call_sid=call_sid)

        (event,) = stream_events(await events_of(running, call_sid))
        code, text = STREAM_ERRORS["handshake"]
        assert (event["kind"], event["data"]["code"]) == ("stream_error", code)
        assert code == 31920 and text in event["data"]["message"]
        (line,) = await running.wait_for_logs("twilio.stream_error", 1)
        assert (line["level"], line["code"], line["call_sid"]) == ("error", 31920, call_sid)
        assert text in line["message"]
        assert not running.fake.sessions  # no stream, no model


async def test_unsigned_and_badly_signed_callbacks_are_refused(tmp_path: Path) -> None:
    behavior = FakeBehavior(ms_per_char=20)
    async with serve(tmp_path, behavior, CALLBRIDGE_API_TOKEN=API_TOKEN) as running:
        call_sid = new_call_sid()
        await voice_webhook(running, call_sid)
        form = stream_status_form(call_sid, "stream-error", StreamError="31920 Stream - WebSocket - Handshake Error")
        other_url = RequestValidator(AUTH_TOKEN).compute_signature(f"{running.base_url}/twilio/status", form)
        other_token = RequestValidator("not-the-token").compute_signature(
            f"{running.base_url}/twilio/stream-status", form
        )
        assert await signed_post(running, "/twilio/stream-status", form, signature="") == 403
        assert await signed_post(running, "/twilio/stream-status", form, signature="bm90IGEgc2lnbmF0dXJl") == 403
        assert await signed_post(running, "/twilio/stream-status", form, signature=other_url) == 403
        assert await signed_post(running, "/twilio/stream-status", form, signature=other_token) == 403
        # Signed, then altered: the signature covers every parameter.
        signed = RequestValidator(AUTH_TOKEN).compute_signature(f"{running.base_url}/twilio/stream-status", form)
        altered = {**form, "StreamEvent": "stream-stopped"}
        assert await signed_post(running, "/twilio/stream-status", altered, signature=signed) == 403

        assert stream_events(await events_of(running, call_sid)) == []
        assert not running.logs("twilio.stream_error")
        refusals = running.logs("security.webhook_signature_invalid")
        assert len(refusals) == 5 and {line["path"] for line in refusals} == {"/twilio/stream-status"}


async def test_callbacks_for_unknown_calls_are_logged_and_ignored(tmp_path: Path) -> None:
    behavior = FakeBehavior(ms_per_char=20)
    async with serve(tmp_path, behavior, CALLBRIDGE_API_TOKEN=API_TOKEN) as running:
        unknown = new_call_sid()
        path = "/twilio/stream-status"
        assert await signed_post(running, path, stream_status_form(unknown, "stream-started")) == 204
        error = stream_status_form(unknown, "stream-error", StreamError="31910 Stream - WebSocket - SSL Protocol Error")
        assert await signed_post(running, path, error) == 204
        assert await signed_post(running, path, stream_status_form(unknown, "stream-paused")) == 204
        without_call = stream_status_form(unknown, "stream-stopped")
        del without_call["CallSid"]
        assert await signed_post(running, path, without_call) == 204

        assert len(running.logs("twilio.stream_status_unknown_call")) == 2
        assert running.logs("twilio.stream_status_unknown_event")
        # An error for a call callbridge does not know still shows: it may be another deployment's wrong URL.
        (line,) = running.logs("twilio.stream_error")
        assert (line["level"], line["code"], line["call_sid"]) == ("error", 31910, unknown)
        async with api(running) as client:
            assert (await client.get(f"/api/calls/{unknown}")).status_code == 404
            assert (await client.get(f"/api/calls/{unknown}/events")).status_code == 404

        # Nothing broke: the next call goes through and is recorded as usual.
        recording = await running.caller().place_call(CallScript([Pause(1000), HangUp()]), max_duration_s=30)
        assert recording.stream_status_callbacks == [("stream-started", 204), ("stream-stopped", 204)]
        await running.wait_for_logs("call.summary", 1)
        kinds = [event["kind"] for event in stream_events(await events_of(running, recording.call_sid))]
        assert kinds == ["stream_started", "stream_stopped"]
        assert not running.logs("twilio.stream_status_failed")
