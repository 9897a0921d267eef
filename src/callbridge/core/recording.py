"""A call's recording as it is made: the caller on the left, the agent on the right, on the call's own timeline.

Sans-I/O like the session: :class:`CallRecorder` is fed what the driver reads and sends, with the time, and hands
back stereo μ-law bytes to append to the recording (interleaved, one byte per channel per sample, 8 kHz). Nothing
is transcoded: the bytes are the phone's own μ-law, decoded only when the recording is read.

- The caller channel places each Twilio frame at its timestamp (milliseconds since the stream began): a gap
  between frames is silence. A frame that would overlap the audio before it (a repeated or missing timestamp) or
  that claims to be implausibly far ahead follows that audio instead: caller audio is never overwritten.
- The agent channel is what the caller heard. Twilio plays the audio it is sent back to back from when it
  arrives, and a ``clear`` drops what it has not played yet: so each :class:`PlayAudio` is placed at the later of
  now and the end of what is queued, and a :class:`ClearAudio` removes everything queued after now. At the end of
  the call, whatever was still queued is cut the same way: nobody heard it.
- Time zero is the stream's ``start``; the recording ends when the call does (or with the caller's last frame, if
  that reaches a little further).

Bytes are handed out up to a point that can no longer change: no later than now (agent audio still queued may yet be
cleared), and no later than the caller's audio so far, unless the caller has been silent on the wire for longer
than :data:`CALLER_WAIT_S` (then the missing stretch is silence). :attr:`CallRecorder.flush_at` says when
:meth:`CallRecorder.take` is next worth calling (every :data:`FLUSH_EVERY_S`), so a process killed mid-call loses at
most about that much of what was already heard.
"""

from __future__ import annotations

import binascii
import struct
from typing import Protocol

from callbridge.core.commands import ClearAudio, PlayAudio, TwilioCommand

SAMPLE_RATE = 8000
"""Samples per second and channel: the phone's."""
SILENCE = b"\xff"
"""μ-law for a zero sample."""
CHANNELS = 2
FLUSH_EVERY_S = 0.5
"""How often the recording is handed out to be written: what a crash can lose of what was already heard."""
CALLER_WAIT_S = 1.0
"""How long the recording waits for caller frames that are late on the wire before it writes silence for them."""
AHEAD_LIMIT_S = 1
"""A caller frame stamped further ahead of the stream's clock than this is not believed: it follows the audio before
it instead of opening a long gap."""


class RecordingSink(Protocol):
    """Where one call's recording goes as it is made (a file, an object being uploaded)."""

    def append(self, chunk: bytes) -> None:
        """Keep these bytes of stereo μ-law after those before. Never blocks (a sink that must wait queues) and never
        raises: a recording that cannot be kept must not disturb the call."""
        ...

    async def close(self) -> None:
        """The call is over: make the recording whole where it is kept."""
        ...


