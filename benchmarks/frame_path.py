"""The per-frame path in one process, without sockets: what one audio frame costs callbridge's Python.

Caller → model: a Twilio ``media`` message is parsed, the session handles it, and the Realtime event it yields is
serialised. Model → caller: a ``response.output_audio.delta`` is parsed, handled, and the Twilio ``media`` (and,
every 100 ms of audio, ``mark``) messages are serialised. Medians of ``--repeat`` rounds, in µs per frame.

``--root`` points at another checkout of callbridge (e.g. a ``git worktree`` of an older commit) to compare two
versions side by side in one run: ``--root . --root ../older``. Versions whose commands carried wire dicts
(``SendTwilio``/``SendRealtime``) are measured the way their driver sent them.

    python benchmarks/frame_path.py --root . --root /path/to/older/checkout
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FRAMES = 20_000


def _measure(root: Path, frames: int, repeat: int) -> dict[str, list[float]]:
    """One version, in an interpreter of its own (two versions cannot share ``sys.modules``)."""
    command = [sys.executable, __file__, "--child", str(root), "--frames", str(frames), "--repeat", str(repeat)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    figures: dict[str, list[float]] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def _encoders() -> tuple[Callable[[Any, str], bytes], Callable[[Any], bytes], Callable[[Any], bool], Any]:
    """(twilio encode, realtime encode, is-a-Twilio-command, orjson) for the version on sys.path."""
    import orjson

    commands = importlib.import_module("callbridge.core.commands")
    if hasattr(commands, "SendTwilio"):  # commands carried wire dicts

        def twilio(command: Any, stream_sid: str) -> bytes:
            return orjson.dumps(command.message)

        def realtime(command: Any) -> bytes:
            return orjson.dumps(command.event)

        return twilio, realtime, lambda command: isinstance(command, commands.SendTwilio), orjson
    outbound = importlib.import_module("callbridge.telephony.outbound")
    client_events = importlib.import_module("callbridge.realtime.client_events")
    twilio_types = tuple(commands.TwilioCommand.__args__)

    def realtime_typed(command: Any) -> bytes:
        encoded: bytes = client_events.encode(command, "ga")
        return encoded

    return outbound.encode, realtime_typed, lambda command: isinstance(command, twilio_types), orjson


def run(frames: int, repeat: int) -> dict[str, list[float]]:
    from callbridge.core import events as ev
    from callbridge.core.context import AgentConfig, CallContext
    from callbridge.core.session import CallSession, SessionConfig
    from callbridge.realtime.protocol import parse_server_event
    from callbridge.telephony.media_streams import parse_twilio_message

    def live_session(now: float) -> CallSession:
        """A session past admission and the model's confirmation, as a verified call's would be."""
        context = CallContext(call_sid="CA" + "1" * 32, caller="+15550100001", called="+15550100002")
        session = CallSession(SessionConfig(agent=AgentConfig(), verify_parameters=lambda parameters, sid: context))
        for event in (
            ev.TwilioConnected(),
            ev.TwilioStart("MZ" + "2" * 32, context.call_sid or "", custom_parameters={}),
            ev.RealtimeConnected(),
            ev.RealtimeSessionUpdated(),
        ):
            session.handle(event, now)
        assert session.phase == "live"
        return session

    twilio_encode, realtime_encode, is_twilio, orjson = _encoders()
    payload = base64.b64encode(bytes([0x7F]) * 160).decode()
    figures: dict[str, list[float]] = {"caller_to_model_us": [], "model_to_caller_us": []}
    for _ in range(repeat):
        now = 1000.0
        session = live_session(now)
        sid = session.stream_sid
        assert sid is not None
        media = [
            orjson.dumps(
                {
                    "event": "media",
                    "sequenceNumber": str(n + 3),
                    "media": {"track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20), "payload": payload},
                    "streamSid": sid,
                }
            )
            for n in range(frames)
        ]
        start = time.perf_counter()
        for n, raw in enumerate(media):
            for command in session.handle(parse_twilio_message(raw), now + n * 0.02):
                realtime_encode(command)
        figures["caller_to_model_us"].append((time.perf_counter() - start) / frames * 1e6)

        now += frames * 0.02
        session.handle(ev.RealtimeResponseCreated("resp_1"), now)
        deltas = [
            orjson.dumps(
                {
                    "type": "response.output_audio.delta",
                    "event_id": f"event_{n}",
                    "response_id": "resp_1",
                    "item_id": "item_1",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": payload,
                }
            )
            for n in range(frames)
        ]
        start = time.perf_counter()
        for n, raw in enumerate(deltas):
            for command in session.handle(parse_server_event(raw), now + n * 0.02):
                if is_twilio(command):
                    twilio_encode(command, sid)
        figures["model_to_caller_us"].append((time.perf_counter() - start) / frames * 1e6)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, action="append", help="a checkout of callbridge (repeatable)")
    parser.add_argument("--frames", type=int, default=FRAMES)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="versions alternate this many times")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        sys.path[:0] = [str(args.child / "src"), str(args.child)]
        print(json.dumps(run(args.frames, args.repeat)))
        return
    roots = [root.resolve() for root in (args.root or [Path(__file__).resolve().parents[1]])]
    results: dict[Path, dict[str, list[float]]] = {root: {} for root in roots}
    for _ in range(args.rounds):
        for root in roots:  # interleaved: a noisy minute hits every version alike
            for key, values in _measure(root, args.frames, args.repeat).items():
                results[root].setdefault(key, []).extend(values)
    first = roots[0]
    for root in roots:
        line = [f"{root.name or root}:"]
        for key, values in results[root].items():
            median = statistics.median(values)
            ratio = median / statistics.median(results[first][key])
            line.append(f"{key} {median:.2f} (x{ratio:.2f})")
        print("  ".join(line))


if __name__ == "__main__":
    main()
