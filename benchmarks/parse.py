"""Microbenchmark of parsing the wire: what each adapter's parser costs per message, in µs.

    .venv/bin/python benchmarks/parse.py                          # this checkout's src
    .venv/bin/python benchmarks/parse.py --src OTHER/src          # another checkout
    .venv/bin/python benchmarks/parse.py --compare OTHER/src      # OTHER/src (before) against --src (after)

The messages are the per-frame ones, shaped as the peers send them: a caller's ``media`` frame (20 ms of μ-law,
160 bytes, base64) through ``parse_twilio_message`` with the service's default frame limit, and a model's
``response.output_audio.delta`` of 20 ms and of 200 ms of μ-law through ``parse_server_event``, in the GA dialect
and as its beta twin (``response.audio.delta``); plus one control message each, a ``mark`` and a
``response.done``. Each is passed as a memoryview, as the WebSocket layer hands it over, and each must parse to
the event it stands for (a benchmark of the error path would be worthless).

Each figure is the median of ``--repeat`` timings of ``--number`` calls (stdlib ``timeit``, garbage collection off).
``--compare`` runs one process per checkout per round, alternating before and after ``--rounds`` times, so a drift
of the machine's speed falls on both; it prints the median over the rounds of each side and their ratio.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import statistics
import subprocess
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FRAME_BYTES = 256 * 1024  # the service's default limit (CALLBRIDGE_MAX_MESSAGE_BYTES)
STREAM_SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
ITEM_ID = "item_CUNsQ3iJ1wpbk4xJbVzZD"
RESPONSE_ID = "resp_CUNsQkWkmXqZcGxsY2bVY"


def audio(milliseconds: int) -> str:
    """``milliseconds`` of 8 kHz μ-law (noise: its content does not change what a parser does), base64."""
    return base64.b64encode(random.Random(milliseconds).randbytes(8 * milliseconds)).decode()


def twilio_media() -> dict[str, Any]:
    media = {"track": "inbound", "chunk": "152", "timestamp": "3040", "payload": audio(20)}
    return {"event": "media", "sequenceNumber": "154", "media": media, "streamSid": STREAM_SID}


def twilio_mark() -> dict[str, Any]:
    return {"event": "mark", "sequenceNumber": "155", "streamSid": STREAM_SID, "mark": {"name": f"{ITEM_ID}:4800"}}


def audio_delta(milliseconds: int, event_type: str = "response.output_audio.delta") -> dict[str, Any]:
    return {
        "type": event_type,
        "event_id": "event_CUNsRJ9JgYB2aQfxLmW1c",
        "response_id": RESPONSE_ID,
        "item_id": ITEM_ID,
        "output_index": 0,
        "content_index": 0,
        "delta": audio(milliseconds),
    }


def response_done() -> dict[str, Any]:
    transcript = "Thanks for calling! Your appointment is on Tuesday at three. Is there anything else?"
    item = {
        "id": ITEM_ID,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_audio", "transcript": transcript}],
    }
    usage = {
        "total_tokens": 1841,
        "input_tokens": 1562,
        "output_tokens": 279,
        "input_token_details": {
            "text_tokens": 1208,
            "audio_tokens": 354,
            "image_tokens": 0,
            "cached_tokens": 1152,
            "cached_tokens_details": {"text_tokens": 1088, "audio_tokens": 64, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": 61, "audio_tokens": 218},
    }
    response = {
        "object": "realtime.response",
        "id": RESPONSE_ID,
        "status": "completed",
        "status_details": None,
        "output": [item],
        "conversation_id": "conv_CUNsN5b0xU7kXo2bJtCzR",
        "output_modalities": ["audio"],
        "max_output_tokens": "inf",
        "audio": {"output": {"format": {"type": "audio/pcmu"}, "voice": "marin"}},
        "usage": usage,
        "metadata": None,
    }
    return {"type": "response.done", "event_id": "event_CUNsWq1Kx8tYd0aPzRb4M", "response": response}


# name → (parser, message, dialect or frame limit, the event class it must parse to)
Case = tuple[str, dict[str, Any], Any, str]
CASES: dict[str, Case] = {
    "twilio media 20 ms": ("twilio", twilio_media(), MAX_FRAME_BYTES, "TwilioMedia"),
    "twilio mark": ("twilio", twilio_mark(), MAX_FRAME_BYTES, "TwilioMark"),
    "realtime delta 20 ms (GA)": ("realtime", audio_delta(20), "ga", "RealtimeAudioDelta"),
    "realtime delta 20 ms (beta)": ("realtime", audio_delta(20, "response.audio.delta"), "beta", "RealtimeAudioDelta"),
    "realtime delta 200 ms (GA)": ("realtime", audio_delta(200), "ga", "RealtimeAudioDelta"),
    "realtime delta 200 ms (beta)": (
        "realtime",
        audio_delta(200, "response.audio.delta"),
        "beta",
        "RealtimeAudioDelta",
    ),
    "realtime response.done (GA)": ("realtime", response_done(), "ga", "RealtimeResponseDone"),
}


def load_parsers(src: Path) -> dict[str, Callable[[Any, Any], object]]:
    """The two parsers of the checkout at ``src`` (first on ``sys.path``, checked to be the ones imported)."""
    sys.path.insert(0, str(src))
    from callbridge.realtime import protocol
    from callbridge.telephony import media_streams

    for module in (protocol, media_streams):
        if not Path(module.__file__ or "").resolve().is_relative_to(src.resolve()):
            raise SystemExit(f"{module.__name__} was imported from {module.__file__}, not from {src}")
    return {"twilio": media_streams.parse_twilio_message, "realtime": protocol.parse_server_event}


def measure(src: Path, repeat: int, number: int) -> dict[str, float]:
    """The median µs a message of each case, in this process, with the parsers at ``src``."""
    parsers = load_parsers(src)
    medians = {}
    for name, (kind, message, argument, expected) in CASES.items():
        raw = memoryview(json.dumps(message, separators=(",", ":")).encode())
        parse = parsers[kind]
        event = parse(raw, argument)
        if type(event).__name__ != expected:
            raise SystemExit(f"{name}: parsed to {event!r}, not a {expected}")
        timer = timeit.Timer("parse(raw, argument)", globals={"parse": parse, "raw": raw, "argument": argument})
        timer.timeit(number)  # warm up
        medians[name] = statistics.median(t / number * 1e6 for t in timer.repeat(repeat, number))
    return medians


def measure_in_process(src: Path, repeat: int, number: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--src", str(src), "--repeat", str(repeat), "--number", str(number), "--json"]
    result: dict[str, float] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return result


def compare(before: Path, after: Path, rounds: int, repeat: int, number: int) -> None:
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for round_ in range(rounds):
        for side, src in (("before", before), ("after", after)):
            runs[side].append(measure_in_process(src, repeat, number))
        print(f"round {round_ + 1}/{rounds} done", file=sys.stderr)
    print(f"before: {before}\nafter:  {after}")
    print(f"median µs per message over {rounds} interleaved rounds (each a median of {repeat} x {number} calls)")
    print(f"{'message':<30} {'before':>8} {'after':>8} {'after/before':>13}")
    for name in CASES:
        old = statistics.median(run[name] for run in runs["before"])
        new = statistics.median(run[name] for run in runs["after"])
        print(f"{name:<30} {old:>8.2f} {new:>8.2f} {new / old:>13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="the src directory of the checkout to time")
    parser.add_argument("--compare", type=Path, metavar="BEFORE_SRC", help="time BEFORE_SRC against --src")
    parser.add_argument("--rounds", type=int, default=5, help="with --compare: processes per side, alternating")
    parser.add_argument("--repeat", type=int, default=25, help="timings per case (the median is reported)")
    parser.add_argument("--number", type=int, default=10_000, help="calls per timing")
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args()
    if args.compare is not None:
        compare(args.compare, args.src, args.rounds, args.repeat, args.number)
        return
    medians = measure(args.src, args.repeat, args.number)
    if args.json:
        print(json.dumps(medians))
        return
    print(f"{args.src}: median µs per message ({args.repeat} x {args.number} calls)")
    for name, value in medians.items():
        print(f"{name:<30} {value:>8.2f}")


if __name__ == "__main__":
    main()
