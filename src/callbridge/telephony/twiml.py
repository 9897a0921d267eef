"""TwiML that connects a call to callbridge's media stream (built with the ``twilio`` package)."""

from __future__ import annotations

from collections.abc import Mapping

from twilio.twiml.voice_response import Connect, VoiceResponse


def connect_stream_twiml(
    stream_url: str,
    parameters: Mapping[str, str],
    say: str | None = None,
    *,
    status_callback: str | None = None,
) -> str:
    """``<Say>`` (optional) then ``<Connect><Stream>`` with the signed ``<Parameter>``s.

    The stream URL carries no query string: Twilio drops it. Per-call data travels as parameters only.
    ``status_callback`` (an absolute URL) has Twilio POST the stream's ``stream-started``, ``stream-stopped`` and
    ``stream-error`` events there, signed like its other webhooks.
    """
    if "?" in stream_url:
        raise ValueError("Twilio drops query strings from <Stream url>; pass data as parameters")
    response = VoiceResponse()
    if say:
        response.say(say)
    connect = Connect()
    if status_callback:
        stream = connect.stream(url=stream_url, status_callback=status_callback, status_callback_method="POST")
    else:
        stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


def fallback_twiml(message: str, transfer_to: str | None = None) -> str:
    """What a caller gets when the agent cannot take the call: the message, then a human or the hang-up."""
    if transfer_to:
        return dial_twiml(transfer_to, say=message)
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response)


def dial_twiml(number: str, say: str | None = None) -> str:
    """Transfer to a human: ``<Dial>`` the number (after an optional ``<Say>``)."""
    response = VoiceResponse()
    if say:
        response.say(say)
    response.dial(number)
    return str(response)
