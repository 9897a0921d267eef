"""MCP tools: the tools of Model Context Protocol servers, offered to the model as function tools.

Declared in the agents file::

    [mcp_servers.crm]
    url = "https://crm.internal.example/mcp"       # streamable HTTP; transport = "sse" for an SSE server
    headers = { Authorization = "Bearer ${CRM_TOKEN}" }
    allowed_tools = ["find_customer", "open_ticket"]  # default: every tool the server lists
    timeout_seconds = 5                              # default: CALLBRIDGE_TOOL_TIMEOUT_SECONDS

callbridge is the MCP client (the official ``mcp`` SDK). Each process connects to each server when it starts and
keeps the connection for its lifetime; it lists the server's tools, again whenever the server says its list
changed, and offers them to the model as ``crm__find_customer``: the server's name, two underscores, the tool's
name, its ``inputSchema`` as the parameters. An agent names one tool so, or all of a server's tools by the server's
name (``tools = ["crm"]``). A call runs the tool with the model's arguments; the output is the result's
``structuredContent`` as JSON, or else its text content joined; an ``isError`` result, a result over 1 MiB, a
timeout or a server that went away are an error output to the model, and the call goes on.

``${VAR}`` in a header's value is the environment variable, read when the file loads (an unset one is an error);
header values are never logged. A server that does not answer at start is logged as an error, its tools are
missing from the calls that start meanwhile, and it is tried again in the background with a growing delay;
so is a server whose connection is lost.

**Native MCP** (``native = true``): the server is handed to OpenAI as a Realtime ``type: "mcp"`` tool instead
(``server_label``, ``server_url``, ``headers``, ``allowed_tools``, ``require_approval = "never"``) and OpenAI calls
it; callbridge does not connect to it. Prefer it only for a server reachable from OpenAI's cloud, on OpenAI (the GA
dialect): it saves a hop, but callbridge neither sees nor records those calls, and no other Realtime server
(the offline engine included) can use it. Client-side MCP (the default) works with any Realtime server and with
servers on a private network, and every call shows in the call's events like any other tool's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx2
import mcp_types
import orjson
import structlog
from mcp.client import Client
from mcp.client.session import IncomingMessage
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError, ToolsListChanged
from pydantic import BaseModel, ConfigDict, Field

from callbridge.service.tools import error_output

log = structlog.stdlib.get_logger("callbridge.tools")

MAX_RESULT_BYTES = 1024 * 1024
"""The largest tool result the model is given: a bigger one is an error output."""
SERVER_NAME = re.compile(r"^[A-Za-z0-9-]+(?:_[A-Za-z0-9-]+)*$")
"""A server's name: no ``__`` (it separates the server from the tool) and no leading or trailing ``_``."""
SEPARATOR = "__"
RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Between attempts to reach a server that is down; the last one repeats."""
CONNECT_TIMEOUT_S = 10.0
PING_EVERY_S = 15.0
"""A server that cannot say when its list changes (an older protocol) is pinged this often, to notice it is gone."""
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class McpServerSpec(BaseModel):
    """One ``[mcp_servers.NAME]`` table of the agents file."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://")
    transport: Literal["streamable_http", "sse"] = "streamable_http"
    headers: dict[str, str] = {}
    allowed_tools: list[str] | None = None
    timeout_seconds: float | None = Field(default=None, gt=0)
    native: bool = False


