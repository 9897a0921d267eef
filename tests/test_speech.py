"""The offline speech models on phone audio: codec, VAD, the domain language model, recognition and synthesis."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import pytest

from callbridge.engine.speech import (
    FRAME_BYTES,
    LanguageModel,
    PhoneVad,
    Recognizer,
    Synthesizer,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
    words_of,
)
from callbridge.telephony import g711 as audio

pytestmark = [pytest.mark.slow]

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "today", "tomorrow")
PARTS = ("morning", "afternoon", "evening")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")

# What an appointment-booking agent expects callers to say (the engine builds its model from such phrases).
BOOKING = (
    "i'd like to book an appointment",
    "i want to make an appointment",
    "can i book an appointment",
    "i need to schedule a visit",
    "book me in please",
)
HOURS = ("what are your opening hours", "when are you open", "what time do you close")
YES_NO = ("yes", "yes please", "yeah that's fine", "that works", "sounds good", "no", "no thank you", "not really")
GOODBYE = ("goodbye", "bye", "thank you goodbye", "thanks bye", "that's all thank you")
FILLERS = ("please", "thank you", "sorry", "actually", "um")

# The caller's lines, spoken more slowly than the agent's voice, each a turn of one call.
CALLER_LINES = (
    "Hi, I'd like to book an appointment please.",
    "Tuesday afternoon at three please.",
    "Actually, what are your opening hours?",
    "Yes please, that works.",
    "No thank you, goodbye.",
)
CALLER_LENGTH_SCALE = 1.1


def domain_phrases() -> list[str]:
    times = [*NUMBERS, *(f"{n} o'clock" for n in NUMBERS), *(f"{n} thirty" for n in NUMBERS)]
    times += [f"half past {n}" for n in NUMBERS] + [f"{n} pm" for n in NUMBERS] + [f"{n} am" for n in NUMBERS]
    phrases = [*BOOKING, *HOURS, *YES_NO, *GOODBYE, *FILLERS]
    for day in DAYS:
        phrases += [day, f"next {day}", f"are you open on {day}"]
        phrases += [f"{day} {part}" for part in PARTS] + [f"{day} at {time}" for time in times]
        phrases += [f"{day} {part} at {time}" for part in PARTS for time in times]
    return phrases + [f"at {time} please" for time in times]


@pytest.fixture(scope="module")
def synthesizer() -> Synthesizer:
    return Synthesizer()


@pytest.fixture(scope="module")
def language_model() -> Iterator[LanguageModel]:
    model = LanguageModel.from_phrases(domain_phrases())
    yield model
    model.close()


@pytest.fixture(scope="module")
def caller_audio() -> list[bytes]:
    voice = Synthesizer(length_scale=CALLER_LENGTH_SCALE)
    return [b"".join(voice.synthesize(line)) for line in CALLER_LINES]


def frames(ulaw: bytes) -> list[bytes]:
    return [ulaw[i : i + FRAME_BYTES] for i in range(0, len(ulaw) - FRAME_BYTES + 1, FRAME_BYTES)]


def on_a_noisy_line(speech: bytes, dbfs: float, pad_ms: int) -> bytes:
    """Speech with pad_ms of line noise either side, and the noise under it too."""
    pad = np.zeros(pad_ms * 8)
    signal = np.concatenate([pad, ulaw_to_pcm16(speech), pad])
    signal += np.random.default_rng(7).standard_normal(len(signal)) * 32768 * 10 ** (dbfs / 20)
    return pcm16_to_ulaw(np.clip(signal, -32768, 32767).astype(np.int16))


def test_codec_is_bit_exact_with_g711() -> None:
    assert ulaw_to_pcm16(bytes(range(256))).tolist() == list(audio.DECODE_TABLE)
    every_sample = np.arange(-32768, 32768, dtype=np.int16)
    assert pcm16_to_ulaw(every_sample) == audio.pcm16_to_ulaw(every_sample.tolist())


def test_vad_hears_speech_not_silence(caller_audio: list[bytes]) -> None:
    vad = PhoneVad()
    assert not any(vad.is_speech(frame) for frame in frames(audio.silence(1000)))
    speech = [vad.is_speech(frame) for line in caller_audio for frame in frames(line)]
    assert sum(speech) > 0.6 * len(speech)
    assert not any(vad.is_speech(frame) for frame in frames(audio.silence(1000)))


def test_vad_hears_speech_not_line_noise(caller_audio: list[bytes]) -> None:
    vad = PhoneVad()
    line = [vad.is_speech(frame) for frame in frames(on_a_noisy_line(caller_audio[0], dbfs=-50, pad_ms=3000))]
    before, speech, after = line[:150], line[150:-150], line[-150:]
    assert not any(before[5:])  # webrtcvad settles on the line's noise within its first frames
    assert sum(speech) > 0.6 * len(speech)
    assert not any(after)


def test_vad_takes_20_ms_frames_only() -> None:
    with pytest.raises(ValueError, match="160"):
        PhoneVad().is_speech(audio.silence(10))


def test_language_model_keeps_known_words_and_reports_the_rest() -> None:
    model = LanguageModel.from_phrases(["Book me in, PLEASE!", "I'd like Zorblax at three o'clock."])
    assert model.unknown_words == ["zorblax"]
    assert model.vocabulary == sorted(["book", "me", "in", "please", "i'd", "like", "at", "three", "o'clock"])
    assert "zorblax" not in model.arpa_path.read_text()
    assert model.dict_path.read_text().count("\n") >= len(model.vocabulary)
    directory = model.arpa_path.parent
    model.close()
    assert not directory.exists()
    with pytest.raises(ValueError, match="no phrase"):
        LanguageModel.from_phrases(["zorblax", "!"])


def read_arpa(path: Path) -> dict[tuple[str, ...], tuple[float, float]]:
    """Every n-gram of an ARPA file → (log10 probability, log10 backoff weight)."""
    grams: dict[tuple[str, ...], tuple[float, float]] = {}
    order = 0
    for line in path.read_text().splitlines():
        if line.endswith("-grams:"):
            order = int(line[1])
        elif order and line and not line.startswith("\\"):
            fields = line.split("\t")
            grams[tuple(fields[1].split())] = (float(fields[0]), float(fields[2]) if len(fields) > 2 else 0.0)
    return grams


def test_language_model_is_a_distribution_after_every_history() -> None:
    model = LanguageModel.from_phrases(["book me in please", "tuesday at three please", "at three", "yes please"])
    grams = read_arpa(model.arpa_path)

    def probability(history: tuple[str, ...], word: str) -> float:
        if (*history, word) in grams:
            return 10 ** grams[(*history, word)][0]
        weight = 10 ** grams[history][1] if history in grams else 1.0
        return weight * probability(history[1:], word)

    histories = [()] + [gram for gram in grams if len(gram) < 3 and gram[-1] != "</s>"]
    for history in histories:
        total = sum(probability(history, word) for word in [*model.vocabulary, "</s>"])
        assert math.isclose(total, 1.0, abs_tol=1e-4), (history, total)


def word_error_rate(hypotheses: list[str]) -> float:
    references = [" ".join(words_of(line)) for line in CALLER_LINES]
    return float(jiwer.wer(references, [" ".join(words_of(hypothesis)) for hypothesis in hypotheses]))


def test_recognizer_understands_a_call(language_model: LanguageModel, caller_audio: list[bytes]) -> None:
    recognizer = Recognizer(language_model)  # one decoder for the whole call, as the engine uses it
    hypotheses = [recognizer.transcribe(line) for line in caller_audio]
    assert word_error_rate(hypotheses) <= 0.20, hypotheses
    assert all(hypothesis == hypothesis.lower() for hypothesis in hypotheses)


def test_recognizer_ignores_the_quiet_around_a_turn(language_model: LanguageModel, caller_audio: list[bytes]) -> None:
    recognizer = Recognizer(language_model)
    hypotheses = [recognizer.transcribe(audio.silence(2000) + line + audio.silence(500)) for line in caller_audio]
    assert word_error_rate(hypotheses) <= 0.20, hypotheses


def test_recognizer_hears_nothing_in_silence(language_model: LanguageModel) -> None:
    recognizer = Recognizer(language_model)
    assert recognizer.transcribe(audio.silence(1000)) == ""
    assert recognizer.transcribe(b"") == ""


class CountingSession:
    """Counts the voice model's runs: one per sentence."""

    def __init__(self, session: Any) -> None:
        self.session, self.runs = session, 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.runs += 1
        return self.session.run(*args, **kwargs)


def test_synthesizer_streams_a_chunk_per_sentence(synthesizer: Synthesizer, monkeypatch: pytest.MonkeyPatch) -> None:
    session = CountingSession(synthesizer._voice.session)
    monkeypatch.setattr(synthesizer._voice, "session", session)
    chunks = synthesizer.synthesize("Sure. Your appointment is booked for Tuesday at three in the afternoon.")
    first = next(chunks)
    assert session.runs == 1  # the first sentence arrives before the second is synthesized
    rest = list(chunks)
    assert session.runs == 2 and len(rest) == 1
    assert 0.2 < len(first) / audio.SAMPLE_RATE < 1.5 < len(rest[0]) / audio.SAMPLE_RATE < 6  # 8 kHz, 1 byte a sample


def test_synthesizer_serves_several_threads(synthesizer: Synthesizer) -> None:
    results: list[list[bytes]] = [[], [], []]

    def speak(index: int) -> None:
        results[index] = list(synthesizer.synthesize("Thanks for calling. Goodbye!"))

    threads = [threading.Thread(target=speak, args=(index,)) for index in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(chunks) == 2 and all(chunks) for chunks in results)
