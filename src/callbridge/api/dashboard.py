"""The dashboard: ``/dashboard``, server-rendered pages over the services, for people.

Login takes the API token and keeps a signed session cookie (HttpOnly, SameSite=Strict, Secure behind https) that
holds the session's CSRF token; every action (logout, hang up) is a POST that must carry it. Every answer has a
Content-Security-Policy that allows the dashboard's own script and style only: no inline script, nothing from
elsewhere. What a call carried (numbers, transcript text, tool arguments) is rendered by Jinja2's autoescape and, in
the browser, as ``textContent``: markup a caller says or keys in stays text.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import orjson
import structlog
from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer

from callbridge.service.calls import CallServices, Invalid, NotFound, ServiceError
from callbridge.service.campaigns import Campaigns
from callbridge.store.campaigns import Campaign
from callbridge.store.repository import CallEvent, CallRecord

log = structlog.stdlib.get_logger("callbridge.dashboard")

COOKIE = "callbridge_dashboard"
SESSION_MAX_AGE_S = 12 * 3600
"""A session lasts this long; then the token is asked for again."""
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_SIZE = 25
DAY_PAGES = 20
"""The day's figures read at most this many pages of 200 calls."""
TURN_CALLS = 100
"""The day's turn latencies are those of its latest answered calls, this many at most."""
_HERE = Path(__file__).resolve().parent.parent / "dashboard"
templates = Jinja2Templates(directory=_HERE / "templates")  # autoescape on: every value is escaped


def mount_dashboard(app: FastAPI) -> None:
    """The dashboard's routes and its static files, on ``app``."""
    app.mount("/dashboard/static", StaticFiles(directory=_HERE / "static"), name="dashboard-static")
    app.include_router(_router())
    app.add_exception_handler(_LoginNeeded, _login_needed)
    app.add_exception_handler(_Refused, _refused)


# --- the session --------------------------------------------------------------------------------------------


def _serializer(services: CallServices) -> URLSafeTimedSerializer | None:
    """Sessions are signed with a key from CALLBRIDGE_SECRET and the API token: a new token ends every session."""
    if not services.api_token:
        return None
    secret = services.settings.secret.get_secret_value() if services.settings.secret else ""
    key = hashlib.sha256(f"{secret}\0{services.api_token}".encode()).hexdigest()
    return URLSafeTimedSerializer(key, salt="callbridge.dashboard.session")


def session_of(request: Request) -> dict[str, Any] | None:
    """The dashboard session the request's cookie carries, if it is valid; a forged or stale one is logged."""
    cookie = request.cookies.get(COOKIE)
    serializer = _serializer(request.app.state.services)
    if cookie is None or serializer is None:
        return None
    try:
        session = serializer.loads(cookie, max_age=SESSION_MAX_AGE_S)
    except BadSignature as exc:  # the value is not logged: only that it did not verify
        log.warning("dashboard.bad_session", path=request.url.path, reason=type(exc).__name__, length=len(cookie))
        return None
    return session if isinstance(session, dict) and isinstance(session.get("csrf"), str) else None


def _signed_in(request: Request) -> dict[str, Any]:
    session = session_of(request)
    if session is None:
        raise _LoginNeeded(forged=COOKIE in request.cookies)
    return session


