"""Slack's HTTP mode: the ``POST /slack/events`` endpoint that hands verified requests to bolt.

Without ``SLACK_APP_TOKEN`` the Slack adapter listens here (port ``SLACK_PORT``) for Events API
callbacks, interactivity payloads and slash commands. Strangers can reach this endpoint, so
every refusal is a 4xx with a JSON error and one warning, never a 5xx or a traceback: the
body's size is checked before it is read, its signature (:mod:`adapters.slack_signature`) over
the raw bytes next, and only a request known to come from Slack is decoded and given to bolt.
While the adapter stops, every request is answered 503, so Slack delivers it again (to another
instance).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest

from adapters.routing import EventTasks
from adapters.slack_signature import SLACK_CONTENT_TYPES, SlackSignatureVerifier
from bot.config import ConfigurationError

logger = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SlackHttpEndpoint:
    """Serves :data:`EVENTS_PATH` for one bolt app, refusing requests once ``tasks`` is closed."""

    def __init__(self, *, app: AsyncApp, tasks: EventTasks, signing_secret: str) -> None:
        """``signing_secret`` is the app's ``SLACK_SIGNING_SECRET``.

        Raises:
            ValueError: ``signing_secret`` is empty (nothing could be verified then).
        """
        self.app = app
        self.tasks = tasks
        # Bolt's own verification is off (see SlackAdapter): this one runs before bolt parses
        # the body, so that a stranger's malformed body gets 401, not 400.
        self._verifier = SlackSignatureVerifier(signing_secret)
        self._runner: web.AppRunner | None = None

    async def start(self, *, host: str, port: int) -> int:
        """Listen on ``host``:``port`` (0: any free port); returns the bound port.

        Raises:
            ConfigurationError: the address cannot be listened on.
        """
        server = web.Application(middlewares=[self._refuse_while_stopping()])
        server.router.add_post(EVENTS_PATH, self.serve)
        runner = web.AppRunner(server, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise ConfigurationError(
                f"cannot listen on {host}:{port} (SLACK_PORT): {error}"
            ) from None
        self._runner = runner
        bound: int = runner.addresses[0][1]
        return bound

    async def close(self) -> None:
        """Stop listening (a no-op when not listening)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _refuse_while_stopping(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        tasks = self.tasks

        @web.middleware
        async def refuse_while_stopping(
            request: web.Request, handler: _Handler
        ) -> web.StreamResponse:
            if not tasks.accepting:
                logger.warning("Slack: stopping, so a request was answered 503 (Slack retries)")
                return web.json_response(
                    {"error": "shutting down"}, status=503, headers={"Retry-After": "1"}
                )
            return await handler(request)

        return refuse_while_stopping

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """One request to :data:`EVENTS_PATH`: checked (see the module docstring), then
        dispatched to bolt, whose listeners acknowledge at once."""
        limit = request.client_max_size  # aiohttp's body limit (0: none)
        declared = request.content_length
        raw: bytes | None = None
        if not (limit and declared is not None and declared > limit):
            # Without a Content-Length, read() itself stops once the body outgrows the limit.
            with contextlib.suppress(web.HTTPRequestEntityTooLarge):
                raw = await request.read()
        if raw is None:
            logger.warning("Slack: refused a request body over %s bytes", limit)
            too_large = web.json_response(
                {"error": f"request body too large (the limit is {limit} bytes)"}, status=413
            )
            # The rest of the body is not wanted: close instead of reading it to reuse the line.
            too_large.force_close()
            return too_large
        # Over the raw bytes, before anything decodes them; see adapters/slack_signature.py
        # for why slack_sdk's SignatureVerifier is not used here.
        if not self._verifier.is_valid_request(body=raw, headers=request.headers):
            logger.warning("Slack: rejected a request with a bad or stale signature")
            return web.json_response({"error": "invalid signature"}, status=401)
        if not raw:
            logger.warning("Slack: ignored a signed request with an empty body")
            return web.json_response({"error": "empty body"}, status=400)
        if request.content_type not in SLACK_CONTENT_TYPES:
            logger.warning("Slack: ignored a request of content type %.80r", request.content_type)
            return web.json_response({"error": "unsupported content type"}, status=415)
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("Slack: ignored a request body that is not UTF-8")
            return web.json_response({"error": "body is not UTF-8"}, status=400)
        try:
            bolt_request = AsyncBoltRequest(
                body=body,
                query=request.query_string,
                headers={key.lower(): value for key, value in request.headers.items()},
            )
        # Bolt assumes a JSON object: malformed JSON raises ValueError, and any other JSON value
        # (a list, null, a number) an AttributeError or TypeError while it reads the payload.
        except (ValueError, AttributeError, TypeError) as error:
            logger.warning("Slack: ignored a malformed request body: %.200s", error)
            return web.json_response({"error": "malformed body"}, status=400)
        retry = request.headers.get("X-Slack-Retry-Num")
        if retry is not None:
            # Only logged, never parsed: the pipeline dedupes on the event id. %r with a cap keeps
            # a huge or non-UTF-8 value (a lone surrogate once decoded) safe for any log sink.
            logger.info(
                "Slack: retry %.20r of an event (%.60r)",
                retry,
                request.headers.get("X-Slack-Retry-Reason"),
            )
        return await to_aiohttp_response(await self.app.async_dispatch(bolt_request))
