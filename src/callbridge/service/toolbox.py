"""Every tool a call may use, whatever answers it: Python functions (the ``CALLBRIDGE_TOOLS`` registry), the host
application's HTTP endpoints (:mod:`callbridge.service.http_tools`) and the tools of MCP servers
(:mod:`callbridge.service.mcp_tools`), under one namespace.

A name belongs to one source only: two sources offering the same name (or one of the built-in call-control tools,
``end_call`` and ``transfer_call``) is an error when the agents file loads. An MCP server's tools are known only
once it answers; one whose name would clash is logged and left out.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
import structlog

from callbridge.core.context import BUILTIN_TOOLS
from callbridge.service.http_tools import HttpTool, parse_arguments
from callbridge.service.mcp_tools import SEPARATOR, McpServer, McpServerSpec, native_tool
from callbridge.service.tools import ToolContext, ToolRegistry, error_output

log = structlog.stdlib.get_logger("callbridge.tools")

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What the Realtime API takes as a function's name."""


class Toolbox:
    """The tools of a service: their schemas for an agent's ``session.update``, and running one by name."""

    def __init__(
        self,
        registry: ToolRegistry,
        http_tools: Mapping[str, HttpTool] | None = None,
        mcp_servers: Mapping[str, tuple[McpServerSpec, Mapping[str, str]]] | None = None,
    ) -> None:
        """``mcp_servers``: each server's declaration and its headers (the environment's values filled in)."""
        self.registry = registry
        self.http_tools = dict(http_tools or {})
        self._client: httpx.AsyncClient | None = None
        self.version = 0
        """Grows whenever the set of tools changes (an MCP server's list): what was built from it is stale."""
        servers = dict(mcp_servers or {})
        self.native = {
            name: native_tool(name, spec, headers) for name, (spec, headers) in servers.items() if spec.native
        }
        self.mcp_servers = {
            name: McpServer(name, spec, headers, taken=self._offered_elsewhere, changed=self._changed)
            for name, (spec, headers) in servers.items()
            if not spec.native
        }
        announced = [  # what the servers will list, when the file says
            f"{name}{SEPARATOR}{tool}" for name, (spec, _) in servers.items() for tool in spec.allowed_tools or ()
        ]
        _check_clashes(
            {
                "the Python tools": registry.names,
                "the HTTP tools": self.http_tools,
                "the MCP servers": servers,
                "the MCP servers' allowed tools": announced,
            }
        )

    def _offered_elsewhere(self, name: str) -> bool:
        return name in BUILTIN_TOOLS or name in self.registry or name in self.http_tools

    def _changed(self) -> None:
        self.version += 1

    def check_selection(self, agent: str, names: Sequence[str]) -> None:
        """Raise ``ValueError`` unless each of ``names`` (an agent's ``tools``) is a tool this service knows.

        ``server__tool`` can only be checked against the server's ``allowed_tools``: what a server lists is known
        once it answers."""
        unknown = [name for name in names if not self._known(name)]
        if unknown:
            raise ValueError(f"agent {agent!r} names unknown tools: {', '.join(unknown)}")
        for name in names:
            server, _, _ = name.partition(SEPARATOR)
            if server in self.native and name != server:
                raise ValueError(f"agent {agent!r} names {name!r}: a native MCP server is named whole ({server!r})")

    def _known(self, name: str) -> bool:
        if self._offered_elsewhere(name) or name in self.mcp_servers or name in self.native:
            return True
        server, separator, tool = name.partition(SEPARATOR)
        declared = self.mcp_servers.get(server) or self.native.get(server)
        if not separator or declared is None:
            return False
        allowed = declared.spec.allowed_tools if isinstance(declared, McpServer) else declared.get("allowed_tools")
        return allowed is None or tool in allowed

    def schemas(self, names: Sequence[str] | None) -> tuple[dict[str, Any], ...]:
        """The tools an agent offers the model now: those ``names`` selects, in its order (the built-in
        call-control tools are the session's), or every tool when ``names`` is ``None``."""
        if names is None:
            names = [*self.registry.names, *self.http_tools, *self.mcp_servers, *self.native]
        by_name = {schema["name"]: schema for schema in self.registry.schemas}
        chosen: list[dict[str, Any]] = []
        for name in names:
            if name in by_name:
                chosen.append(by_name[name])
            elif name in self.http_tools:
                chosen.append(self.http_tools[name].schema)
            elif name in self.native:
                chosen.append(self.native[name])
            elif name in self.mcp_servers:
                chosen += (tool.schema for tool in self.mcp_servers[name].tools.values())
            elif (server := self.mcp_servers.get(name.partition(SEPARATOR)[0])) and name in server.tools:
                chosen.append(server.tools[name].schema)
        unique = {schema.get("name") or schema.get("server_label"): schema for schema in chosen}  # "crm", "crm__a"
        return tuple(unique.values())

    async def run(self, name: str, arguments: str, context: ToolContext, time_limit: float) -> tuple[bool, str]:
        """Run the tool ``name``; ``(ok, output)`` as :meth:`ToolRegistry.run` returns it."""
        if (http_tool := self.http_tools.get(name)) is not None:
            if self._client is None:
                # No timeout of its own: each tool's timeout_seconds bounds its whole request (asyncio.timeout).
                self._client = httpx.AsyncClient(follow_redirects=False, timeout=None)
            return await http_tool.run(self._client, arguments, context, time_limit)
        if name in self.registry:
            return await self.registry.run(name, arguments, context, time_limit)
        server = self.mcp_servers.get(name.partition(SEPARATOR)[0])
        if server is not None:
            tool = server.tools.get(name)
            if tool is None:  # offered when the call started, gone since (the server went away or changed its list)
                return False, error_output(f"the MCP server {server.name!r} does not offer {name!r} now")
            parsed = parse_arguments(arguments, None)  # the server checks them against its schema
            if isinstance(parsed, str):
                return False, error_output(parsed)
            return await server.call(tool, parsed, time_limit)
        return False, error_output(f"unknown tool {name!r}")

    async def start(self, wait: float = 5.0) -> None:
        """Connect to the MCP servers, in the background for the application's lifetime; wait up to ``wait``
        seconds for the first attempts, so that the first calls have the tools of the servers that answer."""
        for server in self.mcp_servers.values():
            server.start()
        if self.mcp_servers:
            attempts = [asyncio.create_task(server.first_attempt()) for server in self.mcp_servers.values()]
            _, pending = await asyncio.wait(attempts, timeout=wait)
            for task in pending:
                task.cancel()

    async def aclose(self) -> None:
        for server in self.mcp_servers.values():
            await server.aclose()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _check_clashes(sources: Mapping[str, Iterable[str]]) -> None:
    """``ValueError`` naming a tool two sources (or a source and the built-ins) both offer."""
    owners: dict[str, str] = {name: "the built-in call-control tools" for name in BUILTIN_TOOLS}
    for source, names in sources.items():
        for name in names:
            if name in owners:
                raise ValueError(f"tool {name!r} is offered by both {owners[name]} and {source}: rename one")
            owners[name] = source
