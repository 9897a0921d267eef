"""Calls' recordings: where they are kept, how they are served, how long they stay.

Each call let in is recorded as it runs (:class:`callbridge.core.recording.CallRecorder` makes the audio; the bridge
appends it here): stereo μ-law, the caller left and the agent right, about every half second, so a process killed
mid-call leaves all but the last moments, made whole at the next start (:meth:`Recordings.recover`). Recording is on
for an agent unless its ``record`` (the agents file) or ``CALLBRIDGE_RECORD_CALLS`` says otherwise.

The REST API serves a recording as a PCM16 WAV (8 kHz, two channels), decoded as it is read: 16-bit samples are
exactly two bytes per μ-law byte, so any byte range of the WAV maps onto the stored file without decoding the rest.

Storage sits behind :class:`RecordingStore`: :class:`DirectoryStore` keeps the files in ``CALLBRIDGE_RECORDINGS_DIR``
on this host; a store shared between hosts (an object store) can take its place when callbridge spans several.
Recordings older than ``CALLBRIDGE_RECORDINGS_RETENTION_DAYS`` are deleted, and the deletion is a call event
(``recording_deleted``); the call's record stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import structlog

from callbridge.config import Settings
from callbridge.core.recording import (
    CHANNELS,
    MULAW_HEADER_BYTES,
    PCM16_HEADER_BYTES,
    SAMPLE_RATE,
    RecordingSink,
    wav_header,
)
from callbridge.core.session import CallSession
from callbridge.service.calls import Invalid, NotFound
from callbridge.store.repository import CallRecord, Store
from callbridge.telephony.g711 import DECODE_TABLE

log = structlog.stdlib.get_logger("callbridge.recordings")
Logger = structlog.stdlib.BoundLogger

CALL_SID = re.compile(r"CA[0-9a-f]{32}")
"""A Twilio call SID, the only name a recording is ever kept or looked up under (checked with ``fullmatch``)."""
SWEEP_EVERY_S = 3600.0
"""How often recordings past their retention are looked for (and once at start)."""
READ_CHUNK = 128 * 1024
"""μ-law bytes read and decoded at a time when a recording is served (256 KiB of WAV)."""
DELETED = "recording_deleted"
"""The call event that says a call's recording was deleted."""


def is_call_sid(value: str) -> bool:
    return CALL_SID.fullmatch(value) is not None


# ---------------------------------------------------------------------------------------------------- storage


