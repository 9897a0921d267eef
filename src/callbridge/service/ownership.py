"""Which process carries a call, and whether that process is still alive (to close the calls of dead ones)."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from callbridge.store.repository import CallRecord

UNOWNED_CALL_LIMIT = timedelta(hours=4)
"""A call no process took up (answered, its stream never came) is lost after this: Twilio's default time limit."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None: no such process, or no /proc to ask)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_identity() -> str:
    """``host:pid:start``: unique even when a restarted container reuses the pid of the process it replaces."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid()) or '-'}"


def is_orphan(call: CallRecord) -> bool:
    """An open call whose process is gone (on this host), or which no process took up for too long.

    Calls carried on other hosts are theirs to close: this process cannot see whether their owner lives.
    """
    if call.owner is None:
        created = call.created_at if call.created_at.tzinfo else call.created_at.replace(tzinfo=UTC)
        return datetime.now(UTC) - created > UNOWNED_CALL_LIMIT
    host, _, rest = call.owner.partition(":")
    if host != socket.gethostname():
        return False
    pid_text, _, started = rest.partition(":")
    if not pid_text.isdigit():
        return True
    alive = _start_time(int(pid_text))
    return alive is None or (started != "-" and alive != started)
