"""Strict conformance checks of the two wire protocols (see :mod:`callbridge.realtime.conformance`)."""

from callbridge.realtime.conformance import (
    ConformanceError,
    Dialect,
    server_event_types,
    validate_client_event,
    validate_server_event,
    validate_twilio_message,
)

__all__ = [
    "ConformanceError",
    "Dialect",
    "server_event_types",
    "validate_client_event",
    "validate_server_event",
    "validate_twilio_message",
]
