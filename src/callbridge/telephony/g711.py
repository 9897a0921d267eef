"""G.711 μ-law, the phone call's audio, in pure Python (``audioop`` is gone from Python 3.13): callbridge's one codec.

The bridge itself never decodes audio; this serves the test doubles, the offline engine (its tables, as arrays), the
demo's WAV files and energy-based VAD.
"""

from __future__ import annotations

import math
import struct
import wave
from pathlib import Path

SAMPLE_RATE = 8000
BYTES_PER_MS = 8
SILENCE_BYTE = 0xFF  # μ-law encoding of 0

_BIAS = 0x84


def _decode_byte(byte: int) -> int:
    byte = ~byte & 0xFF
    sign = byte & 0x80
    exponent = (byte >> 4) & 0x07
    mantissa = byte & 0x0F
    magnitude = ((mantissa << 3) + _BIAS) << exponent
    magnitude -= _BIAS
    return -magnitude if sign else magnitude


_SEGMENT_ENDS = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)


def _encode_sample(sample: int) -> int:
    """The ITU-T G.711 reference encoder (bit-exact with the old ``audioop.lin2ulaw``)."""
    value = sample >> 2  # 14-bit magnitude domain
    mask = 0xFF
    if value < 0:
        value, mask = -value, 0x7F
    value = min(value, 8159) + 0x21
    segment = next((i for i, end in enumerate(_SEGMENT_ENDS) if value <= end), 8)
    if segment >= 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask


DECODE_TABLE: tuple[int, ...] = tuple(_decode_byte(b) for b in range(256))
"""Each μ-law byte's 16-bit sample."""
ENCODE_TABLE = bytes(_encode_sample(s - 32768) for s in range(65536))
"""Each 16-bit sample's μ-law byte, indexed by the sample + 32768."""


def ulaw_to_pcm16(data: bytes) -> list[int]:
    """Decode μ-law bytes to signed 16-bit samples."""
    table = DECODE_TABLE
    return [table[b] for b in data]


def pcm16_to_ulaw(samples: list[int] | tuple[int, ...]) -> bytes:
    """Encode signed 16-bit samples to μ-law bytes."""
    table = ENCODE_TABLE
    return bytes(table[max(-32768, min(32767, s)) + 32768] for s in samples)


def pcm16_bytes_to_ulaw(data: bytes) -> bytes:
    """Encode little-endian 16-bit PCM bytes to μ-law."""
    count = len(data) // 2
    return pcm16_to_ulaw(struct.unpack(f"<{count}h", data[: count * 2]))


def rms(data: bytes) -> float:
    """Root-mean-square level of μ-law audio, on the 16-bit scale."""
    if not data:
        return 0.0
    table = DECODE_TABLE
    return math.sqrt(sum(table[b] ** 2 for b in data) / len(data))


def silence(ms: int) -> bytes:
    return bytes([SILENCE_BYTE]) * (ms * BYTES_PER_MS)


def tone(ms: int, frequency: float = 440.0, amplitude: int = 8000) -> bytes:
    """A sine tone as μ-law: a stand-in for speech that energy-based VAD hears."""
    count = ms * BYTES_PER_MS
    step = 2 * math.pi * frequency / SAMPLE_RATE
    return pcm16_to_ulaw([int(amplitude * math.sin(step * n)) for n in range(count)])


def read_wav_as_ulaw(path: Path) -> bytes:
    """Read an 8 kHz mono WAV file (16-bit PCM or μ-law) as μ-law bytes."""
    with path.open("rb") as handle:
        header = handle.read(64)
    if b"WAVE" in header[:12] and struct.unpack("<H", header[20:22])[0] == 7:  # WAVE_FORMAT_MULAW
        return _read_ulaw_wav(path)
    with wave.open(str(path), "rb") as wav:
        if wav.getframerate() != SAMPLE_RATE or wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise ValueError(
                f"{path}: need 8 kHz mono 16-bit PCM or μ-law, got {wav.getframerate()} Hz, "
                f"{wav.getnchannels()} channel(s), {wav.getsampwidth() * 8}-bit"
            )
        return pcm16_bytes_to_ulaw(wav.readframes(wav.getnframes()))


def _read_ulaw_wav(path: Path) -> bytes:
    data = path.read_bytes()
    position = 12
    while position + 8 <= len(data):
        chunk_id, size = struct.unpack("<4sI", data[position : position + 8])
        if chunk_id == b"data":
            return data[position + 8 : position + 8 + size]
        position += 8 + size + (size & 1)
    raise ValueError(f"{path}: no data chunk")


def write_wav(path: Path, channels: list[bytes]) -> None:
    """Write μ-law channels (padded to equal length with silence) as a 16-bit PCM WAV file."""
    length = max((len(c) for c in channels), default=0)
    padded = [c + bytes([SILENCE_BYTE]) * (length - len(c)) for c in channels]
    decoded = [ulaw_to_pcm16(c) for c in padded]
    interleaved = [sample for frame in zip(*decoded, strict=True) for sample in frame]
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(len(channels))
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(struct.pack(f"<{len(interleaved)}h", *interleaved))
