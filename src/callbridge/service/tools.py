"""Function tools the model can call, declared with a decorator.

```python
from callbridge.service.tools import ToolRegistry

tools = ToolRegistry()

@tools.tool
async def check_availability(day: str, time: str) -> dict[str, object]:
    \"\"\"Check whether an appointment slot is free.

    Args:
        day: the day the caller asked for, e.g. "Tuesday"
        time: the time, e.g. "3 pm"
    \"\"\"
    return {"available": True}
```

The JSON schema comes from the type hints (through pydantic) and the descriptions from the docstring. A tool may
also take a parameter annotated :class:`ToolContext` to learn which call it serves. Arguments are validated
before the tool runs; a tool that raises, times out or gets bad arguments yields an error output to the model,
and the call goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, get_type_hints

import orjson
from pydantic import BaseModel, Field, ValidationError, create_model

from callbridge.core.context import CallContext
from callbridge.service.plugins import load_object

ToolFunction = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool may know about the call it serves."""

    call_sid: str
    context: CallContext
    agent: str | None = None
    """The agent that answers the call (its context's ``agent`` may be unset: the default agent)."""


class ToolRunner(Protocol):
    """What a call needs of its tools: run one by name. :class:`ToolRegistry` is one; the service's
    :class:`~callbridge.service.toolbox.Toolbox` (Python, HTTP and MCP tools together) is another."""

    async def run(self, name: str, arguments: str, context: ToolContext, time_limit: float) -> tuple[bool, str]:
        """Run a tool; return ``(ok, output)``, the output a JSON string for the model (``{"error": ...}``
        when not ok). Never raises: a tool's failure is the model's to hear, not the call's."""
        ...


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    function: ToolFunction
    arguments_model: type[BaseModel]
    context_parameter: str | None

    @property
    def schema(self) -> dict[str, Any]:
        """The Realtime API's function tool definition."""
        parameters = self.arguments_model.model_json_schema()
        parameters.pop("title", None)
        for prop in parameters.get("properties", {}).values():
            prop.pop("title", None)
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": parameters,
        }


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def tool(self, function: ToolFunction) -> ToolFunction:
        """Register ``function`` as a tool named after it."""
        description, argument_docs = _parse_docstring(inspect.getdoc(function) or "")
        hints = get_type_hints(function)
        fields: dict[str, Any] = {}
        context_parameter = None
        for name, parameter in inspect.signature(function).parameters.items():
            annotation = hints.get(name, Any)
            if annotation is ToolContext:
                context_parameter = name
                continue
            default = ... if parameter.default is inspect.Parameter.empty else parameter.default
            fields[name] = (annotation, Field(default, description=argument_docs.get(name)))
        model = create_model(f"{function.__name__}_arguments", **fields)
        self._tools[function.__name__] = Tool(function.__name__, description, function, model, context_parameter)
        return function

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    @property
    def schemas(self) -> tuple[dict[str, Any], ...]:
        return tuple(tool.schema for tool in self._tools.values())

    async def run(self, name: str, arguments: str, context: ToolContext, time_limit: float) -> tuple[bool, str]:
        """Run a tool; return ``(ok, output)`` where output is the JSON string sent back to the model."""
        tool = self._tools.get(name)
        if tool is None:
            return False, error_output(f"unknown tool {name!r}")
        try:
            parsed = tool.arguments_model.model_validate_json(arguments or "{}")
        except ValidationError as exc:
            return False, error_output(f"invalid arguments: {exc.errors(include_url=False)}")
        kwargs = dict(parsed)
        if tool.context_parameter:
            kwargs[tool.context_parameter] = context
        try:
            async with asyncio.timeout(time_limit):
                if inspect.iscoroutinefunction(tool.function):
                    result = await tool.function(**kwargs)
                else:
                    result = await asyncio.to_thread(tool.function, **kwargs)
        except TimeoutError:
            return False, error_output(f"the tool did not answer within {time_limit:g} s")
        except Exception as exc:  # a tool's failure is reported to the model, never fatal to the call
            return False, error_output(f"{type(exc).__name__}: {exc}")
        return True, result if isinstance(result, str) else orjson.dumps(result, default=str).decode()


def error_output(message: str) -> str:
    """The output the model gets for a tool that failed: ``{"error": message}``."""
    return orjson.dumps({"error": message}).decode()


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The summary paragraphs, and ``name: description`` lines of a Google-style ``Args:`` section."""
    parts = re.split(r"^\s*(?:Args|Arguments|Parameters):\s*$", doc, maxsplit=1, flags=re.MULTILINE)
    description = " ".join(parts[0].split())
    arguments: dict[str, str] = {}
    if len(parts) == 2:
        for match in re.finditer(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", parts[1], flags=re.MULTILINE):
            arguments[match.group(1)] = match.group(2).strip()
    return description, arguments


def load_registry(dotted: str) -> ToolRegistry:
    """Load a registry from ``package.module:attribute`` (the ``CALLBRIDGE_TOOLS`` setting)."""
    registry = load_object(dotted, "CALLBRIDGE_TOOLS")
    if not isinstance(registry, ToolRegistry):
        raise TypeError(f"{dotted} is a {type(registry).__name__}, not a ToolRegistry")
    return registry
