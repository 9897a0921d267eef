"""Transcript lines and the sink interface they are delivered to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Speaker = Literal["caller", "agent"]


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    """One completed line of the conversation.

    Offsets are milliseconds from the start of the media stream, so lines sort by when they were spoken even
    though transcriptions complete out of order (the caller's transcription often lands after the agent's reply).
    """

    call_sid: str
    speaker: Speaker
    text: str
    start_ms: int
    end_ms: int
    item_id: str
    interrupted: bool = False
    failed: bool = False


class TranscriptSink(Protocol):
    """Receives each transcript line as soon as it completes."""

    async def write(self, line: TranscriptLine) -> None: ...


def cut_to_heard(text: str, heard_ms: int, total_ms: int) -> str:
    """Cut an agent line to the part the caller heard, proportionally to audio time, on a word boundary.

    The Realtime API deletes the unheard text server-side but never sends the shortened transcript back, so the
    bridge estimates it: speech rate is close enough to constant within one turn.
    """
    if total_ms <= 0 or heard_ms >= total_ms:
        return text
    if heard_ms <= 0:
        return ""
    keep = round(len(text) * heard_ms / total_ms)
    cut = text[:keep]
    if keep < len(text) and not text[keep].isspace() and " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip()
