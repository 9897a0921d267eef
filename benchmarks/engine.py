"""Benchmark of the local engine: turn latency, engine CPU per call-second, simultaneous calls per core.

    .venv/bin/python benchmarks/engine.py [--max-calls 8]

The engine runs in its own process (``callbridge engine``) pinned to CPU 0; the bridge and the simulated callers
run in this process on the other CPU(s), so the engine's CPU time is measured alone. Each round places N
overlapping demo calls, arriving 2.3 s apart (the demo's script, spoken by the caller's real voice), and reads the
engine process's CPU time from /proc before and after. A round "sustains real time" when every call completes
its script, the engine used less than 90 % of its core, and the turn-latency p95 stayed within 1.5x of the
single-call round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from callbridge.config import Settings
from callbridge.engine.demo import (
    DEFAULT_SCRIPT,
    LiveTranscriptSink,
    Utterance,
    _bound_socket,
    _call_script,
    parse_script,
    running_bridge,
    summarize,
    synthesize_caller,
)
from callbridge.observability.logs import configure_logging
from callbridge.testing.caller import CallRecording, SimulatedCaller

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STAGGER_S = 2.3  # between call arrivals: identical scripts started together would turn in lockstep


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("the engine did not start")


async def round_of_calls(calls: int, engine_url: str, utterances: list[Utterance], engine_pid: int) -> dict[str, float]:
    token, sock = secrets.token_hex(16), _bound_socket()
    port = sock.getsockname()[1]
    settings = Settings(
        openai_api_key="unused",
        realtime_url=engine_url,
        public_url=f"http://127.0.0.1:{port}",
        twilio_auth_token=token,
        secret=secrets.token_hex(16),
        agent_greeting="Hello, thanks for calling Bright Dental. How can I help you today?",
        database_url=f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/bench.db",
        _env_file=None,
    )
    sink = LiveTranscriptSink(None)
    async with running_bridge(settings, sock, sink):
        cpu_before, wall_before = cpu_seconds(engine_pid), time.monotonic()
        caller = SimulatedCaller(f"http://127.0.0.1:{port}", token)

        async def call(index: int) -> CallRecording:
            await asyncio.sleep(index * STAGGER_S)  # calls arrive one after another, as they do on a phone line
            return await caller.place_call(_call_script(utterances), max_duration_s=180)

        recordings = await asyncio.gather(*(call(index) for index in range(calls)))
        cpu, wall = cpu_seconds(engine_pid) - cpu_before, time.monotonic() - wall_before
        await asyncio.sleep(0.5)
    latencies: list[int] = []
    completed = 0
    wers = []
    for recording in recordings:
        lines = [line for line in sink.lines if line.call_sid == recording.call_sid]
        summary = summarize(recording, utterances, lines, Path(tempfile.gettempdir()) / "callbridge-bench")
        latencies += summary["turn_latency_ms"]["turns"]
        completed += bool(summary["ok"])
        wers.append(summary["caller_wer"])
    call_seconds = sum(recording.duration_s for recording in recordings)
    ordered = sorted(latencies)
    return {
        "calls": calls,
        "completed": completed,
        "turn_p50_ms": statistics.median(ordered) if ordered else float("nan"),
        "turn_p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if ordered else float("nan"),
        "engine_cpu_s": cpu,
        "engine_core_use": cpu / wall,
        "cpu_ms_per_call_second": 1000 * cpu / call_seconds,
        "caller_wer": statistics.mean(wers),
    }


async def main(max_calls: int) -> None:
    configure_logging("console", "error")
    utterances = synthesize_caller(parse_script(DEFAULT_SCRIPT))
    port = free_port()
    engine = await asyncio.create_subprocess_exec(
        *["taskset", "-c", "0", str(Path(sys.executable).with_name("callbridge")), "engine", "--port", str(port)],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)) or {0})  # keep this process off the engine's core
    try:
        await asyncio.to_thread(wait_for_port, port)
        url = f"ws://127.0.0.1:{port}/v1/realtime"
        others = sorted(os.sched_getaffinity(0))
        print(f"engine pinned to CPU 0 (pid {engine.pid}); bridge and callers on CPU(s) {others}")
        header = ("calls", "done", "turn p50", "turn p95", "engine core", "CPU ms/call-s", "WER")
        print(" ".join(f"{title:>{width}}" for title, width in zip(header, (5, 5, 9, 9, 12, 14, 6), strict=True)))
        baseline_p95 = None
        sustained = 0
        calls = 1
        while calls <= max_calls:
            result = await round_of_calls(calls, url, utterances, engine.pid)
            print(
                f"{calls:>5} {result['completed']:>5} {result['turn_p50_ms']:>7.0f}ms {result['turn_p95_ms']:>7.0f}ms "
                f"{result['engine_core_use']:>11.0%} {result['cpu_ms_per_call_second']:>14.1f} "
                f"{result['caller_wer']:>6.1%}",
                flush=True,
            )
            baseline_p95 = baseline_p95 or result["turn_p95_ms"]
            real_time = (
                result["completed"] == calls
                and result["engine_core_use"] < 0.9
                and result["turn_p95_ms"] <= 1.5 * baseline_p95
            )
            if not real_time:
                break
            sustained = calls
            calls *= 2
        print(f"simultaneous demo calls one core sustains in real time: {sustained}")
    finally:
        engine.terminate()
        await engine.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-calls", type=int, default=8)
    asyncio.run(main(parser.parse_args().max_calls))
