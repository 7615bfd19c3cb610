"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright (never a
downloaded browser), against the bot's web server on loopback (see conftest.py). Each action
is checked in the database; screenshots go to test-artifacts/screenshots/, and with
UPDATE_DOCS_SCREENSHOTS set the overview and review-queue ones to docs/ for the README."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from bot.learning.lease import Lease
from bot.retraining import serving_folder
from bot.storage import AnsweredBy
from tests.conftest import IN_CI
from tests.dashboard.conftest import ARTIFACTS, DOCS, TOKEN, Running

CHROMIUM = Path("/usr/bin/chromium")

if not CHROMIUM.exists():  # .ci/run installs it, so CI never skips; elsewhere, say why
    reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if IN_CI:
        raise RuntimeError(f"the dashboard's browser tests need Chromium: {reason}")
    print(f"skipping the dashboard's browser tests: {reason}")
    pytest.skip(reason, allow_module_level=True)

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        await launched.close()


CONSOLE_ERRORS: dict[int, list[str]] = {}


async def new_page(browser: Browser) -> Page:
    """A page in a fresh context (no cookies); its console errors (a script refused by the
    Content-Security-Policy, say) are kept in ``CONSOLE_ERRORS[id(page)]``."""
    context = await browser.new_context(viewport={"width": 1200, "height": 860})
    context.set_default_timeout(15_000)
    page = await context.new_page()
    errors = CONSOLE_ERRORS.setdefault(id(page), [])
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return page


async def log_in(page: Page, running: Running) -> None:
    await page.goto(f"{running.address}/")
    await expect(page).to_have_url(re.compile(r"/login$"))
    await page.fill("#token", TOKEN)
    await page.click("button[type=submit]")
    await expect(page.get_by_role("heading", name="Overview")).to_be_visible()


async def screenshot(page: Page, name: str, *, docs: str | None = None) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    # The README's pictures change only when asked, so that a test run leaves the tree clean.
    if docs is not None and os.environ.get("UPDATE_DOCS_SCREENSHOTS"):
        DOCS.mkdir(exist_ok=True)
        await page.screenshot(path=str(DOCS / docs))


async def test_log_in_and_search_a_conversation(browser: Browser, running: Running) -> None:
    page = await new_page(browser)
    await page.goto(f"{running.address}/login")
    await page.fill("#token", "not the token")
    await page.click("button[type=submit]")
    await expect(page.get_by_role("alert")).to_have_text("That token is not right.")
    await screenshot(page, "login-refused")
    CONSOLE_ERRORS[id(page)].clear()  # the browser logs the 401 itself

    await log_in(page, running)
    await expect(page.locator(".tile").first).to_contain_text("version 1")
    await expect(page.locator("svg.chart rect.bar-in").first).to_be_attached()
    await screenshot(page, "overview", docs="dashboard-overview.png")
    # htmx and the shortcuts load from the package, within the Content-Security-Policy.
    assert await page.evaluate("typeof htmx") == "object"
    assert CONSOLE_ERRORS[id(page)] == []

    await page.click("nav >> text=Conversations")
    await page.fill("input[name=text]", "refund")
    await page.click("form.search button")
    hits = page.locator("table.hits tbody tr")
    await expect(hits).to_have_count(1)
    await expect(hits).to_contain_text("slack · C-support")
    await screenshot(page, "conversations-search")
    await hits.locator("a").click()
    thread = page.locator("ol.thread li")
    await expect(thread.first).to_contain_text("What is your refund policy?")
    await expect(page.locator("ol.thread")).to_contain_text("answered by bot")
    await expect(page.locator("ol.thread")).to_contain_text("answered by human agent")
    await expect(page.locator("ol.thread")).to_contain_text(running.pipeline.generator.version)
    await screenshot(page, "conversation-thread")

    # By pseudonym: U1 asked twice, in two channels.
    await page.goto(f"{running.address}/conversations")
    await page.fill("input[name=user]", running.pseudonymize("slack", "U1"))
    await page.click("form.search button")
    await expect(page.locator("table.hits tbody tr")).to_have_count(2)


async def test_review_queue_approve_reject_and_edit(browser: Browser, running: Running) -> None:
    bot_answers = [e for e in running.exchanges() if e.answered_by == AnsweredBy.BOT.value]
    first, second, third = bot_answers[:3]
    page = await new_page(browser)
    await log_in(page, running)
    await page.click("nav >> text=Review queue")
    items = page.locator("ol.queue li.item")
    await expect(items).to_have_count(len(bot_answers))
    await expect(items.first).to_have_class(re.compile("selected"))
    await screenshot(page, "review-queue", docs="review-queue.png")

    # Keyboard: a approves the selected (first) exchange.
    await page.keyboard.press("a")
    await expect(page.locator(".flash")).to_be_visible()
    assert running.verdicts() == {first.id: "approved"}
    await expect(items).to_have_count(len(bot_answers) - 1)

    # j moves down (to the third exchange), r rejects it.
    await page.keyboard.press("j")
    await expect(items.nth(1)).to_have_class(re.compile("selected"))
    await page.keyboard.press("r")
    await expect(items).to_have_count(len(bot_answers) - 2)
    assert running.verdicts() == {first.id: "approved", third.id: "rejected"}

    # e edits the selected answer; Ctrl+Enter saves it as a correction.
    await page.keyboard.press("k")
    await expect(items.first).to_have_class(re.compile("selected"))
    await expect(items.first).to_contain_text("What is your refund policy?")
    await page.keyboard.press("e")
    area = items.first.locator("textarea")
    await expect(area).to_be_focused()
    await area.fill("Refunds: within 30 days of purchase, no questions asked.")
    await screenshot(page, "review-edit")
    await page.keyboard.press("Control+Enter")
    await expect(page.locator(".flash")).to_be_visible()
    assert running.verdict(second) == "corrected"
    corrections = [e for e in running.exchanges() if e.answered_by == "correction"]
    assert [running.answer_text(c) for c in corrections] == [
        "Refunds: within 30 days of purchase, no questions asked."
    ]

    # And with the mouse, no keys: reject the next one by its button.
    await items.first.locator("button.reject").click()
    await expect(page.locator(".flash")).to_be_visible()
    assert running.verdict(bot_answers[3]) == "rejected"
    await screenshot(page, "review-done")


