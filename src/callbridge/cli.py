"""The ``callbridge`` command line.

A mistake is one line that names what to fix (the setting, the file or the URL), and an exit status per kind:
:data:`CONFIGURATION` (2), :data:`UNREACHABLE` (3: a server or the database did not answer), :data:`REFUSED` (4: it
answered no, e.g. to a wrong token). ``--debug`` (or ``CALLBRIDGE_LOG_LEVEL=debug``) shows the traceback instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import typer
from pydantic import ValidationError

from callbridge.config import Settings
from callbridge.observability.logs import configure_logging

CONFIGURATION = 2
UNREACHABLE = 3
REFUSED = 4

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: every option with its metavar, no type names
    help="Put a speech-to-speech AI agent on the phone.",
)


class Failure(Exception):
    """What a command tells its user in one line, with the exit status of its kind."""

    def __init__(self, message: str, status: int = CONFIGURATION) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


_debug = False


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"callbridge {package_version('callbridge')}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    global _debug
    _debug = debug


def main() -> None:
    """The ``callbridge`` command: what goes wrong ends in one line and an exit status (see the module's doc)."""
    try:
        app()
    except Exception as exc:
        failure = _failure(exc)
        debug = _debug or "--debug" in sys.argv or os.environ.get("CALLBRIDGE_LOG_LEVEL", "").lower() == "debug"
        if failure is None or debug:
            raise
        typer.echo(f"error: {failure.message}", err=True)
        raise SystemExit(failure.status) from None


def _failure(exc: BaseException) -> Failure | None:
    """The one line a known kind of error becomes (None: a bug, whose traceback is worth showing)."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, ValidationError) and exc.title == Settings.__name__:
        return Failure(_settings_error(exc))
    if isinstance(exc, httpx.TransportError):
        where = _origin(str(exc.request.url)) if _has_request(exc) else "the server"
        return Failure(f"cannot reach {where} — is callbridge serve running? (--url)", UNREACHABLE)
    if isinstance(exc, OSError) and exc.filename is not None:
        return Failure(f"{exc.filename}: {exc.strerror or exc}")
    return None


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018  (raises when the error was made without one)
    except RuntimeError:
        return False
    return True


def _settings_error(exc: ValidationError) -> str:
    """The first refused setting, by its environment variable (and how many more there are)."""
    errors = exc.errors()
    where = ".".join(str(part) for part in errors[0]["loc"])
    where = Settings.variable(where) if where in Settings.model_fields else where
    message = str(errors[0]["msg"]).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where + ': ' if where else ''}{message}{more}"


async def _open_database(url: str) -> None:
    """Connect to the database and migrate it to head, or one line naming it (without its password) says why."""
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from callbridge.store.repository import Store

    try:
        store = await Store.open(url)
    except ArgumentError as exc:
        raise Failure(f"CALLBRIDGE_DATABASE_URL: {exc} (e.g. postgresql://user:password@host/db)") from None
    except (OSError, DBAPIError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        failure = f"CALLBRIDGE_DATABASE_URL={_without_password(url)}: cannot use the database: {reason}"
        raise Failure(failure, UNREACHABLE) from None
    await store.close()


def _check_listen(host: str, port: int) -> None:
    """The address is free to listen on (another server on the port would only show up as a worker's crash)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise Failure(f"cannot listen on {host}:{port}: {exc.strerror or exc} (--host, --port)") from None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@app.command()
def serve(
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = 8080,
    workers: Annotated[
        int, typer.Option(min=1, metavar="N", help="Processes sharing the port (each takes its own calls).")
    ] = 1,
) -> None:
    """Run the service: Twilio webhook, media-stream WebSocket, REST API, health. SIGTERM drains the calls."""
    from callbridge.api.app import create_app
    from callbridge.transport.server import run_worker, run_workers

    _check_settings()
    _check_listen(host, port)
    if workers == 1:
        run_worker(create_app, host, port)
    else:
        run_workers(create_app, host, port, workers)


def _check_settings() -> None:
    """Refuse to start on settings that cannot work, with what to fix, before anything listens (and before any
    worker starts: a worker that failed the same way would only be started again)."""
    from callbridge.service.agents import load_agents
    from callbridge.service.resolvers import PythonContextResolver
    from callbridge.service.tools import ToolRegistry, load_registry

    settings = Settings()
    with _plugged_in("CALLBRIDGE_TOOLS", settings.tools):
        tools = load_registry(settings.tools) if settings.tools else ToolRegistry()
    with _plugged_in("CALLBRIDGE_CONTEXT_FUNCTION", settings.context_function):
        if settings.context_function:
            PythonContextResolver(settings.context_function)
    try:
        load_agents(settings, tools, settings.agents_file)
    except (ValueError, OSError) as exc:
        raise Failure(f"CALLBRIDGE_AGENTS_FILE: {exc}") from None
    asyncio.run(_open_database(settings.database_url))  # it answers, and is migrated, before any worker starts


@contextlib.contextmanager
def _plugged_in(setting: str, value: str | None) -> Iterator[None]:
    """What the host application names by ``module:name`` loads, or one line says why."""
    try:
        yield
    except (ImportError, ValueError, AttributeError, TypeError) as exc:
        hint = " (is its folder the working directory, or on PYTHONPATH?)" if isinstance(exc, ImportError) else ""
        raise Failure(f"{setting}={value}: {exc}{hint}") from None


@app.command()
def simulate(
    url: ApiUrl = None,
    script: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Caller lines, one per line; a line starting with '>' barges in (default: a short call).",
        ),
    ] = None,
    wav: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Play this 8 kHz mono WAV (PCM16 or μ-law) instead of a script.")
    ] = None,
    seconds: Annotated[
        float,
        typer.Option(
            min=1, metavar="SECONDS", help="The call's length at most: the caller hangs up then, if it has not yet."
        ),
    ] = 60.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    token: Annotated[
        str | None,
        typer.Option(
            metavar="TOKEN",
            help="The server's API token, for its transcript and tool calls (default: CALLBRIDGE_API_TOKEN).",
        ),
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(metavar="URL", help="The server's CALLBRIDGE_PUBLIC_URL, if not --url (signatures cover it)."),
    ] = None,
    save: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Write a stereo WAV (caller left, agent right) here.")
    ] = None,
) -> None:
    """A simulated Twilio call to a running callbridge, as the demo places it: signed like Twilio's, spoken with the
    demo's voice, the live transcript and the demo's summary. Exits 1 when the agent never answered."""
    import json

    from callbridge.engine.demo import SIMULATE_SCRIPT, caller_part, run_simulation
    from callbridge.testing.caller import CallRefused

    settings = Settings()
    url = url or settings.public_url
    configure_logging(settings.log_format, "warning")
    auth_token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    if not auth_token:
        raise Failure("TWILIO_AUTH_TOKEN is unset: set it to the server's (the caller signs like Twilio)")
    if script and wav:
        raise Failure("--script and --wav: give one of them")
    try:
        part = caller_part(script, wav, SIMULATE_SCRIPT)
    except ValueError as exc:
        raise Failure(str(exc)) from None
    api_token = token or (settings.api_token.get_secret_value() if settings.api_token else None)
    if api_token:  # refused or unreachable: say so now, not after the call
        with _api(url, api_token) as client:
            _check(client.get("/api/calls", params={"limit": 1}))
    # Signatures cover the URL the server believes it has: its CALLBRIDGE_PUBLIC_URL, the same as here when both
    # read the same settings, or else the URL called.
    public_urls = [public_url] if public_url else list(dict.fromkeys([settings.public_url, url.rstrip("/")]))
    call = run_simulation(url, auth_token, part, public_urls, api_token, seconds, save=save, json_output=json_output)
    try:
        summary = asyncio.run(call)
    except CallRefused as exc:
        signature = exc.status_code == 403
        hint = (
            ": set TWILIO_AUTH_TOKEN to the server's, and --public-url to its CALLBRIDGE_PUBLIC_URL"
            if signature
            else ""
        )
        raise Failure(f"{url} refused the call ({exc.reason}, HTTP {exc.status_code}){hint}", REFUSED) from None
    except ImportError as exc:
        raise Failure(str(exc)) from None
    if json_output:
        print(json.dumps(summary))
    raise typer.Exit(0 if summary["ok"] else 1)


