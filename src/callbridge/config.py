"""Configuration: one ``Settings`` object, read from the environment and ``.env``, passed down explicitly."""

from __future__ import annotations

import base64
import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from callbridge.core.context import AgentConfig
from callbridge.core.session import SessionConfig
from callbridge.realtime.client import CONNECT_TIMEOUT_S, RealtimeEndpoint
from callbridge.realtime.dialect import Dialect

DEFAULT_REALTIME_URL = "wss://api.openai.com/v1/realtime"
LIVE_EVENT_TYPES = (
    "call.started",
    "call.updated",
    "call.ended",
    "transcript.line",
    "transcript.partial",
    "call.event",
    "turn.metrics",
)
"""The types of live events (``GET /api/live``), which ``CALLBRIDGE_WEBHOOK_EVENTS`` chooses from."""
WEBHOOK_EVENT_TYPES = (*LIVE_EVENT_TYPES, "campaign.completed")
"""What ``CALLBRIDGE_WEBHOOK_EVENTS`` chooses from: the live events, and a campaign's end."""


def _default(cls: type[Any], name: str) -> Any:
    """The default the dataclass ``cls`` gives its field ``name``: where that default is written, once."""
    (field,) = (field for field in dataclasses.fields(cls) if field.name == name)
    return field.default


_AGENT = AgentConfig()
"""The core's default agent: the agent settings default to its values."""