def expand_headers(headers: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The headers with each ``${VAR}`` replaced by the environment variable (``ValueError`` naming an unset one,
    never a value)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ValueError(f"header names the environment variable {name}, which is not set")
        return environ[name]

    return {key: _VARIABLE.sub(value, raw) for key, raw in headers.items()}


def native_tool(name: str, spec: McpServerSpec, headers: Mapping[str, str]) -> dict[str, Any]:
    """The Realtime API's ``type: "mcp"`` tool for a native server."""
    tool: dict[str, Any] = {"type": "mcp", "server_label": name, "server_url": spec.url, "require_approval": "never"}
    if headers:
        tool["headers"] = dict(headers)
    if spec.allowed_tools is not None:
        tool["allowed_tools"] = list(spec.allowed_tools)
    return tool


@dataclass(frozen=True, slots=True)
class McpTool:
    name: str
    """As the model knows it: ``server__tool``."""
    remote: str
    """As the server knows it."""
    schema: dict[str, Any]


class McpServer:
    """One MCP server, connected for the application's lifetime: its tools as they are now, and calling them."""

    def __init__(
        self,
        name: str,
        spec: McpServerSpec,
        headers: Mapping[str, str],
        *,
        taken: Callable[[str], bool],
        changed: Callable[[], None],
    ) -> None:
        self.name = name
        self.spec = spec
        self._headers = dict(headers)
        self._taken = taken  # a name another source offers
        self._changed = changed
        self.tools: dict[str, McpTool] = {}
        self._client: Client | None = None
        self._list_changed = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep_connected(), name=f"mcp:{self.name}")

    async def first_attempt(self) -> None:
        """Until the first attempt to connect has succeeded or failed."""
        await self._first_attempt.wait()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def call(self, tool: McpTool, arguments: dict[str, Any], time_limit: float) -> tuple[bool, str]:
        client = self._client
        if client is None:
            return False, error_output(f"the MCP server {self.name!r} is not reachable now")
        limit = self.spec.timeout_seconds or time_limit
        try:
            async with asyncio.timeout(limit):
                result = await client.call_tool(tool.remote, arguments, read_timeout_seconds=limit)
        except TimeoutError:
            return False, error_output(f"the MCP server {self.name!r} did not answer within {limit:g} s")
        except Exception as exc:  # the server went away, or broke the protocol: the model hears it, the call goes on
            return False, error_output(f"the MCP server {self.name!r} failed: {_reason(exc)}")
        return _output(result)

    async def _keep_connected(self) -> None:
        attempt = 0
        while True:
            try:
                async with self._connected() as client:
                    attempt = 0
                    await self._refresh(client)
                    self._client = client
                    self._first_attempt.set()
                    log.info("mcp.connected", server=self.name, url=self.spec.url, tools=sorted(self.tools))
                    await self._watch(client)
                log.error("mcp.disconnected", server=self.name, url=self.spec.url)
            except Exception as exc:
                delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
                log.error(
                    "mcp.unavailable",
                    server=self.name,
                    url=self.spec.url,
                    error=_reason(exc),
                    detail=f"its tools are left out of the calls that start meanwhile; retried in {delay:g} s",
                )
                attempt += 1
            else:
                delay = RETRY_DELAYS_S[0]
            finally:
                self._client = None
                self._first_attempt.set()
                if self.tools:
                    self.tools = {}
                    self._changed()
            await asyncio.sleep(delay)

    @contextlib.asynccontextmanager
    async def _connected(self) -> AsyncIterator[Client]:
        async with contextlib.AsyncExitStack() as stack:
            if self.spec.transport == "sse":
                transport: Any = sse_client(self.spec.url, headers=self._headers, timeout=CONNECT_TIMEOUT_S)
            else:
                timeout = httpx2.Timeout(CONNECT_TIMEOUT_S, read=300.0)  # a stream of events may stay quiet long
                http = await stack.enter_async_context(httpx2.AsyncClient(headers=self._headers, timeout=timeout))
                transport = streamable_http_client(self.spec.url, http_client=http)
            client = Client(
                transport,
                cache=None,  # a listing is fetched when it changed, and must not be served stale
                read_timeout_seconds=CONNECT_TIMEOUT_S,
                message_handler=self._message,
                client_info=mcp_types.Implementation(name="callbridge", version="1"),
            )
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await stack.enter_async_context(client)
            yield client

    async def _message(self, message: IncomingMessage) -> None:
        """Older servers say their list changed with a notification (2026 ones through ``listen``)."""
        if isinstance(message, mcp_types.ToolListChangedNotification):
            self._list_changed.set()

    async def _watch(self, client: Client) -> None:
        """Until the connection is lost (or the server closes it): refresh the tools whenever their list changes."""
        try:
            async with client.listen(tools_list_changed=True) as subscription:
                async for event in subscription:
                    if isinstance(event, ToolsListChanged):
                        await self._refresh(client)
            return
        except ListenNotSupportedError:
            pass
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PING_EVERY_S):
                    await self._list_changed.wait()
            if self._list_changed.is_set():
                self._list_changed.clear()
                await self._refresh(client)
            else:
                await client.send_ping()

    async def _refresh(self, client: Client) -> None:
        listed: list[mcp_types.Tool] = []
        cursor: str | None = None
        for _ in range(100):  # a server that pages forever cannot hold the connection
            page = await client.list_tools(cursor=cursor)
            listed += page.tools
            if (cursor := page.next_cursor) is None:
                break
        tools = {}
        allowed = self.spec.allowed_tools
        for tool in listed:
            if allowed is not None and tool.name not in allowed:
                continue
            name = f"{self.name}{SEPARATOR}{tool.name}"
            if self._taken(name):
                log.error("mcp.tool_clash", server=self.name, tool=name, detail="another tool has its name: left out")
                continue
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                log.error("mcp.tool_name", server=self.name, tool=name, detail="not a function name: left out")
                continue
            parameters = dict(tool.input_schema) or {"type": "object", "properties": {}}
            schema = {"type": "function", "name": name, "description": tool.description or "", "parameters": parameters}
            tools[name] = McpTool(name, tool.name, schema)
        if tools != self.tools:
            self.tools = tools
            self._changed()
            log.info("mcp.tools", server=self.name, tools=sorted(tools))


def _output(result: mcp_types.CallToolResult) -> tuple[bool, str]:
    if result.structured_content is not None and not result.is_error:
        output = orjson.dumps(result.structured_content).decode()
    else:
        output = "\n".join(part.text for part in result.content if isinstance(part, mcp_types.TextContent))
    if result.is_error:
        return False, error_output(output or "the tool failed")
    if len(output.encode()) > MAX_RESULT_BYTES:
        return False, error_output(f"the tool's result is larger than {MAX_RESULT_BYTES} bytes")
    return True, output


def _reason(exc: BaseException) -> str:
    """One line for what went wrong: the first real error inside the task groups' exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
