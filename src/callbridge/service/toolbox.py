"""Every tool a call may use, whatever answers it: Python functions (the ``CALLBRIDGE_TOOLS`` registry), the host
application's HTTP endpoints (:mod:`callbridge.service.http_tools`) and the tools of MCP servers
(:mod:`callbridge.service.mcp_tools`), under one namespace.

A name belongs to one source only: two sources offering the same name (or one of the built-in call-control tools,
``end_call`` and ``transfer_call``) is an error when the agents file loads. An MCP server's tools are known only
once it answers; one whose name would clash is logged and left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
import structlog

from callbridge.core.context import BUILTIN_TOOLS
from callbridge.service.http_tools import HttpTool
from callbridge.service.tools import ToolContext, ToolRegistry, error_output

log = structlog.stdlib.get_logger("callbridge.tools")

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What the Realtime API takes as a function's name."""


class Toolbox:
    """The tools of a service: their schemas for an agent's ``session.update``, and running one by name."""

    def __init__(self, registry: ToolRegistry, http_tools: Mapping[str, HttpTool] | None = None) -> None:
        self.registry = registry
        self.http_tools = dict(http_tools or {})
        self._client: httpx.AsyncClient | None = None
        self.version = 0
        """Grows whenever the set of tools changes (an MCP server's list): what was built from it is stale."""
        _check_clashes({"the Python tools": list(registry.names), "the HTTP tools": list(self.http_tools)})

    def check_selection(self, agent: str, names: Sequence[str]) -> None:
        """Raise ``ValueError`` unless each of ``names`` (an agent's ``tools``) is a tool this service knows."""
        unknown = [name for name in names if not self._known(name)]
        if unknown:
            raise ValueError(f"agent {agent!r} names unknown tools: {', '.join(unknown)}")

    def _known(self, name: str) -> bool:
        return name in BUILTIN_TOOLS or name in self.registry or name in self.http_tools

    def schemas(self, names: Sequence[str] | None) -> tuple[dict[str, Any], ...]:
        """The function tools an agent offers the model now: those ``names`` selects, in its order (the built-in
        call-control tools are the session's), or every tool when ``names`` is ``None``."""
        if names is None:
            return (*self.registry.schemas, *(tool.schema for tool in self.http_tools.values()))
        by_name = {schema["name"]: schema for schema in self.registry.schemas}
        chosen: list[dict[str, Any]] = []
        for name in names:
            if name in by_name:
                chosen.append(by_name[name])
            elif name in self.http_tools:
                chosen.append(self.http_tools[name].schema)
        return tuple(chosen)

    async def run(self, name: str, arguments: str, context: ToolContext, time_limit: float) -> tuple[bool, str]:
        """Run the tool ``name``; ``(ok, output)`` as :meth:`ToolRegistry.run` returns it."""
        if (http_tool := self.http_tools.get(name)) is not None:
            if self._client is None:
                self._client = httpx.AsyncClient(follow_redirects=False)
            return await http_tool.run(self._client, arguments, context, time_limit)
        if name in self.registry:
            return await self.registry.run(name, arguments, context, time_limit)
        return False, error_output(f"unknown tool {name!r}")

    async def start(self) -> None:
        """Open what lives as long as the application."""

    async def aclose(self) -> None:
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