class RecordingStore(Protocol):
    """Where recordings are kept, by call SID: the stereo μ-law samples of each (without a header), written as the
    call runs and readable once it is over."""

    def create(self, call_sid: str, logger: Logger) -> RecordingSink | None:
        """Begin a call's recording (``None``: the call already has one); ``logger`` names the call in what the
        recording has to say (a write that failed, the recording saved)."""
        ...

    async def size(self, call_sid: str) -> int | None:
        """Bytes of samples a finished recording holds (``None``: no finished recording)."""
        ...

    async def read(self, call_sid: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of a finished recording's samples from ``offset``."""
        ...

    async def in_progress(self, call_sid: str) -> bool:
        """Whether the call's recording is being made (or was left incomplete, until :meth:`recover`)."""
        ...

    async def remove_older_than(self, cutoff: float) -> list[str]:
        """Delete the finished recordings completed before ``cutoff`` (Unix time); the call SIDs deleted."""
        ...

    async def recover(self) -> list[str]:
        """Make whole each recording left incomplete by a process that is gone: the call SIDs recovered."""
        ...


class DirectoryStore:
    """Recordings as files in one directory: ``<call SID>.wav`` once finished (a stereo μ-law WAV, playable as it
    is), ``<call SID>.part`` while recorded. The process recording a call holds an exclusive ``flock`` on its part
    file, which the kernel releases when the process dies however it dies: a part file nobody holds is a recording
    left incomplete, which :meth:`recover` finishes (header fixed, trailing half sample dropped) and renames.

    Appends are plain ``write`` calls on the event loop (about 8 KB per call every half second, into the page
    cache); reads, listings and recovery run in a thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, call_sid: str, suffix: str) -> Path:
        if not is_call_sid(call_sid):  # no file name is ever made of anything but a call SID
            raise ValueError("not a call SID")
        return self.directory / f"{call_sid}{suffix}"

    def create(self, call_sid: str, logger: Logger) -> RecordingSink | None:
        final, part = self._path(call_sid, ".wav"), self._path(call_sid, ".part")
        if final.exists():
            logger.warning("recording.exists", detail="the call was recorded before; not again")
            return None
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Made and locked under a name recovery never looks at, then linked into place (which fails if a recording
        # of the call is already being made): recovery can never take a new recording for an abandoned one.
        staging = self.directory / f".{call_sid}.{os.getpid()}.tmp"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, wav_header(0, mulaw=True))
            os.link(staging, part)
        except FileExistsError:
            os.close(fd)
            logger.warning("recording.exists", detail="a recording of the call is being made")
            return None
        except BaseException:
            os.close(fd)
            raise
        finally:
            staging.unlink(missing_ok=True)
        return _RecordingFile(logger, fd, part, final)

    async def size(self, call_sid: str) -> int | None:
        try:
            return max(0, self._path(call_sid, ".wav").stat().st_size - MULAW_HEADER_BYTES)
        except FileNotFoundError:
            return None

    async def read(self, call_sid: str, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(_read, self._path(call_sid, ".wav"), MULAW_HEADER_BYTES + offset, length)

    async def in_progress(self, call_sid: str) -> bool:
        return self._path(call_sid, ".part").exists()

    async def remove_older_than(self, cutoff: float) -> list[str]:
        return await asyncio.to_thread(self._remove_older_than, cutoff)

    def _remove_older_than(self, cutoff: float) -> list[str]:
        removed = []
        for call_sid, path in self._files(".wav"):
            with contextlib.suppress(FileNotFoundError):  # a sibling process's sweep took it first
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(call_sid)
        return removed

    async def recover(self) -> list[str]:
        return await asyncio.to_thread(self._recover)

    def _recover(self) -> list[str]:
        recovered = []
        for call_sid, part in self._files(".part"):
            with _abandoned(part) as fd:
                if fd is not None:
                    data_bytes = max(0, os.fstat(fd).st_size - MULAW_HEADER_BYTES)
                    _complete(fd, part, self._path(call_sid, ".wav"), data_bytes)
                    recovered.append(call_sid)
        for staging in self.directory.glob(".CA*.tmp"):  # made by a process killed before it linked its part file
            with _abandoned(staging) as fd:
                if fd is not None:
                    staging.unlink(missing_ok=True)
        return recovered

    def _files(self, suffix: str) -> Iterator[tuple[str, Path]]:
        """(call SID, path) of the files with this suffix; anything else in the directory is left alone."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            call_sid = path.name.removesuffix(suffix)
            if path.name.endswith(suffix) and is_call_sid(call_sid):
                yield call_sid, path


@contextlib.contextmanager
def _abandoned(path: Path) -> Iterator[int | None]:
    """An open descriptor of ``path`` if no live process holds it (its lock taken), else ``None``."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:  # finished or recovered meanwhile
        yield None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        same = os.stat(path).st_ino == os.fstat(fd).st_ino  # not renamed away while we opened it
    except (BlockingIOError, FileNotFoundError):  # being recorded by a live process, or just finished
        same = False
    try:
        yield fd if same else None
    finally:
        os.close(fd)


def _complete(fd: int, part: Path, final: Path, data_bytes: int) -> None:
    """Give a recording its true header (whole stereo samples only) and its final name."""
    data_bytes -= data_bytes % CHANNELS
    os.ftruncate(fd, MULAW_HEADER_BYTES + data_bytes)
    os.pwrite(fd, wav_header(data_bytes, mulaw=True), 0)
    os.replace(part, final)


def _read(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read(length)


class _RecordingFile:
    """One call's part file, locked while it is written."""

    def __init__(self, logger: Logger, fd: int, part: Path, final: Path) -> None:
        self._log = logger
        self._fd: int | None = fd
        self._part = part
        self._final = final
        self._data_bytes = 0

    def append(self, chunk: bytes) -> None:
        if self._fd is None or not chunk:
            return
        try:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:  # a full disk: the recording stops here; the call goes on
            self._log.error("recording.write_failed", error=f"{type(exc).__name__}: {exc}")
            self._close()
            return
        self._data_bytes += len(chunk)

    async def close(self) -> None:
        self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _complete(fd, self._part, self._final, self._data_bytes)
            seconds = round(self._data_bytes / CHANNELS / SAMPLE_RATE, 2)
            self._log.info("recording.saved", seconds=seconds)
        except OSError as exc:  # left as a part file, for the next start to finish
            self._log.error("recording.finish_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------- serving

_LOW = bytes(sample & 0xFF for sample in DECODE_TABLE)
_HIGH = bytes((sample >> 8) & 0xFF for sample in DECODE_TABLE)


def pcm16(ulaw: bytes) -> bytes:
    """μ-law as little-endian 16-bit PCM (the codec's own table, two byte translations: no Python per sample)."""
    out = bytearray(2 * len(ulaw))
    out[0::2] = ulaw.translate(_LOW)
    out[1::2] = ulaw.translate(_HIGH)
    return bytes(out)


@dataclasses.dataclass(frozen=True, slots=True)
class Recording:
    """A finished recording as the API serves it: a PCM16 WAV, 8 kHz, two channels (caller left, agent right)."""

    call_sid: str
    samples_bytes: int
    """Bytes of stereo μ-law kept (the WAV's data is twice as long)."""
    store: RecordingStore

    @property
    def size(self) -> int:
        """Bytes of the WAV."""
        return PCM16_HEADER_BYTES + 2 * self.samples_bytes

    @property
    def duration_s(self) -> float:
        return self.samples_bytes / CHANNELS / SAMPLE_RATE

    async def chunks(self, first: int = 0, last: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``first`` to ``last`` (inclusive; default: the end) of the WAV, decoded as they are read."""
        stop = self.size if last is None else min(last + 1, self.size)
        if first < PCM16_HEADER_BYTES:
            yield wav_header(2 * self.samples_bytes, mulaw=False)[first:stop]
        position, stop = max(first, PCM16_HEADER_BYTES) - PCM16_HEADER_BYTES, stop - PCM16_HEADER_BYTES
        while position < stop:  # in the data: PCM byte p is half of μ-law byte p // 2
            begin = position // 2
            end = min((stop + 1) // 2, begin + READ_CHUNK)
            ulaw = await self.store.read(self.call_sid, begin, end - begin)
            if not ulaw:  # deleted while it was being read
                return
            piece = pcm16(ulaw)[position - 2 * begin : stop - 2 * begin]
            yield piece
            position += len(piece)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes a ``Range`` header asks of ``size`` as (first, last), inclusive; ``None`` for the whole (no header,
    another unit, several ranges or one that does not parse: RFC 9110 lets a server answer those with everything).
    Raises :class:`ValueError` for a range that starts past the end (416)."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    found = re.fullmatch(r"\s*(\d{0,18})\s*-\s*(\d{0,18})\s*", spec)
    if unit.strip().lower() != "bytes" or found is None or found[1] == found[2] == "":
        return None
    if found[1] == "":  # the last n bytes
        if int(found[2]) == 0 or size == 0:
            raise ValueError("an empty suffix")
        return max(0, size - int(found[2])), size - 1
    first = int(found[1])
    last = int(found[2]) if found[2] else size - 1
    if first >= size and (last >= first or not found[2]):
        raise ValueError("past the end")
    return (first, min(last, size - 1)) if last >= first else None


# ---------------------------------------------------------------------------------------------------- the service


class Recordings:
    """Recordings for the service: opened for each call let in, served by call SID, swept after their retention."""

    def __init__(self, settings: Settings, store: Store, files: RecordingStore | None = None) -> None:
        self.retention_days = settings.recordings_retention_days
        self.store = store
        self.files: RecordingStore = files or DirectoryStore(Path(settings.recordings_dir))

    def open(self, session: CallSession) -> RecordingSink | None:
        """Where a call let in is recorded (the bridge's hook); ``None`` when its agent does not record."""
        call_sid = session.call_sid
        if not session.agent.record or call_sid is None:
            return None
        logger = log.bind(call_sid=call_sid, stream_sid=session.stream_sid)  # as every line of the call
        if not is_call_sid(call_sid):
            logger.warning("recording.skipped", reason="not a Twilio call SID")
            return None
        try:
            return self.files.create(call_sid, logger)
        except OSError as exc:  # an unwritable directory: the call goes on unrecorded
            logger.error("recording.open_failed", error=f"{type(exc).__name__}: {exc}")
            return None

    async def recording(self, call_sid: str) -> Recording:
        """A call's finished recording; :class:`Invalid` for what is no call SID, :class:`NotFound` (with the reason)
        when the call or its recording is not there."""
        if not is_call_sid(call_sid):
            log.warning("recording.refused", call_sid=call_sid[:80], reason="not a call SID")
            raise Invalid("not a call SID (CA and 32 lowercase hexadecimal digits)")
        record = await self.store.get_call(call_sid)
        if record is None:
            raise NotFound("no such call")
        size = await self.files.size(call_sid)
        if size is None:
            raise NotFound(await self._missing(record))
        return Recording(call_sid, size, self.files)

    async def _missing(self, record: CallRecord) -> str:
        """Why a call on record has no recording to serve (logged, for whoever wonders)."""
        call_sid = record.call_sid
        reason = "the call was not recorded (recording is off for its agent, or it never reached the agent)"
        elsewhere = record.owner is not None and record.owner.partition(":")[0] != socket.gethostname()
        if await self.files.in_progress(call_sid):
            reason = "the call is still being recorded: its recording is ready once the call has ended"
        elif any(event.kind == DELETED for event in await self.store.events(call_sid)):
            reason = f"the recording was deleted: recordings are kept {self.retention_days} days"
        elif elsewhere:
            reason = "the call was carried by another host: its recording is kept there, not on this one"
            log.warning("recording.elsewhere", call_sid=call_sid, owner=record.owner)
        elif record.ended_at is None:
            reason = "the call is in progress: its recording is ready once the call has ended"
        log.info("recording.not_found", call_sid=call_sid, reason=reason)
        return reason

    async def recover(self) -> None:
        """Finish the recordings of calls whose process was killed (at start: their files stay valid WAVs)."""
        for call_sid in await self.files.recover():
            log.warning("recording.recovered", call_sid=call_sid, detail="left incomplete by a process that stopped")

    async def sweep(self, now: float | None = None) -> list[str]:
        """Delete the recordings older than the retention; each deletion is an event of its call."""
        if self.retention_days <= 0:
            return []
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        removed = await self.files.remove_older_than(cutoff)
        data = {"reason": "retention", "retention_days": self.retention_days}
        for call_sid in removed:
            log.info("recording.deleted", call_sid=call_sid, retention_days=self.retention_days)
            try:
                if await self.store.get_call(call_sid) is not None:
                    await self.store.add_event(call_sid, DELETED, data)
            except Exception as exc:  # the file is gone either way; the event is what is lost
                log.error("recording.event_failed", call_sid=call_sid, error=f"{type(exc).__name__}: {exc}")
        return removed

    async def sweep_forever(self, every_s: float = SWEEP_EVERY_S) -> None:
        """:meth:`sweep` now and every ``every_s``, for the life of the application."""
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # a transient error (the directory, the database) must not end the sweeps
                log.error("recording.sweep_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(every_s)
