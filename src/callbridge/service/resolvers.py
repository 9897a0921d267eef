"""Context resolvers: how the host application feeds per-call context without hosting any WebSocket.

The signed stream parameters carry a small reference (``CallContext.reference``: a customer id, a booking id)
plus the call's numbers. At call start, while the model connection opens, a resolver turns that into the
person's name, instructions, a greeting and earlier conversation items:

- :class:`HttpContextResolver` (``CALLBRIDGE_CONTEXT_URL``): callbridge POSTs JSON to the host app (Rails,
  Django, anything), signed per Standard Webhooks (:mod:`callbridge.service.webhooks`), and reads the JSON answer;
- :class:`PythonContextResolver` (``CALLBRIDGE_CONTEXT_FUNCTION=package.module:function``): an async function;
- a static context from the agents file needs no resolver at all.
A resolver that fails or misses the deadline leaves the agent's defaults: the caller never waits in silence.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import httpx
import orjson
from pydantic import BaseModel, ConfigDict

from callbridge.core.context import CallContext, ContextItem
from callbridge.service.plugins import load_object
from callbridge.service.webhooks import WebhookSigner


class ResolvedItem(BaseModel):
    role: Literal["system", "user", "assistant"]
    text: str


class ResolvedContext(BaseModel):
    """What a resolver answers (every field optional)."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    instructions: str | None = None
    greeting: str | None = None
    items: list[ResolvedItem] = []
    metadata: dict[str, Any] = {}

    def to_context(self) -> CallContext:
        return CallContext(
            name=self.name,
            instructions=self.instructions,
            greeting=self.greeting,
            items=tuple(ContextItem(item.role, item.text) for item in self.items),
            metadata=self.metadata,
        )


def request_body(context: CallContext) -> dict[str, Any]:
    return {
        "call_sid": context.call_sid,
        "reference": context.reference,
        "agent": context.agent,
        "from": context.caller,
        "to": context.called,
    }


class HttpContextResolver:
    """POSTs the call's reference and numbers to ``url``, signed with ``secret`` (``CALLBRIDGE_WEBHOOK_SECRET``,
    ``whsec_…``; an empty or malformed key is refused here, so no request is ever signed without one)."""

    def __init__(self, url: str, secret: str, client: httpx.AsyncClient | None = None) -> None:
        self._url = url
        self._signer = WebhookSigner(secret)
        self._client = client or httpx.AsyncClient()

    async def __call__(self, context: CallContext) -> CallContext | None:
        body = orjson.dumps(request_body(context))
        response = await self._client.post(self._url, content=body, headers=self._signer.headers(body))
        response.raise_for_status()
        return ResolvedContext.model_validate_json(response.content).to_context()

    async def aclose(self) -> None:
        await self._client.aclose()


class PythonContextResolver:
    """Calls ``async def resolve(context: CallContext) -> dict | CallContext | None``."""

    def __init__(self, dotted: str) -> None:
        function = load_object(dotted, "CALLBRIDGE_CONTEXT_FUNCTION")
        if not inspect.iscoroutinefunction(function):
            raise ValueError(f"CALLBRIDGE_CONTEXT_FUNCTION must name an async function as 'module:function': {dotted}")
        self._function: Callable[[CallContext], Awaitable[Any]] = function

    async def __call__(self, context: CallContext) -> CallContext | None:
        result = await self._function(context)
        if result is None or isinstance(result, CallContext):
            return result
        return ResolvedContext.model_validate(result).to_context()
