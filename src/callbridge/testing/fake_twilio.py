"""A local fake of Twilio's Calls REST resource, for tests that must not touch the network.

It serves the documented endpoints of ``https://api.twilio.com/2010-04-01`` that call control uses, the way
Twilio does: HTTP basic auth with the account SID and auth token, form-encoded parameters, call resources and
Twilio's error JSON (``code``, ``message``, ``more_info``, ``status``). Every request is recorded in
:attr:`FakeTwilio.requests` and every call in :attr:`FakeTwilio.calls`. Calls do not progress by themselves:
set ``fake.calls[sid].status`` to play a call's life (``"in-progress"``, ``"completed"``, …).

- ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json``: create a call (``To``, ``From`` and one of ``Twiml``,
  ``Url`` or ``ApplicationSid``); 201 with the call, status ``queued``.
- ``POST .../Calls/{CallSid}.json``: update a call: ``Status`` (``completed`` or ``canceled``), ``Twiml``, ``Url``.
- ``GET .../Calls/{CallSid}.json``: fetch a call.

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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

__all__ = ["FakeCall", "FakeTwilio", "RecordedRequest"]

API_VERSION = "2010-04-01"
MAX_TWIML_CHARS = 4000
ENDED_STATUSES = frozenset({"completed", "canceled", "busy", "failed", "no-answer"})
_NOT_ANSWERED = frozenset({"queued", "initiated", "ringing"})
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

    def value(self, name: str) -> str | None:
        """The parameter's single (first) value."""
        values = self.form.get(name)
        return values[0] if values else None


@dataclass
class FakeCall:
    """A call resource's state."""

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
    end_time: datetime | None = None

    def resource(self) -> dict[str, Any]:
        """The call as Twilio's JSON represents it."""
        base = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{self.sid}"
        return {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": None,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": format_datetime(self.date_created),
            "date_updated": format_datetime(self.date_updated),
            "direction": "outbound-api",
            "duration": None if self.end_time is None else "0",
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
            "start_time": None,
            "status": self.status,
            "subresource_uris": {key: f"{base}/{name}.json" for key, name in _CALL_SUBRESOURCES.items()},
            "to": self.to,
            "to_formatted": self.to,
            "trunk_sid": None,
            "uri": f"{base}.json",
        }


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


class FakeTwilio:
    """Twilio's Calls endpoints under uvicorn on a free local port: ``async with FakeTwilio(sid, token) as t``.

    Error codes and messages follow Twilio's: 20003 ``Authenticate`` (401), 20404 (404), 21201 no ``To``,
    21205 no ``Url`` (nor ``Twiml`` or ``ApplicationSid``), 21213 no ``From``, checked in that order;
    32018 ``Twiml`` over 4000 characters; 21220 update of a call that has ended. Assumed rather than observed:
    the HTTP status (400) of 32018, the message of 21213, 404 for a path naming another account, and 20001 for a
    ``Status`` other than ``completed`` or ``canceled``. ``completed`` and ``canceled`` both end a call that has
    not been answered yet as ``canceled``; on a call in progress, only ``completed`` ends it.
    """

    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.requests: list[RecordedRequest] = []
        self.calls: dict[str, FakeCall] = {}
        self.base_url = ""
        self._failures: list[int] = []
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._app = self._build_app()

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        """Answer the next ``n`` requests with ``status`` (Twilio's 20xxx code for it) before anything else."""
        self._failures.extend([status] * n)

    async def __aenter__(self) -> FakeTwilio:
        listener = socket.create_server(("127.0.0.1", 0))
        config = uvicorn.Config(self._app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]))
        self.base_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        return self  # the socket listens already: requests wait in its backlog until uvicorn accepts them

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server = self._task = None

    def _build_app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        calls_path = f"/{API_VERSION}/Accounts/{{account_sid}}/Calls"

        @app.post(f"{calls_path}.json", status_code=201)
        async def create_call(request: Request, account_sid: str) -> JSONResponse:
            return await self._handle(request, account_sid, None, 201)

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

    def _auth_ok(self, header: str | None) -> bool:
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user == self.account_sid and password == self.auth_token

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
        self.calls[call.sid] = call
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
        elif url is not None:
            call.twiml, call.url = None, url
        if status is not None:
            if call.status in _NOT_ANSWERED:
                call.status, call.end_time = "canceled", now
            elif status == "completed":
                call.status, call.end_time = "completed", now
        call.date_updated = now
