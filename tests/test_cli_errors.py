"""The first hour's mistakes: each is at most two lines on stderr that name the setting, file or URL, with no
traceback, and the documented exit status (2 configuration, 3 unreachable, 4 refused). Real processes throughout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from callbridge.testing.caller import CallScript, HangUp, Pause
from callbridge.testing.fake_realtime import FakeBehavior
from support import Service, free_port, no_live_call, serve

from conftest import secret

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # a process per case: about half a minute

CALLBRIDGE = Path(sys.executable).with_name("callbridge")
API_TOKEN = secret("cli-api-token-0123456789")
CLOSED = f"http://127.0.0.1:{free_port()}"  # nothing listens there
CALL_SID = "CA" + "9" * 32


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("CALLBRIDGE_", "OPENAI_", "TWILIO_"))
    }
    environment |= {"CALLBRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'calls.db'}", **env}
    return subprocess.run(
        [str(CALLBRIDGE), *args], env=environment, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


def assert_one_line(done: subprocess.CompletedProcess[str], status: int, *named: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status, (done.returncode, done.stderr)
    assert 1 <= len(lines) <= 2, done.stderr
    assert "Traceback" not in done.stderr and lines[0].startswith("error: "), done.stderr
    for name in named:
        assert name in done.stderr, (name, done.stderr)


@pytest.mark.parametrize(
    ("args", "env", "status", "named"),
    [
        (("serve", "--port", "9"), {"CALLBRIDGE_DATABASE_URL": "postgresql://u:pw@127.0.0.1:9/x"}, 3, "127.0.0.1:9"),
        (("db", "upgrade"), {"CALLBRIDGE_DATABASE_URL": "postgresql://u:pw@127.0.0.1:9/x"}, 3, "DATABASE_URL"),
        (("serve", "--port", "9"), {"CALLBRIDGE_TOOLS": "nonexistent.module:tools"}, 2, "CALLBRIDGE_TOOLS"),
        (("serve", "--port", "9"), {"CALLBRIDGE_TURN_DETECTION": "semantic"}, 2, "CALLBRIDGE_TURN_DETECTION"),
        (("serve", "--port", "9"), {"CALLBRIDGE_REALTIME_URL": "not-a-url"}, 2, "CALLBRIDGE_REALTIME_URL"),
        (("serve", "--port", "9"), {"CALLBRIDGE_WEBHOOK_URL": "ftp://x"}, 2, "CALLBRIDGE_WEBHOOK_URL"),
        (("serve", "--port", "9"), {"CALLBRIDGE_WEBHOOK_URL": "http://x/h"}, 2, "CALLBRIDGE_WEBHOOK_SECRET"),
        (("serve", "--port", "9"), {"CALLBRIDGE_CONTEXT_URL": "http://x/c"}, 2, "CALLBRIDGE_CONTEXT_URL"),
        (("serve", "--port", "9"), {"CALLBRIDGE_WEBHOOK_SECRET": "hook-secret"}, 2, "CALLBRIDGE_WEBHOOK_SECRET"),
        (("db", "upgrade"), {"CALLBRIDGE_DATABASE_URL": "not a url"}, 2, "CALLBRIDGE_DATABASE_URL"),
        (("demo", "--script", "/nonexistent"), {}, 2, "/nonexistent"),
        (("calls", "--url", CLOSED, "--token", "t"), {}, 3, CLOSED),
        (("transcript", CALL_SID, "--url", CLOSED, "--token", "t"), {}, 3, CLOSED),
        (("call", "+15550100001", "--from", "+15550100002", "--url", CLOSED, "--token", "t"), {}, 3, CLOSED),
        (("calls", "--url", CLOSED), {}, 2, "CALLBRIDGE_API_TOKEN"),
    ],
)
def test_a_mistake_is_one_line(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], status: int, named: str
) -> None:
    done = run(tmp_path, *args, **env)
    assert_one_line(done, status, named)
    assert "pw@" not in done.stderr, "a database password is never printed"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = run(tmp_path, "--debug", "demo", "--script", "/nonexistent")
    assert done.returncode != 0 and "Traceback" in done.stderr and "FileNotFoundError" in done.stderr


def test_version(tmp_path: Path) -> None:
    done = run(tmp_path, "--version")
    assert done.returncode == 0 and done.stdout.startswith("callbridge ")


async def test_client_commands_against_a_running_service(tmp_path: Path) -> None:
    """A wrong token is refused (4) in one line; with the right one, `calls` prints whole SIDs, piped, and --json."""
    async with serve(tmp_path, FakeBehavior(), CALLBRIDGE_API_TOKEN=API_TOKEN) as running:
        await place_call(running)
        wrong = run(tmp_path, "calls", "--url", running.base_url, "--token", "wrong-token")
        assert_one_line(wrong, 4, running.base_url, "CALLBRIDGE_API_TOKEN")
        listed = run(tmp_path, "calls", "--url", running.base_url, "--token", API_TOKEN, COLUMNS="60")
        assert listed.returncode == 0, listed.stderr
        assert CALL_SID in listed.stdout, listed.stdout  # whole, on a narrow terminal, piped
        as_json = run(tmp_path, "calls", "--json", "--url", running.base_url, "--token", API_TOKEN)
        calls = json.loads(as_json.stdout)["calls"]
        assert [(call["call_sid"], call["status"]) for call in calls] == [(CALL_SID, "ended")]


async def place_call(running: Service) -> None:
    """One short call through the service: its stream ends, and Twilio's final status never comes."""
    await running.caller().place_call(CallScript([Pause(300), HangUp()]), call_sid=CALL_SID, max_duration_s=20)
    await no_live_call(running)


@pytest.mark.parametrize(
    "command", ["", "serve", "simulate", "demo", "engine", "call", "calls", "transcript", "db", "db upgrade", "secret"]
)
def test_help_reads_cleanly(tmp_path: Path, command: str) -> None:
    """No type names (``<str>``), no raw markup, every option with a metavar that says what it takes."""
    done = run(tmp_path, *command.split(), "--help")
    assert done.returncode == 0, done.stderr
    for noise in ("<str>", "<bool>", "<int>", "<path>", "<float", "``", "[]"):
        assert noise not in done.stdout, (noise, done.stdout)


@pytest.mark.parametrize("command", ["serve", "engine"])
def test_a_port_in_use_is_one_line(tmp_path: Path, command: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line(run(tmp_path, command, "--port", str(port)), 2, f"127.0.0.1:{port}", "--port")
