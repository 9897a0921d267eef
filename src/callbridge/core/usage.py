"""Token usage of a call: what the model reported in each ``response.done``, summed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenUsage:
    """Tokens billed for one call, by kind.

    ``input_text + input_audio`` is every input token; ``input_cached`` is the part of those served from the
    prompt cache (billed at a lower rate), not an addition to them. ``output_text + output_audio`` is every output
    token.
    """

    input_text: int = 0
    input_audio: int = 0
    input_cached: int = 0
    output_text: int = 0
    output_audio: int = 0
    responses: int = 0
    """Responses whose usage was counted."""

    KINDS = ("input_text", "input_audio", "input_cached", "output_text", "output_audio")

    @property
    def input_tokens(self) -> int:
        return self.input_text + self.input_audio

    @property
    def output_tokens(self) -> int:
        return self.output_text + self.output_audio

    def add(self, other: TokenUsage) -> None:
        for name in (*self.KINDS, "responses"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_record(self) -> dict[str, int]:
        """The shape kept on the call record and returned by the API as ``usage``."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            **{f"{kind}_tokens": getattr(self, kind) for kind in self.KINDS},
            "responses": self.responses,
        }

    def by_kind(self) -> dict[str, int]:
        """The counts behind ``callbridge_tokens_total{kind}``."""
        return {kind: getattr(self, kind) for kind in self.KINDS}
