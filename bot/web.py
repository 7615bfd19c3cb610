"""The bot process's one HTTP server: ``/healthz``, ``/readyz``, ``/metrics`` and whatever
routers the composition root adds (the dashboard).

A FastAPI app served by uvicorn inside the bot's own event loop, as a task beside the
adapters: no second process, no thread. uvicorn's signal handling is off, so SIGTERM stays
the bot's (bot/cli.py drains the replies in flight, then stops this server).

Usage::

    app = build_web_app(ready=ServiceReadiness(store=store, generator=generator),
                        metrics=metrics, routers=[...])
    server = WebServer(app=app, host="127.0.0.1", port=8080)
    await server.start()        # bound, or WebServerError
    server.address              # "http://127.0.0.1:8080"
    await server.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from sqlmodel import Session

from bot.observability.metrics import Metrics
from bot.storage import StorageError, Store

logger = logging.getLogger(__name__)

#: How long /readyz waits for the database before it calls it unready.
READY_TIMEOUT_SECONDS = 5.0
#: How long a stop waits for open requests (a long scrape, a page) before closing them.
STOP_GRACE_SECONDS = 3


class Readiness(Protocol):
    """Checks what the bot needs to serve: ``{"database": "ok" | why not, "model": ...}``."""

    async def __call__(self) -> dict[str, str]: ...


class WebServerError(Exception):
    """The server cannot start (the address is taken, the host unknown); says which."""


def _database_answers(session: Session) -> None:
    session.connection().exec_driver_sql("SELECT 1")


class ServiceReadiness:
    """Ready when the database answers a ``SELECT 1`` (through the store, within
    :data:`READY_TIMEOUT_SECONDS`) and the model is loaded and takes requests."""

    def __init__(
        self, *, store: Store, generator: Any, timeout: float = READY_TIMEOUT_SECONDS
    ) -> None:
        self.store = store
        self.generator = generator
        self.timeout = timeout

    async def __call__(self) -> dict[str, str]:
        return {"database": await self._database(), "model": self._model()}

    async def _database(self) -> str:
        try:
            await asyncio.wait_for(self.store.run(_database_answers), self.timeout)
        except StorageError as error:
            return str(error)
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        return "ok"

    def _model(self) -> str:
        version = getattr(self.generator, "version", "")
        if not version:
            return "not loaded"
        if not getattr(self.generator, "ready", True):
            return f"{version} is not taking requests (not started, or closing)"
        return "ok"


def build_web_app(
    *,
    ready: Readiness,
    routers: Sequence[APIRouter] = (),
    metrics: Metrics | None = None,
) -> FastAPI:
    """The app: ``/healthz`` (alive), ``/readyz`` (503 with what failed), ``/metrics``
    (Prometheus text; ``metrics`` or an empty registry of its own), all without login, plus
    ``routers``."""
    app = FastAPI(title="chatbot", docs_url=None, redoc_url=None, openapi_url=None)
    scraped = metrics if metrics is not None else Metrics()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = await ready()
        ok = all(value == "ok" for value in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503
        )

    @app.get("/metrics")
    async def metrics_text() -> Response:
        # Off the loop: a scrape may read the database and the model's stats.
        body, content_type = await asyncio.to_thread(scraped.render)
        return Response(content=body, media_type=content_type)

    for router in routers:
        app.include_router(router)
    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the bot's own handle SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebServer:
    """Serves ``app`` on ``host:port`` (port 0: a free one) in the running event loop."""

    def __init__(self, *, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    async def start(self) -> None:
        """Bind and start serving; returns once connections are accepted.

        Raises:
            WebServerError: the address cannot be bound (in use, not this host's).
        """
        if self._task is not None:
            raise RuntimeError("the web server is started already")
        listener = self._bind()
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the bot's logging as configured (text or JSON)
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=STOP_GRACE_SECONDS,
        )
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[listener]), name="web-server")
        while not server.started:
            if task.done():
                listener.close()
                error = task.exception()
                raise WebServerError(f"the web server did not start: {error!r}")
            await asyncio.sleep(0.01)
        self._server, self._task, self._socket = server, task, listener

    def _bind(self) -> socket.socket:
        """The listening socket, bound here so a taken port is one clear error (uvicorn
        would exit the process) and port 0 tells its number."""
        try:
            family, kind, proto, _name, address = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except socket.gaierror as error:
            raise WebServerError(
                f"DASHBOARD_HOST {self.host!r} is not an address of this host: {error}"
            ) from None
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(128)
        except OSError as error:
            listener.close()
            raise WebServerError(
                f"cannot listen on {self.host}:{self.port} ({error.strerror}); set "
                "DASHBOARD_PORT to a free port, 0 for any free one, or -1 to turn the "
                "server off"
            ) from None
        listener.setblocking(False)
        return listener

    @property
    def address(self) -> str:
        """Where it serves, e.g. ``http://127.0.0.1:8080`` (after :meth:`start`)."""
        if self._socket is None:
            raise RuntimeError("the web server is not started")
        host, port = self._socket.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    async def stop(self) -> None:
        """Stop serving: open requests get :data:`STOP_GRACE_SECONDS` to finish."""
        server, task = self._server, self._task
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await task
        finally:
            self._server = self._task = None
            if self._socket is not None:
                self._socket.close()
                self._socket = None
