"""Who gets in and which requests act, over real HTTP on loopback (aiohttp as the client):
wrong tokens are refused and rate-limited, a login link works once, forged cross-site and
token-less POSTs change nothing, and every page and file needs a session."""

from __future__ import annotations

import io
import re
import zipfile

import aiohttp

from bot.dashboard.auth import COOKIE, FAILURES_ALLOWED
from tests.dashboard.conftest import TOKEN, Running

PAGES = ["/", "/conversations", "/conversations/1", "/review", "/training", "/data"]


async def logged_in(running: Running) -> tuple[aiohttp.ClientSession, str]:
    """A client with a session, and the CSRF token of its forms."""
    client = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with client.post(f"{running.address}/login", data={"token": TOKEN}) as response:
        assert response.status == 200 and response.url.path == "/"
    async with client.get(f"{running.address}/review") as response:
        page = await response.text()
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the review page has a CSRF field"
    return client, match.group(1)


async def test_wrong_tokens_are_refused_then_rate_limited(running: Running) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        for _ in range(FAILURES_ALLOWED):
            async with client.post(f"{running.address}/login", data={"token": "guess"}) as r:
                assert r.status == 401
                assert "That token is not right." in await r.text()
        # Now even the right token waits: the limit is per client address.
        async with client.post(f"{running.address}/login", data={"token": TOKEN}) as r:
            assert r.status == 429
            assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert not [c for c in client.cookie_jar if c.key == COOKIE]


async def test_a_login_link_works_once(running: Running) -> None:
    link = running.dashboard.login_link(running.address)
    assert re.fullmatch(rf"{running.address}/login\?code=[\w-]+", link)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        async with client.get(link, allow_redirects=False) as response:
            assert response.status == 303
            cookie = response.cookies[COOKIE]
            assert cookie["httponly"] and cookie["samesite"].lower() == "strict"
        async with client.get(f"{running.address}/") as response:
            assert response.status == 200 and "Overview" in await response.text()
    async with aiohttp.ClientSession() as stranger, stranger.get(link) as response:
        assert response.status == 401  # spent


async def test_pages_and_files_need_a_session(running: Running) -> None:
    async with aiohttp.ClientSession() as client:
        for page in PAGES:
            async with client.get(f"{running.address}{page}", allow_redirects=False) as r:
                assert (r.status, r.headers["Location"]) == (303, "/login"), page
        for path in ["/training/versions/1/loss.png", "/data/shards/x.zip"]:
            async with client.get(f"{running.address}{path}") as r:
                assert r.status == 403, path
        # A forged cookie is no session.
        forged = {COOKIE: "abc.1700000000.c2lnbmF0dXJl"}
        async with client.get(f"{running.address}/", cookies=forged, allow_redirects=False) as r:
            assert r.status == 303


async def test_every_page_renders_for_an_admin(running: Running) -> None:
    client, _csrf = await logged_in(running)
    async with client:
        for page in PAGES:
            async with client.get(f"{running.address}{page}") as response:
                assert response.status == 200, page
                assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        async with client.get(f"{running.address}/training/versions/1/loss.png") as response:
            assert response.status == 200
            assert (await response.read()).startswith(b"\x89PNG")
        async with client.get(f"{running.address}/static/htmx.min.js") as response:
            assert response.status == 200 and "htmx" in await response.text()


async def test_forged_posts_change_nothing(running: Running) -> None:
    first = running.exchanges()[0]
    approve = f"{running.address}/review/{first.id}/approve"
    client, csrf = await logged_in(running)
    async with client:
        # Another site's page posting with the admin's cookie: refused by its Origin.
        headers = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
        async with client.post(
            approve, data={"csrf": csrf}, headers=headers, allow_redirects=False
        ) as r:
            assert r.status == 403
        async with client.post(
            approve, data={}, headers={"Origin": "http://evil.example"}, allow_redirects=False
        ) as r:
            assert r.status == 403
        # Same origin but without the session's CSRF token (or with another's).
        for data in ({}, {"csrf": "not-the-token"}):
            async with client.post(approve, data=data, allow_redirects=False) as r:
                assert r.status == 403
        assert running.verdicts() == {}
        # The same request from the dashboard's own form goes through.
        origin = {"Origin": running.address}
        async with client.post(
            approve, data={"csrf": csrf}, headers=origin, allow_redirects=False
        ) as r:
            assert r.status == 303
        assert running.verdicts() == {first.id: "approved"}


async def test_a_shard_downloads_as_a_zip(running: Running) -> None:
    client, csrf = await logged_in(running)
    async with client:
        # Approve everything, then export through the same command the chat has.
        for exchange in running.exchanges():
            async with client.post(
                f"{running.address}/review/{exchange.id}/approve", data={"csrf": csrf}
            ) as r:
                assert r.status == 200
        text = await running.dashboard.actions.commands.run(
            running.dashboard.actions.request("export")
        )
        assert "shard" in text.lower(), text
        async with client.get(f"{running.address}/data") as r:
            page = await r.text()
        name = re.search(r'href="/data/shards/([\w.-]+)\.zip"', page)
        assert name, page
        async with client.get(f"{running.address}/data/shards/{name.group(1)}.zip") as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/zip"
            archive = zipfile.ZipFile(io.BytesIO(await r.read()))
        names = archive.namelist()
        assert names and all(n.startswith(f"{name.group(1)}/") for n in names)
        async with client.get(f"{running.address}/data/shards/..%2F..%2Fetc.zip") as r:
            assert r.status == 404
