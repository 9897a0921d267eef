"""Running the service: uvicorn, with callbridge's drain on SIGTERM, in one process or several.

uvicorn answers SIGTERM by closing every open WebSocket with code 1012 before the application hears of it, which
would cut every live call off mid-sentence on each deploy. :class:`DrainingServer` takes the signal first: the
application drains (no new calls, live calls go on up to ``CALLBRIDGE_DRAIN_SECONDS``, the rest get the fallback),
and only then is uvicorn told to stop. A second signal stops at once.

With ``--workers N`` each worker is a process of its own listening on the same port (``SO_REUSEPORT``: the kernel
spreads new connections across them); the parent passes signals on and replaces a worker that dies.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, Protocol, cast

import structlog
import uvicorn

from callbridge.config import Settings
from callbridge.observability.logs import configure_logging
from callbridge.transport.router import websocket_router

log = structlog.stdlib.get_logger("callbridge.server")
STARTUP_FAILURE = 3
"""Exit code of a process whose application could not start (as uvicorn's own)."""
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
"""A worker that dies after it started is replaced, up to this many times in this window; then the service stops
(with :data:`STARTUP_FAILURE`): something is wrong that restarting will not fix. A worker that dies before its
application started stops the service at once."""


class ServedApp(Protocol):
    """An ASGI application whose ``state`` holds ``media_stream`` (a
    :class:`~callbridge.transport.router.MediaStreamEndpoint`) and ``drain`` (an async callable): what
    :func:`callbridge.api.app.create_app` builds."""

    state: Any

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...


AppFactory = Callable[[Settings], ServedApp]
"""Builds the application from the settings (a module-level function: worker processes are spawned)."""


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains the calls before the server stops."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain_calls = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What startup made (modules, the app, the store) lives as long as the process. Frozen, it is out of the
        # cyclic collector's sight: a full collection then scans only what calls have made since, instead of
        # stopping every call's audio for the ~70 ms it took to scan the whole heap at 100 calls.
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # a second signal, or nothing to drain yet: stop now
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        try:
            await self._drain_calls()
        except Exception as exc:  # the process must still stop
            log.error("drain.failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.should_exit = True


def uvicorn_config(app: ServedApp, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for callbridge's app: the media stream on picows, everything else on ASGI."""
    return uvicorn.Config(
        app,
        log_config=None,
        ws=cast(Any, websocket_router(app.state.media_stream)),  # uvicorn calls it as it would a protocol class
        proxy_headers=True,
        **options,
    )


def run_worker(create_app: AppFactory, host: str, port: int, reuse_port: bool = False) -> None:
    """One serving process: builds the app from the environment and serves until drained."""
    if reuse_port:
        # A worker of ``run_workers``: out of the terminal's process group, so a Ctrl-C reaches only the parent,
        # which passes it on once (a worker that got it twice would stop at once instead of draining).
        os.setpgrp()

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        app = create_app(settings)
    except Exception as exc:  # it would fail the same way when started again: say so by the exit code
        log.error("worker.start_failed", error=f"{type(exc).__name__}: {exc}")
        raise SystemExit(STARTUP_FAILURE) from None
    server = DrainingServer(uvicorn_config(app, host=host, port=port), app.state.drain)
    if reuse_port:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        server.run(sockets=[sock])
    else:
        server.run()
    if not server.started:  # the application could not start (database, configuration): say so by the exit code
        raise SystemExit(STARTUP_FAILURE)


def run_workers(create_app: AppFactory, host: str, port: int, workers: int) -> None:
    """``workers`` serving processes on one port; signals go to all of them, a dead one is replaced (one that
    cannot start stops them all: it would fail the same way again)."""
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> BaseProcess:
        process = context.Process(target=run_worker, args=(create_app, host, port, True), daemon=False)
        process.start()
        return process

    processes = [start() for _ in range(workers)]
    deaths: deque[float] = deque()  # when workers died lately, to give up on a service that keeps dying

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        for index, process in enumerate(processes):
            process.join(timeout=0.2)
            if process.exitcode is not None and not stopping:
                log.error("worker.died", pid=process.pid, exitcode=process.exitcode)
                deaths.append(time.monotonic())
                while deaths and deaths[0] < deaths[-1] - RESTART_WINDOW_S:
                    deaths.popleft()
                if process.exitcode == STARTUP_FAILURE or len(deaths) > MAX_RESTARTS:
                    log.error("workers.giving_up", exitcode=process.exitcode, deaths_in_window=len(deaths))
                    forward(signal.SIGTERM, None)
                    raise SystemExit(STARTUP_FAILURE)
                time.sleep(1)
                processes[index] = start()
        if stopping and all(process.exitcode is not None for process in processes):
            return
