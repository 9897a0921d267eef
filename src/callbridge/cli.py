"""The ``callbridge`` command line."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from callbridge.config import Settings
from callbridge.logs import configure_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Put a speech-to-speech AI agent on the phone.")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
) -> None:
    """Run the service: Twilio webhook, media-stream WebSocket, health."""
    import uvicorn

    from callbridge.api.app import create_app

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        ws_max_size=settings.max_message_bytes,
        proxy_headers=True,
    )


@app.command()
def simulate(
    url: Annotated[str, typer.Option(help="Base URL of a running callbridge, e.g. http://127.0.0.1:8080.")],
    wav: Annotated[Path | None, typer.Option(help="8 kHz mono WAV the caller speaks (PCM16 or μ-law).")] = None,
    public_url: Annotated[
        str | None,
        typer.Option(help="The server's CALLBRIDGE_PUBLIC_URL, if not --url (signatures cover it)."),
    ] = None,
    seconds: Annotated[float, typer.Option(help="Hang up after this many seconds.")] = 20.0,
    save: Annotated[Path | None, typer.Option(help="Write a stereo WAV (caller left, agent right) here.")] = None,
) -> None:
    """Place a simulated Twilio call against a running callbridge (signed like Twilio's)."""
    from callbridge.demo import run_simulation

    settings = Settings()
    configure_logging(settings.log_format, "warning")
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    if not token:
        raise typer.BadParameter("set TWILIO_AUTH_TOKEN to the server's token: the caller signs like Twilio")
    ok = asyncio.run(run_simulation(url, token, public_url=public_url, wav=wav, seconds=seconds, save=save))
    raise typer.Exit(0 if ok else 1)


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Folder for the call's WAV and transcript.")] = Path("callbridge-demo"),
    script: Annotated[
        Path | None, typer.Option(help="Caller lines, one per line; a line starting with '>' barges in.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """A whole phone call, offline: the bridge, the local engine and a simulated caller with a real voice."""
    import json

    from callbridge.demo import DEFAULT_SCRIPT, run_demo

    configure_logging("console", "error")
    text = script.read_text() if script else DEFAULT_SCRIPT
    summary = asyncio.run(run_demo(output, script=text, json_output=json_output))
    if json_output:
        print(json.dumps(summary))
    raise typer.Exit(0 if summary["ok"] else 1)


@app.command()
def engine(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 9001,
) -> None:
    """Run the offline Realtime-compatible engine on its own (ws://HOST:PORT/v1/realtime)."""
    from callbridge.engine.agent import LocalEngine

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)

    async def run() -> None:
        async with LocalEngine(host=host, port=port):
            await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":  # pragma: no cover
    app()