class _Refused(Exception):
    """A dashboard request refused: an HTML page that says why, with its status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _Refused)
    return _page(request, "error.html", {"message": exc.message, "session": session_of(request)}, exc.status)


class _LoginNeeded(Exception):
    def __init__(self, *, forged: bool) -> None:
        self.forged = forged


def _check_csrf(request: Request, session: dict[str, Any], token: str | None) -> None:
    if token is None or not hmac.compare_digest(token, session["csrf"]):
        log.warning("dashboard.csrf_refused", path=request.url.path)
        raise _Refused(403, "The form's CSRF token is missing or wrong: reload the page.")


def _page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def _router() -> APIRouter:
    dashboard = APIRouter(prefix="/dashboard", include_in_schema=False)
    _login(dashboard)
    _pages(dashboard)
    return dashboard


def _login(dashboard: APIRouter) -> None:
    @dashboard.get("/login")
    async def login_form(request: Request) -> HTMLResponse:
        return _page(request, "login.html", {"error": None})

    @dashboard.post("/login")
    async def login(request: Request, token: Annotated[str, Form(max_length=500)] = "") -> Response:
        services: CallServices = request.app.state.services
        serializer = _serializer(services)
        if serializer is None or not services.api_token or not hmac.compare_digest(token, services.api_token):
            log.warning("dashboard.login_refused", configured=serializer is not None)
            error = (
                "That is not the API token." if serializer else "CALLBRIDGE_API_TOKEN is not set: no one can log in."
            )
            return _page(request, "login.html", {"error": error}, status_code=401)
        response = RedirectResponse("/dashboard", status_code=303)
        cookie = serializer.dumps({"csrf": secrets.token_urlsafe(24)})
        secure = services.settings.public_url.startswith("https://")
        response.set_cookie(
            COOKIE, cookie, max_age=SESSION_MAX_AGE_S, httponly=True, samesite="strict", secure=secure, path="/"
        )
        log.info("dashboard.login")
        return response

    @dashboard.post("/logout")
    async def logout(request: Request, csrf: Annotated[str | None, Form()] = None) -> Response:
        _check_csrf(request, _signed_in(request), csrf)
        response = RedirectResponse("/dashboard/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response


def _pages(dashboard: APIRouter) -> None:
    @dashboard.get("")
    async def calls(
        request: Request,
        status: str | None = None,
        number: str | None = None,
        agent: str | None = None,
        day: str | None = None,
        cursor: str | None = None,
    ) -> Response:
        session = _signed_in(request)
        services: CallServices = request.app.state.services
        since, until = _day_bounds(day)
        filters = {"status": status or None, "number": number or None, "agent": agent or None, "day": day or None}
        try:
            page = await services.calls(
                status=filters["status"],
                number=filters["number"],
                since=since,
                until=until,
                limit=PAGE_SIZE,
                cursor=cursor or None,
            )
        except Invalid:
            raise _Refused(400, "That page of calls does not exist.") from None
        rows = [call for call in page.calls if not filters["agent"] or call.agent == filters["agent"]]
        live = await services.calls(status="in-progress", number=None, since=None, until=None, limit=50, cursor=None)
        query = {key: value for key, value in filters.items() if value} | {"cursor": page.next_cursor or ""}
        context = {
            "session": session,
            "calls": rows,
            "live": [call for call in live.calls if call.ended_at is None],
            "next_cursor": page.next_cursor,
            "next_query": urlencode(query),
            "filters": filters,
            "figures": await _figures(services),
        }
        return _page(request, "calls.html", context)

    @dashboard.get("/calls/{call_sid}")
    async def call(request: Request, call_sid: str) -> Response:
        session = _signed_in(request)
        services: CallServices = request.app.state.services
        try:
            record = await services.call(call_sid)
        except NotFound:
            raise _Refused(404, "No such call on record.") from None
        lines = await services.transcript(call_sid)
        events = await services.events(call_sid)
        context = {
            "session": session,
            "call": record,
            "duration": _duration(record),
            "live": record.ended_at is None,
            "no_recording": None if record.ended_at is None else await _no_recording(request, call_sid),
            "lines": lines,
            "events": [(event, _details(event), orjson.dumps(event.data).decode()) for event in events],
        }
        return _page(request, "call.html", context)

    @dashboard.get("/campaigns")
    async def campaigns(request: Request) -> Response:
        session = _signed_in(request)
        campaigns: Campaigns = request.app.state.campaigns
        rows = [await campaigns.summary(campaign.id) for campaign in await campaigns.store.campaigns()]
        return _page(request, "campaigns.html", {"session": session, "campaigns": [_progress(*row) for row in rows]})

    @dashboard.get("/campaigns/{campaign_id}")
    async def campaign(request: Request, campaign_id: str) -> Response:
        session = _signed_in(request)
        campaigns: Campaigns = request.app.state.campaigns
        try:
            found, counts = await campaigns.summary(campaign_id)
        except NotFound:
            raise _Refused(404, "No such campaign.") from None
        contacts = await campaigns.contacts(campaign_id, status=None, after=0, limit=500)
        context = {"session": session, "campaign": _progress(found, counts), "contacts": contacts}
        return _page(request, "campaign.html", context)

    @dashboard.post("/calls/{call_sid}/hangup")
    async def hang_up(request: Request, call_sid: str, csrf: Annotated[str | None, Form()] = None) -> Response:
        _check_csrf(request, _signed_in(request), csrf)
        await request.app.state.services.hang_up(call_sid)
        log.info("dashboard.hang_up", call_sid=call_sid)
        return RedirectResponse(f"/dashboard/calls/{call_sid}", status_code=303)


def _progress(campaign: Campaign, counts: dict[str, int]) -> dict[str, Any]:
    """A campaign for its page: its counts, and its contacts done as a share of all (the progress bar)."""
    total = sum(counts.values())
    done = total - sum(counts.get(status, 0) for status in ("pending", "scheduled", "in_progress"))
    return {
        "campaign": campaign,
        "counts": {status: count for status, count in counts.items() if count},
        "total": total,
        "done": done,
        "share": done / total if total else 0.0,
    }


async def _login_needed(request: Request, exc: Exception) -> Response:
    """No valid session: the login page for a browser; a forged or stale cookie is refused with a clear 401."""
    assert isinstance(exc, _LoginNeeded)
    if exc.forged:
        response = _page(request, "login.html", {"error": "Your session is not valid: log in again."}, 401)
        response.delete_cookie(COOKIE, path="/")
        return response
    return RedirectResponse("/dashboard/login", status_code=303)


# --- what the pages show ------------------------------------------------------------------------------------


def _day_bounds(day: str | None) -> tuple[datetime | None, datetime | None]:
    if not day:
        return None, None
    try:
        start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise _Refused(400, "The date must be YYYY-MM-DD.") from None
    return start, start + timedelta(days=1)


def _duration(call: CallRecord) -> float | None:
    if call.started_at is None or call.ended_at is None:
        return None
    return max(0.0, (call.ended_at - call.started_at).total_seconds())


async def _no_recording(request: Request, call_sid: str) -> str | None:
    """Why the call has no recording to play (``None`` when it has one)."""
    try:
        await request.app.state.recordings.recording(call_sid)
    except ServiceError as exc:
        return str(exc)
    return None


def _turn_ms(events: list[CallEvent]) -> list[int]:
    """The agent's latency on each turn of a call (``turn`` events), in milliseconds."""
    found = (event.data.get("turn_latency_s") for event in events if event.kind == "turn")
    return [round(value * 1000) for value in found if isinstance(value, int | float)]


