"""MCP tools: an MCP server's tools offered to the model as function tools, called through callbridge as the MCP
client. ``callbridge serve`` as a process, the MCP server another (the ``mcp`` SDK's own server, streamable HTTP),
killed mid-call where the test says."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp.client import Client

from callbridge.config import Settings
from callbridge.core.commands import UpdateSession
from callbridge.realtime.client_events import client_event
from callbridge.service.agents import load_agents
from callbridge.service.tools import ToolRegistry
from callbridge.service.webhooks import new_secret
from callbridge.telephony import g711 as audio
from callbridge.testing.caller import CallScript, HangUp, Pause, Say
from callbridge.testing.conformance import validate_client_event
from callbridge.testing.fake_realtime import FakeBehavior, FakeSession
from support import assert_conformant, free_port, serve, wait_closed, wait_until

MCP_SERVER = """
import json
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

calls = sys.argv[2]
server = MCPServer("crm")


@server.tool()
def find_order(order_id: int) -> dict:
    \"\"\"Find an order by its number.\"\"\"
    with open(calls, "a") as log:
        log.write(json.dumps({"tool": "find_order", "order_id": order_id}) + "\\n")
    return {"order_id": order_id, "status": "shipped"}


@server.tool()
def export_orders(count: int) -> str:
    \"\"\"Export orders as text.\"\"\"
    return "order;" * count


uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


