"""``/metrics`` collected at scrape time: what the finished calls counted plus what the live ones count so far."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from callbridge.core.context import AgentConfig, CallContext
from callbridge.core.session import CallSession, SessionConfig
from callbridge.core.usage import TokenUsage
from callbridge.observability.metrics import Metrics


def refuse(parameters: Mapping[str, str], call_sid: str) -> CallContext:
    raise AssertionError("these sessions never start")


def session_using(usage: TokenUsage, end_reason: str = "caller_hung_up") -> CallSession:
    session = CallSession(SessionConfig(agent=AgentConfig(), verify_parameters=refuse))
    session.end_reason = end_reason
    session.usage = usage
    return session


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    exposition = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def tokens(metrics: Metrics) -> dict[str, float]:
    return {
        dict(labels)["kind"]: value
        for (name, labels), value in scrape(metrics).items()
        if name == "callbridge_tokens_total"
    }


def test_tokens_sum_finished_and_live_calls_and_count_a_finished_call_once() -> None:
    live: list[CallSession] = []
    metrics = Metrics(lambda: live)
    assert tokens(metrics) == dict.fromkeys(TokenUsage.KINDS, 0)

    finished = session_using(TokenUsage(input_text=10, input_audio=200, input_cached=50, output_audio=300))
    metrics.call_ended(finished)
    running = session_using(TokenUsage(input_audio=100, output_text=7, output_audio=80, responses=1))
    live.append(running)
    expected = {"input_text": 10, "input_audio": 300, "input_cached": 50, "output_text": 7, "output_audio": 380}
    assert tokens(metrics) == expected
    assert tokens(metrics) == expected  # scraping again counts nothing twice

    # A long call's tokens show while it runs.
    running.usage.add(TokenUsage(input_audio=40, input_cached=20, output_audio=60, responses=1))
    expected = {"input_text": 10, "input_audio": 340, "input_cached": 70, "output_text": 7, "output_audio": 440}
    assert tokens(metrics) == expected

    # It ends as app.py ends it: out of the live calls and into the finished totals at once.
    live.remove(running)
    metrics.call_ended(running)
    assert tokens(metrics) == expected
    assert scrape(metrics)[("callbridge_calls_total", (("outcome", "caller_hung_up"),))] == 2
    assert scrape(metrics)[("callbridge_active_calls", ())] == 0


def test_a_call_without_tokens_counts_zero() -> None:
    """A call the model never answered (refused, or no Realtime connection) adds nothing."""
    metrics = Metrics(lambda: [session_using(TokenUsage())])
    metrics.call_ended(session_using(TokenUsage(), end_reason="refused"))
    assert tokens(metrics) == dict.fromkeys(TokenUsage.KINDS, 0)
