"""The dashboard's routes: pages (GET) and the forms that act (POST, then a redirect back).

Every page needs a session; every POST also needs the session's CSRF token and a same-origin
browser (``Origin`` / ``Sec-Fetch-Site``). Responses carry a strict Content-Security-Policy:
scripts only from this server (the vendored htmx and a few lines of keyboard shortcuts).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    RedirectResponse,
    Response,
)
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.background import BackgroundTask

from bot.dashboard import pages
from bot.dashboard.actions import DashboardActions
from bot.dashboard.auth import COOKIE, SESSION_SECONDS, DashboardAuth, Session, same_origin_request
from bot.storage import export_shards

logger = logging.getLogger(__name__)

STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}
#: The loss curve the retrain writes beside each version (model.train.LOSS_CURVE).
LOSS_CURVE = "loss.png"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class DashboardRouter(APIRouter):
    """The dashboard's routes, with the dashboard they serve (to print its login link)."""

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self.dashboard = dashboard


class Dashboard:
    """The dashboard: what it reads (``sources``), who may use it (``auth``) and what its
    buttons do (``actions``). :meth:`router` gives the routes for the bot's web server."""

    def __init__(
        self,
        *,
        sources: pages.DashboardSources,
        auth: DashboardAuth,
        actions: DashboardActions,
        secure_cookie: bool = False,
    ) -> None:
        """``secure_cookie``: mark the session cookie Secure (served behind HTTPS)."""
        self.sources = sources
        self.auth = auth
        self.actions = actions
        self.secure_cookie = secure_cookie
        self.templates = Environment(
            loader=PackageLoader("bot.dashboard", "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._flashes: dict[str, list[str]] = {}

    def login_link(self, address: str) -> str:
        """A link that logs in once, within a few minutes: printed when the bot starts."""
        return f"{address.rstrip('/')}/login?code={self.auth.issue_login_code()}"

    # --- helpers for the routes ----------------------------------------------------------------

    def session_of(self, request: Request) -> Session | None:
        return self.auth.session_from_cookie(request.cookies.get(COOKIE))

    def render(
        self,
        request: Request,
        name: str,
        session: Session | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        flashes = self._flashes.pop(session.nonce, []) if session else []
        html = self.templates.get_template(name).render(
            request=request,
            path=request.url.path,
            csrf=session.csrf_token if session else "",
            flashes=flashes,
            **context,
        )
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def flash(self, session: Session, text: str) -> None:
        messages = self._flashes.setdefault(session.nonce, [])
        messages.append(text)
        del messages[:-5]
        if len(self._flashes) > 1000:  # sessions that never came back
            self._flashes.pop(next(iter(self._flashes)))

    async def checked_post(self, request: Request) -> Session:
        """The session of a state-changing POST, after the CSRF checks; 403 otherwise."""
        if not same_origin_request(
            host=request.headers.get("host", ""),
            origin=request.headers.get("origin"),
            fetch_site=request.headers.get("sec-fetch-site"),
        ):
            logger.warning("refused a cross-site POST to %s", request.url.path)
            raise HTTPException(status_code=403, detail="cross-site request refused")
        session = self.session_of(request)
        if session is None:
            raise HTTPException(status_code=403, detail="log in first")
        form = await request.form()
        token = form.get("csrf")
        if not isinstance(token, str) or not self.auth.csrf_matches(session, token):
            logger.warning("refused a POST to %s without a valid CSRF token", request.url.path)
            raise HTTPException(status_code=403, detail="invalid CSRF token")
        return session

    def log_in(self, target: str) -> Response:
        _session, cookie = self.auth.new_session()
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=self.secure_cookie,
            path="/",
        )
        return response

    # --- the routes ----------------------------------------------------------------------------

    def router(self) -> DashboardRouter:
        router = DashboardRouter(self)
        _auth_routes(self, router)
        _page_routes(self, router)
        _action_routes(self, router)
        _file_routes(self, router)
        return router


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _auth_routes(dashboard: Dashboard, router: APIRouter) -> None:
    auth = dashboard.auth

    def refused(request: Request, wait: int) -> HTMLResponse:
        response = dashboard.render(
            request, "login.html", None, status=429, error=f"Too many tries: wait {wait} s."
        )
        response.headers["Retry-After"] = str(wait)
        return response

    @router.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request, code: str = "") -> Response:
        client = _client(request)
        if code:
            wait = auth.retry_after(client)
            if wait:
                return refused(request, wait)
            if auth.redeem_login_code(code):
                logger.warning("dashboard: logged in with a one-time link from %s", client)
                return dashboard.log_in("/")
            auth.record_failure(client)
            return dashboard.render(
                request, "login.html", None, status=401, error="That login link has expired."
            )
        if dashboard.session_of(request) is not None:
            return RedirectResponse("/", status_code=303)
        return dashboard.render(request, "login.html", None)

    @router.post("/login", response_class=HTMLResponse)
    async def login(request: Request, token: str = Form("")) -> Response:
        client = _client(request)
        if not same_origin_request(
            host=request.headers.get("host", ""),
            origin=request.headers.get("origin"),
            fetch_site=request.headers.get("sec-fetch-site"),
        ):
            raise HTTPException(status_code=403, detail="cross-site request refused")
        wait = auth.retry_after(client)
        if wait:
            return refused(request, wait)
        if not auth.token_matches(token):
            auth.record_failure(client)
            logger.warning("dashboard: a wrong token from %s", client)
            return dashboard.render(
                request, "login.html", None, status=401, error="That token is not right."
            )
        logger.warning("dashboard: logged in with the token from %s", client)
        return dashboard.log_in("/")

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        session = await dashboard.checked_post(request)
        auth.log_out(session)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response


def _page_routes(dashboard: Dashboard, router: APIRouter) -> None:
    sources = dashboard.sources

    def page(path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A page that needs a session: without one, the login page."""

        def register(build: Callable[..., Any]) -> Callable[..., Any]:
            async def handler(request: Request) -> Response:
                session = dashboard.session_of(request)
                if session is None:
                    return RedirectResponse("/login", status_code=303)
                result: Response = await build(request, session)
                return result

            handler.__name__ = build.__name__
            router.add_api_route(path, handler, methods=["GET"], response_class=HTMLResponse)
            return build

        return register

    @page("/")
    async def overview(request: Request, session: Session) -> Response:
        view = await pages.overview(sources)
        return dashboard.render(request, "overview.html", session, view=view)

    @page("/conversations")
    async def conversations(request: Request, session: Session) -> Response:
        params = request.query_params
        query = pages.Search(
            text=params.get("text", ""),
            platform=params.get("platform", ""),
            channel=params.get("channel", ""),
            user=params.get("user", ""),
        )
        hits = await pages.search(sources, query)
        return dashboard.render(request, "conversations.html", session, query=query, hits=hits)

    @page("/conversations/{conversation_id}")
    async def conversation(request: Request, session: Session) -> Response:
        conversation_id = _number(request.path_params["conversation_id"])
        messages = await pages.thread(sources, conversation_id)
        if not messages:
            raise HTTPException(status_code=404, detail="no such conversation")
        return dashboard.render(
            request, "thread.html", session, conversation_id=conversation_id, messages=messages
        )

    @page("/review")
    async def review(request: Request, session: Session) -> Response:
        items, total = await pages.review(sources)
        at = _number(request.query_params.get("at", "0"), default=0)
        return dashboard.render(
            request,
            "review.html",
            session,
            items=items,
            total=total,
            at=min(at, max(0, len(items) - 1)),
        )

    @page("/training")
    async def training(request: Request, session: Session) -> Response:
        view = await pages.training(sources)
        return dashboard.render(
            request, "training.html", session, view=view, job=dashboard.actions.retrain_job
        )

    @page("/training/status")
    async def training_status(request: Request, session: Session) -> Response:
        view = await pages.training(sources)
        return dashboard.render(
            request, "_training_status.html", session, view=view, job=dashboard.actions.retrain_job
        )

    @page("/training/confirm")
    async def confirm(request: Request, session: Session) -> Response:
        action = request.query_params.get("action", "")
        number = _number(request.query_params.get("number", "0"), default=0)
        if action not in ("rollback", "use", "promote"):
            raise HTTPException(status_code=404, detail="no such action")
        view = await pages.training(sources)
        return dashboard.render(
            request, "confirm.html", session, action=action, number=number, view=view
        )

    @page("/data")
    async def data(request: Request, session: Session) -> Response:
        view = await pages.privacy(sources)
        return dashboard.render(request, "data.html", session, view=view)


def _number(text: str, *, default: int | None = None) -> int:
    if text.isdigit() and len(text) < 12:
        return int(text)
    if default is not None:
        return default
    raise HTTPException(status_code=404, detail="not found")


def _action_routes(dashboard: Dashboard, router: APIRouter) -> None:
    actions = dashboard.actions

    def back(to: str) -> Response:
        return RedirectResponse(to, status_code=303)

    @router.post("/review/{exchange_id}/{verdict}")
    async def review(request: Request, exchange_id: str, verdict: str) -> Response:
        session = await dashboard.checked_post(request)
        form = await request.form()
        at = _number(str(form.get("at", "0")), default=0)
        number = _number(exchange_id)
        if verdict == "edit":
            answer = str(form.get("answer", "")).strip()
            if not answer:
                dashboard.flash(session, "The corrected answer is empty: nothing was stored.")
                return back(f"/review?at={at}")
            text = await actions.edit(exchange_id=number, answer=answer)
        elif verdict in ("approve", "reject"):
            text = await actions.review(exchange_id=number, verdict=verdict)
        else:
            raise HTTPException(status_code=404, detail="no such verdict")
        dashboard.flash(session, text)
        return back(f"/review?at={at}")

    @router.post("/data/channels")
    async def channel_training(request: Request) -> Response:
        session = await dashboard.checked_post(request)
        form = await request.form()
        platform = str(form.get("platform", "")).strip()
        channel = str(form.get("channel", "")).strip()
        setting = str(form.get("training", ""))
        if not platform or not channel or setting not in ("on", "off"):
            dashboard.flash(session, "Name a platform and a channel, and training on or off.")
            return back("/data")
        text = await actions.set_training(platform=platform, channel=channel, on=setting == "on")
        dashboard.flash(session, f"{platform} {channel}: {text}")
        return back("/data")

    @router.post("/training/retrain")
    async def retrain(request: Request) -> Response:
        session = await dashboard.checked_post(request)
        if actions.start_retrain():
            dashboard.flash(session, "Retrain started; this page follows its progress.")
        else:
            dashboard.flash(session, "The retrain started from here is still running.")
        return back("/training")

    @router.post("/training/{action}")
    async def switch(request: Request, action: str) -> Response:
        session = await dashboard.checked_post(request)
        form = await request.form()
        number = _number(str(form.get("number", "0")), default=0)
        if action not in ("rollback", "use", "promote"):
            raise HTTPException(status_code=404, detail="no such action")
        if form.get("confirmed") != "yes":  # the confirmation step comes first
            return back(f"/training/confirm?action={action}&number={number}")
        if action == "rollback":
            text = await actions.rollback()
        else:
            text = await actions.use_version(number=number)
        dashboard.flash(session, text)
        return back("/training")


def _file_routes(dashboard: Dashboard, router: APIRouter) -> None:
    static = files("bot.dashboard") / "static"
    sources = dashboard.sources

    @router.get("/static/{name}")
    async def static_file(name: str) -> Response:
        resource = static / name
        suffix = Path(name).suffix
        if "/" in name or name.startswith(".") or suffix not in STATIC_TYPES:
            raise HTTPException(status_code=404)
        if not resource.is_file():
            raise HTTPException(status_code=404)
        return Response(
            resource.read_bytes(),
            media_type=STATIC_TYPES[suffix],
            headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    @router.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204, headers={"Cache-Control": "max-age=86400"})

    @router.get("/training/versions/{number}/loss.png")
    async def loss_curve(request: Request, number: str) -> Response:
        if dashboard.session_of(request) is None:
            raise HTTPException(status_code=403, detail="log in first")
        wanted = _number(number)
        found = await asyncio.to_thread(sources.registry.versions)
        version = next((v for v in found if v.number == wanted and v.number > 0), None)
        if version is None or not (version.path / LOSS_CURVE).is_file():
            raise HTTPException(status_code=404)
        return FileResponse(version.path / LOSS_CURVE, media_type="image/png")

    @router.get("/data/shards/{name}.zip")
    async def shard_zip(request: Request, name: str) -> Response:
        if dashboard.session_of(request) is None:
            raise HTTPException(status_code=403, detail="log in first")
        shards = await sources.store.run(export_shards)
        if name not in {shard.name for shard in shards}:
            raise HTTPException(status_code=404, detail="no such shard")
        folder = sources.export_dir / name
        if not folder.is_dir():
            raise HTTPException(status_code=404, detail="the shard's folder is gone")
        path = await asyncio.to_thread(_zip_folder, folder)
        # Streamed from the file in chunks, which is removed once sent.
        return FileResponse(
            path,
            media_type="application/zip",
            filename=f"{name}.zip",
            background=BackgroundTask(path.unlink, missing_ok=True),
        )


def _zip_folder(folder: Path) -> Path:
    """The folder zipped into a temporary file (shards are written once, never changed)."""
    descriptor, name = tempfile.mkstemp(prefix="chatbot-shard-", suffix=".zip")
    with (
        os.fdopen(descriptor, "wb") as handle,
        zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive,
    ):
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{folder.name}/{path.relative_to(folder)}")
    return Path(name)
