"""Settings: the environment names are the documented ones, values reach their fields, each default has one source."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import EnvSettingsSource

from callbridge.config import DEFAULT_REALTIME_URL, Settings
from callbridge.core.context import AgentConfig
from callbridge.core.session import SessionConfig
from callbridge.realtime.client import CONNECT_TIMEOUT_S, RealtimeEndpoint

README = Path(__file__).resolve().parents[1] / "README.md"

DESCRIBED_DEFAULTS = {"CALLBRIDGE_REALTIME_URL", "CALLBRIDGE_SECRET", "CALLBRIDGE_AGENT_INSTRUCTIONS"}
"""Variables whose default the table describes in words instead of giving a value."""


def documented() -> dict[str, str]:
    """Each variable of the README's configuration table, with its default as the table writes it."""
    text = README.read_text()
    start = text.index("\n## Configuration\n")
    section = text[start : text.index("\n#", start + 1)]
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \| (.*?) \| .* \|$", section, flags=re.MULTILINE)
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), "a variable is listed twice"
    return dict(rows)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting of the machine running the tests: every test sets what it reads."""
    for name in list(os.environ):
        if name.upper().startswith(("CALLBRIDGE_", "OPENAI_", "TWILIO_")):
            monkeypatch.delenv(name)


def read_from_environment(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> dict[str, Any]:
    """What Settings reads from the environment when it holds ``values``, by field name, before validation."""
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    by_key = {str(field.validation_alias or name): name for name, field in Settings.model_fields.items()}
    return {by_key[key]: value for key, value in EnvSettingsSource(Settings)().items()}


def fields_by_variable(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The field each documented variable sets, found by setting every variable to a value of its own."""
    read = read_from_environment(monkeypatch, {name: f"value of {name}" for name in documented()})
    return {str(value).removeprefix("value of "): field for field, value in read.items()}


def test_the_environment_names_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    names = documented()
    assert len(names) == len(Settings.model_fields)
    # Every documented variable reaches a field of its own, and every field is documented.
    assert sorted(fields_by_variable(monkeypatch)) == sorted(names)
    assert sorted(fields_by_variable(monkeypatch).values()) == sorted(Settings.model_fields)
    # And nothing else is read: one name per field, never the field's name besides its explicit one.
    assert all(isinstance(field.validation_alias, str | None) for field in Settings.model_fields.values())
    assert not Settings.model_config.get("validate_by_name") and not Settings.model_config.get("populate_by_name")
    near_misses = {
        candidate
        for name in Settings.model_fields
        for candidate in (name.upper(), f"CALLBRIDGE_{name.upper()}", f"CALLBRIDGE_CALLBRIDGE_{name.upper()}")
        if candidate not in names
    }
    for name in names:
        monkeypatch.delenv(name)
    assert read_from_environment(monkeypatch, dict.fromkeys(near_misses, "x")) == {}


