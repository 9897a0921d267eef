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
```

Every field is optional: what an agent leaves out comes from the ``CALLBRIDGE_AGENT_*`` / ``CALLBRIDGE_VAD_*``
settings. ``tools`` names functions of the ``CALLBRIDGE_TOOLS`` registry and the built-in ``end_call`` and
``transfer_call``; an agent without ``tools`` gets every registry function and no call-control tool.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from callbridge.config import Settings
from callbridge.core.context import BUILTIN_TOOLS, AgentConfig
from callbridge.service.tools import ToolRegistry


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


class AgentsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_agent: str = "default"
    agents: dict[str, AgentSpec] = {}
    numbers: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class AgentDirectory:
    """The agents a service knows, and which one answers which number."""

    default: AgentConfig
    agents: Mapping[str, AgentConfig]
    numbers: Mapping[str, str]

    def for_number(self, called: str | None) -> str:
        """The agent that answers calls to ``called``."""
        return self.numbers.get(called or "", self.default.name)

    def get(self, name: str | None) -> AgentConfig | None:
        return self.agents.get(name or "")


def load_agents(settings: Settings, registry: ToolRegistry, path: Path | None = None) -> AgentDirectory:
    """Agents from ``path`` (TOML), or the single agent the settings describe."""
    spec = AgentsFile()
    if path is not None:
        try:
            spec = AgentsFile.model_validate(tomllib.loads(path.read_text()))
        except ValidationError as exc:
            raise ValueError(f"{path}: {_first_error(exc)}") from None
    agents = {}
    for name, agent in spec.agents.items():
        try:
            agents[name] = _agent(settings, registry, name, agent)
        except ValidationError as exc:  # a value the settings would refuse (vad_threshold = 7)
            raise ValueError(f"{path}: agent {name!r}: {_first_error(exc)}") from None
    if spec.default_agent not in agents:
        agents[spec.default_agent] = _agent(settings, registry, spec.default_agent, AgentSpec())
    for number, name in spec.numbers.items():
        if name not in agents:
            raise ValueError(f"number {number} is mapped to an unknown agent {name!r}")
    return AgentDirectory(agents[spec.default_agent], agents, spec.numbers)


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


def _agent(settings: Settings, registry: ToolRegistry, name: str, spec: AgentSpec) -> AgentConfig:
    """The settings' agent, with what ``spec`` says instead."""
    fields = spec.model_dump(exclude={"tools", "transfer_number", "record"}, exclude_none=True)
    merged = _merged(settings, {_SETTING_OF.get(key, key): value for key, value in fields.items()})
    schemas = registry.schemas
    builtin: tuple[str, ...] = ()
    if spec.tools is not None:
        unknown = [tool for tool in spec.tools if tool not in registry and tool not in BUILTIN_TOOLS]
        if unknown:
            raise ValueError(f"agent {name!r} names unknown tools: {', '.join(unknown)}")
        schemas = tuple(schema for schema in schemas if schema["name"] in spec.tools)
        builtin = tuple(tool for tool in spec.tools if tool in BUILTIN_TOOLS)
    return dataclasses.replace(
        merged.agent(schemas),
        name=name,
        builtin_tools=builtin,
        transfer_number=spec.transfer_number,
        record=settings.record_calls if spec.record is None else spec.record,
    )