@app.command()
def demo(
    output: Annotated[Path, typer.Option(metavar="FOLDER", help="Folder for the call's WAV and transcript.")] = Path(
        "callbridge-demo"
    ),
    script: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Caller lines, one per line; a line starting with '>' barges in."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """A whole phone call, offline: the bridge, the local engine and a simulated caller with a real voice."""
    import json

    from callbridge.engine.demo import DEFAULT_SCRIPT, parse_script, run_demo

    configure_logging("console", "error")
    text = script.read_text() if script else DEFAULT_SCRIPT
    try:
        parse_script(text)
    except ValueError as exc:
        raise Failure(f"{script}: {exc}") from None
    try:
        summary = asyncio.run(run_demo(output, script=text, json_output=json_output))
    except ImportError as exc:  # the speech packages of the offline extra
        raise Failure(str(exc)) from None
    if json_output:
        print(json.dumps(summary))
    raise typer.Exit(0 if summary["ok"] else 1)


@app.command()
def engine(
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = 9001,
) -> None:
    """Run the offline Realtime-compatible engine on its own (ws://HOST:PORT/v1/realtime)."""
    from callbridge.engine.agent import LocalEngine

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)

    async def run() -> None:
        _check_listen(host, port)
        async with LocalEngine(host=host, port=port):
            await asyncio.Event().wait()

    asyncio.run(run())


db = typer.Typer(no_args_is_help=True, help="The call records database.")
app.add_typer(db, name="db")


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations (callbridge serve does it at start too)."""
    settings = Settings()
    asyncio.run(_open_database(settings.database_url))
    typer.echo(f"database at head: {settings.database_url}")


@app.command()
def secret() -> None:
    """Print a new CALLBRIDGE_WEBHOOK_SECRET (whsec_…): the key that signs every request to your app (Standard
    Webhooks), which your app verifies with it."""
    from callbridge.service.webhooks import new_secret

    typer.echo(new_secret())


ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--url",
        metavar="URL",
        help="Base URL of the running callbridge service (default: CALLBRIDGE_PUBLIC_URL, http://127.0.0.1:8080).",
    ),
]
ApiToken = Annotated[
    str | None, typer.Option("--token", metavar="TOKEN", help="API token (default: CALLBRIDGE_API_TOKEN).")
]


def _api(url: str | None, token: str | None) -> httpx.Client:
    settings = Settings()
    url = url or settings.public_url
    configured = settings.api_token
    token = token or (configured.get_secret_value() if configured else None)
    if not token:
        raise Failure("no API token: set CALLBRIDGE_API_TOKEN or pass --token")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _check(response: httpx.Response) -> Any:
    if response.status_code in (401, 403):
        raise Failure(
            f"{_origin(str(response.url))} refused the API token ({response.status_code}): "
            "set CALLBRIDGE_API_TOKEN or --token to the server's",
            REFUSED,
        )
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise Failure(f"{response.status_code} from {response.url.path}: {str(detail)[:300]}", REFUSED)
    return response.json()


@app.command()
def call(
    to: Annotated[str, typer.Argument(metavar="NUMBER", hidden=True)],  # in the usage line and the doc
    from_: Annotated[str, typer.Option("--from", metavar="NUMBER", help="Your Twilio number, E.164.")],
    agent: Annotated[str | None, typer.Option(metavar="NAME", help="Agent name (default: the default agent).")] = None,
    reference: Annotated[
        str | None, typer.Option(metavar="TEXT", help="Your reference for the call's context.")
    ] = None,
    name: Annotated[str | None, typer.Option(metavar="TEXT", help="The callee's name, for the greeting.")] = None,
    url: ApiUrl = None,
    token: ApiToken = None,
) -> None:
    """Place an outbound call to NUMBER (E.164, +1…), answered by the agent."""
    body = {"to": to, "from": from_, "agent": agent, "context": {"reference": reference, "name": name}}
    with _api(url, token) as client:
        created = _check(client.post("/api/calls", json=body))
    typer.echo(f"{created['call_sid']} {created['status']}")


@app.command()
def calls(
    status: Annotated[
        str | None,
        typer.Option(metavar="STATUS", help="Only calls with this status (in-progress, ended, completed, ...)."),
    ] = None,
    number: Annotated[str | None, typer.Option(metavar="NUMBER", help="Only calls from or to this number.")] = None,
    limit: Annotated[int, typer.Option(metavar="N", help="How many.")] = 20,
    json_output: Annotated[bool, typer.Option("--json", help="Print the calls as JSON, one object.")] = False,
    url: ApiUrl = None,
    token: ApiToken = None,
) -> None:
    """List recent calls (status 'ended': the agent's part is over, Twilio has not yet said how the call ended)."""
    import json

    from rich.console import Console
    from rich.table import Table

    params = {key: value for key, value in {"status": status, "number": number, "limit": limit}.items() if value}
    with _api(url, token) as client:
        page = _check(client.get("/api/calls", params=params))
    if json_output:
        typer.echo(json.dumps(page))
        return
    table = Table()
    table.add_column("call", no_wrap=True, min_width=34)  # never cut: it is copied into `callbridge transcript`
    for heading in ("direction", "from", "to", "agent", "status", "started", "end reason"):
        table.add_column(heading, overflow="fold")
    for item in page["calls"]:
        table.add_row(
            item["call_sid"],
            item["direction"],
            item["from_number"] or "",
            item["to_number"] or "",
            item["agent"],
            item["status"],
            (item["started_at"] or "")[:19],
            item["end_reason"] or "",
        )
    Console().print(table)


@app.command()
def transcript(
    call_sid: Annotated[str, typer.Argument(metavar="CALL_SID", hidden=True)],  # in the usage line and the doc
    url: ApiUrl = None,
    token: ApiToken = None,
) -> None:
    """Print the transcript of the call CALL_SID (CA…)."""
    from rich.console import Console
    from rich.table import Table

    with _api(url, token) as client:
        body = _check(client.get(f"/api/calls/{call_sid}/transcript"))
    table = Table("at", "speaker", "text", title=call_sid)
    for line in body["lines"]:
        colour = "cyan" if line["speaker"] == "caller" else "green"
        cut = " [dim](interrupted)[/dim]" if line["interrupted"] else ""
        table.add_row(f"{line['start_ms'] / 1000:.2f}s", f"[{colour}]{line['speaker']}[/{colour}]", line["text"] + cut)
    Console(width=120).print(table)


CallSidArgument = Annotated[str, typer.Argument(metavar="CALL_SID", hidden=True)]  # in the usage line and the doc
TextArgument = Annotated[str, typer.Argument(metavar="TEXT", hidden=True)]


def _control(url: str | None, token: str | None, call_sid: str, command: str, body: dict[str, Any]) -> None:
    """Send a command to a live call; one line says which process took it (a refusal is a :class:`Failure`)."""
    with _api(url, token) as client:
        taken = _check(client.post(f"/api/calls/{call_sid}/{command}", json=body))
    typer.echo(f"{call_sid}: {command} taken by {taken['carried_by']}")


@app.command()
def say(
    call_sid: CallSidArgument,
    text: TextArgument,
    interrupt: Annotated[
        bool, typer.Option("--interrupt", help="Say it now, cutting off the agent (else after its current turn).")
    ] = False,
    url: ApiUrl = None,
    token: ApiToken = None,
) -> None:
    """Have the agent of the live call CALL_SID say TEXT, word for word."""
    _control(url, token, call_sid, "say", {"text": text, "interrupt": interrupt})


@app.command()
def instruct(
    call_sid: CallSidArgument,
    text: TextArgument,
    respond: Annotated[bool, typer.Option("--respond", help="Have the agent speak about it.")] = False,
    url: ApiUrl = None,
    token: ApiToken = None,
) -> None:
    """Give the agent of the live call CALL_SID new facts or instructions: TEXT, as a system message."""
    _control(url, token, call_sid, "instruct", {"text": text, "respond": respond})


@app.command()
def watch(
    call_sid: Annotated[str | None, typer.Argument(metavar="CALL_SID", hidden=True)] = None,  # usage line, doc
    url: ApiUrl = None,
    token: ApiToken = None,
) -> None:
    """Follow the call CALL_SID live: its transcript and events, until it ends. Without CALL_SID, the calls as they
    start, change and end (Ctrl-C to stop)."""
    from httpx_sse import SSEError, connect_sse
    from rich.console import Console

    console = Console(highlight=False)
    path = f"/api/calls/{call_sid}/live" if call_sid else "/api/live"
    last_id: str | None = None
    with _api(url, token) as client:
        while True:  # a dropped connection is resumed after the last event seen
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(client, "GET", path, headers=headers) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        _check(source.response)
                    for event in source.iter_sse():
                        last_id = event.id or last_id
                        _print_live(console, event.event, event.json())
                        if call_sid and event.event == "call.ended":
                            return
            except (httpx.TransportError, SSEError):
                if last_id is None:
                    raise
            console.print("[dim]… reconnecting[/dim]")
            time.sleep(1)


_SPEAKER_COLOUR = {"caller": "cyan", "agent": "green"}


def _print_live(console: Any, kind: str, data: dict[str, Any]) -> None:
    """One live event as a line of the terminal, in colour; what the call says is printed as text, never markup."""
    from rich.markup import escape

    call = f"[dim]{escape(str(data.get('call_sid', '')))}[/dim] "
    if kind == "transcript.line":
        colour = _SPEAKER_COLOUR.get(data.get("speaker", ""), "white")
        cut = " [dim](interrupted)[/dim]" if data.get("interrupted") else ""
        at = f"{data.get('start_ms', 0) / 1000:7.2f}s"
        console.print(
            f"{at} [{colour}]{escape(str(data.get('speaker')))}[/{colour}]: {escape(str(data.get('text')))}{cut}"
        )
    elif kind == "transcript.partial":
        speaker = escape(str(data.get("speaker")))
        console.print(f"[dim]… {speaker} is saying “{escape(str(data.get('text')))}”[/dim]")
    elif kind == "call.event":
        colour = "red" if data.get("kind") == "error" else "yellow"
        details = escape(json.dumps(data.get("data"), ensure_ascii=False))
        console.print(f"{call}[{colour}]{escape(str(data.get('kind')))}[/{colour}] {details}")
    elif kind == "turn.metrics":
        console.print(f"{call}[dim]turn latency {data.get('turn_latency_s', 0):.2f} s[/dim]")
    else:
        fields = " ".join(f"{key}={escape(str(value))}" for key, value in data.items() if key != "call_sid" and value)
        console.print(f"{call}[bold magenta]{kind.removeprefix('call.')}[/bold magenta] {fields}")


if __name__ == "__main__":  # pragma: no cover
    main()


campaign = typer.Typer(no_args_is_help=True, help="Campaigns: lists of people the agent calls, paced and retried.")
app.add_typer(campaign, name="campaign")
CampaignArgument = Annotated[str, typer.Argument(metavar="ID", hidden=True)]  # in the usage line and the doc


@campaign.command("create")
def campaign_create(
    contacts: Annotated[Path, typer.Argument(metavar="CONTACTS.CSV", hidden=True)],  # in the usage line and the doc
    agent: Annotated[str, typer.Option(metavar="NAME", help="The agent that talks on the calls.")],
    from_: Annotated[str, typer.Option("--from", metavar="NUMBER", help="Your Twilio number, E.164.")],
    name: Annotated[str | None, typer.Option(metavar="TEXT", help="The campaign's name (default: the file's).")] = None,
    hours: Annotated[
        str, typer.Option(metavar="HH:MM-HH:MM", help="Calling hours in each contact's local time.")
    ] = "09:00-20:00",
    max_concurrent: Annotated[int, typer.Option(metavar="N", min=1, help="Calls at once, at most.")] = 5,
    draft: Annotated[bool, typer.Option("--draft", help="Leave it a draft (start it with campaign start).")] = False,
    url: ApiUrl = None,
    token: ApiToken = None,
) -> None:
    """Create a campaign that calls the people of CONTACTS.CSV (a header naming 'to', and any of reference, name,
    timezone; other columns are metadata the voicemail message may name), and start it."""
    try:
        text = contacts.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(f"{contacts}: {exc}") from None
    body = {
        "name": name or contacts.stem,
        "agent": agent,
        "from": from_,
        "calling_hours": hours,
        "max_concurrent": max_concurrent,
    }
    with _api(url, token) as client:
        created = _check(client.post("/api/campaigns", json=body))
        campaign_id = created["id"]
        response = client.post(
            f"/api/campaigns/{campaign_id}/contacts", content=text.encode(), headers={"Content-Type": "text/csv"}
        )
        if response.status_code == 422:
            client.post(f"/api/campaigns/{campaign_id}/cancel")  # nothing of the file was kept: no empty draft stays
            problems = response.json().get("problems") or [{"row": "", "field": "", "message": response.text}]
            lines = "\n".join(f"  {p['row']}: {p['field']}: {p['message']}" for p in problems[:20])
            raise Failure(f"{contacts}: {len(problems)} bad rows, nothing imported:\n{lines}", REFUSED)
        added = _check(response)["added"]
        if not draft:
            _check(client.post(f"/api/campaigns/{campaign_id}/start"))
    state = "draft" if draft else "running"
    typer.echo(f"{campaign_id} {state}: {added} contacts (callbridge campaign status {campaign_id})")


@campaign.command("status")
def campaign_status(
    campaign_id: CampaignArgument,
    once: Annotated[bool, typer.Option("--once", help="Print the counts once instead of following them.")] = False,
    url: ApiUrl = None,
    token: ApiToken = None,
) -> None:
    """Follow the campaign ID: a progress bar and its contacts by status, until it completes (Ctrl-C to stop)."""
    from rich.console import Console
    from rich.live import Live

    console = Console(highlight=False)
    with _api(url, token) as client:
        body = _check(client.get(f"/api/campaigns/{campaign_id}"))
        if once or not console.is_terminal:
            console.print(_campaign_view(body))
            return
        with Live(_campaign_view(body), console=console, refresh_per_second=4) as live:
            while body["status"] in ("draft", "running", "paused"):
                time.sleep(1)
                body = _check(client.get(f"/api/campaigns/{campaign_id}"))
                live.update(_campaign_view(body))


def _campaign_view(body: dict[str, Any]) -> Any:
    """A campaign as the terminal shows it: its name and status, a progress bar, and the counts."""
    from rich.console import Group
    from rich.markup import escape
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    counts: dict[str, int] = body["counts"]
    total = body["total"]
    done = total - sum(counts.get(status, 0) for status in ("pending", "scheduled", "in_progress"))
    table = Table.grid(padding=(0, 2))
    for status, count in counts.items():
        if count:
            table.add_row(status.replace("_", " "), str(count))
    title = f"[bold]{escape(body['name'])}[/bold] {body['id']} [dim]{body['status']}[/dim]  {done}/{total} done"
    return Group(title, ProgressBar(total=max(total, 1), completed=done, width=50), table)


def _campaign_action(action: str, campaign_id: str, url: str | None, token: str | None) -> None:
    with _api(url, token) as client:
        body = _check(client.post(f"/api/campaigns/{campaign_id}/{action}"))
    typer.echo(f"{campaign_id} {body['status']}")


@campaign.command("start")
def campaign_start(campaign_id: CampaignArgument, url: ApiUrl = None, token: ApiToken = None) -> None:
    """Start the draft campaign ID."""
    _campaign_action("start", campaign_id, url, token)


@campaign.command("pause")
def campaign_pause(campaign_id: CampaignArgument, url: ApiUrl = None, token: ApiToken = None) -> None:
    """Pause the campaign ID: no new call is placed (calls in progress go on)."""
    _campaign_action("pause", campaign_id, url, token)


@campaign.command("resume")
def campaign_resume(campaign_id: CampaignArgument, url: ApiUrl = None, token: ApiToken = None) -> None:
    """Resume the paused campaign ID."""
    _campaign_action("resume", campaign_id, url, token)


@campaign.command("cancel")
def campaign_cancel(campaign_id: CampaignArgument, url: ApiUrl = None, token: ApiToken = None) -> None:
    """Cancel the campaign ID for good: no new call is placed (calls in progress go on)."""
    _campaign_action("cancel", campaign_id, url, token)
