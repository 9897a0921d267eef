"""The host application's control of a live call: in the session (what it says, the facts it adds, its transfer), and
the REST API's routing in one process."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from callbridge.api.app import create_app
from callbridge.config import Settings
from callbridge.core import events as ev
from callbridge.core.commands import Command, ControlRefused, EndCall, RecordEvent, TransferCall
from callbridge.core.context import AgentConfig
from callbridge.store.repository import Store
from support import free_port

from conftest import Harness, audio, of_type, twilio_messages


def refusals(commands: Sequence[object]) -> list[ControlRefused]:
    return [c for c in commands if isinstance(c, ControlRefused)]


def recorded(commands: Sequence[object], kind: str) -> list[dict[str, object]]:
    return [c.data for c in commands if isinstance(c, RecordEvent) and c.kind == kind]


def said(commands: list[Command]) -> list[str]:
    """The instructions of each response.create."""
    return [event.get("response", {}).get("instructions", "") for event in of_type(commands, "response.create")]


def live(agent: AgentConfig | None = None) -> Harness:
    """A live call whose greeting has been said."""
    harness = Harness(agent)
    harness.go_live()
    harness.handle(ev.RealtimeResponseCreated("resp_greeting"))
    harness.handle(ev.RealtimeResponseDone("resp_greeting", "completed"))
    return harness


def test_say_with_interrupt_cuts_the_agent_off_as_a_barge_in_does_then_says_the_text() -> None:
    harness = live()
    harness.speak("resp_1", "item_1", chunks=3)  # 300 ms at Twilio, the response still streaming
    commands = harness.handle(ev.HostSay("Your order has shipped.", interrupt=True), at=harness.now + 0.15)
    assert [m["event"] for m in twilio_messages(commands)] == ["clear"]
    assert len(of_type(commands, "response.cancel")) == 1  # the server cancels only for the caller's speech
    (truncate,) = of_type(commands, "conversation.item.truncate")
    assert truncate["item_id"] == "item_1" and 100 <= truncate["audio_end_ms"] <= 200
    assert said(commands) == []  # not while the cancelled response is active
    assert recorded(commands, "say")[0]["text"] == "Your order has shipped."
    assert harness.session.stats.barge_ins == 0  # the caller did not speak
    # Late audio of the cancelled response never reaches the caller.
    assert twilio_messages(harness.handle(ev.RealtimeAudioDelta("resp_1", "item_1", "AAAA"))) == []
    commands = harness.handle(ev.RealtimeResponseDone("resp_1", "cancelled"))
    assert [text.endswith("saying exactly: Your order has shipped.") for text in said(commands)] == [True]


def test_say_with_interrupt_once_the_response_is_done_clears_what_still_plays_and_speaks_at_once() -> None:
    harness = live()
    harness.speak("resp_1", "item_1", chunks=3)
    harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    commands = harness.handle(ev.HostSay("One more thing.", interrupt=True), at=harness.now + 0.1)
    assert [m["event"] for m in twilio_messages(commands)] == ["clear"]
    assert of_type(commands, "response.cancel") == []  # nothing is being generated
    assert len(of_type(commands, "conversation.item.truncate")) == 1
    assert said(commands) == [
        "Say this to the caller now, word for word and nothing else, by saying exactly: One more thing."
    ]


def test_say_without_interrupt_waits_for_the_current_response() -> None:
    harness = live()
    harness.speak("resp_1", "item_1", chunks=2)
    commands = harness.handle(ev.HostSay("Your table is ready."))
    assert twilio_messages(commands) == [] and of_type(commands, "response.cancel") == []
    assert said(commands) == []
    commands = harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    assert [text.endswith("exactly: Your table is ready.") for text in said(commands)] == [True]
    # Two more while that one is asked for: one at a time, in order.
    harness.handle(ev.HostSay("First."))
    assert said(harness.handle(ev.HostSay("Second."))) == []
    harness.handle(ev.RealtimeResponseCreated("resp_2"))
    assert [
        text.endswith("First.") for text in said(harness.handle(ev.RealtimeResponseDone("resp_2", "completed")))
    ] == [True]
    harness.handle(ev.RealtimeResponseCreated("resp_3"))
    assert [
        text.endswith("Second.") for text in said(harness.handle(ev.RealtimeResponseDone("resp_3", "completed")))
    ] == [True]


def test_say_waits_for_a_response_asked_for_but_not_yet_started() -> None:
    harness = Harness()
    harness.go_live()  # the greeting is asked for
    assert said(harness.handle(ev.HostSay("Hello from the host."))) == []
    harness.handle(ev.RealtimeResponseCreated("resp_greeting"))
    commands = harness.handle(ev.RealtimeResponseDone("resp_greeting", "completed"))
    assert [text.endswith("Hello from the host.") for text in said(commands)] == [True]


def test_say_with_interrupt_cancels_a_response_asked_for_before_it_once_it_starts() -> None:
    harness = Harness()
    harness.go_live()  # the greeting is asked for, not started
    commands = harness.handle(ev.HostSay("Sorry to cut in.", interrupt=True))
    assert said(commands) == [] and twilio_messages(commands) == []
    (cancel,) = of_type(harness.handle(ev.RealtimeResponseCreated("resp_greeting")), "response.cancel")
    assert cancel["response_id"] == "resp_greeting"
    assert twilio_messages(harness.handle(ev.RealtimeAudioDelta("resp_greeting", "item_g", audio(100)))) == []
    commands = harness.handle(ev.RealtimeResponseDone("resp_greeting", "cancelled", output_item_ids=("item_g",)))
    assert [text.endswith("exactly: Sorry to cut in.") for text in said(commands)] == [True]
    harness.handle(ev.RealtimeResponseCreated("resp_say"))  # the say itself is not cancelled
    assert twilio_messages(harness.handle(ev.RealtimeAudioDelta("resp_say", "item_s", audio(100))))


def test_a_say_refused_for_an_active_response_of_the_server_waits_its_turn_again() -> None:
    harness = live()
    (create,) = of_type(harness.handle(ev.HostSay("Hold on.")), "response.create")
    harness.handle(ev.RealtimeResponseCreated("resp_server"))  # the server started one of its own meanwhile
    harness.handle(ev.RealtimeError("conversation_already_has_active_response", "busy", create["event_id"]))
    commands = harness.handle(ev.RealtimeResponseDone("resp_server", "completed"))
    assert [text.endswith("Hold on.") for text in said(commands)] == [True]


def test_instruct_adds_a_system_message_and_responds_only_when_asked() -> None:
    harness = live()
    commands = harness.handle(ev.HostInstruct("The order was just refunded."))
    (item,) = of_type(commands, "conversation.item.create")
    assert item["item"]["role"] == "system"
    assert item["item"]["content"][0]["text"] == "The order was just refunded."
    assert said(commands) == []
    assert recorded(commands, "instruct") == [{"text": "The order was just refunded.", "respond": False}]
    harness.speak("resp_1", "item_1", chunks=1)
    commands = harness.handle(ev.HostInstruct("The courier is at the door.", respond=True))
    assert len(of_type(commands, "conversation.item.create")) == 1 and said(commands) == []
    commands = harness.handle(ev.RealtimeResponseDone("resp_1", "completed"))
    assert len(of_type(commands, "response.create")) == 1 and said(commands) == [""]  # the session's instructions


def test_instructions_are_given_again_to_a_new_model_session() -> None:
    harness = live()
    harness.handle(ev.HostInstruct("The order was just refunded."))
    harness.handle(ev.RealtimeClosed(1011, "lost"))
    assert harness.session.phase == "connecting"
    assert refusals(harness.handle(ev.HostSay("Anyone there?"))) == [
        ControlRefused("not_ready", "the agent is not ready: the model's session is not confirmed yet")
    ]
    harness.handle(ev.RealtimeConnected())
    commands = harness.handle(ev.RealtimeSessionUpdated())
    system = [
        e["item"]["content"][0]["text"]
        for e in of_type(commands, "conversation.item.create")
        if e["item"]["role"] == "system"
    ]
    assert "The order was just refunded." in system


def test_a_say_the_lost_model_session_never_started_is_said_by_the_new_one() -> None:
    harness = live()
    (create,) = of_type(harness.handle(ev.HostSay("We are back.")), "response.create")
    harness.handle(ev.RealtimeClosed(1011, "lost"))  # before its response was created
    harness.handle(ev.RealtimeConnected())
    assert said(harness.handle(ev.RealtimeSessionUpdated())) == [""]  # nothing was said yet: the agent greets first
    harness.handle(ev.RealtimeResponseCreated("resp_greeting_2"))
    commands = harness.handle(ev.RealtimeResponseDone("resp_greeting_2", "completed"))
    (again,) = of_type(commands, "response.create")
    assert (
        again["response"]["instructions"].endswith("exactly: We are back.") and again["event_id"] != create["event_id"]
    )


def test_transfer_with_a_last_sentence_cuts_the_agent_off_says_it_then_redirects() -> None:
    harness = live()
    harness.speak("resp_1", "item_1", chunks=2)
    commands = harness.handle(ev.HostTransfer("+15550107777", say="Putting you through to Sam."), at=harness.now + 0.1)
    assert [m["event"] for m in twilio_messages(commands)] == ["clear"]
    assert len(of_type(commands, "response.cancel")) == 1
    assert recorded(commands, "transfer")[0]["to"] == "+15550107777"
    commands = harness.handle(ev.RealtimeResponseDone("resp_1", "cancelled"))
    assert [text.endswith("exactly: Putting you through to Sam.") for text in said(commands)] == [True]
    assert refusals(harness.handle(ev.HostSay("Wait."))) == [
        ControlRefused("ending", "the call is ending: a goodbye or a transfer is under way")
    ]
    harness.speak("resp_2", "item_bye", chunks=1)
    assert not [c for c in harness.handle(ev.RealtimeResponseDone("resp_2", "completed")) if isinstance(c, EndCall)]
    commands = harness.handle(ev.TwilioMark("item_bye:800"))  # the caller heard it
    transfers = [c for c in commands if isinstance(c, TransferCall)]
    (end,) = [c for c in commands if isinstance(c, EndCall)]
    assert transfers == [TransferCall("+15550107777")] and end.reason == "transferred" and not end.hang_up
    assert commands.index(transfers[0]) < commands.index(end)
    assert refusals(harness.handle(ev.HostInstruct("Too late."))) == [ControlRefused("ended", "the call has ended")]


def test_transfer_without_a_sentence_moves_the_call_at_once() -> None:
    harness = live()
    harness.speak("resp_1", "item_1", chunks=2)
    commands = harness.handle(ev.HostTransfer("+15550107777"), at=harness.now + 0.1)
    assert [m["event"] for m in twilio_messages(commands)] == ["clear"]
    assert said(commands) == []
    transfers = [c for c in commands if isinstance(c, TransferCall)]
    (end,) = [c for c in commands if isinstance(c, EndCall)]
    assert transfers == [TransferCall("+15550107777")] and end.reason == "transferred"


def test_commands_before_the_call_is_live_are_refused_and_do_nothing() -> None:
    harness = Harness()
    harness.handle(ev.TwilioConnected())
    harness.handle(harness.start_event())
    for event in (ev.HostSay("Hi."), ev.HostInstruct("Facts.", respond=True), ev.HostTransfer("+15550107777")):
        commands = harness.handle(event)
        assert [type(c) for c in commands] == [ControlRefused], commands
        assert commands[0].reason == "not_ready"  # type: ignore[union-attr]
    assert harness.session.phase == "connecting"


def test_commands_while_the_agent_says_goodbye_are_refused() -> None:
    harness = live(AgentConfig(builtin_tools=("end_call",)))
    harness.handle(ev.RealtimeResponseCreated("resp_1"))
    harness.handle(ev.RealtimeFunctionCallDone("resp_1", "item_f", "call_1", "end_call", "{}", "completed"))
    (refusal,) = refusals(harness.handle(ev.HostTransfer("+15550107777")))
    assert refusal.reason == "ending"


# --- the REST API in one process, without Redis ---------------------------------------------------------------

API_TOKEN = "control-api-token"
BASE_URL = "http://callbridge.test"


@asynccontextmanager
async def app_in_process(
    tmp_path: Path, redis_url: str | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Store]]:
    """The app with its lifespan (no Twilio REST; Redis if given), a client with the API token, and its store."""
    settings = Settings(
        api_token=API_TOKEN,
        database_url=f"sqlite:///{tmp_path / 'calls.db'}",
        realtime_url="ws://127.0.0.1:9/v1/realtime",
        public_url=BASE_URL,
        redis_url=redis_url,
        redis_prefix=f"test-{uuid.uuid4().hex[:12]}",
        _env_file=None,
    )
    app = create_app(settings)
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    transport = httpx.ASGITransport(app)
    client = httpx.AsyncClient(transport=transport, base_url=BASE_URL, headers=headers)
    async with client as http, app.router.lifespan_context(app):
        yield http, app.state.services.store


async def on_record(store: Store, *, owner: str | None, started: bool = True, ended: bool = False) -> str:
    call_sid = "CA" + uuid.uuid4().hex
    await store.record_call(call_sid=call_sid, direction="inbound", status="in-progress")
    now = datetime.now(UTC)
    await store.update_call(call_sid, owner=owner, started_at=now if started else None, ended_at=now if ended else None)
    return call_sid


async def test_a_worker_without_redis_refuses_a_call_another_process_carries_and_knows_the_rest(
    tmp_path: Path,
) -> None:
    async with app_in_process(tmp_path) as (http, store):
        elsewhere = await on_record(store, owner="another-host:4242:99")
        ended = await on_record(store, owner="another-host:4242:99", ended=True)
        waiting = await on_record(store, owner=None, started=False)
        unknown = "CA" + "0" * 32
        for path, body in [("say", {"text": "Hello."}), ("instruct", {"text": "Facts.", "respond": True})]:
            refused = await http.post(f"/api/calls/{elsewhere}/{path}", json=body)
            assert refused.status_code == 409, refused.text
            assert refused.json()["code"] == "not_live_here" and "CALLBRIDGE_REDIS_URL" in refused.json()["detail"]
            for call_sid in (ended, waiting):
                over = await http.post(f"/api/calls/{call_sid}/{path}", json=body)
                assert over.status_code == 409 and over.json()["code"] == "not_live", over.text
            assert (await http.post(f"/api/calls/{unknown}/{path}", json=body)).status_code == 404
        ended_detail = (await http.post(f"/api/calls/{ended}/say", json={"text": "Hi."})).json()["detail"]
        assert ended_detail == "the call has ended"
        # Transfers need Twilio's REST API, which this app has not got.
        unconfigured = await http.post(f"/api/calls/{elsewhere}/transfer", json={"to": "+15550107777"})
        assert unconfigured.status_code == 503, unconfigured.text


async def test_what_cannot_be_said_is_refused_before_it_reaches_a_call(tmp_path: Path) -> None:
    async with app_in_process(tmp_path) as (http, store):
        call_sid = await on_record(store, owner="another-host:4242:99")
        for path, body in [
            ("say", {"text": "x" * 4001}),
            ("say", {"text": ""}),
            ("say", {"text": "   "}),
            ("say", {"text": "Hi.", "volume": 11}),
            ("instruct", {"text": "y" * 4001}),
            ("transfer", {"to": "12"}),
            ("transfer", {"to": "+15550107777", "say": "z" * 4001}),
        ]:
            response = await http.post(f"/api/calls/{call_sid}/{path}", json=body)
            assert response.status_code == 422, (path, body, response.text)
        too_long = (await http.post(f"/api/calls/{call_sid}/say", json={"text": "x" * 4001})).json()["detail"]
        assert too_long[0]["loc"] == ["body", "text"] and "4000 characters" in too_long[0]["msg"]
        anonymous = await http.post(f"/api/calls/{call_sid}/say", json={"text": "Hi."}, headers={"Authorization": ""})
        assert anonymous.status_code == 401


@pytest.mark.parametrize(
    ("redis_url", "why"),
    [
        ("redis://127.0.0.1:6379/5", "the process that carries the call is gone"),
        (f"redis://127.0.0.1:{free_port()}/5", "the process that carries the call cannot be reached (Redis)"),
    ],
    ids=["owner-gone", "redis-down"],
)
async def test_through_redis_a_call_whose_process_does_not_answer_is_not_live(
    tmp_path: Path, redis_url: str, why: str
) -> None:
    async with app_in_process(tmp_path, redis_url) as (http, store):
        call_sid = await on_record(store, owner="another-host:4242:99")  # nobody listens on its channel
        refused = await http.post(f"/api/calls/{call_sid}/say", json={"text": "Hello?"})
    assert refused.status_code == 409, refused.text
    assert refused.json() == {"detail": why, "code": "not_live"}
