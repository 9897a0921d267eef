"""Agents in a file: several agents, and phone numbers mapped to them.

```toml
default_agent = "reception"

[agents.reception]
instructions = "You answer calls for Bright Dental. Be brief."
voice = "marin"
greeting = "Bright Dental, how can I help?"
tools = ["check_availability", "end_call", "transfer_call"]
transfer_number = "+15550109999"

[agents.reminders]
record = false
instructions = "You call patients to confirm tomorrow's appointment."
speaks_first = true
turn_detection = "semantic_vad"
vad_eagerness = "low"

[numbers]
"+15550100002" = "reception"

[tools.lookup_order]           # an HTTP tool: the host application's endpoint answers it
description = "Look up an order by its number."
url = "https://app.example.com/callbridge/tools/lookup_order"
parameters = { type = "object", properties = { order_id = { type = "integer" } }, required = ["order_id"] }

[mcp_servers.crm]              # an MCP server: its tools are crm__<tool>
url = "https://crm.internal.example/mcp"
headers = { Authorization = "Bearer ${CRM_TOKEN}" }
```

Every field is optional: what an agent leaves out comes from the ``CALLBRIDGE_AGENT_*`` / ``CALLBRIDGE_VAD_*``
settings.

The file also declares the tools that are not Python functions: HTTP tools (``[tools.NAME]``, answered by the host
application's endpoint, see :mod:`callbridge.service.http_tools`) and MCP servers (``[mcp_servers.NAME]``, see
:mod:`callbridge.service.mcp_tools`). An agent's ``tools`` names any of them alike: a function of the
``CALLBRIDGE_TOOLS`` registry, an HTTP tool, one tool of an MCP server as ``"NAME__tool"`` or all of its tools as
``"NAME"``, and the built-in ``end_call`` and ``transfer_call``. An agent without ``tools`` gets every registry
function, every HTTP tool and every MCP server's tools (they are declared in the same file, for the agents it
describes), and no call-control tool.

Which tools an agent has is settled when each call starts: an MCP server that comes up (or changes its list) later
gives its tools to the calls that start after it did.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from callbridge.config import Settings
from callbridge.core.context import BUILTIN_TOOLS, AgentConfig
from callbridge.service.contacts import placeholders
from callbridge.service.http_tools import HttpTool, HttpToolSpec
from callbridge.service.mcp_tools import SERVER_NAME, McpServerSpec, expand_headers
from callbridge.service.toolbox import TOOL_NAME, Toolbox
from callbridge.service.tools import ToolRegistry
from callbridge.service.webhooks import WebhookSigner


class AgentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instructions: str | None = None
    voice: str | None = None
    greeting: str | None = None
    speaks_first: bool | None = None
    tools: list[str] | None = None
    transfer_number: str | None = None
    turn_detection: Literal["server_vad", "semantic_vad"] | None = None
    vad_threshold: float | None = None
    vad_silence_duration_ms: int | None = None
    vad_prefix_padding_ms: int | None = None
    vad_eagerness: Literal["low", "medium", "high", "auto"] | None = None
    transcription_model: str | None = None
    transcription_language: str | None = None
    transcription_prompt: str | None = None
    noise_reduction: Literal["near_field", "far_field", "off"] | None = None
    idle_timeout_ms: int | None = Field(default=None, ge=5000, le=30000)
    idle_hangup_after: int | None = Field(default=None, ge=0)
    voice_speed: float | None = Field(default=None, ge=0.25, le=1.5)
    max_output_tokens: int | None = Field(default=None, ge=1, le=4096)
    tool_choice: Literal["auto", "none", "required"] | None = None
    tool_filler_after_ms: int | None = Field(default=None, ge=0)
    record: bool | None = None
    """Record this agent's calls (default: ``CALLBRIDGE_RECORD_CALLS``)."""
    machine_detection: bool = False
    """Outbound calls of this agent run Twilio's answering-machine detection (``POST /api/calls`` may say too)."""
    voicemail_message: str | None = None
    """Left word for word on an answering machine; ``{name}``-style placeholders come from the call's context and
    metadata (a missing one refuses the call at request time). Without it, a machine is hung up on."""

    @field_validator("voicemail_message")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            placeholders(value)  # plain names only
        return value


class AgentsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_agent: str = "default"
    agents: dict[str, AgentSpec] = {}
    numbers: dict[str, str] = {}
    tools: dict[str, HttpToolSpec] = {}
    mcp_servers: dict[str, McpServerSpec] = {}


class AgentDirectory:
    """The agents a service knows, and which one answers which number.

    An agent is looked up with the tools it has now (an MCP server's tools come and go): :attr:`agents` is a
    mapping that builds each agent's configuration from the toolbox as it is, again only when the toolbox changed.
    """

    def __init__(
        self,
        agents: Mapping[str, AgentConfig],
        tools: Mapping[str, tuple[str, ...] | None],
        default: str,
        numbers: Mapping[str, str],
        toolbox: Toolbox,
    ) -> None:
        self._base = dict(agents)
        self._tools = dict(tools)
        self.default_name = default
        self.numbers = dict(numbers)
        self.toolbox = toolbox
        self._built: dict[str, tuple[int, AgentConfig]] = {}
        self.agents: Mapping[str, AgentConfig] = _CurrentAgents(self)

    @property
    def default(self) -> AgentConfig:
        return self.current(self.default_name)

    def for_number(self, called: str | None) -> str:
        """The agent that answers calls to ``called``."""
        return self.numbers.get(called or "", self.default_name)

    def get(self, name: str | None) -> AgentConfig | None:
        return self.agents.get(name or "")

    def current(self, name: str) -> AgentConfig:
        """The agent ``name`` with the tools it has now (``KeyError`` for an unknown agent)."""
        version = self.toolbox.version
        built = self._built.get(name)
        if built is not None and built[0] == version:
            return built[1]
        agent = dataclasses.replace(self._base[name], tools=self.toolbox.schemas(self._tools[name]))
        self._built[name] = (version, agent)
        return agent


class _CurrentAgents(Mapping[str, AgentConfig]):
    """The agents by name, each with its current tools (what a call's session looks its agent up in)."""

    def __init__(self, directory: AgentDirectory) -> None:
        self._directory = directory

    def __getitem__(self, name: str) -> AgentConfig:
        return self._directory.current(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._directory._base)

    def __len__(self) -> int:
        return len(self._directory._base)


def load_agents(settings: Settings, registry: ToolRegistry, path: Path | None = None) -> AgentDirectory:
    """Agents from ``path`` (TOML), or the single agent the settings describe.

    Checks everything the file declares (the tools' schemas, that no two tools share a name, that HTTP tools can
    be signed) without reaching any of them: MCP servers are connected to by the toolbox's :meth:`Toolbox.start`.
    """
    spec = AgentsFile()
    if path is not None:
        try:
            spec = AgentsFile.model_validate(tomllib.loads(path.read_text()))
        except ValidationError as exc:
            raise ValueError(f"{path}: {_first_error(exc)}") from None
    try:
        toolbox = Toolbox(registry, _http_tools(settings, spec.tools), _mcp_servers(settings, spec.mcp_servers))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}" if path else str(exc)) from None
    agents = {}
    selections: dict[str, tuple[str, ...] | None] = {}
    for name, agent in spec.agents.items():
        try:
            agents[name] = _agent(settings, toolbox, name, agent)
        except ValidationError as exc:  # a value the settings would refuse (vad_threshold = 7)
            raise ValueError(f"{path}: agent {name!r}: {_first_error(exc)}") from None
        selections[name] = None if agent.tools is None else tuple(agent.tools)
    if spec.default_agent not in agents:
        agents[spec.default_agent] = _agent(settings, toolbox, spec.default_agent, AgentSpec())
        selections[spec.default_agent] = None
    for number, name in spec.numbers.items():
        if name not in agents:
            raise ValueError(f"number {number} is mapped to an unknown agent {name!r}")
    return AgentDirectory(agents, selections, spec.default_agent, spec.numbers, toolbox)


