"""Recordings end to end: ``callbridge serve`` records a call with a barge-in, and the REST API serves it as a
stereo PCM16 WAV checked sample by sample against what the simulated caller sent and heard; byte ranges; refusals;
a ``kill -9`` mid-call and the next start."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import wave
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from callbridge.store.repository import Store
from callbridge.telephony import g711 as audio
from callbridge.testing.caller import CallRecording, CallScript, HangUp, Pause, Say, SayWhenHearing
from callbridge.testing.fake_realtime import FakeSession
from support import API_TOKEN, Service, api, opening_hours, serve, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE = audio.SAMPLE_RATE
TIMING_S = 0.1
"""How far a moment in the recording may sit from the same moment as the simulated caller saw it: the two clocks
are two processes' (and the caller plays in 20 ms steps)."""
CUT_BYTES = 30 * audio.BYTES_PER_MS
"""How much the cut of the interrupted answer may differ from what the simulated caller heard of it: the caller
counts a whole 20 ms step as heard once it begins, the recording cuts at the clear itself."""


def decoded(ulaw: bytes) -> list[int]:
    return [audio.DECODE_TABLE[byte] for byte in ulaw]


def stereo(wav_bytes: bytes) -> tuple[list[int], list[int]]:
    """The left and right channels of a WAV that must be 16-bit PCM, 8 kHz, stereo."""
    with wave.open(io.BytesIO(wav_bytes)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, RATE)
        frames = wav.readframes(wav.getnframes())
    samples = struct.unpack(f"<{len(frames) // 2}h", frames)
    return list(samples[0::2]), list(samples[1::2])


def item_audio(session: FakeSession) -> list[bytes]:
    """The audio of each agent item the fake streamed, in order."""
    items: dict[str, bytearray] = {}
    for event in session.server_events:
        if event["type"] in ("response.output_audio.delta", "response.audio.delta"):
            items.setdefault(event["item_id"], bytearray()).extend(base64.b64decode(event["delta"]))
    return [bytes(data) for data in items.values()]


def sounding(samples: list[int]) -> list[int]:
    """The samples that are not silence, in order: what both sides hold of the agent, whatever gaps each put in."""
    return [sample for sample in samples if sample]


async def fetch(client: httpx.AsyncClient, call_sid: str, **headers: str) -> httpx.Response:
    return await client.get(f"/api/calls/{call_sid}/recording", headers=headers)


async def saved(running: Service, call_sid: str) -> None:
    await wait_until(lambda: running.logs("recording.saved"), 10, what="the recording saved")
    assert running.logs("recording.saved")[0]["call_sid"] == call_sid


async def test_a_call_with_a_barge_in_is_recorded_as_the_caller_heard_it(tmp_path: Path) -> None:
    directory = tmp_path / "kept-recordings"
    script = CallScript(
        [
            Pause(2500),  # the greeting plays
            Say(audio.tone(900, 330)),
            SayWhenHearing(audio.tone(700, 440), after_heard_ms=1200),  # barge in on the long answer
            Pause(4500),  # the short answer plays in full
            HangUp(),
        ]
    )
    async with serve(
        tmp_path, opening_hours(), CALLBRIDGE_API_TOKEN=API_TOKEN, CALLBRIDGE_RECORDINGS_DIR=str(directory)
    ) as running:
        call = await running.caller().place_call(script, max_duration_s=30)
        (session,) = running.fake.sessions
        await saved(running, call.call_sid)
        async with api(running) as client:
            whole = await fetch(client, call.call_sid)
            from_start = await fetch(client, call.call_sid, Range="bytes=0-")
            middle = await fetch(client, call.call_sid, Range="bytes=1001-50000")
            tail = await fetch(client, call.call_sid, Range="bytes=-100")
            past_end = await fetch(client, call.call_sid, Range=f"bytes={len(whole.content)}-")

    assert whole.status_code == 200, whole.text
    assert whole.headers["content-type"] == "audio/wav"
    assert whole.headers["accept-ranges"] == "bytes"
    size = len(whole.content)
    assert int(whole.headers["content-length"]) == size
    assert_recorded_as_heard(whole.content, call, session)

    # Byte ranges, as a browser's player asks for them to start and to seek.
    assert (from_start.status_code, from_start.headers["content-range"]) == (206, f"bytes 0-{size - 1}/{size}")
    assert from_start.content == whole.content
    assert (middle.status_code, middle.headers["content-range"]) == (206, f"bytes 1001-50000/{size}")
    assert middle.content == whole.content[1001:50001] and middle.headers["content-length"] == "49000"
    assert (tail.status_code, tail.content) == (206, whole.content[-100:])
    assert (past_end.status_code, past_end.headers["content-range"]) == (416, f"bytes */{size}")


