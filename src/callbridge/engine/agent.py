"""The local engine: the Realtime protocol server with speech models and a deterministic brain behind it."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from callbridge.engine.brain import BookingBrain, Brain
from callbridge.realtime.server import RealtimeServer, ServerOptions, ToolCall, TurnContext

if TYPE_CHECKING:  # the speech models are an optional extra, imported when the engine starts
    from callbridge.engine.speech import LanguageModel, Synthesizer

log = structlog.stdlib.get_logger("callbridge.engine")

BrainFactory = Callable[[], Brain]


def split_sentences(text: str) -> list[str]:
    """Sentences, so the first one is spoken while the rest is still being synthesized."""
    return [sentence for sentence in re.split(r"(?<=[.!?])\s+", text.strip()) if sentence]


@dataclass
class SpeechModels:
    """The models one process shares between its calls, loaded once, on first use."""

    phrases: list[str]
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loaded: tuple[LanguageModel, Synthesizer] | None = None

    def load(self) -> tuple[LanguageModel, Synthesizer]:
        from callbridge.engine.speech import LanguageModel, Synthesizer

        with self._lock:
            if self._loaded is None:
                self._loaded = (LanguageModel.from_phrases(self.phrases), Synthesizer())
            return self._loaded


class SpeechAgent:
    """One call's mind and voice: webrtcvad, a pocketsphinx decoder kept across turns, a brain, piper."""

    def __init__(self, models: SpeechModels, brain: Brain) -> None:
        from callbridge.engine.speech import PhoneVad, Recognizer

        language_model, synthesizer = models.load()
        self._vad = PhoneVad()
        self._recognizer = Recognizer(language_model)
        self._synthesizer = synthesizer
        self._brain = brain

    def hears_speech(self, frame: bytes) -> bool:
        return self._vad.is_speech(frame)

    async def transcribe(self, audio: bytes, turn: int) -> str:
        return await asyncio.to_thread(self._recognizer.transcribe, audio)

    def plan(self, context: TurnContext) -> str | ToolCall:
        return self._brain.respond(context)

    async def speak(self, text: str) -> AsyncGenerator[tuple[str, bytes], None]:
        for sentence in split_sentences(text):
            audio = await asyncio.to_thread(self._synthesize, sentence)
            yield f"{sentence} ", audio

    def _synthesize(self, sentence: str) -> bytes:
        return b"".join(self._synthesizer.synthesize(sentence))


class LocalEngine(RealtimeServer):
    """A Realtime-compatible server on loopback, built only from models that ship inside packages.

    Audio deltas are sent as soon as they are synthesized (faster than real time), as the hosted service does.
    """

    def __init__(self, brain_factory: BrainFactory = BookingBrain, host: str = "127.0.0.1", port: int = 0) -> None:
        self.models = SpeechModels(brain_factory().phrases())
        self._brain_factory = brain_factory
        super().__init__(self._new_agent, ServerOptions(delta_ms=100, speed=0), host, port)

    def _new_agent(self) -> SpeechAgent:
        return SpeechAgent(self.models, self._brain_factory())

    async def start(self) -> None:
        await asyncio.to_thread(self.models.load)  # ~1 s: pay it before the first call, not during it
        await super().start()
        log.info("engine.started", url=self.url)