def test_a_value_in_the_environment_reaches_its_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    environment = {
        "OPENAI_API_KEY": "sk-test",
        "TWILIO_ACCOUNT_SID": "AC1",
        "TWILIO_AUTH_TOKEN": "token",
        "TWILIO_API_BASE_URL": "http://127.0.0.1:9",
        "CALLBRIDGE_SAY": "One moment.",
        "CALLBRIDGE_AGENT_VOICE": "cedar",
        "CALLBRIDGE_AGENT_SPEAKS_FIRST": "false",
        "CALLBRIDGE_VAD_THRESHOLD": "0.7",
        "CALLBRIDGE_REALTIME_CONNECT_TIMEOUT_SECONDS": "2.5",
        "CALLBRIDGE_AGENTS_FILE": str(tmp_path / "agents.toml"),
        "CALLBRIDGE_TRANSCRIPTION_MODEL": "",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    assert settings.openai_api_key == SecretStr("sk-test") and settings.twilio_auth_token == SecretStr("token")
    assert (settings.twilio_account_sid, settings.twilio_api_base_url) == ("AC1", "http://127.0.0.1:9")
    assert settings.say == "One moment."
    assert (settings.agent_voice, settings.agent_speaks_first) == ("cedar", False)
    assert (settings.vad_threshold, settings.realtime_connect_timeout_seconds) == (0.7, 2.5)
    assert settings.agents_file == tmp_path / "agents.toml" and settings.transcription_model is None
    # From a .env file too; what the code passes wins over both.
    dotenv = tmp_path / ".env"
    dotenv.write_text("CALLBRIDGE_MAX_CALLS=7\nTWILIO_ACCOUNT_SID=AC2\nCALLBRIDGE_LOG_LEVEL=debug\n")
    monkeypatch.delenv("TWILIO_ACCOUNT_SID")
    settings = Settings(_env_file=dotenv, log_level="warning")
    assert (settings.max_calls, settings.twilio_account_sid, settings.log_level) == (7, "AC2", "warning")


def test_a_bad_value_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBRIDGE_VAD_THRESHOLD", "7")
    with pytest.raises(ValidationError, match="vad_threshold"):
        Settings(_env_file=None)


def test_in_code_a_setting_is_named_by_its_field() -> None:
    settings = Settings(agent_voice="cedar", openai_api_key="sk-test", twilio_account_sid="AC1", _env_file=None)
    assert (settings.agent_voice, settings.openai_api_key, settings.twilio_account_sid) == (
        "cedar",
        SecretStr("sk-test"),
        "AC1",
    )
    assert Settings(say="One moment.", _env_file=None).say == "One moment."
    # The environment's name of a field is refused, not silently ignored.
    with pytest.raises(ValidationError, match=r"CALLBRIDGE_AGENT_VOICE .*\(agent_voice\)"):
        Settings(CALLBRIDGE_AGENT_VOICE="cedar", _env_file=None)


def value_of(cell: str) -> Any:
    """A default as the README writes it (`5`, `true`, `ga`, —), as a value."""
    if cell == "—":
        return None
    text = cell.strip("`")
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def test_the_readme_gives_each_default(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = fields_by_variable(monkeypatch)
    for name in documented():
        monkeypatch.delenv(name)
    defaults = Settings(_env_file=None)
    for name, cell in documented().items():
        actual = getattr(defaults, fields[name])
        actual = actual.get_secret_value() if isinstance(actual, SecretStr) else actual
        if name in DESCRIBED_DEFAULTS:
            assert not re.fullmatch(r"`[^`]*`|—", cell), f"{name}: the default is given, check it here"
        elif cell.endswith("…`"):
            assert isinstance(actual, str) and actual.startswith(cell.strip("`…").rstrip()), name
        else:
            assert re.fullmatch(r"`[^`]*`|—", cell), f"{name}: {cell!r} is not a default"
            assert value_of(cell) == actual, f"{name}: the README says {cell}, the default is {actual!r}"
    assert DEFAULT_REALTIME_URL in documented()["CALLBRIDGE_REALTIME_URL"]


def core_default(cls: type[Any], name: str) -> Any:
    (field,) = (field for field in dataclasses.fields(cls) if field.name == name)
    return field.default


def test_defaults_the_core_defines_are_the_settings_defaults() -> None:
    settings = Settings(_env_file=None)
    agent, core = settings.agent(), AgentConfig()
    for name in (
        "instructions",
        "model",
        "voice",
        "speaks_first",
        "transcription_model",
        "noise_reduction",
        "tool_filler_after_ms",
        "idle_hangup_after",
        "speed",
        "max_output_tokens",
        "tool_choice",
    ):
        assert getattr(agent, name) == getattr(core, name), name
    assert agent.turn_detection["type"] == core.turn_detection["type"]
    assert settings.pre_ready_buffer_ms == core_default(SessionConfig, "pre_ready_buffer_ms")
    assert settings.realtime_reconnect_deadline_seconds == core_default(SessionConfig, "reconnect_deadline_s")
    assert settings.realtime_ready_timeout_seconds == core_default(SessionConfig, "ready_timeout_s")
    assert settings.realtime_rollover_seconds == core_default(SessionConfig, "rollover_after_s")
    assert settings.realtime_connect_timeout_seconds == CONNECT_TIMEOUT_S
    assert settings.realtime_dialect == core_default(RealtimeEndpoint, "dialect")
