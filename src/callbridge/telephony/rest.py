"""Twilio's REST API, through the official package's async client."""

from __future__ import annotations

from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client


class TwilioCalls:
    """Call control over REST: what the media stream cannot do by itself."""

    def __init__(self, account_sid: str, auth_token: str) -> None:
        self._client = Client(account_sid, auth_token, http_client=AsyncTwilioHttpClient())

    async def hang_up(self, call_sid: str) -> None:
        await self._client.calls(call_sid).update_async(status="completed")