class Settings(BaseSettings):
    """Every setting of callbridge, read from ``CALLBRIDGE_`` + the field's name in upper case.

    The environment names are listed in the README's configuration table. Defaults that the core or the Realtime
    client define (the agent, the session's timings, the connect timeout) are taken from there, not written again.
    """

    model_config = SettingsConfigDict(
        env_prefix="CALLBRIDGE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- the model ---
    # OPENAI_API_KEY and the TWILIO_* variables keep the names OpenAI's and Twilio's own tools read, without the
    # prefix: those fields name their variable explicitly. Each field is its variable's name in lower case, so in code
    # it is set like any other (``Settings(openai_api_key=...)``).
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    realtime_url: str | None = None
    realtime_model: str = _AGENT.model
    realtime_dialect: Dialect = _default(RealtimeEndpoint, "dialect")
    realtime_connect_timeout_seconds: float = Field(default=CONNECT_TIMEOUT_S, gt=0)
    realtime_reconnect_deadline_seconds: float = Field(default=_default(SessionConfig, "reconnect_deadline_s"), gt=0)
    """How long a call waits for the model (at start or after losing it) before the caller gets the fallback."""
    realtime_ready_timeout_seconds: float = Field(default=_default(SessionConfig, "ready_timeout_s"), gt=0)
    """From the stream's start to a model session that confirmed its configuration; past it, the fallback."""
    realtime_rollover_seconds: float = Field(default=_default(SessionConfig, "rollover_after_s"), gt=0)
    """Move a long call to a fresh model session at the first quiet moment after this long (OpenAI's limit: 60 min)."""

    # --- Twilio and the public face ---
    public_url: str = "http://127.0.0.1:8080"
    secret: SecretStr | None = None
    stream_parameters_ttl_seconds: int = Field(default=600, gt=0)
    twilio_account_sid: str | None = Field(default=None, validation_alias="TWILIO_ACCOUNT_SID")
    twilio_auth_token: SecretStr | None = Field(default=None, validation_alias="TWILIO_AUTH_TOKEN")
    say: str | None = None
    """Said to the caller (``<Say>``) before the stream connects."""
    on_model_end: Literal["close_stream", "hangup"] = "close_stream"
    max_calls: int = Field(default=200, ge=1)
    """Concurrent calls one process carries; past it new calls hear the fallback and are refused."""
    fallback_say: str = "Sorry, our assistant is not available right now. Please call again later."
    fallback_transfer_to: str | None = None
    """A number to dial after the fallback message instead of hanging up: callers reach a human, not a dead end."""
    drain_seconds: float = Field(default=60.0, ge=0)
    """On SIGTERM, how long live calls may go on before they are handed the fallback and the process exits."""
    dev_disable_signatures: bool = False
    """Local development only: accept Twilio requests without a valid ``X-Twilio-Signature``."""
    dev_campaign_clock: datetime | None = None
    """Tests only: the campaigns' wall clock starts at this time (calling hours are judged by it) and runs on."""
    amd_timeout_seconds: float = Field(default=_default(SessionConfig, "amd_timeout_s"), gt=0, le=60)
    """An outbound call with answering-machine detection and no verdict this long after it connects: a person."""
    max_message_bytes: int = Field(default=256 * 1024, gt=1024)
    max_request_bytes: int = Field(default=1024 * 1024, gt=1024)
    """Largest HTTP request body (webhooks, REST API): past it, 413."""
    pre_ready_buffer_ms: int = Field(default=_default(SessionConfig, "pre_ready_buffer_ms"), ge=0)

    twilio_api_base_url: str | None = Field(default=None, validation_alias="TWILIO_API_BASE_URL")
    """Test-only: where Twilio REST requests go instead of Twilio (a local fake)."""

    # --- records, the REST API, the host application ---
    database_url: str = "sqlite+aiosqlite:///callbridge.db"
    api_token: SecretStr | None = None
    agents_file: Path | None = None
    context_url: str | None = None
    context_function: str | None = None
    context_timeout_seconds: float = Field(default=2.0, gt=0)
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    """Standard Webhooks key (``whsec_`` and base64) signing every request to the host application."""
    webhook_max_attempts: int = Field(default=12, ge=1)
    """Attempts of one webhook delivery (backoff with jitter, about a day for 12) before it is dead."""
    webhook_backoff_seconds: float = Field(default=60.0, gt=0)
    """The longest wait after a delivery's first failed attempt; it doubles with each failure, up to 8 h."""
    webhook_events: str = "call.ended,campaign.completed"
    """A comma list of live event types also POSTed to the webhook URL, through the outbox."""
    redis_url: str | None = None
    """Live events through Redis Streams, so that every worker and host sees every call's (else: in process)."""
    redis_prefix: str = Field(default="callbridge", min_length=1, max_length=100)
    """The start of every Redis key callbridge writes (several deployments can share one Redis)."""
    record_calls: bool = True
    """Record every call (stereo: the caller left, the agent as heard right); an agent's ``record`` overrides it."""
    recordings_dir: str = Field(default="recordings", min_length=1)
    """Where recordings are kept (relative to the working directory unless absolute)."""
    recordings_retention_days: int = Field(default=30, ge=0)
    """Recordings older than this are deleted (0: kept for ever)."""

    # --- the agent ---
    agent_instructions: str = _AGENT.instructions
    agent_voice: str = _AGENT.voice
    agent_greeting: str | None = "Hello, thanks for calling. How can I help you today?"
    """The core's agent has no scripted greeting (the model greets as its instructions say); the service's has."""
    agent_speaks_first: bool = _AGENT.speaks_first
    turn_detection: Literal["server_vad", "semantic_vad"] = _AGENT.turn_detection["type"]
    vad_threshold: float = Field(default=0.5, ge=0, le=1)
    vad_prefix_padding_ms: int = Field(default=300, ge=0)
    vad_silence_duration_ms: int = Field(default=500, ge=0)
    vad_eagerness: Literal["low", "medium", "high", "auto"] = "auto"
    vad_interrupt_response: bool = True
    transcription_model: str | None = _AGENT.transcription_model
    transcription_language: str | None = Field(default=None, max_length=16)
    """ISO-639-1 code of the callers' language (``en``): better and faster transcription."""
    transcription_prompt: str | None = Field(default=None, max_length=1000)
    """Words the transcription should expect: names, products, how numbers are read."""
    noise_reduction: Literal["near_field", "far_field", "off"] = _default(AgentConfig, "noise_reduction")
    idle_timeout_ms: int | None = Field(default=None, ge=5000, le=30000)
    """Server VAD: re-prompt a caller silent this long after the agent finished."""
    idle_hangup_after: int = Field(default=_AGENT.idle_hangup_after, ge=0)
    """Unanswered re-prompts before the agent says goodbye and ends the call."""
    voice_speed: float | None = Field(default=None, ge=0.25, le=1.5)
    max_output_tokens: int | None = Field(default=None, ge=1, le=4096)
    tool_choice: Literal["auto", "none", "required"] | None = None
    tools: str | None = None
    tool_timeout_seconds: float = Field(default=10.0, gt=0)
    tool_filler_after_ms: int = Field(default=_AGENT.tool_filler_after_ms, ge=0)
    """A tool still running this long: the model says a short filler once (0: never)."""

    # --- operations ---
    log_format: Literal["console", "json"] = "console"
    log_level: str = "info"

    @field_validator(
        "transcription_model",
        "transcription_language",
        "transcription_prompt",
        "idle_timeout_ms",
        "voice_speed",
        "max_output_tokens",
        "tool_choice",
        "say",
        "agent_greeting",
        "tools",
        "realtime_url",
        "context_url",
        "context_function",
        "webhook_url",
        "redis_url",
        "twilio_api_base_url",
        "agents_file",
        "fallback_transfer_to",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable that sets ``field`` (what an operator is told to fix)."""
        info = cls.model_fields.get(field)
        if info is not None and isinstance(info.validation_alias, str):
            return info.validation_alias
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    @model_validator(mode="before")
    @classmethod
    def _no_environment_names(cls, data: Any) -> Any:
        """``Settings(CALLBRIDGE_AGENT_VOICE=...)``: refused, not ignored. In code a setting is named by its field."""
        prefix = cls.model_config.get("env_prefix", "").lower()
        for key in data if isinstance(data, dict) else ():
            name = str(key).lower()
            field = cls.model_fields.get(name.removeprefix(prefix))
            if name.startswith(prefix) and field is not None and field.validation_alias is None:
                raise ValueError(f"{key} is the environment's name: in code, name the field ({name[len(prefix) :]})")
        return data

    @field_validator("public_url", "realtime_url", "context_url", "webhook_url", "twilio_api_base_url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A URL with a host and the scheme its peer speaks, checked at start rather than at the first call."""
        if value is None:
            return None
        secure, plain = ("wss", "ws") if info.field_name == "realtime_url" else ("https", "http")
        parts = urlsplit(value)
        if parts.scheme not in (secure, plain) or not parts.hostname:
            raise ValueError(f"{value!r} is not a URL: it must start with {secure}:// (or {plain}:// for local use)")
        return value.rstrip("/") if info.field_name == "public_url" else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{value!r} is not a Redis URL: it must start with redis://, rediss:// or unix://")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        """Empty is unset; anything else must be a key Standard Webhooks libraries take."""
        if value is None or not value.get_secret_value():
            return None
        check_webhook_secret(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _signed_requests(self) -> Self:
        """What callbridge sends the host application is always signed: a URL to send to needs the key."""
        urls = {"CALLBRIDGE_WEBHOOK_URL": self.webhook_url, "CALLBRIDGE_CONTEXT_URL": self.context_url}
        unsigned = [name for name, url in urls.items() if url]
        if unsigned and self.webhook_secret is None:
            named = " and ".join(unsigned)
            raise ValueError(
                f"{named} set without CALLBRIDGE_WEBHOOK_SECRET: every request to your app is signed "
                "(Standard Webhooks); set it to the key your app verifies with (`callbridge secret` prints a new one)"
            )
        return self

    @field_validator("webhook_events")
    @classmethod
    def _webhook_events(cls, value: str) -> str:
        unknown = [kind for kind in _comma_list(value) if kind not in WEBHOOK_EVENT_TYPES]
        if unknown:
            raise ValueError(f"unknown event types {unknown}: choose from {', '.join(WEBHOOK_EVENT_TYPES)}")
        return value

    @property
    def webhook_event_types(self) -> frozenset[str]:
        """The live event types POSTed to the webhook URL (none without one)."""
        return frozenset(_comma_list(self.webhook_events)) if self.webhook_url else frozenset()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.idle_timeout_ms is not None and self.turn_detection != "server_vad":
            raise ValueError("CALLBRIDGE_IDLE_TIMEOUT_MS needs CALLBRIDGE_TURN_DETECTION=server_vad")
        if self.realtime_dialect == "beta" and self.realtime_host_is_openai:
            raise ValueError(
                "CALLBRIDGE_REALTIME_DIALECT=beta: OpenAI's Realtime API refuses the beta shape "
                "(beta_api_shape_disabled); use ga, or set CALLBRIDGE_REALTIME_URL to a server that speaks beta"
            )
        return self

    @property
    def realtime_host_is_openai(self) -> bool:
        """Whether calls go to OpenAI's own endpoint (no URL set, or a URL on api.openai.com)."""
        if self.realtime_url is None:
            return self.openai_api_key is not None  # without a key either, calls go to the local engine
        return urlsplit(self.realtime_url).hostname == "api.openai.com"

    @property
    def uses_local_engine(self) -> bool:
        """No key and no URL: calls go to callbridge's own offline engine."""
        return self.openai_api_key is None and self.realtime_url is None

    @property
    def effective_realtime_url(self) -> str:
        return self.realtime_url or DEFAULT_REALTIME_URL

    @property
    def stream_url(self) -> str:
        """The media-stream URL Twilio connects to: the public URL with https→wss (http→ws)."""
        scheme, rest = self.public_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/twilio/media-stream"

    def agent(self, tools: tuple[dict[str, Any], ...] = ()) -> AgentConfig:
        """The agent as configured by the environment."""
        turn_detection: dict[str, Any]
        if self.turn_detection == "semantic_vad":
            turn_detection = {"type": "semantic_vad", "eagerness": self.vad_eagerness}
        else:
            turn_detection = {
                "type": "server_vad",
                "threshold": self.vad_threshold,
                "prefix_padding_ms": self.vad_prefix_padding_ms,
                "silence_duration_ms": self.vad_silence_duration_ms,
            }
            if self.idle_timeout_ms is not None:
                turn_detection["idle_timeout_ms"] = self.idle_timeout_ms
        turn_detection["interrupt_response"] = self.vad_interrupt_response
        return AgentConfig(
            instructions=self.agent_instructions,
            model=self.realtime_model,
            voice=self.agent_voice,
            greeting=self.agent_greeting,
            speaks_first=self.agent_speaks_first,
            turn_detection=turn_detection,
            transcription_model=self.transcription_model,
            transcription_language=self.transcription_language,
            transcription_prompt=self.transcription_prompt,
            noise_reduction=None if self.noise_reduction == "off" else self.noise_reduction,
            speed=self.voice_speed,
            max_output_tokens=self.max_output_tokens,
            tools=tools,
            tool_choice=self.tool_choice,
            tool_filler_after_ms=self.tool_filler_after_ms,
            idle_hangup_after=self.idle_hangup_after,
        )


def check_webhook_secret(secret: str) -> None:
    """Raise ``ValueError`` unless ``secret`` is a Standard Webhooks key (``whsec_`` and non-empty base64)."""
    try:
        key = secret.removeprefix("whsec_").rstrip("=")
        if not secret.startswith("whsec_") or not base64.b64decode(key + "=" * (-len(key) % 4), validate=True):
            raise ValueError("empty")
    except Exception:
        raise ValueError("must be whsec_ and base64, as `callbridge secret` prints") from None


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]