class CallRecorder:
    """One call's stereo recording, from the stream's start (``started``, the driver's monotonic seconds)."""

    __slots__ = ("_base", "_end", "_left", "_right", "_started", "flush_at", "written")

    def __init__(self, started: float) -> None:
        self._started = started
        self._base = 0
        """The sample both channels start at: everything before it has been handed out."""
        self._left = bytearray()
        """Caller audio from ``_base`` on."""
        self._right = bytearray()
        """Agent audio from ``_base`` on, up to the end of what is queued at Twilio."""
        self._end: int | None = None
        """The call's last sample, once it has ended."""
        self.flush_at = started + FLUSH_EVERY_S
        """When :meth:`take` next has a worthwhile amount to hand out."""
        self.written = 0
        """Samples per channel handed out so far."""

    @property
    def ended(self) -> bool:
        return self._end is not None

    def _sample(self, now: float) -> int:
        return max(0, round((now - self._started) * SAMPLE_RATE))

    # ------------------------------------------------------------------------------------------------ input

    def caller(self, payload: str, timestamp_ms: int, now: float) -> None:
        """One caller frame (base64 μ-law, as Twilio sent it) stamped ``timestamp_ms`` after the stream began."""
        if self._end is not None:
            return
        audio = binascii.a2b_base64(payload)
        left = self._left
        end = self._base + len(left)
        at = timestamp_ms * (SAMPLE_RATE // 1000)
        if at != end:  # not right after the frame before (the usual case): a gap, an overlap or a wild stamp
            if at < end or at > self._sample(now) + AHEAD_LIMIT_S * SAMPLE_RATE:
                at = end
            left += SILENCE * (at - end)
        left += audio

    def command(self, command: TwilioCommand, now: float) -> None:
        """A message the driver sent to Twilio: audio to play, or a ``clear`` (a mark changes nothing heard)."""
        if type(command) is PlayAudio:
            self.play(command.payload, now)
        elif type(command) is ClearAudio:
            self.clear(now)

    def play(self, payload: str, now: float) -> None:
        """Agent audio (base64 μ-law) sent to Twilio now: it plays after what is queued, or at once."""
        if self._end is not None:
            return
        right = self._right
        queued_until = self._base + len(right)
        now_at = self._sample(now)
        if now_at > queued_until:  # Twilio's queue ran dry: silence until now
            right += SILENCE * (now_at - queued_until)
        right += binascii.a2b_base64(payload)

    def clear(self, now: float) -> None:
        """Twilio drops what it has not played yet: nothing after now was heard."""
        if self._end is None:
            self._cut_agent(self._sample(now))

    def end(self, now: float) -> None:
        """The call is over: the recording ends now (or with the caller's last frame); queued agent audio is cut."""
        if self._end is None:
            now_at = self._sample(now)
            self._cut_agent(now_at)
            self._end = max(now_at, self._base + len(self._left))

    def _cut_agent(self, at: int) -> None:
        keep = max(0, at - self._base)
        if len(self._right) > keep:
            del self._right[keep:]

    # ------------------------------------------------------------------------------------------------ output

    def take(self, now: float) -> bytes:
        """The stereo μ-law that can no longer change, to append to the recording (empty when there is none)."""
        self.flush_at = now + FLUSH_EVERY_S
        if self._end is not None:
            return self._hand_out(self._end)
        now_at = self._sample(now)
        caller_until = self._base + len(self._left)
        return self._hand_out(min(now_at, max(caller_until, now_at - int(CALLER_WAIT_S * SAMPLE_RATE))))

    def finish(self, now: float) -> bytes:
        """End the call (if it has not ended) and hand out the rest of the recording."""
        self.end(now)
        return self.take(now)

    def _hand_out(self, until: int) -> bytes:
        count = until - self._base
        if count <= 0:
            return b""
        left, right = self._left, self._right
        out = bytearray(CHANNELS * count)
        out[0::2] = _exactly(left, count)
        out[1::2] = _exactly(right, count)
        del left[:count]
        del right[:count]
        self._base = until
        self.written += count
        return bytes(out)


def _exactly(channel: bytearray, count: int) -> bytes | bytearray:
    """The first ``count`` samples of a channel, silence where it has none."""
    if len(channel) >= count:
        return channel[:count]
    return bytes(channel) + SILENCE * (count - len(channel))


# ---------------------------------------------------------------------------------------------------- WAV headers

WAVE_FORMAT_PCM = 1
WAVE_FORMAT_MULAW = 7


def wav_header(data_bytes: int, *, mulaw: bool, channels: int = CHANNELS, rate: int = SAMPLE_RATE) -> bytes:
    """A WAV header for ``data_bytes`` of sample data: 8-bit μ-law (its ``fmt`` extension and ``fact`` chunk, as the
    format requires of a compressed encoding) or 16-bit PCM (the plain 44 bytes)."""
    width = 1 if mulaw else 2
    block = channels * width
    fmt = struct.pack(
        "<HHIIHH", WAVE_FORMAT_MULAW if mulaw else WAVE_FORMAT_PCM, channels, rate, rate * block, block, 8 * width
    )
    chunks = b"fmt " + struct.pack("<I", len(fmt) + 2 * mulaw) + fmt + b"\0\0" * mulaw
    if mulaw:
        chunks += b"fact" + struct.pack("<II", 4, data_bytes // block)
    chunks += b"data" + struct.pack("<I", data_bytes)
    return b"RIFF" + struct.pack("<I", 4 + len(chunks) + data_bytes) + b"WAVE" + chunks


MULAW_HEADER_BYTES = len(wav_header(0, mulaw=True))
"""58: what precedes the samples of a recording as it is kept."""
PCM16_HEADER_BYTES = len(wav_header(0, mulaw=False))
"""44: what precedes the samples of a recording as it is served."""