def assert_recorded_as_heard(wav_bytes: bytes, call: CallRecording, session: FakeSession) -> None:
    left, right = stereo(wav_bytes)
    assert abs(len(left) / RATE - call.duration_s) <= 0.5, (len(left) / RATE, call.duration_s)

    # The left channel is what the caller sent, sample for sample, at its offsets; then silence.
    sent = decoded(bytes(call.sent_audio))
    assert left[: len(sent)] == sent
    assert not any(left[len(sent) :])

    # The simulated caller heard the greeting, the long answer up to the barge-in, and the short answer.
    greeting, answer, short = item_audio(session)[:3]
    heard = bytes(call.heard_audio)
    heard_of_answer = len(heard) - len(greeting) - len(short)
    assert 0 < heard_of_answer < len(answer)
    assert heard == greeting + answer[:heard_of_answer] + short

    # The right channel holds the same, sample for sample: the greeting, the answer cut at the barge-in (within a
    # playback step of the caller's cut), then the short answer, and nothing of the rest of the long answer.
    expected_greeting, expected_short = sounding(decoded(greeting)), sounding(decoded(short))
    recorded = sounding(right)
    assert recorded[: len(expected_greeting)] == expected_greeting
    assert recorded[len(recorded) - len(expected_short) :] == expected_short
    recorded_of_answer = recorded[len(expected_greeting) : len(recorded) - len(expected_short)]
    assert recorded_of_answer == sounding(decoded(answer))[: len(recorded_of_answer)]
    heard_sounding = len(sounding(decoded(answer[:heard_of_answer])))
    assert abs(len(recorded_of_answer) - heard_sounding) <= CUT_BYTES, (len(recorded_of_answer), heard_sounding)

    # Where each part is on the call's timeline, against where the caller heard it.
    at = [index for index, sample in enumerate(right) if sample]
    (clear,) = call.clears
    cut_s = (at[len(expected_greeting) + len(recorded_of_answer) - 1] + 1) / RATE
    assert cut_s <= clear.at_s + TIMING_S, (cut_s, clear.at_s)  # nothing after the clear
    assert abs(cut_s - clear.at_s) <= TIMING_S
    _, heard_on_timeline = call.stereo_channels()
    heard_at = [index for index, byte in enumerate(heard_on_timeline) if audio.DECODE_TABLE[byte]]
    starts = {  # the first sample of each part: in the recording, and on the caller's timeline
        "greeting": (at[0], heard_at[0]),
        "answer": (at[len(expected_greeting)], heard_at[len(expected_greeting)]),
        "short answer": (
            at[len(expected_greeting) + len(recorded_of_answer)],
            heard_at[len(expected_greeting) + heard_sounding],
        ),
    }
    for part, (recorded_at, heard_at_sample) in starts.items():
        assert abs(recorded_at - heard_at_sample) / RATE <= TIMING_S, (part, recorded_at, heard_at_sample)


