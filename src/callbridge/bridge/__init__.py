"""The asyncio side of a call: the driver of one call (:class:`CallBridge`) and the calls a process carries
(:class:`CallRegistry`)."""

from callbridge.bridge.call import (
    Authorize,
    BridgeMetrics,
    CallBridge,
    CallHooks,
    CallLimits,
    ContextResolver,
    EventSink,
    Fallback,
    HangUp,
    Transfer,
    TwilioLink,
)
from callbridge.bridge.registry import CallEnded, CallRegistry
from callbridge.realtime.client import RealtimeEndpoint

__all__ = [
    "Authorize",
    "BridgeMetrics",
    "CallBridge",
    "CallEnded",
    "CallHooks",
    "CallLimits",
    "CallRegistry",
    "ContextResolver",
    "EventSink",
    "Fallback",
    "HangUp",
    "RealtimeEndpoint",
    "Transfer",
    "TwilioLink",
]
