"""HTTP tools: the model calls a function, callbridge POSTs it signed to the host application's endpoint, and the
JSON answer (or why there is none) is what the model hears. ``callbridge serve`` as a process, the host application
a real HTTP server on a real port."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from callbridge.config import Settings
from callbridge.service.agents import load_agents
from callbridge.service.tools import ToolRegistry
from callbridge.service.webhooks import new_secret
from callbridge.telephony import g711 as audio
from callbridge.testing.caller import CallScript, HangUp, Pause, Say
from callbridge.testing.fake_realtime import FakeBehavior
from support import API_TOKEN, agent_items, api, assert_conformant, free_port, serve, serve_refused, wait_closed

HOOK_SECRET = new_secret()
MAX_BYTES = 4096


@dataclass
class HostApp:
    """The host application's tool endpoints, on a real port; it keeps every request it got."""

    port: int = field(default_factory=free_port)
    requests: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.requests]

    async def _endpoint(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        self.requests.append((path, body, dict(request.headers)))
        if path == "/slow":
            await asyncio.sleep(5)
            return JSONResponse({"late": True})
        if path == "/fail":
            return JSONResponse({"detail": "database down"}, status_code=500)
        if path == "/big":
            return JSONResponse({"padding": "x" * (MAX_BYTES * 4)})
        if path == "/text":
            return PlainTextResponse("order 42 has shipped")
        arguments = json.loads(body)["arguments"]
        return JSONResponse({"order_id": arguments["order_id"], "status": "shipped"})

    @asynccontextmanager
    async def running(self) -> AsyncIterator[HostApp]:
        routes = [
            Route(f"/{name}", self._endpoint, methods=["POST"]) for name in ("order", "slow", "fail", "big", "text")
        ]
        config = uvicorn.Config(
            Starlette(routes=routes), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag, it has no event to await
            await asyncio.sleep(0.01)
        try:
            yield self
        finally:
            server.should_exit = True
            server.force_exit = True  # the slow endpoint may still be asleep
            await task


ORDER_SCHEMA = (
    '{ type = "object", properties = { order_id = { type = "integer", description = "The order number" } }, '
    'required = ["order_id"] }'
)


def agents_file(host: HostApp) -> str:
    tools = "".join(
        f'[tools.{name}]\ndescription = "{name}"\nurl = "{host.url}/{path}"\ntimeout_seconds = 1\n'
        f"parameters = {ORDER_SCHEMA}\n\n"
        for name, path in [
            ("lookup_order", "order"),
            ("slow_lookup", "slow"),
            ("failing_lookup", "fail"),
            ("huge_lookup", "big"),
            ("text_lookup", "text"),
        ]
    )
    return 'default_agent = "shop"\n\n[agents.shop]\ngreeting = "Hi."\n\n' + tools


@pytest.mark.e2e
@pytest.mark.slow
async def test_http_tools_answer_the_model_and_their_failures_do_not_end_the_call(tmp_path: Path) -> None:
    turns = [
        ("order", "lookup_order", '{"order_id": 42}'),
        ("slow", "slow_lookup", '{"order_id": 1}'),
        ("broken", "failing_lookup", '{"order_id": 2}'),
        ("huge", "huge_lookup", '{"order_id": 3}'),
        ("text", "text_lookup", '{"order_id": 4}'),
        ("garbled", "lookup_order", '{"order_id": "forty-two"}'),
    ]
    behavior = FakeBehavior(
        transcripts=[f"{keyword} please" for keyword, _, _ in turns],
        tool_cues={keyword: (name, arguments) for keyword, name, arguments in turns},
        greeting="Hi.",
        ms_per_char=10,
    )
    steps: list[Any] = [Pause(1000)]
    for _ in turns:
        steps += [Say(audio.tone(600, 330)), Pause(2600)]
    (tmp_path / "agents.toml").write_text(agents_file(host := HostApp()))
    env = {
        "CALLBRIDGE_AGENTS_FILE": str(tmp_path / "agents.toml"),
        "CALLBRIDGE_WEBHOOK_SECRET": HOOK_SECRET,
        "CALLBRIDGE_MAX_REQUEST_BYTES": str(MAX_BYTES),
        "CALLBRIDGE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}",
        "CALLBRIDGE_API_TOKEN": API_TOKEN,
    }
    async with host.running(), serve(tmp_path, behavior, **env) as service:
        recording = await service.caller().place_call(CallScript([*steps, HangUp()]), max_duration_s=40)
        (session,) = service.fake.sessions
        await wait_closed([session])
        (summary,) = await service.wait_for_logs("call.summary", 1, seconds=10)
        async with api(service) as client:
            events = (await client.get(f"/api/calls/{recording.call_sid}/events")).json()

    assert_conformant(session)
    (update, *_) = session.client_events_of("session.update")
    assert [tool["name"] for tool in update["session"]["tools"]] == [name for name in _names(turns)]
    assert update["session"]["tools"][0]["parameters"]["properties"]["order_id"]["type"] == "integer"

    # The host application got one signed request per valid call, none for the arguments that break the schema.
    assert host.paths() == ["/order", "/slow", "/fail", "/big", "/text"]
    _, body, headers = host.requests[0]
    Webhook(HOOK_SECRET).verify(body, headers)
    request = json.loads(body)
    assert request["call_sid"] == recording.call_sid and request["tool"] == "lookup_order"
    assert request["arguments"] == {"order_id": 42}
    assert request["context"]["agent"] == "shop" and set(request["context"]) == {"reference", "agent", "from", "to"}

    items = [event["item"] for event in session.client_events_of("conversation.item.create")]
    outputs = [json.loads(item["output"]) for item in items if item["type"] == "function_call_output"]
    assert outputs[0] == {"order_id": 42, "status": "shipped"}
    errors = [output["error"] for output in outputs[1:]]
    assert len(errors) == 5
    assert "within 1 s" in errors[0]
    assert "HTTP 500" in errors[1]
    assert f"larger than {MAX_BYTES} bytes" in errors[2]
    assert "not answer JSON" in errors[3]
    assert "invalid arguments" in errors[4] and "integer" in errors[4]

    # Each output is followed by the model's next response, and the call went on to the end: one reply per turn.
    types = [event["type"] for event in session.client_events if event["type"] != "input_audio_buffer.append"]
    for index, kind in enumerate(types):
        if kind == "conversation.item.create":
            assert types[index + 1] == "response.create"
    said = [e["transcript"] for e in session.server_events_of("response.output_audio_transcript.done")]
    assert len(said) == 1 + len(turns) and all(line.startswith("Here is what I found:") for line in said[1:])
    assert len(agent_items(session)) == 1 + len(turns)
    assert summary["reason"] == "caller_hung_up"

    # The call's events say which tool failed, and why.
    tool_calls = [event["data"] for event in events if event["kind"] == "tool_call"]
    assert [call["ok"] for call in tool_calls] == [True, False, False, False, False, False]
    assert "HTTP 500" in tool_calls[2]["output"] and tool_calls[2]["name"] == "failing_lookup"


def _names(turns: list[tuple[str, str, str]]) -> list[str]:
    return list(dict.fromkeys(name for _, name, _ in turns))


# --- what the agents file may not declare ---------------------------------------------------------------------


def _settings(**values: Any) -> Settings:
    return Settings(_env_file=None, webhook_secret=HOOK_SECRET, **values)


def _http_tool(parameters: str = ORDER_SCHEMA, name: str = "lookup_order") -> str:
    return f'[tools.{name}]\nurl = "http://127.0.0.1:9/order"\nparameters = {parameters}\n'


@pytest.mark.parametrize(
    ("parameters", "reason"),
    [
        ('{ type = "bogus" }', "parameters is not a JSON Schema"),
        ('{ type = "object", properties = { n = { type = 7 } } }', "parameters is not a JSON Schema"),
        ('{ type = "string" }', "must be an object schema"),
    ],
)
def test_a_tool_schema_that_is_not_json_schema_is_refused_at_load(parameters: str, reason: str, tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(_http_tool(parameters))
    with pytest.raises(ValueError, match=reason) as refused:
        load_agents(_settings(), ToolRegistry(), path)
    assert str(path) in str(refused.value) and "tool 'lookup_order'" in str(refused.value)


def test_a_name_two_sources_offer_is_refused_at_load(tmp_path: Path) -> None:
    registry = ToolRegistry()

    @registry.tool
    async def lookup_order(order_id: int) -> dict[str, int]:
        """Look up an order."""
        return {"order_id": order_id}

    path = tmp_path / "agents.toml"
    path.write_text(_http_tool())
    with pytest.raises(ValueError, match="'lookup_order' is offered by both the Python tools and the HTTP tools"):
        load_agents(_settings(), registry, path)
    path.write_text(_http_tool(name="end_call"))
    with pytest.raises(ValueError, match="'end_call' is offered by both the built-in call-control tools"):
        load_agents(_settings(), ToolRegistry(), path)


def test_an_http_tool_needs_the_webhook_secret(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(_http_tool())
    with pytest.raises(ValueError, match="need CALLBRIDGE_WEBHOOK_SECRET"):
        load_agents(Settings(_env_file=None), ToolRegistry(), path)


def test_agents_name_http_tools_and_get_them_all_by_default(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(
        '[agents.a]\ntools = ["lookup_order", "end_call"]\n[agents.b]\n[agents.c]\ntools = ["nope"]\n' + _http_tool()
    )
    with pytest.raises(ValueError, match="agent 'c' names unknown tools: nope"):
        load_agents(_settings(), ToolRegistry(), path)
    path.write_text('[agents.a]\ntools = ["lookup_order", "end_call"]\n[agents.b]\n' + _http_tool())
    directory = load_agents(_settings(), ToolRegistry(), path)
    a, b = directory.get("a"), directory.get("b")
    assert a is not None and b is not None
    assert [tool["name"] for tool in a.all_tools] == ["lookup_order", "end_call"]
    assert [tool["name"] for tool in b.all_tools] == ["lookup_order"]


@pytest.mark.e2e
def test_serve_refuses_an_agents_file_with_a_broken_tool_schema(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(_http_tool('{ type = "bogus" }'))
    (line,) = serve_refused(tmp_path, CALLBRIDGE_AGENTS_FILE=str(path), CALLBRIDGE_WEBHOOK_SECRET=HOOK_SECRET)
    assert line.startswith("error: CALLBRIDGE_AGENTS_FILE: ") and str(path) in line
    assert "tool 'lookup_order': parameters is not a JSON Schema" in line
