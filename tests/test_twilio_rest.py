"""TwilioCalls (the official client) against the local fake of Twilio's Calls resource."""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from callbridge.telephony.rest import MAX_TWIML_CHARS, TwilioCalls, TwilioRestException
from callbridge.testing.fake_twilio import FakeTwilio

ACCOUNT_SID = "AC" + "a" * 32
AUTH_TOKEN = "test-auth-token"
CALLS_PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls"
TWIML = '<Response><Connect><Stream url="wss://bridge.example/twilio/media-stream"/></Connect></Response>'


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as fake:
        yield fake


@pytest.fixture
async def calls(twilio: FakeTwilio) -> AsyncIterator[TwilioCalls]:
    client = TwilioCalls(ACCOUNT_SID, AUTH_TOKEN, api_base_url=twilio.base_url)
    yield client
    await client.aclose()


async def test_create_sends_the_documented_form(twilio: FakeTwilio, calls: TwilioCalls) -> None:
    sid = await calls.create(
        to="+15550100002",
        from_="+15550100001",
        twiml=TWIML,
        status_callback="https://bridge.example/twilio/status",
        status_callback_event=["initiated", "answered", "completed"],
        machine_detection="DetectMessageEnd",
        time_limit=600,
    )

    [request] = twilio.requests
    assert (request.method, request.path, request.status) == ("POST", f"{CALLS_PATH}.json", 201)
    assert request.auth_ok and request.content_type == "application/x-www-form-urlencoded"
    assert request.form == {
        "To": ["+15550100002"],
        "From": ["+15550100001"],
        "Twiml": [TWIML],
        "StatusCallback": ["https://bridge.example/twilio/status"],
        "StatusCallbackEvent": ["initiated", "answered", "completed"],
        "MachineDetection": ["DetectMessageEnd"],
        "TimeLimit": ["600"],
    }
    assert sid.startswith("CA") and len(sid) == 34
    call = twilio.calls[sid]
    assert (call.to, call.from_, call.twiml, call.status) == ("+15550100002", "+15550100001", TWIML, "queued")
    assert call.status_callback_events == ["initiated", "answered", "completed"]

    await calls.create(to="+15550100002", from_="+15550100001", twiml="<Response/>")
    assert twilio.requests[1].form == {"To": ["+15550100002"], "From": ["+15550100001"], "Twiml": ["<Response/>"]}


async def test_hang_up(twilio: FakeTwilio, calls: TwilioCalls) -> None:
    sid = await calls.create(to="+15550100002", from_="+15550100001", twiml=TWIML)
    twilio.calls[sid].status = "in-progress"
    await calls.hang_up(sid)

    request = twilio.requests[-1]
    assert (request.method, request.path, request.status) == ("POST", f"{CALLS_PATH}/{sid}.json", 200)
    assert request.form == {"Status": ["completed"]}
    assert twilio.calls[sid].status == "completed"


async def test_hang_up_tolerates_only_a_call_that_is_over(twilio: FakeTwilio, calls: TwilioCalls) -> None:
    sid = await calls.create(to="+15550100002", from_="+15550100001", twiml=TWIML)
    await calls.hang_up(sid)  # still queued: canceled
    await calls.hang_up(sid)  # over already: 400 with code 21220
    await calls.hang_up("CA" + "f" * 32)  # unknown: 404
    assert [r.status for r in twilio.requests] == [201, 200, 400, 404]
    assert twilio.calls[sid].status == "canceled"

    twilio.fail_next(1, status=500)
    with pytest.raises(TwilioRestException) as caught:
        await calls.hang_up(sid)
    assert (caught.value.status, caught.value.code) == (500, 20500)


