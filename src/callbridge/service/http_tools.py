"""HTTP tools: a function the model calls, answered by the host application's own endpoint, in any language.

Declared in the agents file, next to the agents::

    [tools.lookup_order]
    description = "Look up an order by its number."
    url = "https://app.example.com/callbridge/tools/lookup_order"
    timeout_seconds = 5
    parameters = { type = "object", properties = { order_id = { type = "integer" } }, required = ["order_id"] }

``parameters`` is a JSON Schema (an object schema, as the Realtime API requires), checked when the file loads. The
model's arguments are validated against it before anything is sent: arguments that break it are an error output
to the model, and the host application never sees them. Otherwise callbridge POSTs::

    {"call_sid": "CA…", "tool": "lookup_order", "arguments": {"order_id": 42},
     "context": {"reference": "…", "agent": "reception", "from": "+1555…", "to": "+1555…"}}

signed with the Standard Webhooks headers (``CALLBRIDGE_WEBHOOK_SECRET``; see :mod:`callbridge.service.webhooks`),
and the JSON answer, whatever its shape, is the tool's output. An answer that is not a 2xx, not JSON, larger than
``CALLBRIDGE_MAX_REQUEST_BYTES`` (read no further than that) or later than ``timeout_seconds`` (by default
``CALLBRIDGE_TOOL_TIMEOUT_SECONDS``) is an error output: the model hears the tool failed, the call goes on, and
the call's ``tool_call`` event says why.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
from jsonschema import Draft202012Validator, SchemaError
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field

from callbridge.service.tools import ToolContext, error_output
from callbridge.service.webhooks import WebhookSigner


class HttpToolSpec(BaseModel):
    """One ``[tools.NAME]`` table of the agents file."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    url: str = Field(pattern=r"^https?://")
    timeout_seconds: float | None = Field(default=None, gt=0)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


def object_schema_validator(schema: dict[str, Any]) -> Validator:
    """A validator for a tool's parameters, or ``ValueError`` saying why ``schema`` cannot be one.

    The dialect is the one ``$schema`` names (2020-12 when it names none); the Realtime API takes only an object
    schema for a function's parameters.
    """
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path)
        raise ValueError(
            f"parameters is not a JSON Schema: {exc.message}" + (f" (at {where})" if where else "")
        ) from None
    if schema.get("type") != "object":
        raise ValueError(f'parameters must be an object schema (type = "object"), not type = {schema.get("type")!r}')
    validator: Validator = cls(schema)
    return validator


def parse_arguments(arguments: str, validator: Validator | None) -> dict[str, Any] | str:
    """The model's arguments as an object, or why they are refused (not JSON, not an object, against the schema)."""
    try:
        parsed = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError as exc:
        return f"invalid arguments: not JSON ({exc})"
    if not isinstance(parsed, dict):
        return "invalid arguments: not a JSON object"
    if validator is not None and (error := best_match(validator.iter_errors(parsed))) is not None:
        where = "/".join(str(part) for part in error.absolute_path)
        return f"invalid arguments: {error.message}" + (f" (at {where})" if where else "")
    return parsed


class HttpTool:
    """One HTTP tool: its schema for the model, and the signed request that runs it."""

    def __init__(self, name: str, spec: HttpToolSpec, signer: WebhookSigner, max_bytes: int) -> None:
        self.name = name
        self.spec = spec
        self._validator = object_schema_validator(spec.parameters)
        self._signer = signer
        self._max_bytes = max_bytes

    @property
    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.spec.description,
            "parameters": self.spec.parameters,
        }

    async def run(
        self, client: httpx.AsyncClient, arguments: str, context: ToolContext, time_limit: float
    ) -> tuple[bool, str]:
        parsed = parse_arguments(arguments, self._validator)
        if isinstance(parsed, str):
            return False, error_output(parsed)
        call = context.context
        body = orjson.dumps(
            {
                "call_sid": context.call_sid,
                "tool": self.name,
                "arguments": parsed,
                "context": {
                    "reference": call.reference,
                    "agent": context.agent or call.agent,
                    "from": call.caller,
                    "to": call.called,
                },
            }
        )
        limit = self.spec.timeout_seconds or time_limit
        try:
            async with asyncio.timeout(limit):
                return await self._post(client, body)
        except TimeoutError:
            return False, error_output(f"the tool's endpoint did not answer within {limit:g} s")
        except httpx.HTTPError as exc:
            return False, error_output(f"the tool's endpoint could not be reached: {type(exc).__name__}: {exc}")

    async def _post(self, client: httpx.AsyncClient, body: bytes) -> tuple[bool, str]:
        headers = self._signer.headers(body)
        async with client.stream("POST", self.spec.url, content=body, headers=headers) as response:
            if not response.is_success:
                return False, error_output(f"the tool's endpoint answered HTTP {response.status_code}")
            received = bytearray()
            async for chunk in response.aiter_bytes():
                received += chunk
                if len(received) > self._max_bytes:
                    return False, error_output(f"the tool's answer is larger than {self._max_bytes} bytes")
        try:
            answer = orjson.loads(received)
        except orjson.JSONDecodeError:
            return False, error_output("the tool's endpoint did not answer JSON")
        return True, orjson.dumps(answer).decode()
