"""Configuration: one ``Settings`` object, read from the environment and ``.env``, passed down explicitly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from callbridge.core.context import AgentConfig

DEFAULT_REALTIME_URL = "wss://api.openai.com/v1/realtime"


class Settings(BaseSettings):
    """Every setting of callbridge. Environment names are listed in the README's configuration table."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- the model ---
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    realtime_url: str | None = Field(default=None, validation_alias="CALLBRIDGE_REALTIME_URL")
    realtime_model: str = Field(default="gpt-realtime-1.5", validation_alias="CALLBRIDGE_REALTIME_MODEL")
    realtime_dialect: Literal["ga", "beta"] = Field(default="ga", validation_alias="CALLBRIDGE_REALTIME_DIALECT")
    realtime_connect_timeout_seconds: float = Field(
        default=5.0, gt=0, validation_alias="CALLBRIDGE_REALTIME_CONNECT_TIMEOUT_SECONDS"
    )
    realtime_reconnect_deadline_seconds: float = Field(
        default=10.0, gt=0, validation_alias="CALLBRIDGE_REALTIME_RECONNECT_DEADLINE_SECONDS"
    )
    """How long a call waits for the model (at start or after losing it) before the caller gets the fallback."""
    realtime_ready_timeout_seconds: float = Field(
        default=8.0, gt=0, validation_alias="CALLBRIDGE_REALTIME_READY_TIMEOUT_SECONDS"
    )
    """From the stream's start to a model session that confirmed its configuration; past it, the fallback."""
    realtime_rollover_seconds: float = Field(
        default=55 * 60, gt=0, validation_alias="CALLBRIDGE_REALTIME_ROLLOVER_SECONDS"
    )
    """Move a long call to a fresh model session at the first quiet moment after this long (OpenAI's limit: 60 min)."""

    # --- Twilio and the public face ---
    public_url: str = Field(default="http://127.0.0.1:8080", validation_alias="CALLBRIDGE_PUBLIC_URL")
    secret: SecretStr | None = Field(default=None, validation_alias="CALLBRIDGE_SECRET")
    stream_parameters_ttl_seconds: int = Field(
        default=600, gt=0, validation_alias="CALLBRIDGE_STREAM_PARAMETERS_TTL_SECONDS"
    )
    twilio_account_sid: str | None = Field(default=None, validation_alias="TWILIO_ACCOUNT_SID")
    twilio_auth_token: SecretStr | None = Field(default=None, validation_alias="TWILIO_AUTH_TOKEN")
    say_before_connect: str | None = Field(default=None, validation_alias="CALLBRIDGE_SAY")
    on_model_end: Literal["close_stream", "hangup"] = Field(
        default="close_stream", validation_alias="CALLBRIDGE_ON_MODEL_END"
    )
    max_calls: int = Field(default=200, ge=1, validation_alias="CALLBRIDGE_MAX_CALLS")
    """Concurrent calls one process carries; past it new calls hear the fallback and are refused."""
    fallback_say: str = Field(
        default="Sorry, our assistant is not available right now. Please call again later.",
        validation_alias="CALLBRIDGE_FALLBACK_SAY",
    )
    fallback_transfer_to: str | None = Field(default=None, validation_alias="CALLBRIDGE_FALLBACK_TRANSFER_TO")
    """A number to dial after the fallback message instead of hanging up: callers reach a human, not a dead end."""
    drain_seconds: float = Field(default=60.0, ge=0, validation_alias="CALLBRIDGE_DRAIN_SECONDS")
    """On SIGTERM, how long live calls may go on before they are handed the fallback and the process exits."""
    dev_disable_signatures: bool = Field(default=False, validation_alias="CALLBRIDGE_DEV_DISABLE_SIGNATURES")
    """Local development only: accept Twilio requests without a valid ``X-Twilio-Signature``."""
    max_message_bytes: int = Field(default=256 * 1024, gt=1024, validation_alias="CALLBRIDGE_MAX_MESSAGE_BYTES")
    max_request_bytes: int = Field(default=1024 * 1024, gt=1024, validation_alias="CALLBRIDGE_MAX_REQUEST_BYTES")
    """Largest HTTP request body (webhooks, REST API): past it, 413."""
    pre_ready_buffer_ms: int = Field(default=5000, ge=0, validation_alias="CALLBRIDGE_PRE_READY_BUFFER_MS")

    twilio_api_base_url: str | None = Field(default=None, validation_alias="TWILIO_API_BASE_URL")
    """Test-only: where Twilio REST requests go instead of Twilio (a local fake)."""

    # --- records, the REST API, the host application ---
    database_url: str = Field(default="sqlite+aiosqlite:///callbridge.db", validation_alias="CALLBRIDGE_DATABASE_URL")
    api_token: SecretStr | None = Field(default=None, validation_alias="CALLBRIDGE_API_TOKEN")
    agents_file: Path | None = Field(default=None, validation_alias="CALLBRIDGE_AGENTS_FILE")
    context_url: str | None = Field(default=None, validation_alias="CALLBRIDGE_CONTEXT_URL")
    context_function: str | None = Field(default=None, validation_alias="CALLBRIDGE_CONTEXT_FUNCTION")
    context_timeout_seconds: float = Field(default=2.0, gt=0, validation_alias="CALLBRIDGE_CONTEXT_TIMEOUT_SECONDS")
    webhook_url: str | None = Field(default=None, validation_alias="CALLBRIDGE_WEBHOOK_URL")
    webhook_secret: SecretStr | None = Field(default=None, validation_alias="CALLBRIDGE_WEBHOOK_SECRET")

    # --- the agent ---
    agent_instructions: str = Field(
        default=(
            "You are a friendly, efficient phone agent. Keep every answer short and natural: this is a phone "
            "call. Ask one question at a time."
        ),
        validation_alias="CALLBRIDGE_AGENT_INSTRUCTIONS",
    )
    agent_voice: str = Field(default="marin", validation_alias="CALLBRIDGE_AGENT_VOICE")
    agent_greeting: str | None = Field(
        default="Hello, thanks for calling. How can I help you today?",
        validation_alias="CALLBRIDGE_AGENT_GREETING",
    )
    agent_speaks_first: bool = Field(default=True, validation_alias="CALLBRIDGE_AGENT_SPEAKS_FIRST")
    turn_detection: Literal["server_vad", "semantic_vad"] = Field(
        default="server_vad", validation_alias="CALLBRIDGE_TURN_DETECTION"
    )
    vad_threshold: float = Field(default=0.5, ge=0, le=1, validation_alias="CALLBRIDGE_VAD_THRESHOLD")
    vad_prefix_padding_ms: int = Field(default=300, ge=0, validation_alias="CALLBRIDGE_VAD_PREFIX_PADDING_MS")
    vad_silence_duration_ms: int = Field(default=500, ge=0, validation_alias="CALLBRIDGE_VAD_SILENCE_DURATION_MS")
    vad_eagerness: Literal["low", "medium", "high", "auto"] = Field(
        default="auto", validation_alias="CALLBRIDGE_VAD_EAGERNESS"
    )
    vad_interrupt_response: bool = Field(default=True, validation_alias="CALLBRIDGE_VAD_INTERRUPT_RESPONSE")
    transcription_model: str | None = Field(default="gpt-transcribe", validation_alias="CALLBRIDGE_TRANSCRIPTION_MODEL")
    transcription_language: str | None = Field(
        default=None, max_length=16, validation_alias="CALLBRIDGE_TRANSCRIPTION_LANGUAGE"
    )
    """ISO-639-1 code of the callers' language (``en``): better and faster transcription."""
    transcription_prompt: str | None = Field(
        default=None, max_length=1000, validation_alias="CALLBRIDGE_TRANSCRIPTION_PROMPT"
    )
    """Words the transcription should expect: names, products, how numbers are read."""
    noise_reduction: Literal["near_field", "far_field", "off"] = Field(
        default="far_field", validation_alias="CALLBRIDGE_NOISE_REDUCTION"
    )
    idle_timeout_ms: int | None = Field(default=None, ge=5000, le=30000, validation_alias="CALLBRIDGE_IDLE_TIMEOUT_MS")
    """Server VAD: re-prompt a caller silent this long after the agent finished."""
    idle_hangup_after: int = Field(default=2, ge=0, validation_alias="CALLBRIDGE_IDLE_HANGUP_AFTER")
    """Unanswered re-prompts before the agent says goodbye and ends the call."""
    voice_speed: float | None = Field(default=None, ge=0.25, le=1.5, validation_alias="CALLBRIDGE_VOICE_SPEED")
    max_output_tokens: int | None = Field(default=None, ge=1, le=4096, validation_alias="CALLBRIDGE_MAX_OUTPUT_TOKENS")
    tool_choice: Literal["auto", "none", "required"] | None = Field(
        default=None, validation_alias="CALLBRIDGE_TOOL_CHOICE"
    )
    tools: str | None = Field(default=None, validation_alias="CALLBRIDGE_TOOLS")
    tool_timeout_seconds: float = Field(default=10.0, gt=0, validation_alias="CALLBRIDGE_TOOL_TIMEOUT_SECONDS")
    tool_filler_after_ms: int = Field(default=1500, ge=0, validation_alias="CALLBRIDGE_TOOL_FILLER_AFTER_MS")
    """A tool still running this long: the model says a short filler once (0: never)."""

    # --- operations ---
    log_format: Literal["console", "json"] = Field(default="console", validation_alias="CALLBRIDGE_LOG_FORMAT")
    log_level: str = Field(default="info", validation_alias="CALLBRIDGE_LOG_LEVEL")

    @field_validator(
        "transcription_model",
        "transcription_language",
        "transcription_prompt",
        "idle_timeout_ms",
        "voice_speed",
        "max_output_tokens",
        "tool_choice",
        "say_before_connect",
        "agent_greeting",
        "tools",
        "realtime_url",
        "context_url",
        "context_function",
        "webhook_url",
        "twilio_api_base_url",
        "agents_file",
        "fallback_transfer_to",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("CALLBRIDGE_PUBLIC_URL must start with https:// (or http:// for local use)")
        return value.rstrip("/")

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