async def test_toggle_a_channels_training_opt_out(browser: Browser, running: Running) -> None:
    page = await new_page(browser)
    await log_in(page, running)
    await page.click("nav >> text=Data and privacy")
    row = page.locator('tr[data-channel="slack:C-support"]')
    await expect(row).to_contain_text("on")
    await row.get_by_role("button", name="Turn training off").click()
    await expect(page.locator(".flash")).to_contain_text("Training is now off")
    assert running.opted_out("slack", "C-support") is True
    support = [e for e in running.exchanges() if e.conversation_id in (1, 2)]
    assert support and not any(e.for_training for e in support)
    await screenshot(page, "data-opted-out")

    await row.get_by_role("button", name="Turn training on").click()
    await expect(page.locator(".flash")).to_contain_text("Training is back on")
    assert running.opted_out("slack", "C-support") is False
    assert running.opted_out("discord", "D-help") is None  # untouched


async def test_rollback_and_use_a_version_after_confirming(
    browser: Browser, running: Running
) -> None:
    page = await new_page(browser)
    await log_in(page, running)
    await page.click("nav >> text=Training")
    await expect(page.locator("#version-1")).to_contain_text("serving")
    await expect(page.locator("#version-1 img.loss")).to_be_visible()
    await expect(page.locator("#version-2")).to_contain_text("kept, not promoted")
    await screenshot(page, "training")

    await page.get_by_role("button", name="Roll back…").click()
    await expect(page.get_by_role("heading", name="Are you sure?")).to_be_visible()
    assert running.registry.pointer()[0] == 1  # nothing happens before the confirmation
    await screenshot(page, "rollback-confirm")
    await page.get_by_role("button", name="Yes, roll back").click()
    await expect(page.locator(".flash")).to_contain_text("Rolled back: the base model serves")
    assert running.registry.pointer()[0] == 0
    assert serving_folder(running.pipeline.generator) == running.registry.version(0).path

    # Promote the kept candidate, then cancel a switch: only the confirmed one happens.
    await page.locator("#version-2").get_by_role("button", name="Promote…").click()
    await page.get_by_role("button", name="Yes, promote").click()
    await expect(page.locator(".flash")).to_contain_text("The version 2 serves now.")
    assert running.registry.pointer()[0] == 2
    await page.locator("#version-1").get_by_role("button", name="Use version 1…").click()
    await page.get_by_role("link", name="Cancel").click()
    assert running.registry.pointer()[0] == 2


async def test_the_retrain_button_runs_the_retrain_command(
    browser: Browser, running: Running
) -> None:
    """The retrain runs in the background and the page follows it; here another replica
    holds the training lease, so the command answers at once that one is running."""
    other = Lease(running.database, name="training", holder="other-replica", seconds=120)
    assert other.acquire()
    page = await new_page(browser)
    await log_in(page, running)
    await page.click("nav >> text=Training")
    await page.get_by_role("button", name="Retrain now").click()
    await expect(page.locator(".flash")).to_contain_text("Retrain started")
    # htmx polls the status until the command has answered.
    await expect(page.locator("#training-status")).to_contain_text(
        "A training is running already", timeout=20_000
    )
    await expect(page.locator("#training-status")).to_contain_text("finished")
    job = running.dashboard.actions.retrain_job
    assert job is not None and not job.running
    assert running.registry.pointer()[0] == 1 and len(running.registry.versions()) == 3


async def test_another_sites_form_cannot_act(browser: Browser, running: Running) -> None:
    """A page on another origin posts a form to the dashboard in the admin's logged-in
    browser: the browser withholds the SameSite cookie and the dashboard refuses the Origin."""
    first = running.exchanges()[0]
    evil = web.Application()

    async def form(_request: web.Request) -> web.Response:
        return web.Response(
            content_type="text/html",
            text=f"""<form method="post" action="{running.address}/review/{first.id}/approve">
            <input name="csrf" value="guessed"></form>
            <script>document.forms[0].submit()</script>""",
        )

    evil.router.add_get("/", form)
    runner = web.AppRunner(evil)
    await runner.setup()
    site = web.TCPSite(runner, "localhost", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        page = await new_page(browser)
        await log_in(page, running)
        async with page.expect_response(re.compile(r"/review/\d+/approve$")) as posted:
            await page.goto(f"http://localhost:{port}/")
        response = await posted.value
        assert response.status == 403
        await screenshot(page, "cross-site-refused")
        assert running.verdicts() == {}
    finally:
        await runner.cleanup()