def _mcp_servers(
    settings: Settings, specs: Mapping[str, McpServerSpec]
) -> dict[str, tuple[McpServerSpec, dict[str, str]]]:
    """The file's MCP servers, with their headers' ``${VAR}`` filled in from the environment."""
    servers = {}
    for name, spec in specs.items():
        if not SERVER_NAME.match(name):
            raise ValueError(f"mcp_servers.{name}: a server's name is letters, digits, - and single _ (no __)")
        if spec.native and settings.realtime_dialect == "beta":
            raise ValueError(
                f"mcp_servers.{name}: native MCP servers need the GA Realtime API (CALLBRIDGE_REALTIME_DIALECT)"
            )
        try:
            servers[name] = (spec, expand_headers(spec.headers))
        except ValueError as exc:
            raise ValueError(f"mcp_servers.{name}: {exc}") from None
    return servers


def _http_tools(settings: Settings, specs: Mapping[str, HttpToolSpec]) -> dict[str, HttpTool]:
    """The file's HTTP tools, each schema checked; their requests are signed, so they need the webhook secret."""
    if not specs:
        return {}
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    if not secret:
        raise ValueError(
            f"HTTP tools ({', '.join(specs)}) need CALLBRIDGE_WEBHOOK_SECRET: their requests are signed with it "
            "(`callbridge secret` prints a new one)"
        )
    try:
        signer = WebhookSigner(secret)
    except ValueError as exc:
        raise ValueError(f"CALLBRIDGE_WEBHOOK_SECRET {exc} (the HTTP tools' requests are signed with it)") from None
    tools = {}
    for name, spec in specs.items():
        if not TOOL_NAME.match(name):
            raise ValueError(f"tool {name!r}: a tool's name is 1 to 64 letters, digits, _ or -")
        try:
            tools[name] = HttpTool(name, spec, signer, settings.max_request_bytes)
        except ValueError as exc:
            raise ValueError(f"tool {name!r}: {exc}") from None
    return tools


_SETTING_OF = {
    "instructions": "agent_instructions",
    "voice": "agent_voice",
    "greeting": "agent_greeting",
    "speaks_first": "agent_speaks_first",
}


def _merged(settings: Settings, updates: dict[str, Any]) -> Settings:
    """The settings with an agent's values instead, validated as the settings are (ranges, choices, consistency).

    Validated by field name, and without reading the environment again.
    """
    return Settings.model_validate({**settings.model_dump(), **updates}, by_name=True, by_alias=False)


def _first_error(exc: ValidationError) -> str:
    """The first problem, named as the agents file names it (``agents.reception.vad_threshold``, or the setting)."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    where = next((key for key, name in _SETTING_OF.items() if name == where), where)
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _agent(settings: Settings, toolbox: Toolbox, name: str, spec: AgentSpec) -> AgentConfig:
    """The settings' agent, with what ``spec`` says instead; its tools are the directory's to fill in."""
    own = {"tools", "transfer_number", "record", "machine_detection", "voicemail_message"}
    fields = spec.model_dump(exclude=own, exclude_none=True)
    merged = _merged(settings, {_SETTING_OF.get(key, key): value for key, value in fields.items()})
    builtin: tuple[str, ...] = ()
    if spec.tools is not None:
        toolbox.check_selection(name, spec.tools)
        builtin = tuple(tool for tool in spec.tools if tool in BUILTIN_TOOLS)
    return dataclasses.replace(
        merged.agent(),
        name=name,
        builtin_tools=builtin,
        transfer_number=spec.transfer_number,
        record=settings.record_calls if spec.record is None else spec.record,
        machine_detection=spec.machine_detection,
        voicemail_message=spec.voicemail_message,
    )
