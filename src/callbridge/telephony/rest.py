"""Call control over Twilio's REST API, through the official package's async client."""

from __future__ import annotations

import asyncio
from datetime import datetime

from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

__all__ = ["MAX_TWIML_CHARS", "TwilioCalls", "TwilioRestException"]

MAX_TWIML_CHARS = 4000
"""The longest ``Twiml`` parameter Twilio accepts (error 32018)."""
_CALL_ENDED = 21220  # "Call is not in-progress. Cannot redirect.": the answer to updating a call that has ended


class TwilioCalls:
    """Create, redirect and hang up calls: what the media stream cannot do by itself.

    Twilio's errors raise :class:`TwilioRestException` (``status``, ``code``, ``msg``); a request that takes longer
    than ``timeout`` seconds raises :class:`TimeoutError` (the package's async client sets no timeout of its own).
    ``api_base_url`` (for tests, e.g. ``http://127.0.0.1:8081``) replaces ``https://api.twilio.com`` in every
    request, which is otherwise exactly what the official client sends.
    """

    def __init__(
        self, account_sid: str, auth_token: str, *, api_base_url: str | None = None, timeout: float = 10.0
    ) -> None:
        self._account_sid = account_sid
        self._auth_token = auth_token
        self._api_base_url = api_base_url
        self._timeout = timeout
        self._client: Client | None = None

    def _twilio(self) -> Client:
        # Created on first use: the client's aiohttp session needs the running event loop, and this object is
        # built before the server's loop starts.
        if self._client is None:
            self._client = Client(self._account_sid, self._auth_token, http_client=AsyncTwilioHttpClient())
            if self._api_base_url is not None:
                self._client.api.base_url = self._api_base_url
                # TWILIO_EDGE / TWILIO_REGION would rewrite the host again.
                self._client.edge = self._client.region = None
        return self._client

    async def create(
        self,
        *,
        to: str,
        from_: str,
        twiml: str,
        status_callback: str | None = None,
        status_callback_event: list[str] | None = None,
        machine_detection: str | None = None,
        amd_callback: str | None = None,
        time_limit: int | None = None,
    ) -> str:
        """Place an outbound call that runs ``twiml``; returns its call SID.

        ``amd_callback`` makes answering-machine detection asynchronous: the call connects at once and the verdict
        is POSTed there (``AsyncAmd``, ``AsyncAmdStatusCallback``), so that a person who answers never waits in
        silence for it.
        """
        _check_twiml(twiml)
        async with asyncio.timeout(self._timeout):
            call = await self._twilio().calls.create_async(
                to=to,
                from_=from_,
                twiml=twiml,
                status_callback=status_callback,
                status_callback_event=status_callback_event,
                machine_detection=machine_detection,
                async_amd="true" if amd_callback else None,
                async_amd_status_callback=amd_callback,
                time_limit=time_limit,
            )
        sid: str = call.sid
        return sid

    async def fetch(self, call_sid: str) -> tuple[str, str | None]:
        """The call's status and, when answering-machine detection ran, its verdict (``answered_by``)."""
        async with asyncio.timeout(self._timeout):
            call = await self._twilio().calls(call_sid).fetch_async()
        return str(call.status), call.answered_by

    async def created_since(self, *, to: str, from_: str, since: datetime) -> list[str]:
        """SIDs of the calls from ``from_`` to ``to`` created at or after ``since``, newest first."""
        async with asyncio.timeout(self._timeout):
            calls = await self._twilio().calls.list_async(to=to, from_=from_, limit=50)
        return [str(call.sid) for call in calls if call.date_created is not None and call.date_created >= since]

    async def hang_up(self, call_sid: str) -> None:
        """End the call (cancel it if it has not been answered yet). A call that is already over is no error."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._twilio().calls(call_sid).update_async(status="completed")
        except TwilioRestException as exc:
            if exc.status != 404 and exc.code != _CALL_ENDED:
                raise

    async def redirect(self, call_sid: str, twiml: str) -> None:
        """Replace what the call is doing with ``twiml``; a ``<Connect><Stream>`` on it ends."""
        _check_twiml(twiml)
        async with asyncio.timeout(self._timeout):
            await self._twilio().calls(call_sid).update_async(twiml=twiml)

    async def aclose(self) -> None:
        """Close the HTTP session. The object stays usable: the next request opens a new one."""
        client, self._client = self._client, None
        if client is not None:
            await client.http_client.close()


def _check_twiml(twiml: str) -> None:
    if len(twiml) > MAX_TWIML_CHARS:
        raise ValueError(f"TwiML is {len(twiml)} characters; Twilio accepts at most {MAX_TWIML_CHARS} (error 32018)")
