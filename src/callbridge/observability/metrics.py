"""Prometheus metrics (``GET /metrics``), one registry per application.

The per-frame counters cost nothing on the audio path: each call already counts its frames, barge-ins and errors in
its session's stats, and :class:`_CallCounters` adds them up only when Prometheus scrapes (the finished calls' totals
plus the live calls' current stats); so are the tokens the model bills, from each call's usage. Histograms are
observed where the events are rare (a turn) or sampled (the relay's added latency, one frame in
:data:`RELAY_SAMPLE_EVERY`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from callbridge.core.usage import TokenUsage

if TYPE_CHECKING:
    from callbridge.core.session import CallSession, SessionStats

RELAY_SAMPLE_EVERY = 16
"""One audio frame in this many has its time through the bridge measured."""

_STAT_COUNTERS: dict[str, tuple[str, str, dict[str, str]]] = {
    # session stat → (metric name, help, labels)
    "frames_in": ("callbridge_frames_relayed", "Audio frames relayed", {"direction": "caller_to_model"}),
    "deltas_out": ("callbridge_frames_relayed", "Audio frames relayed", {"direction": "model_to_caller"}),
    "barge_ins": ("callbridge_barge_ins", "Times a caller spoke over the agent", {}),
    "truncations": ("callbridge_truncations", "Agent turns truncated to what the caller heard", {}),
    "deletions": (
        "callbridge_item_deletions",
        "Agent audio items the caller heard nothing of, deleted from the model's conversation",
        {},
    ),
    "cancels": ("callbridge_response_cancels", "Model responses cancelled by callbridge", {}),
    "tool_calls": ("callbridge_tool_calls", "Tool calls the model made", {}),
    "protocol_errors": ("callbridge_errors", "Errors, by kind", {"kind": "twilio_protocol"}),
    "realtime_errors": ("callbridge_errors", "Errors, by kind", {"kind": "realtime_error_event"}),
    "frames_buffered_dropped": ("callbridge_errors", "Errors, by kind", {"kind": "caller_audio_dropped"}),
    "deltas_unconfirmed": ("callbridge_errors", "Errors, by kind", {"kind": "agent_audio_before_confirmed_session"}),
    "responses_failed": ("callbridge_errors", "Errors, by kind", {"kind": "response_failed"}),
    "responses_incomplete": ("callbridge_errors", "Errors, by kind", {"kind": "response_incomplete"}),
}


class _CallCounters(Collector):
    """Counters summed over finished calls and live ones at scrape time, and the number of live calls."""

    def __init__(
        self,
        live_sessions: Callable[[], Iterable[CallSession]],
        finished: dict[str, int],
        finished_tokens: dict[str, int],
    ) -> None:
        self._live_sessions = live_sessions
        self._finished = finished
        self._finished_tokens = finished_tokens

    def collect(self) -> Iterator[Metric]:
        totals = dict(self._finished)
        tokens = dict(self._finished_tokens)
        live = 0
        for session in self._live_sessions():
            live += 1
            _add(totals, session.stats)
            _add_tokens(tokens, session.usage)
        active = GaugeMetricFamily("callbridge_active_calls", "Calls this process carries now")
        active.add_metric([], live)
        yield active
        families: dict[str, CounterMetricFamily] = {}
        for stat, (name, documentation, labels) in _STAT_COUNTERS.items():
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(name, documentation, labels=list(labels))
            family.add_metric(list(labels.values()), totals.get(stat, 0))
        yield from families.values()
        billed = CounterMetricFamily(
            "callbridge_tokens",
            "Tokens the model billed, by kind (input_cached is the cached part of input_text and input_audio)",
            labels=["kind"],
        )
        for kind in TokenUsage.KINDS:
            billed.add_metric([kind], tokens.get(kind, 0))
        yield billed


class Metrics:
    """Everything ``/metrics`` reports for one application."""

    def __init__(self, live_sessions: Callable[[], Iterable[CallSession]]) -> None:
        self.registry = CollectorRegistry()
        self._finished: dict[str, int] = {}
        self._finished_tokens: dict[str, int] = {}
        self.registry.register(_CallCounters(live_sessions, self._finished, self._finished_tokens))
        self.calls = Counter(
            "callbridge_calls", "Calls ended, by outcome (the end reason)", ["outcome"], registry=self.registry
        )
        self.refusals = Counter(
            "callbridge_calls_refused", "Calls turned away, by reason", ["reason"], registry=self.registry
        )
        self.errors = Counter(
            "callbridge_bridge_errors", "Failures of the bridge's own I/O, by kind", ["kind"], registry=self.registry
        )
        self.turn_latency = Histogram(
            "callbridge_turn_latency_seconds",
            "From the caller's end of speech (as the model's VAD reports it) to the agent's first audio sent",
            buckets=(0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
            registry=self.registry,
        )
        self.relay_latency = Histogram(
            "callbridge_relay_latency_seconds",
            f"Time an audio frame spends in the bridge, read to written (1 frame in {RELAY_SAMPLE_EVERY})",
            ["direction"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
            registry=self.registry,
        )
        self.live_events_lost = Counter(
            "callbridge_live_events_lost",
            "Live events not delivered to the live bus, by reason (dropped: its buffer was full; failed: Redis refused "
            "or could not be reached) and event type",
            ["reason", "type"],
            registry=self.registry,
        )

    def live_event_lost(self, reason: str, kind: str) -> None:
        self.live_events_lost.labels(reason, kind).inc()

    def call_ended(self, session: CallSession) -> None:
        self.calls.labels(session.end_reason or "unknown").inc()
        _add(self._finished, session.stats)
        _add_tokens(self._finished_tokens, session.usage)

    def observe(self, name: str, value: float) -> None:
        if name == "turn_latency_s":
            self.turn_latency.observe(value)

    def relayed(self, direction: str, seconds: float) -> None:
        self.relay_latency.labels(direction).observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()


def _add(totals: dict[str, int], stats: SessionStats) -> None:
    for name, value in dataclasses.asdict(stats).items():
        totals[name] = totals.get(name, 0) + value


def _add_tokens(totals: dict[str, int], usage: TokenUsage) -> None:
    for kind, count in usage.by_kind().items():
        totals[kind] = totals.get(kind, 0) + count
