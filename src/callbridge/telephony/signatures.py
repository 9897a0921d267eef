"""``X-Twilio-Signature`` checks, over the public URL Twilio used (never the one a proxy rewrote)."""

from __future__ import annotations

from collections.abc import Mapping

from twilio.request_validator import RequestValidator


class TwilioSignatures:
    def __init__(self, auth_token: str | None, *, disabled: bool = False) -> None:
        self._validator = RequestValidator(auth_token) if auth_token else None
        self.disabled = disabled

    @property
    def configured(self) -> bool:
        return self._validator is not None

    def valid(self, url: str, params: Mapping[str, str], signature: str | None) -> bool:
        """True only for a correct signature; with no auth token configured nothing is valid.

        ``disabled`` (local development only) accepts everything.
        """
        if self.disabled:
            return True
        if self._validator is None or not signature:
            return False
        return bool(self._validator.validate(url, dict(params), signature))