async def test_redirect(twilio: FakeTwilio, calls: TwilioCalls) -> None:
    sid = await calls.create(to="+15550100002", from_="+15550100001", twiml=TWIML)
    twilio.calls[sid].status = "in-progress"
    dial = '<Response><Dial callerId="+15550100001" timeout="20"><Number>+15550100003</Number></Dial></Response>'
    await calls.redirect(sid, dial)

    assert twilio.requests[-1].form == {"Twiml": [dial]}
    assert (twilio.calls[sid].twiml, twilio.calls[sid].status) == (dial, "in-progress")

    twilio.calls[sid].status = "completed"
    with pytest.raises(TwilioRestException) as caught:
        await calls.redirect(sid, dial)
    assert (caught.value.status, caught.value.code) == (400, 21220)
    with pytest.raises(TwilioRestException) as caught:
        await calls.redirect("CA" + "f" * 32, dial)
    assert (caught.value.status, caught.value.code) == (404, 20404)


async def test_wrong_auth_token(twilio: FakeTwilio) -> None:
    client = TwilioCalls(ACCOUNT_SID, "wrong-token", api_base_url=twilio.base_url)
    try:
        with pytest.raises(TwilioRestException) as caught:
            await client.create(to="+15550100002", from_="+15550100001", twiml=TWIML)
    finally:
        await client.aclose()
    assert (caught.value.status, caught.value.code) == (401, 20003)
    assert not twilio.requests[0].auth_ok and not twilio.calls


async def test_twiml_over_4000_characters_is_refused_before_sending(twilio: FakeTwilio, calls: TwilioCalls) -> None:
    longest = "<Response><Say>" + "a" * (MAX_TWIML_CHARS - 32) + "</Say></Response>"
    assert len(longest) == MAX_TWIML_CHARS
    sid = await calls.create(to="+15550100002", from_="+15550100001", twiml=longest)
    with pytest.raises(ValueError, match="32018"):
        await calls.create(to="+15550100002", from_="+15550100001", twiml=longest + " ")
    with pytest.raises(ValueError, match="32018"):
        await calls.redirect(sid, longest + " ")
    assert len(twilio.requests) == 1


async def test_aclose_leaves_no_open_session(twilio: FakeTwilio) -> None:
    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))
    client = TwilioCalls(ACCOUNT_SID, AUTH_TOKEN, api_base_url=twilio.base_url)
    await client.create(to="+15550100002", from_="+15550100001", twiml=TWIML)
    await client.aclose()
    await client.aclose()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del client
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)] and not reported


async def test_a_request_that_gets_no_answer_times_out() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never answers
        client = TwilioCalls(
            ACCOUNT_SID, AUTH_TOKEN, api_base_url=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.1
        )
        with pytest.raises(TimeoutError):
            await client.hang_up("CA" + "f" * 32)
        await client.aclose()


async def test_fake_answers_as_twilio_does(twilio: FakeTwilio, calls: TwilioCalls) -> None:
    refusals = [
        ({"From": "+15550100001", "Twiml": TWIML}, 21201),
        ({"To": "+15550100002", "From": "+15550100001"}, 21205),
        ({"To": "+15550100002", "Url": "https://bridge.example/twiml"}, 21213),
        ({"To": "+15550100002", "From": "+15550100001", "Twiml": "x" * (MAX_TWIML_CHARS + 1)}, 32018),
    ]
    sid = await calls.create(to="+15550100002", from_="+15550100001", twiml=TWIML)
    async with httpx.AsyncClient(base_url=twilio.base_url, auth=(ACCOUNT_SID, AUTH_TOKEN)) as http:
        for form, code in refusals:
            response = await http.post(f"{CALLS_PATH}.json", data=form)
            assert response.status_code == 400
            assert response.json() == {
                "code": code,
                "message": response.json()["message"],
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": 400,
            }
        fetched = await http.get(f"{CALLS_PATH}/{sid}.json")
        refused = await http.get(f"{CALLS_PATH}/{sid}.json", auth=(ACCOUNT_SID, "wrong-token"))
    assert list(twilio.calls) == [sid]
    assert fetched.status_code == 200
    assert fetched.json()["sid"] == sid and fetched.json()["uri"] == f"{CALLS_PATH}/{sid}.json"
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Basic realm="Twilio API"'
    assert refused.json() == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
