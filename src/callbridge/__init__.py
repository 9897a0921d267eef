"""callbridge: a speech-to-speech AI agent on the phone (Twilio Media Streams ⇄ OpenAI Realtime API).

The public API. Names load on first use, so importing one part (the sans-I/O core, say) does not pull in the web
stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from callbridge.api.app import create_app
    from callbridge.bridge import CallBridge, CallHooks, CallLimits, CallRegistry, RealtimeEndpoint
    from callbridge.config import Settings
    from callbridge.core.session import CallSession
    from callbridge.service.tools import ToolContext, ToolRegistry

__all__ = [
    "CallBridge",
    "CallHooks",
    "CallLimits",
    "CallRegistry",
    "CallSession",
    "RealtimeEndpoint",
    "Settings",
    "ToolContext",
    "ToolRegistry",
    "create_app",
]

_MODULES = {
    "CallBridge": "callbridge.bridge",
    "CallHooks": "callbridge.bridge",
    "CallLimits": "callbridge.bridge",
    "CallRegistry": "callbridge.bridge",
    "RealtimeEndpoint": "callbridge.realtime.client",
    "CallSession": "callbridge.core.session",
    "Settings": "callbridge.config",
    "ToolContext": "callbridge.service.tools",
    "ToolRegistry": "callbridge.service.tools",
    "create_app": "callbridge.api.app",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'callbridge' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
