"""The built-in ``do_not_call`` tool: the person's number goes on the list (an event the service acts on), the
model hears it is done, and the call goes on."""

from __future__ import annotations

import json

from callbridge.core import events as ev
from callbridge.core.commands import EndCall, RecordEvent
from callbridge.core.context import BUILTIN_TOOLS, AgentConfig, CallContext

from conftest import CALL_SID, Harness, of_type

AGENT = AgentConfig(builtin_tools=("do_not_call",))


def test_the_person_goes_on_the_list_and_the_call_goes_on() -> None:
    harness = Harness(AGENT)
    context = CallContext(call_sid=CALL_SID, direction="outbound", caller="+12025550100", called="+12025550123")
    (update,) = of_type(harness.go_live(context), "session.update")
    assert BUILTIN_TOOLS["do_not_call"] in update["session"]["tools"]
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    call = ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "do_not_call", '{"reason": "asked"}', "completed")
    commands = harness.handle(call)
    events = {c.kind: c.data for c in commands if isinstance(c, RecordEvent)}
    assert events["do_not_call"] == {"number": "+12025550123", "reason": "asked"}  # the person, not our number
    (output,) = of_type(commands, "conversation.item.create")
    assert json.loads(output["item"]["output"])["ok"] is True
    commands = harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    assert len(of_type(commands, "response.create")) == 1  # the agent confirms
    assert not [c for c in commands if isinstance(c, EndCall)]


def test_without_a_number_nothing_is_listed_and_the_model_is_told() -> None:
    harness = Harness(AGENT)
    harness.go_live(CallContext(call_sid=CALL_SID))
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    call = ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "do_not_call", "not json", "completed")
    commands = harness.handle(call)
    assert not [c for c in commands if isinstance(c, RecordEvent) and c.kind == "do_not_call"]
    (output,) = of_type(commands, "conversation.item.create")
    assert json.loads(output["item"]["output"])["ok"] is False
