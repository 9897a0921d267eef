"""The asyncio side of a call: the driver of one call (:class:`CallBridge`) and the calls a process carries
(:class:`CallRegistry`)."""

from callbridge.bridge.call import (
    RELAY_SAMPLE_EVERY,
    Authorize,
    BridgeMetrics,
    CallBridge,
    ContextResolver,
    EventSink,
    Fallback,
    HangUp,
    ModelConnection,
    RealtimeEndpoint,
    Transfer,
    TwilioLink,
)
from callbridge.bridge.registry import CallEnded, CallRegistry

__all__ = [
    "RELAY_SAMPLE_EVERY",
    "Authorize",
    "BridgeMetrics",
    "CallBridge",
    "CallEnded",
    "CallRegistry",
    "ContextResolver",
    "EventSink",
    "Fallback",
    "HangUp",
    "ModelConnection",
    "RealtimeEndpoint",
    "Transfer",
    "TwilioLink",
]
