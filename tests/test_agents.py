"""Agents from a file, context resolvers, and the Standard Webhooks signatures callbridge puts on what it sends."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from callbridge.config import Settings
from callbridge.core.context import CallContext, ContextItem
from callbridge.service.agents import load_agents
from callbridge.service.resolvers import HttpContextResolver, PythonContextResolver
from callbridge.service.tools import ToolRegistry
from callbridge.service.webhooks import WebhookSigner, new_secret
from support import serve_refused

registry = ToolRegistry()


@registry.tool
async def check_availability(day: str) -> bool:
    """Is the day free?"""
    return True


@registry.tool
async def cancel_booking(reference: str) -> bool:
    """Cancel a booking."""
    return True


AGENTS = """
default_agent = "reception"

[agents.reception]
instructions = "You answer for Bright Dental."
greeting = "Bright Dental, how can I help?"
tools = ["check_availability", "end_call", "transfer_call"]
transfer_number = "+15550109999"

[agents.reminders]
speaks_first = false
turn_detection = "semantic_vad"
vad_eagerness = "low"

[numbers]
"+15550100002" = "reception"
"+15550100003" = "reminders"
"""


def test_agents_file(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(AGENTS)
    settings = Settings(agent_voice="cedar", _env_file=None)
    directory = load_agents(settings, registry, path)
    reception, reminders = directory.get("reception"), directory.get("reminders")
    assert reception is not None and reminders is not None
    assert directory.default is reception
    assert reception.instructions == "You answer for Bright Dental." and reception.voice == "cedar"
    assert [tool["name"] for tool in reception.all_tools] == ["check_availability", "end_call", "transfer_call"]
    assert reception.transfer_number == "+15550109999"
    assert reminders.turn_detection["type"] == "semantic_vad" and not reminders.speaks_first
    assert [tool["name"] for tool in reminders.all_tools] == ["check_availability", "cancel_booking"]
    assert directory.for_number("+15550100003") == "reminders"
    assert directory.for_number("+19999999999") == "reception"


def test_session_settings_per_agent_and_as_defaults(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(
        "[agents.a]\n"
        'noise_reduction = "near_field"\ntranscription_language = "de"\ntranscription_prompt = "Zahnarzt"\n'
        "idle_timeout_ms = 7000\nidle_hangup_after = 1\nvoice_speed = 1.2\nmax_output_tokens = 300\n"
        'tool_choice = "required"\ntool_filler_after_ms = 800\n'
        "[agents.b]\n"
    )
    settings = Settings(noise_reduction="off", idle_timeout_ms=9000, _env_file=None)
    directory = load_agents(settings, registry, path)
    a, b = directory.get("a"), directory.get("b")
    assert a is not None and b is not None
    assert (a.noise_reduction, a.transcription_language, a.transcription_prompt) == ("near_field", "de", "Zahnarzt")
    assert (a.idle_timeout_ms, a.idle_hangup_after, a.speed, a.max_output_tokens) == (7000, 1, 1.2, 300)
    assert (a.tool_choice, a.tool_filler_after_ms) == ("required", 800)
    # What an agent leaves out is the settings': here noise reduction off, a 9 s idle timeout, the rest unset.
    assert (b.noise_reduction, b.idle_timeout_ms, b.speed, b.max_output_tokens, b.tool_choice) == (
        None,
        9000,
        None,
        None,
        None,
    )
    path.write_text("[agents.a]\nvoice_speed = 3\n")
    with pytest.raises(ValueError, match="voice_speed"):
        load_agents(settings, registry, path)


def test_idle_timeout_needs_server_vad() -> None:
    with pytest.raises(ValueError, match="CALLBRIDGE_IDLE_TIMEOUT_MS"):
        Settings(idle_timeout_ms=6000, turn_detection="semantic_vad", _env_file=None)


def test_agents_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text('[agents.a]\ntools = ["nope"]\n')
    with pytest.raises(ValueError, match="unknown tools: nope"):
        load_agents(Settings(_env_file=None), registry, path)
    path.write_text('[numbers]\n"+1" = "ghost"\n')
    with pytest.raises(ValueError, match="unknown agent"):
        load_agents(Settings(_env_file=None), registry, path)
    path.write_text("[agents.a]\nvoyce = 'x'\n")
    with pytest.raises(ValueError, match="voyce"):
        load_agents(Settings(_env_file=None), registry, path)
    path.write_text("[agents.a]\nvoicemail_message = 'Hi {name.__class__}'\n")
    with pytest.raises(ValueError, match=r"agents.a.voicemail_message: .*plain names"):
        load_agents(Settings(_env_file=None), registry, path)


def test_an_agent_leaves_voicemail(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text('[agents.reminders]\nmachine_detection = true\nvoicemail_message = "Hi {name}, at {time}."\n')
    agent = load_agents(Settings(_env_file=None), registry, path).agents["reminders"]
    assert agent.machine_detection and agent.voicemail_message == "Hi {name}, at {time}."


def test_without_a_file_there_is_one_default_agent() -> None:
    directory = load_agents(Settings(_env_file=None), registry)
    assert directory.default.name == "default" and len(directory.default.tools) == 2


def test_signatures_are_standard_webhooks() -> None:
    """A receiver verifies with any Standard Webhooks library: here the reference one, ``standardwebhooks``."""
    key = new_secret()
    body = b'{"call_sid": "CA1"}'
    headers = WebhookSigner(key).headers(body, "msg_1")
    assert headers["webhook-id"] == "msg_1" and headers["Content-Type"] == "application/json"
    assert Webhook(key).verify(body, headers) == {"call_sid": "CA1"}
    with pytest.raises(WebhookVerificationError):
        Webhook(key).verify(body + b" ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    stale = WebhookSigner(key).headers(body, "msg_1", at=datetime.now(UTC) - timedelta(hours=1))
    with pytest.raises(WebhookVerificationError):  # too old: a replay
        Webhook(key).verify(body, stale)
    for refused in ("", "whsec_", "hook-secret", "whsec_not base64!"):
        with pytest.raises(ValueError, match="whsec_"):
            WebhookSigner(refused)


async def test_http_resolver_signs_and_reads_the_answer() -> None:
    key = new_secret()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        Webhook(key).verify(request.content, dict(request.headers))
        return httpx.Response(
            200, json={"name": "Ada", "greeting": "Hi Ada!", "items": [{"role": "user", "text": "x"}]}
        )

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    resolver = HttpContextResolver("https://app.example/callbridge/context", key, client)
    context = CallContext(call_sid="CA1", reference="customer-42", caller="+1", called="+2", agent="reception")
    resolved = await resolver(context)
    assert resolved == CallContext(name="Ada", greeting="Hi Ada!", items=(ContextItem("user", "x"),))
    assert json.loads(seen[0].content) == {
        "call_sid": "CA1",
        "reference": "customer-42",
        "agent": "reception",
        "from": "+1",
        "to": "+2",
    }
    await resolver.aclose()


async def resolve_example(context: CallContext) -> dict[str, object]:
    return {"name": f"customer {context.reference}", "metadata": {"tier": "gold"}}


async def test_python_resolver() -> None:
    resolved = await PythonContextResolver("test_agents:resolve_example")(CallContext(reference="7"))
    assert resolved is not None and resolved.name == "customer 7" and resolved.metadata == {"tier": "gold"}
    with pytest.raises(ValueError):
        PythonContextResolver("test_agents:registry")


async def test_agent_twiml_for_host_apps(tmp_path: Path) -> None:
    """A Python host app gets the TwiML, and the call's context goes to the record the service reads it from."""
    from callbridge.service.calls import agent_twiml
    from callbridge.store.repository import Store
    from callbridge.telephony.params import StreamParameterSigner

    database = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    settings = Settings(
        secret="shared",
        public_url="https://bridge.example",
        database_url=database,
        _env_file=None,
    )
    twiml = await agent_twiml(settings, CallContext(call_sid="CA1", name="Ada"), say="One moment.")
    assert "<Say>One moment.</Say>" in twiml and 'url="wss://bridge.example/twilio/media-stream"' in twiml
    token = twiml.split('value="')[1].split('"')[0]
    verified = StreamParameterSigner("shared", 600).verify({"callbridge": token}, "CA1", now=__import__("time").time())
    assert verified.call_sid == "CA1" and "Ada" not in token
    store = await Store.open(database)
    try:
        record = await store.get_call("CA1")
    finally:
        await store.close()
    assert record is not None and record.context is not None and record.context["name"] == "Ada"
    with pytest.raises(ValueError, match="CALLBRIDGE_SECRET"):
        await agent_twiml(Settings(_env_file=None), CallContext())