async def test_no_recording_and_bad_requests_get_a_clear_answer(tmp_path: Path) -> None:
    directory = tmp_path / "kept-recordings"
    unrecorded, elsewhere, unknown = "CA" + "a" * 32, "CA" + "b" * 32, "CA" + "c" * 32
    async with serve(
        tmp_path,
        opening_hours(),
        CALLBRIDGE_API_TOKEN=API_TOKEN,
        CALLBRIDGE_RECORDINGS_DIR=str(directory),
        CALLBRIDGE_RECORD_CALLS="false",
    ) as running:
        call = await running.caller().place_call(CallScript([Pause(1500), HangUp()]), max_duration_s=20)
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'callbridge.db'}")
        try:
            for call_sid, owner in [(unrecorded, None), (elsewhere, "host-far-away:4242:17")]:
                await store.record_call(call_sid=call_sid, direction="inbound", status="completed")
                await store.update_call(call_sid, owner=owner, ended_at=datetime.now(UTC))
        finally:
            await store.close()
        await wait_until(lambda: running.logs("call.summary"), 10)
        async with api(running) as client:
            answers = {
                name: await fetch(client, call_sid)
                for name, call_sid in [
                    ("off", call.call_sid),
                    ("unrecorded", unrecorded),
                    ("elsewhere", elsewhere),
                    ("unknown", unknown),
                    ("upper case", unrecorded.upper()),
                    ("dots", ".."),
                    ("file name", f"{unrecorded}.wav"),
                    ("escaped path", "..%2F..%2F..%2Fetc%2Fpasswd"),
                    ("escaped dots", f"%2E%2E%2F{unrecorded}"),
                    ("nul", f"{unrecorded}%00"),
                ]
            }
            unauthorized = await httpx.AsyncClient(base_url=running.base_url).get(
                f"/api/calls/{call.call_sid}/recording"
            )
        logs = running.log_path.read_text()

    assert unauthorized.status_code == 401
    assert answers["off"].status_code == 404 and "not recorded" in answers["off"].json()["detail"]
    assert answers["unrecorded"].status_code == 404 and "not recorded" in answers["unrecorded"].json()["detail"]
    assert answers["elsewhere"].status_code == 404 and "another host" in answers["elsewhere"].json()["detail"]
    assert answers["unknown"].status_code == 404 and answers["unknown"].json()["detail"] == "no such call"
    for name in ("upper case", "dots", "file name", "escaped path", "escaped dots", "nul"):
        assert 400 <= answers[name].status_code < 500, (name, answers[name].status_code)
    for answer in answers.values():  # nothing of this host: no path, no other host's name, no audio
        assert str(tmp_path) not in answer.text and "host-far-away" not in answer.text
        assert answer.headers["content-type"] == "application/json"
    assert not directory.exists() or not any(directory.iterdir())
    assert "recording.refused" in logs and "recording.elsewhere" in logs


async def test_kill_9_mid_call_keeps_all_but_the_last_second(tmp_path: Path) -> None:
    voice = audio.tone(6000, 523)
    env = {"CALLBRIDGE_API_TOKEN": API_TOKEN}
    async with serve(tmp_path, opening_hours(), **env) as running:
        call = asyncio.create_task(
            running.caller().place_call(CallScript([Pause(500), Say(voice), Pause(30000)]), max_duration_s=40)
        )
        await wait_until(lambda: running.fake.sessions and len(running.fake.sessions[0].audio) >= 4 * RATE, 20)
        running.process.kill()  # SIGKILL: no drain, nothing closed on the way out
        await running.process.wait()
        received = len(running.fake.sessions[0].audio)  # what the service had read of the caller, at least
        recording = await call
    assert list((tmp_path / "recordings").glob("*.part"))  # left incomplete

    async with serve(tmp_path, opening_hours(), **env) as running:  # the next start
        assert running.logs("recording.recovered")[0]["call_sid"] == recording.call_sid
        async with api(running) as client:
            kept = await fetch(client, recording.call_sid)
    assert kept.status_code == 200, kept.text
    left, _ = stereo(kept.content)
    sent = decoded(bytes(recording.sent_audio))
    assert left == sent[: len(left)]  # everything kept is what the caller sent, where it was sent
    assert len(left) >= received - RATE, (len(left), received)  # all but the last second
