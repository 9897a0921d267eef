"""The public API: every name in ``__all__`` resolves, and importing the core pulls in no web stack."""

from __future__ import annotations

import subprocess
import sys

import callbridge
import callbridge.testing


def test_every_public_name_resolves() -> None:
    for package in (callbridge, callbridge.testing):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
    assert callbridge.create_app.__module__ == "callbridge.api.app"
    assert callbridge.testing.conformance.__name__ == "callbridge.testing.conformance"


def test_the_core_imports_alone() -> None:
    """The sans-I/O session runs in any asyncio app: importing it loads neither FastAPI nor the openai models."""
    code = (
        "import sys, callbridge.core.session, callbridge\n"
        "loaded = [m for m in ('fastapi', 'openai', 'sqlalchemy', 'picows') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
