"""The default models are current in the installed ``openai`` package: a deprecation is caught here, not on a call."""

from __future__ import annotations

import ast
import inspect
import re
from types import ModuleType

import pytest
from openai.types.realtime import audio_transcription_param, realtime_session_create_request_param

from callbridge.config import Settings
from callbridge.core.context import AgentConfig


def field_docstring(module: ModuleType, class_name: str, field: str) -> str:
    """The docstring under a field of a class in the module's source (the package documents fields that way)."""
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            body = node.body
            for index, statement in enumerate(body[:-1]):
                if (
                    isinstance(statement, ast.AnnAssign)
                    and isinstance(statement.target, ast.Name)
                    and statement.target.id == field
                    and isinstance(body[index + 1], ast.Expr)
                ):
                    value = body[index + 1].value  # type: ignore[attr-defined]
                    assert isinstance(value, ast.Constant) and isinstance(value.value, str)
                    return value.value
    raise AssertionError(f"{class_name}.{field} has no docstring in {module.__name__}")


def deprecated_values(docstring: str) -> set[str]:
    """The quoted names listed under "Deprecated values:" in a field's docstring."""
    _, found, rest = docstring.partition("Deprecated values:")
    assert found, "the package no longer lists deprecated values here: read the docstring and update this test"
    return set(re.findall(r'"([^"]+)"', rest))


FIELDS = [
    pytest.param(
        realtime_session_create_request_param,
        "RealtimeSessionCreateRequestParam",
        "model",
        Settings(_env_file=None).realtime_model,
        AgentConfig().model,
        id="realtime model",
    ),
    pytest.param(
        audio_transcription_param,
        "AudioTranscriptionParam",
        "model",
        Settings(_env_file=None).transcription_model,
        AgentConfig().transcription_model,
        id="transcription model",
    ),
]


@pytest.mark.parametrize(("module", "class_name", "field", "setting_default", "agent_default"), FIELDS)
def test_default_models_are_not_deprecated(
    module: ModuleType, class_name: str, field: str, setting_default: str, agent_default: str
) -> None:
    deprecated = deprecated_values(field_docstring(module, class_name, field))
    assert deprecated, "no deprecated value parsed: the docstring's format changed"
    assert setting_default == agent_default
    assert setting_default not in deprecated, f"{setting_default} is deprecated in openai: choose a current model"


def test_the_parser_finds_what_the_package_deprecates() -> None:
    """The check above can fail: the models callbridge used before are found in the lists."""
    realtime = deprecated_values(
        field_docstring(realtime_session_create_request_param, "RealtimeSessionCreateRequestParam", "model")
    )
    transcription = deprecated_values(field_docstring(audio_transcription_param, "AudioTranscriptionParam", "model"))
    assert "gpt-realtime" in realtime and "gpt-realtime-1.5" not in realtime
    assert "gpt-4o-mini-transcribe" in transcription and "gpt-transcribe" not in transcription
