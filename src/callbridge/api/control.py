"""Live call control from the host application: the agent says something, learns something, or transfers the call.

Each route answers 202 once the call has taken the command (carried out now, or queued after the agent's current
response); 409 when the call is not live, with a ``code``: ``not_live`` (ended, not started, not ready yet, or
ending) or ``not_live_here`` (carried by another worker, which this one cannot reach without Redis).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, Self

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from callbridge.api.docs import ErrorBody, answers
from callbridge.api.rest import CallSid, authorized
from callbridge.service.control import TEXT_CHARS, Accepted, CallControl

_E164 = r"^\+[1-9]\d{6,14}$"


class _Command(BaseModel):
    """A command's body: nothing but its fields, text that is not blank and can travel as UTF-8 JSON."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _sendable(self) -> Self:
        try:  # a lone surrogate parses as JSON but cannot be sent on to the model
            orjson.dumps(self.model_dump())
        except orjson.JSONEncodeError as exc:
            raise ValueError(f"not encodable as UTF-8 JSON: {exc}") from None
        for name, value in self.model_dump().items():
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"{name} is blank")
        return self


class SayIn(_Command):
    """What the agent says, word for word."""

    text: str = Field(min_length=1, max_length=TEXT_CHARS, description="What the agent says, word for word")
    interrupt: bool = Field(
        default=False,
        description="Say it now, cutting off what the agent is saying (as when the caller speaks); otherwise after "
        "the agent's current response",
    )


class InstructIn(_Command):
    """New facts or instructions for the agent, as a system message in the live conversation."""

    text: str = Field(
        min_length=1,
        max_length=TEXT_CHARS,
        description="The system message, e.g. 'The order was just refunded.' (kept if the model's session is renewed)",
    )
    respond: bool = Field(
        default=False, description="Have the agent speak about it (after its current response, if one is under way)"
    )


class TransferIn(_Command):
    """Where the call goes: the agent stops, says its last sentence if given, and Twilio dials the number."""

    to: str = Field(pattern=_E164, description="E.164 number to transfer the call to")
    say: str | None = Field(
        default=None,
        min_length=1,
        max_length=TEXT_CHARS,
        description="The agent's last sentence, word for word, before the transfer (none when absent)",
    )


class ControlOut(BaseModel):
    """The call took the command: carried out now, or queued after the agent's current response."""

    call_sid: str = Field(description="Twilio's SID of the call")
    command: Literal["say", "instruct", "transfer"] = Field(description="The command the call took")
    carried_by: str = Field(
        description="The process that carries the call and took the command: host:pid:start time (the record's owner)"
    )


class NotLiveBody(ErrorBody):
    """The call is not live (the body of a 409 answer)."""

    code: Literal["not_live", "not_live_here"] = Field(
        description="not_live: the call has ended, has not started, is not ready yet or is ending; not_live_here: "
        "another worker carries it and this one cannot reach it (no CALLBRIDGE_REDIS_URL): send the request again"
    )


def get_control(request: Request) -> CallControl:
    control: CallControl = request.app.state.control
    return control


Control = Annotated[CallControl, Depends(get_control)]
_NOT_LIVE: dict[int | str, dict[str, Any]] = {
    409: {"model": NotLiveBody, "description": "The call is not live (why, in detail; which way, in code)"}
}


@contextlib.asynccontextmanager
async def _control(app: FastAPI) -> AsyncIterator[None]:
    """The call control of this process, for the app's life: after the services, which it uses, are up."""
    settings = app.state.settings
    control = CallControl(app.state.services, app.state.registry, settings.redis_url, settings.redis_prefix)
    await control.start()
    app.state.control = control
    try:
        yield
    finally:
        await control.aclose()


def _out(accepted: Accepted, response: Response) -> ControlOut:
    response.headers["X-Callbridge-Worker"] = str(os.getpid())  # which worker took the request (the call's may differ)
    return ControlOut(call_sid=accepted.call_sid, command=accepted.command, carried_by=accepted.carried_by)


def control_router() -> APIRouter:
    api = APIRouter(
        prefix="/api",
        tags=["call control"],
        dependencies=[Depends(authorized)],
        responses={**answers(401, 404, 413, 422), **_NOT_LIVE},
        lifespan=_control,
    )

    @api.post("/calls/{call_sid}/say", status_code=202, response_model=ControlOut)
    async def say(call_sid: CallSid, body: SayIn, control: Control, response: Response) -> ControlOut:
        """Have the agent say something, word for word: now, or after its current response."""
        return _out(await control.say(call_sid, body.text, body.interrupt), response)

    @api.post("/calls/{call_sid}/instruct", status_code=202, response_model=ControlOut)
    async def instruct(call_sid: CallSid, body: InstructIn, control: Control, response: Response) -> ControlOut:
        """Give the agent new facts or instructions (a system message), and have it speak about them if asked."""
        return _out(await control.instruct(call_sid, body.text, body.respond), response)

    @api.post("/calls/{call_sid}/transfer", status_code=202, response_model=ControlOut, responses=answers(503))
    async def transfer(call_sid: CallSid, body: TransferIn, control: Control, response: Response) -> ControlOut:
        """Transfer the call to a number: the agent stops, says the last sentence if given, then Twilio dials."""
        return _out(await control.transfer(call_sid, body.to, body.say), response)

    return api
