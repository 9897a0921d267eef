"""Every example in the README works as written.

The README's fenced blocks are taken in order, in one empty directory: a ``toml`` or ``python`` block whose first
line is ``# <path>`` is that file; a ``sh`` block runs in bash (``set -e``), with the project's virtualenv as
``.venv`` and none of this machine's callbridge, OpenAI or Twilio settings. A ``callbridge serve`` in a block runs
in the background on a free port until it answers ``/healthz``; the block fails if it never does, and every server
is stopped (SIGTERM) when the block ends. The port is the one thing changed: ``127.0.0.1:8080`` becomes it, and
``CALLBRIDGE_PUBLIC_URL`` (the client commands' default URL) names it. A block that cannot run here says so, and
why, in a ``<!-- README test: not run (...) -->`` comment just above it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = re.compile(r"<!-- README test: not run \((?P<why>[^)]+)\) -->\s*$")
SERVE = re.compile(r"\bcallbridge serve\b")
FILE = re.compile(r"# (?P<path>[\w./-]+)")

PRELUDE = """
set -euo pipefail
trap 'kill $(jobs -p) 2>/dev/null || true; wait || true' EXIT
wait_healthy() {
    python3 - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(600):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(f"callbridge serve on port {sys.argv[1]} never answered /healthz")
PY
}
"""


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int
    not_run: str | None


def blocks() -> list[Block]:
    found, lines = [], README.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = lines[index].strip()
        if opening.startswith("```"):
            language = opening.removeprefix("```").strip()
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
            indent = len(lines[index]) - len(lines[index].lstrip())
            text = "\n".join(line[indent:] for line in lines[index + 1 : end])
            marker = NOT_RUN.search(lines[index - 1]) if index else None
            found.append(Block(language, text, index + 1, marker.group("why") if marker else None))
            index = end
        index += 1
    return found


def file_path(block: Block) -> str | None:
    """The file a ``toml`` or ``python`` example is (its first line, ``# myapp/agent_tools.py``)."""
    first = FILE.fullmatch(block.text.splitlines()[0]) if block.text else None
    return first.group("path") if first else None


def as_script(block: Block, port: int) -> str:
    """The block as bash: each ``callbridge serve`` on ``port``, in the background, waited for."""
    lines = []
    for line in block.text.replace("127.0.0.1:8080", f"127.0.0.1:{port}").splitlines():
        if SERVE.search(line):
            command = SERVE.sub(f"callbridge serve --port {port}", line.split("#", 1)[0]).rstrip().rstrip("&")
            lines += [f"{command} &", f"wait_healthy {port}"]
        else:
            lines.append(line)
    return PRELUDE + f"export CALLBRIDGE_PUBLIC_URL=http://127.0.0.1:{port}\n" + "\n".join(lines) + "\n"


def test_every_example_is_run_or_says_why_not() -> None:
    for block in blocks():
        if block.language in ("", "text"):
            continue  # a picture, not an example
        runnable = block.language == "sh" or (block.language in ("toml", "python") and file_path(block) is not None)
        assert runnable or block.not_run, f"README.md:{block.line}: a {block.language} example the test cannot run"


def test_the_examples_run_as_written(tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(sys.prefix)
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("CALLBRIDGE_", "OPENAI_", "TWILIO_"))
    }
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    ran = 0
    for block in blocks():
        if block.not_run or block.language in ("", "text"):
            continue
        if block.language in ("toml", "python"):
            name = file_path(block)
            assert name is not None, f"README.md:{block.line}: a {block.language} example names no file"
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.text + "\n")
            continue
        done = subprocess.run(
            ["bash", "-c", as_script(block, free_port())],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        output = f"README.md:{block.line}:\n{block.text}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"  # noqa: E501
        assert done.returncode == 0, output
        assert "Traceback" not in done.stderr, output
        ran += 1
    assert ran >= 3, "the README's runnable examples were not found"
