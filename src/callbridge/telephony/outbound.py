"""The session's commands to Twilio as Media Streams messages (``media``, ``mark``, ``clear``)."""

from __future__ import annotations

from typing import Any

import orjson

from callbridge.core.commands import ClearAudio, PlayAudio, SendMark, TwilioCommand


def encode(command: TwilioCommand, stream_sid: str) -> bytes:
    """The command as the text of one WebSocket message on the stream ``stream_sid``."""
    return orjson.dumps(twilio_message(command, stream_sid))


def twilio_message(command: TwilioCommand, stream_sid: str) -> dict[str, Any]:
    """The command as a Media Streams message."""
    if type(command) is PlayAudio:  # the per-frame path first
        return {"event": "media", "streamSid": stream_sid, "media": {"payload": command.payload}}
    if isinstance(command, SendMark):
        return {"event": "mark", "streamSid": stream_sid, "mark": {"name": command.name}}
    assert isinstance(command, ClearAudio)
    return {"event": "clear", "streamSid": stream_sid}
