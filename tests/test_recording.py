"""Recordings without sockets: the recorder (sans-I/O), the files it ends up in, recovery after ``kill -9``, the WAV
served (its bytes and its ranges), the retention sweep and who gets recorded."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import struct
import sys
import time
import wave
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from subprocess import PIPE

import pytest

from callbridge.config import Settings
from callbridge.core.commands import ClearAudio, PlayAudio, SendMark
from callbridge.core.context import AgentConfig, CallContext
from callbridge.core.recording import (
    CALLER_WAIT_S,
    FLUSH_EVERY_S,
    MULAW_HEADER_BYTES,
    CallRecorder,
    RecordingSink,
    wav_header,
)
from callbridge.core.session import CallSession, SessionConfig
from callbridge.service.agents import load_agents
from callbridge.service.calls import Invalid, NotFound
from callbridge.service.recordings import (
    DirectoryStore,
    Recording,
    Recordings,
    RecordingStore,
    byte_range,
    log,
    pcm16,
)
from callbridge.service.tools import ToolRegistry
from callbridge.store.repository import Store
from callbridge.telephony.g711 import DECODE_TABLE

from conftest import CALL_SID

LOG = log.bind(call_sid="test")
LETTERED_SID = "CA" + "0123456789abcdef" * 2
T0 = 1000.0
SILENT = 0xFF


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def frame(byte: int, ms: int = 20) -> bytes:
    return bytes([byte]) * (ms * 8)


def channels(stereo: bytes) -> tuple[bytes, bytes]:
    return stereo[0::2], stereo[1::2]


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


# ---------------------------------------------------------------------------------------------- the recorder


def test_caller_frames_go_at_their_timestamps_and_gaps_are_silence() -> None:
    recorder = CallRecorder(T0)
    recorder.caller(b64(frame(1)), 0, T0 + 0.02)
    recorder.caller(b64(frame(2)), 20, T0 + 0.04)
    recorder.caller(b64(frame(3)), 60, T0 + 0.08)  # the frame at 40 ms never came
    left, right = channels(recorder.finish(T0 + 0.08))
    assert left == frame(1) + frame(2) + frame(SILENT) + frame(3)
    assert right == frame(SILENT, 80)


def test_caller_audio_is_never_overwritten_by_a_repeated_or_wild_timestamp() -> None:
    recorder = CallRecorder(T0)
    recorder.caller(b64(frame(1)), 0, T0 + 0.02)
    recorder.caller(b64(frame(2)), 0, T0 + 0.04)  # no timestamp (Twilio's default of 0): it follows
    recorder.caller(b64(frame(3)), 10_000_000, T0 + 0.06)  # hours ahead of the stream's clock: it follows too
    left, _ = channels(recorder.finish(T0 + 0.06))
    assert left == frame(1) + frame(2) + frame(3)


def test_agent_audio_plays_back_to_back_from_when_it_was_sent() -> None:
    recorder = CallRecorder(T0)
    recorder.command(PlayAudio(b64(frame(5, 40))), T0 + 0.1)  # plays 100-140 ms
    recorder.command(SendMark("item:320"), T0 + 0.1)  # a mark plays nothing
    recorder.command(PlayAudio(b64(frame(6, 40))), T0 + 0.12)  # queued: 140-180 ms
    recorder.command(PlayAudio(b64(frame(7, 20))), T0 + 0.3)  # the queue ran dry: 300-320 ms
    _, right = channels(recorder.finish(T0 + 0.4))
    assert right == frame(SILENT, 100) + frame(5, 40) + frame(6, 40) + frame(SILENT, 120) + frame(7) + frame(SILENT, 80)


def test_a_clear_removes_everything_not_yet_played_and_the_end_cuts_the_queue() -> None:
    recorder = CallRecorder(T0)
    recorder.command(PlayAudio(b64(frame(5, 1000))), T0)  # a second of answer, sent at once
    recorder.command(ClearAudio(), T0 + 0.25)  # the caller barged in after 250 ms of it
    recorder.command(PlayAudio(b64(frame(6, 500))), T0 + 0.5)
    recorder.end(T0 + 0.6)  # the call ends 100 ms into the next answer
    recorder.command(PlayAudio(b64(frame(7, 500))), T0 + 0.7)  # after the end: nothing
    recorder.caller(b64(frame(8)), 700, T0 + 0.7)
    left, right = channels(recorder.take(T0 + 0.7))
    assert right == frame(5, 250) + frame(SILENT, 250) + frame(6, 100)
    assert left == frame(SILENT, 600)


def test_the_recording_ends_with_the_callers_last_frame_when_it_reaches_further() -> None:
    recorder = CallRecorder(T0)
    recorder.caller(b64(frame(1)), 0, T0 + 0.005)  # 0-20 ms of caller audio, 5 ms into the call
    left, right = channels(recorder.finish(T0 + 0.005))
    assert left == frame(1) and right == frame(SILENT)


def test_nothing_is_handed_out_that_could_still_change() -> None:
    recorder = CallRecorder(T0)
    recorder.command(PlayAudio(b64(frame(5, 2000))), T0)  # queued far beyond now: may yet be cleared
    for index in range(25):  # caller frames up to 500 ms
        recorder.caller(b64(frame(1)), 20 * index, T0 + 0.02 * index + 0.001)
    assert recorder.flush_at == T0 + FLUSH_EVERY_S
    left, right = channels(recorder.take(T0 + 0.3))  # up to now, which is within the caller's audio
    assert left == frame(1, 300) and right == frame(5, 300)
    assert recorder.flush_at == pytest.approx(T0 + 0.3 + FLUSH_EVERY_S)
    left, right = channels(recorder.take(T0 + 0.8))  # up to the caller's last frame (500 ms), not to now
    assert len(left) == len(right) == 200 * 8
    recorder.command(ClearAudio(), T0 + 0.9)
    left, right = channels(recorder.finish(T0 + 1.0))
    assert right == frame(5, 400) + frame(SILENT, 100)  # played until the clear at 900 ms
    assert left == frame(SILENT, 500)
    assert recorder.written == 1000 * 8


def test_a_caller_silent_on_the_wire_holds_the_recording_back_at_most_a_second() -> None:
    recorder = CallRecorder(T0)
    recorder.caller(b64(frame(1)), 0, T0 + 0.02)
    assert len(recorder.take(T0 + 0.5)) == 2 * 20 * 8  # up to the caller's audio
    stereo = recorder.take(T0 + 3.0)
    assert len(stereo) == 2 * int((3.0 - CALLER_WAIT_S) * 8000) - 2 * 20 * 8
    recorder.caller(b64(frame(2)), 1500, T0 + 3.01)  # late, behind what was written: after it, not lost
    left, _ = channels(recorder.finish(T0 + 3.01))
    assert left.startswith(frame(2)) and len(left) == round((1.0 + 0.01) * 8000)


def test_a_long_call_keeps_only_what_is_not_yet_handed_out() -> None:
    recorder = CallRecorder(T0)
    total = 0
    for index in range(3000):  # a minute of caller frames, an agent delta every 100 ms
        now = T0 + 0.02 * index + 0.001
        recorder.caller(b64(frame(1)), 20 * index, now)
        if index % 5 == 0:
            recorder.command(PlayAudio(b64(frame(5, 100))), now)
        if now >= recorder.flush_at:
            total += len(recorder.take(now))
    assert len(recorder._left) < 8000 and len(recorder._right) < 8000
    total += len(recorder.finish(T0 + 60.0))
    assert total == 2 * 60 * 8000


# ---------------------------------------------------------------------------------------------- WAV and decoding


def test_the_pcm16_header_is_a_plain_stereo_wav() -> None:
    samples = bytes(range(256)) * 4
    with wave.open(io.BytesIO(wav_header(2 * len(samples), mulaw=False) + pcm16(samples))) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 8000)
        assert wav.getnframes() == len(samples) // 2
        decoded = struct.unpack(f"<{len(samples)}h", wav.readframes(wav.getnframes()))
    assert list(decoded) == [DECODE_TABLE[byte] for byte in samples]


def test_the_mulaw_header_describes_its_data() -> None:
    header = wav_header(16000, mulaw=True)
    assert len(header) == MULAW_HEADER_BYTES
    riff, size, wave_id = struct.unpack("<4sI4s", header[:12])
    assert (riff, wave_id, size) == (b"RIFF", b"WAVE", MULAW_HEADER_BYTES - 8 + 16000)
    fmt_id, fmt_size, tag, count, rate, byte_rate, block, bits, extra = struct.unpack("<4sIHHIIHHH", header[12:38])
    assert (fmt_id, fmt_size, tag, count, rate, byte_rate, block, bits, extra) == (
        b"fmt ",
        18,
        7,
        2,
        8000,
        16000,
        2,
        8,
        0,
    )
    assert struct.unpack("<4sII", header[38:50]) == (b"fact", 4, 8000)
    assert struct.unpack("<4sI", header[50:58]) == (b"data", 16000)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-", (0, 999)),
        ("bytes=0-0", (0, 0)),
        ("bytes=100-199", (100, 199)),
        ("bytes=900-5000", (900, 999)),
        ("bytes=-100", (900, 999)),
        ("bytes=-5000", (0, 999)),
        ("BYTES = 10 - 20", (10, 20)),
        ("bytes=0-1,5-6", None),  # several ranges: the whole
        ("items=0-5", None),
        ("bytes=5-2", None),
        ("bytes=abc", None),
        ("bytes=-", None),
        ("bytes=" + "9" * 5000 + "-", None),
    ],
)
def test_range_headers(header: str | None, expected: tuple[int, int] | None) -> None:
    assert byte_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_a_range_past_the_end_is_unsatisfiable(header: str) -> None:
    with pytest.raises(ValueError):
        byte_range(header, 1000)


# ---------------------------------------------------------------------------------------------- the files


async def record(
    store: RecordingStore, chunks: list[bytes], call_sid: str = CALL_SID, *, close: bool = True
) -> RecordingSink:
    sink = store.create(call_sid, LOG)
    assert sink is not None
    for chunk in chunks:
        sink.append(chunk)
    if close:
        await sink.close()
    return sink


def read_mulaw_wav(path: Path) -> tuple[int, bytes]:
    """(channels, samples) of a μ-law WAV, read by its chunks as any player reads it."""
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    position, channels_, samples = 12, 0, b""
    while position < len(data):
        chunk, size = struct.unpack("<4sI", data[position : position + 8])
        body = data[position + 8 : position + 8 + size]
        if chunk == b"fmt ":
            tag, channels_ = struct.unpack("<HH", body[:4])
            assert tag == 7
        elif chunk == b"data":
            samples = body
            assert len(body) == size
        position += 8 + size
    return channels_, samples


async def test_a_finished_recording_is_a_valid_mulaw_wav(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "recordings")
    sink = store.create(CALL_SID, LOG)
    assert sink is not None
    sink.append(b"\x01\x02" * 4000)
    sink.append(b"")
    sink.append(b"\x03\x04" * 4000)
    assert await store.in_progress(CALL_SID) and await store.size(CALL_SID) is None
    await sink.close()
    assert not await store.in_progress(CALL_SID)
    assert await store.size(CALL_SID) == 16000
    assert read_mulaw_wav(tmp_path / "recordings" / f"{CALL_SID}.wav") == (2, b"\x01\x02" * 4000 + b"\x03\x04" * 4000)
    assert await store.read(CALL_SID, 7999, 3) == b"\x02\x03\x04"
    assert store.create(CALL_SID, LOG) is None  # recorded once
    assert names(tmp_path / "recordings") == [f"{CALL_SID}.wav"]
    assert (tmp_path / "recordings").stat().st_mode & 0o777 == 0o700


def test_no_file_name_is_made_of_anything_but_a_call_sid(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    for name in ["../" + CALL_SID, CALL_SID + "/..", "CA" + "G" * 32, LETTERED_SID.upper(), CALL_SID + "0", ""]:
        with pytest.raises(ValueError):
            store.create(name, LOG)
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from callbridge.service.recordings import DirectoryStore, log

sink = DirectoryStore(Path(sys.argv[1])).create(sys.argv[2], log)
sink.append(b"\\x11\\x22" * 8000)
sink.append(b"\\x33\\x44" * 8000)
os.write(sink._fd, b"\\x55")  # half a stereo sample: the write a kill cut short
print("written", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


async def test_a_recording_left_by_kill_9_is_made_valid_at_the_next_start(tmp_path: Path) -> None:
    directory = tmp_path / "recordings"
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_WRITER, str(directory), CALL_SID, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(killed.communicate(), 60)
    assert killed.returncode == -signal.SIGKILL and out == b"written\n", err
    store = DirectoryStore(directory)
    assert await store.in_progress(CALL_SID) and await store.size(CALL_SID) is None

    assert await store.recover() == [CALL_SID]
    assert read_mulaw_wav(directory / f"{CALL_SID}.wav") == (2, b"\x11\x22" * 8000 + b"\x33\x44" * 8000)
    assert await store.size(CALL_SID) == 32000 and not await store.in_progress(CALL_SID)
    assert await store.recover() == []


async def test_recovery_leaves_the_recordings_of_live_processes_alone(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    live = store.create(CALL_SID, LOG)  # held by this process, as by a sibling worker still carrying its call
    assert live is not None
    live.append(b"\x01\x02" * 100)
    (tmp_path / f".{CALL_SID}.99999.tmp").write_bytes(b"")  # a process killed before its file was in place
    (tmp_path / "notes.part").write_bytes(b"not ours")
    assert await store.recover() == []
    assert await store.in_progress(CALL_SID)
    assert names(tmp_path) == [f"{CALL_SID}.part", "notes.part"]
    await live.close()
    assert await store.size(CALL_SID) == 200


async def test_a_recording_that_cannot_be_written_stops_without_disturbing_the_call(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    sink = store.create(CALL_SID, LOG)
    assert sink is not None
    sink.append(b"\x01\x02" * 100)
    read_only = os.open(os.devnull, os.O_RDONLY)
    os.dup2(read_only, sink._fd)  # type: ignore[attr-defined]  # the file is gone from under it: writes fail
    os.close(read_only)
    sink.append(b"\x03\x04" * 100)  # logged, never raised; the recording stops
    sink.append(b"\x03\x04" * 100)
    await sink.close()
    assert await store.recover() == [CALL_SID]  # what was written before is kept
    assert read_mulaw_wav(tmp_path / f"{CALL_SID}.wav") == (2, b"\x01\x02" * 100)


async def test_the_served_wav_and_any_range_of_it_decode_the_kept_samples(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    samples = os.urandom(2 * 8000 * 3 + 10)  # 3 s and 5 stereo samples
    await record(store, [samples[:1000], samples[1000:]])
    await record(store, [], "CA" + "2" * 32)
    assert await store.size("CA" + "2" * 32) == 0

    recording = Recording(CALL_SID, len(samples), store)
    whole = wav_header(2 * len(samples), mulaw=False) + pcm16(samples)
    assert recording.size == len(whole) == 44 + 2 * len(samples)
    assert recording.duration_s == pytest.approx(3.0 + 5 / 8000)
    assert b"".join([chunk async for chunk in recording.chunks()]) == whole
    size = recording.size
    for first, last in [(0, 0), (0, 43), (0, 44), (43, 45), (44, 44), (45, 46), (101, 2000), (size - 3, size - 1)]:
        got = b"".join([chunk async for chunk in recording.chunks(first, last)])
        assert got == whole[first : last + 1], (first, last)
    with wave.open(io.BytesIO(whole)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 8000)


# ---------------------------------------------------------------------------------------------- the service


def session_of(call_sid: str | None, *, record: bool = True) -> CallSession:
    session = CallSession(SessionConfig(agent=AgentConfig(record=record), verify_parameters=lambda p, s: CallContext()))
    session.call_sid = call_sid
    return session


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}")
    yield opened
    await opened.close()


async def test_calls_are_recorded_as_their_agent_says(tmp_path: Path, store: Store) -> None:
    recordings = Recordings(Settings(recordings_dir=str(tmp_path / "recordings")), store)
    assert recordings.open(session_of(CALL_SID, record=False)) is None
    assert recordings.open(session_of(None)) is None
    assert recordings.open(session_of("CA-not-a-call")) is None
    sink = recordings.open(session_of(CALL_SID))
    assert sink is not None
    await sink.close()
    assert recordings.open(session_of(CALL_SID)) is None  # once per call
    unwritable = Recordings(Settings(recordings_dir="/proc/no-such-dir"), store)
    assert unwritable.open(session_of("CA" + "3" * 32)) is None


def test_the_agents_file_and_the_setting_say_who_is_recorded(tmp_path: Path) -> None:
    agents_file = tmp_path / "agents.toml"
    agents_file.write_text(
        'default_agent = "reception"\n[agents.reception]\n[agents.private]\nrecord = false\n'
        "[agents.kept]\nrecord = true\n"
    )
    on = load_agents(Settings(), ToolRegistry(), agents_file)
    off = load_agents(Settings(record_calls=False), ToolRegistry(), agents_file)
    assert {name: agent.record for name, agent in on.agents.items()} == {
        "reception": True,
        "private": False,
        "kept": True,
    }
    assert {name: agent.record for name, agent in off.agents.items()} == {
        "reception": False,
        "private": False,
        "kept": True,
    }
    assert load_agents(Settings(record_calls=False), ToolRegistry()).default.record is False


async def test_a_recording_is_served_only_for_a_call_on_record_with_one(tmp_path: Path, store: Store) -> None:
    recordings = Recordings(Settings(recordings_dir=str(tmp_path / "recordings")), store)
    for bad in ["../../etc/passwd", "CA" + "0" * 31, LETTERED_SID.upper(), CALL_SID + ".wav", "CA%2e%2e"]:
        with pytest.raises(Invalid):
            await recordings.recording(bad)
    with pytest.raises(NotFound, match="no such call"):
        await recordings.recording(CALL_SID)
    await store.record_call(call_sid=CALL_SID, direction="inbound")
    with pytest.raises(NotFound, match="in progress"):
        await recordings.recording(CALL_SID)
    sink = await record(recordings.files, [b"\x01\x02" * 8], close=False)
    with pytest.raises(NotFound, match="still being recorded"):
        await recordings.recording(CALL_SID)
    os.close(sink._fd)  # type: ignore[attr-defined]  # its process died: the lock is gone
    assert await recordings.files.recover() == [CALL_SID]
    found = await recordings.recording(CALL_SID)
    assert (found.call_sid, found.samples_bytes) == (CALL_SID, 16)


async def test_a_call_carried_by_another_host_or_not_recorded_gets_its_reason(tmp_path: Path, store: Store) -> None:
    recordings = Recordings(Settings(recordings_dir=str(tmp_path)), store)
    elsewhere, unrecorded = "CA" + "4" * 32, "CA" + "5" * 32
    for call_sid, owner in [(elsewhere, "another-host:123:456"), (unrecorded, None)]:
        await store.record_call(call_sid=call_sid, direction="inbound")
        await store.update_call(call_sid, owner=owner, ended_at=datetime.now(UTC))
    with pytest.raises(NotFound, match="another host") as found:
        await recordings.recording(elsewhere)
    assert "another-host" not in str(found.value)  # nothing of the other host
    with pytest.raises(NotFound, match="not recorded"):
        await recordings.recording(unrecorded)


async def test_recordings_past_their_retention_are_deleted_and_the_call_says_so(tmp_path: Path, store: Store) -> None:
    recordings = Recordings(Settings(recordings_dir=str(tmp_path), recordings_retention_days=30), store)
    old, recent, unknown = CALL_SID, "CA" + "6" * 32, "CA" + "7" * 32
    for call_sid in (old, recent, unknown):
        await record(recordings.files, [b"\x01\x02"], call_sid)
    for call_sid in (old, recent):
        await store.record_call(call_sid=call_sid, direction="inbound")
    forty_days_ago = time.time() - 40 * 86400
    for call_sid in (old, unknown):
        os.utime(tmp_path / f"{call_sid}.wav", (forty_days_ago, forty_days_ago))

    assert sorted(await recordings.sweep()) == sorted([old, unknown])
    assert [name for name in names(tmp_path) if name.endswith(".wav")] == [f"{recent}.wav"]
    (event,) = await store.events(old)
    assert (event.kind, event.data) == ("recording_deleted", {"reason": "retention", "retention_days": 30})
    assert await store.get_call(old) is not None  # the call stays on record
    with pytest.raises(NotFound, match="deleted: recordings are kept 30 days"):
        await recordings.recording(old)
    assert await recordings.sweep() == []

    keep_all = Recordings(Settings(recordings_dir=str(tmp_path), recordings_retention_days=0), store)
    assert await keep_all.sweep(now=time.time() + 10**9) == []
