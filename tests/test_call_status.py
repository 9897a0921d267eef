"""A call's status on record: ``ended`` between the end of its stream and Twilio's final status, never live again."""

from __future__ import annotations

from pathlib import Path

from callbridge.config import Settings
from callbridge.core.context import AgentConfig, CallContext
from callbridge.core.session import CallSession, SessionConfig
from callbridge.service.agents import load_agents
from callbridge.service.calls import CallServices
from callbridge.service.tools import ToolRegistry
from callbridge.store.repository import Store
from callbridge.telephony.params import StreamParameterSigner

CALL_SID = "CA" + "3" * 32


async def _services(tmp_path: Path) -> CallServices:
    settings = Settings(secret="s" * 32, database_url=f"sqlite:///{tmp_path / 'calls.db'}", _env_file=None)
    store = await Store.open(settings.database_url)
    return CallServices(
        settings, store, StreamParameterSigner("s" * 32, 600), load_agents(settings, ToolRegistry(), None), None
    )


def _ended_session() -> CallSession:
    session = CallSession(SessionConfig(agent=AgentConfig(), verify_parameters=lambda parameters, sid: CallContext()))
    session.call_sid = CALL_SID
    session.end_reason = "caller_hung_up"
    return session


async def _status(services: CallServices) -> str:
    record = await services.store.get_call(CALL_SID)
    assert record is not None
    return record.status


async def test_a_call_whose_stream_ended_is_ended_until_twilio_says_how(tmp_path: Path) -> None:
    services = await _services(tmp_path)
    try:
        await services.call_started(CALL_SID, "MZ" + "4" * 32, CallContext(caller="+15550100001"))
        assert await _status(services) == "in-progress"
        await services.call_ended(_ended_session())
        assert await _status(services) == "ended"
        await services.status_callback({"CallSid": CALL_SID, "CallStatus": "in-progress"})  # a late callback
        assert await _status(services) == "ended"
        await services.status_callback({"CallSid": CALL_SID, "CallStatus": "completed"})
        record = await services.store.get_call(CALL_SID)
        assert record is not None and (record.status, record.end_reason) == ("completed", "caller_hung_up")
        await services.status_callback({"CallSid": CALL_SID, "CallStatus": "ringing"})  # later still
        assert await _status(services) == "completed"
    finally:
        await services.store.close()


async def test_twilio_s_final_status_first_stays(tmp_path: Path) -> None:
    services = await _services(tmp_path)
    try:
        await services.call_started(CALL_SID, "MZ" + "4" * 32, CallContext(caller="+15550100001"))
        await services.status_callback({"CallSid": CALL_SID, "CallStatus": "completed"})
        await services.call_ended(_ended_session())
        assert await _status(services) == "completed"
    finally:
        await services.store.close()