GROWING_MCP_SERVER = """
import sys

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("crm")


def cancel_order(order_id: int) -> str:
    \"\"\"Cancel an order.\"\"\"
    return "cancelled"


@server.tool()
async def unlock(ctx: Context) -> str:
    \"\"\"Offer one more tool.\"\"\"
    server.add_tool(cancel_order)
    await ctx.notify_tools_changed()
    return "unlocked"


uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


@asynccontextmanager
async def mcp_server(tmp_path: Path, port: int, script: str = MCP_SERVER) -> AsyncIterator[asyncio.subprocess.Process]:
    """The MCP server as a process of its own, once it accepts connections; killed on the way out."""
    (tmp_path / "mcp_server.py").write_text(script)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(tmp_path / "mcp_server.py"), str(port), str(tmp_path / "mcp_calls.jsonl"), cwd=tmp_path
    )
    try:
        await wait_until(lambda: _listening(port), timeout=20, what="the MCP server listens")
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def agents_file(tmp_path: Path, port: int, tools: str = "") -> dict[str, str]:
    path = tmp_path / "agents.toml"
    path.write_text(
        f'default_agent = "shop"\n\n[agents.shop]\ngreeting = "Hi."\n{tools}\n\n'
        f'[mcp_servers.crm]\nurl = "http://127.0.0.1:{port}/mcp"\n'
        'headers = { Authorization = "Bearer ${CRM_TOKEN}" }\ntimeout_seconds = 3\n'
    )
    return {"CALLBRIDGE_AGENTS_FILE": str(path), "CRM_TOKEN": "crm-token-never-logged"}


def outputs(session: FakeSession) -> list[dict[str, Any]]:
    items = [event["item"] for event in session.client_events_of("conversation.item.create")]
    return [json.loads(item["output"]) for item in items if item["type"] == "function_call_output"]


@pytest.mark.e2e
@pytest.mark.slow
async def test_mcp_tools_reach_the_model_and_a_killed_server_is_an_error_output(tmp_path: Path) -> None:
    turns = [
        ("order", "crm__find_order", '{"order_id": 42}'),
        ("export", "crm__export_orders", '{"count": 200000}'),  # 1.2 MB of text
        ("again", "crm__find_order", '{"order_id": 43}'),
    ]
    behavior = FakeBehavior(
        transcripts=["order please", "export please", "again please", "thanks"],
        tool_cues={keyword: (name, arguments) for keyword, name, arguments in turns},
        greeting="Hi.",
        ms_per_char=10,
    )
    steps: list[Any] = [Pause(1000)]
    for _ in range(4):
        steps += [Say(audio.tone(600, 330)), Pause(3000)]
    port = free_port()
    async with (
        mcp_server(tmp_path, port) as server,
        serve(tmp_path, behavior, **agents_file(tmp_path, port)) as service,
    ):
        call = asyncio.create_task(service.caller().place_call(CallScript([*steps, HangUp()]), max_duration_s=40))
        await wait_until(
            lambda: len(service.fake.sessions) == 1 and len(outputs(service.fake.sessions[0])) == 2, timeout=30
        )
        server.kill()  # mid-call, before the third tool call
        await server.wait()
        await call
        (session,) = service.fake.sessions
        await wait_closed([session])
        (summary,) = await service.wait_for_logs("call.summary", 1, seconds=10)
        lost = await service.wait_for_logs("mcp.unavailable", 1, server="crm")

    assert_conformant(session)
    (update, *_) = session.client_events_of("session.update")
    tools = update["session"]["tools"]
    assert [tool["name"] for tool in tools] == ["crm__find_order", "crm__export_orders"]
    assert tools[0]["parameters"]["properties"]["order_id"]["type"] == "integer"
    assert tools[0]["description"] == "Find an order by its number."

    calls = [json.loads(line) for line in (tmp_path / "mcp_calls.jsonl").read_text().splitlines()]
    assert calls == [{"tool": "find_order", "order_id": 42}]  # the model's arguments reached the server
    found, exported, after_kill = outputs(session)
    assert found == {"order_id": 42, "status": "shipped"}
    assert "larger than 1048576 bytes" in exported["error"]
    assert "crm" in after_kill["error"]

    # The call went on: each output got the model's next response, and the last turn its plain reply.
    said = [e["transcript"] for e in session.server_events_of("response.output_audio_transcript.done")]
    assert len(said) == 5 and said[-1].startswith("You said: thanks")
    assert summary["reason"] == "caller_hung_up"
    assert lost and "crm-token-never-logged" not in service.log_path.read_text()


@pytest.mark.e2e
@pytest.mark.slow
async def test_an_mcp_server_down_at_start_leaves_its_tools_out_until_it_answers(tmp_path: Path) -> None:
    behavior = FakeBehavior(transcripts=["hello", "hello again"], greeting="Hi.", ms_per_char=10)
    port = free_port()  # nothing listens there, yet
    env = agents_file(tmp_path, port, tools='tools = ["crm", "end_call"]')
    script = CallScript([Pause(1000), Say(audio.tone(600, 330)), Pause(2000), HangUp()])
    async with serve(tmp_path, behavior, **env) as service:
        (down, *_) = await service.wait_for_logs("mcp.unavailable", 1, server="crm")
        await service.caller().place_call(script, max_duration_s=20)
        async with mcp_server(tmp_path, port):  # it comes up: retried in the background, it is found
            assert await service.wait_for_logs("mcp.connected", 1, seconds=30, server="crm")
            await service.caller().place_call(script, max_duration_s=20)
        first, second = service.fake.sessions
        await wait_closed([first, second])
    assert down["level"] == "error" and "retried" in down["detail"]
    tools = [
        [tool["name"] for tool in s.client_events_of("session.update")[0]["session"]["tools"]] for s in (first, second)
    ]
    assert tools == [["end_call"], ["crm__find_order", "crm__export_orders", "end_call"]]
    assert "crm-token-never-logged" not in service.log_path.read_text()


@pytest.mark.e2e
async def test_a_changed_tool_list_reaches_the_calls_that_start_after_it(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "agents.toml"
    path.write_text(
        f'[agents.a]\ntools = ["crm", "crm__unlock"]\n[mcp_servers.crm]\nurl = "http://127.0.0.1:{port}/mcp"\n'
    )
    async with mcp_server(tmp_path, port, GROWING_MCP_SERVER):
        directory = load_agents(Settings(_env_file=None), ToolRegistry(), path)
        await directory.toolbox.start()
        try:
            before = directory.agents["a"]
            assert [tool["name"] for tool in before.tools] == ["crm__unlock"]
            async with Client(f"http://127.0.0.1:{port}/mcp") as admin:  # someone else changes the server's tools
                await admin.call_tool("unlock", {})
            await wait_until(lambda: len(directory.agents["a"].tools) == 2, what="the new tool is offered")
            assert [tool["name"] for tool in directory.agents["a"].tools] == ["crm__unlock", "crm__cancel_order"]
            assert [tool["name"] for tool in before.tools] == ["crm__unlock"]  # a call keeps what it started with
        finally:
            await directory.toolbox.aclose()


# --- the agents file -------------------------------------------------------------------------------------------


def _load(tmp_path: Path, text: str, **settings: Any) -> Any:
    path = tmp_path / "agents.toml"
    path.write_text(text)
    return load_agents(Settings(_env_file=None, **settings), ToolRegistry(), path)


def test_mcp_servers_in_the_agents_file_are_checked_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALLBRIDGE_TEST_UNSET", raising=False)
    server = '[mcp_servers.crm]\nurl = "http://127.0.0.1:9/mcp"\n'
    with pytest.raises(ValueError, match="CALLBRIDGE_TEST_UNSET, which is not set"):
        _load(tmp_path, server + 'headers = { Authorization = "Bearer ${CALLBRIDGE_TEST_UNSET}" }\n')
    with pytest.raises(ValueError, match="no __"):
        _load(tmp_path, server.replace("crm", "c__rm"))
    with pytest.raises(ValueError, match="agent 'a' names unknown tools: crm__delete"):
        _load(tmp_path, server + 'allowed_tools = ["find"]\n[agents.a]\ntools = ["crm__delete"]\n')
    directory = _load(tmp_path, server + 'allowed_tools = ["find"]\n[agents.a]\ntools = ["crm__find", "crm"]\n')
    assert directory.get("a").tools == ()  # known once the server answers


def test_a_name_an_mcp_server_would_take_is_refused_at_load(tmp_path: Path) -> None:
    text = (
        '[mcp_servers.crm]\nurl = "http://127.0.0.1:9/mcp"\nallowed_tools = ["find"]\n'
        '[tools.crm__find]\nurl = "http://127.0.0.1:9/find"\n'
    )
    with pytest.raises(ValueError, match="'crm__find' is offered by both the HTTP tools and the MCP servers"):
        _load(tmp_path, text, webhook_secret=new_secret())


def test_a_native_mcp_server_is_a_realtime_mcp_tool(tmp_path: Path) -> None:
    text = (
        '[mcp_servers.docs]\nurl = "https://mcp.example.com/mcp"\nnative = true\nallowed_tools = ["search"]\n'
        'headers = { Authorization = "Bearer t" }\n[agents.a]\ntools = ["docs", "end_call"]\n'
    )
    with pytest.raises(ValueError, match="native MCP servers need the GA Realtime API"):
        _load(tmp_path, text, realtime_dialect="beta")
    agent = _load(tmp_path, text, realtime_dialect="ga").get("a")
    assert agent.tools == (
        {
            "type": "mcp",
            "server_label": "docs",
            "server_url": "https://mcp.example.com/mcp",
            "require_approval": "never",
            "headers": {"Authorization": "Bearer t"},
            "allowed_tools": ["search"],
        },
    )
    validate_client_event(client_event(UpdateSession("e1", agent, "Be brief."), "ga"), "ga")