def test_a_value_the_settings_refuse_is_refused_in_the_agents_file_too(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text("[agents.reception]\nvad_threshold = 7\n")
    with pytest.raises(ValueError, match=r"agents.toml: agent 'reception': vad_threshold: .*less than or equal to 1"):
        load_agents(Settings(_env_file=None), registry, path)
    path.write_text('[agents.reception]\nturn_detection = "semantik"\n')
    with pytest.raises(ValueError, match=r"agents.reception.turn_detection"):
        load_agents(Settings(_env_file=None), registry, path)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_stops_at_once_on_a_bad_agents_file(workers: str, tmp_path: Path) -> None:
    """Before anything listens and before any worker starts: no worker is started again and again."""
    path = tmp_path / "agents.toml"
    path.write_text("[agents.reception]\nvad_threshold = 7\n")
    lines = serve_refused(tmp_path, workers=workers, CALLBRIDGE_AGENTS_FILE=str(path))
    assert len(lines) == 1 and "agent 'reception': vad_threshold" in lines[0] and "agents.toml" in lines[0]


def test_serve_names_the_variable_of_a_bad_setting(tmp_path: Path) -> None:
    assert serve_refused(tmp_path, CALLBRIDGE_VAD_THRESHOLD="7") == [
        "error: CALLBRIDGE_VAD_THRESHOLD: Input should be less than or equal to 1"
    ]