def _details(event: CallEvent) -> str:
    turn = _turn_ms([event])
    return f"latency {turn[0]} ms" if turn else orjson.dumps(event.data).decode()


def _percentile(values: list[int], fraction: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def _figures(services: CallServices) -> dict[str, Any]:
    """Today's figures (UTC), from the calls on record: calls, answered, average duration, end reasons, calls per
    hour, and the agent's turn latency p50/p95 (over the turns of the latest answered calls)."""
    since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    calls: list[CallRecord] = []
    cursor = None
    for _ in range(DAY_PAGES):
        page = await services.calls(status=None, number=None, since=since, until=None, limit=200, cursor=cursor)
        calls.extend(page.calls)
        if (cursor := page.next_cursor) is None:
            break
    answered = [call for call in calls if call.started_at is not None]
    durations = [d for d in map(_duration, answered) if d is not None]
    reasons: dict[str, int] = {}
    hours = [0] * 24
    for call in calls:
        if call.end_reason:
            reasons[call.end_reason] = reasons.get(call.end_reason, 0) + 1
        hours[call.created_at.astimezone(UTC).hour] += 1
    latencies: list[int] = []
    for call in answered[:TURN_CALLS]:
        latencies.extend(_turn_ms(await services.events(call.call_sid)))
    return {
        "p50": _percentile(latencies, 0.5),
        "p95": _percentile(latencies, 0.95),
        "calls": len(calls),
        "answered": len(answered),
        "average_s": sum(durations) / len(durations) if durations else None,
        "reasons": sorted(reasons.items(), key=lambda item: -item[1]),
        "reasons_max": max(reasons.values(), default=1),
        "hours": hours,
        "hours_max": max(max(hours), 1),
    }


templates.env.globals["duration"] = _duration
