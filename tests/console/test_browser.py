"""The console in a real browser: Debian's chromium (``/usr/bin/chromium``) driven by
Playwright against the console served by uvicorn on 127.0.0.1. Each test saves a screenshot
under ``.cache/screenshots/``. Without chromium these tests skip locally and fail under CI."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.apps import console_app as tasks
from tests.console.conftest import TOKEN, Console, MakeConsole, serving

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / ".cache" / "screenshots"
SCRIPT = "<script>alert(1)</script>"
#: Playwright's own waits, in ms.
WAIT_MS = 15_000


def _chromium_missing() -> bool:
    return not Path(CHROMIUM).exists()


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if _chromium_missing():
        _missing(f"{CHROMIUM} is missing: apt-get install chromium")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _missing("playwright is missing: pip install playwright (never `playwright install`)")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield chromium
        finally:
            await chromium.close()


class Session:
    """A signed-in page that accepts confirmations and remembers every dialog."""

    def __init__(self, page: Any, url: str) -> None:
        self.page, self.url = page, url
        self.dialogs: list[tuple[str, str]] = []
        page.set_default_timeout(WAIT_MS)

        async def on_dialog(dialog: Any) -> None:
            self.dialogs.append((dialog.type, dialog.message))
            await dialog.accept()

        page.on("dialog", on_dialog)

    async def sign_in(self) -> None:
        await self.page.goto(self.url + "/")
        assert "/login" in self.page.url
        await self.page.fill("#token", TOKEN)
        await self.page.click("#login button")
        await self.page.wait_for_url(self.url + "/")

    async def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    async def reload_until(self, selector: str, text: str) -> None:
        """Reload until ``selector`` shows ``text`` (the page does not update by itself)."""
        for _ in range(100):
            if text in (await self.page.inner_text(selector)):
                return
            await self.page.wait_for_timeout(100)
            await self.page.reload()
        raise AssertionError(f"{selector} never showed {text!r}")


async def _session(browser: Any, url: str) -> Session:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    session = Session(await context.new_page(), url)
    await session.sign_in()
    return session


async def test_list_filter_and_a_tasks_attempts(browser: Any, console: Console) -> None:
    ids = [await console.submit("add", i, 1, tags=["batch-7"]) for i in range(3)]
    failed = await console.submit("fails", "disk full", tags=["batch-7"])
    report = await console.submit("report", "weekly")
    for task_id in [*ids, failed, report]:
        await console.ended(task_id)
    async with serving(console) as url:
        session = await _session(browser, url)
        page = session.page
        assert await page.inner_text('[data-count="success"]') == "4"
        assert await page.locator("#task-rows tr").count() == 5
        await session.shot("list")
        await page.select_option("#f-queue", "reports")
        await page.click("#filters button")
        await page.wait_for_url("**queue=reports**")
        assert await page.locator("#task-rows tr").count() == 1
        assert await page.locator(f'#task-rows tr[data-id="{report}"]').count() == 1
        await page.select_option("#f-queue", "")
        await page.select_option("#f-status", "error")
        await page.click("#filters button")
        await page.wait_for_url("**status=error**")
        assert await page.locator("#task-rows tr").count() == 1
        await page.click(f'#task-rows a[href="/tasks/{failed}"]')
        await page.wait_for_url(f"**/tasks/{failed}")
        assert await page.locator("section.attempt[data-attempt]").count() == 4  # 0 + 3 attempts
        assert "RuntimeError: disk full" in await page.inner_text("#error")
        await page.locator("#timeline details.traceback summary").first.click()
        assert "Traceback" in await page.inner_text("#timeline")
        await session.shot("task")
        # The as-of link of the first event: the task as it was submitted.
        await page.locator("#timeline a", has_text="as of").first.click()
        await page.wait_for_selector("#asof-banner")
        assert "new" in await page.inner_text(".facts")
        assert session.dialogs == []


async def test_replay_a_dead_letter_and_the_task_succeeds(
    browser: Any, make_console: MakeConsole
) -> None:
    console = await make_console(unreadable_submits=True)
    # countdown=0: through the scheduler, which dead-letters the unreadable submit (a
    # task due now would go from the client straight to its lane and run).
    tasks.BROKEN.add("later")
    task_id = await console.submit("later", countdown=0)
    other = await console.submit("later", countdown=0)
    for dead in (task_id, other):
        assert (await console.ended(dead)).status == "dead_letter"
    await console.settled()
    tasks.BROKEN.clear()  # the cause is fixed
    async with serving(console) as url:
        session = await _session(browser, url)
        page = session.page
        await page.goto(url + "/dead-letters")
        assert "cannot read submits" in await page.inner_text("#letters")
        await session.shot("dead-letters")
        # One letter by its own button.
        await page.locator(
            f'#letters tr:has(a[href="/tasks/{task_id}"]) button.replay'
        ).first.click()
        await page.wait_for_selector("#outcomes")
        assert "replayed" in await page.inner_text("#outcomes")
        assert [kind for kind, _ in session.dialogs] == ["confirm"]
        await page.locator(f'#outcomes a[href="/tasks/{task_id}"]').click()
        await session.reload_until(".facts", "success")
        assert '"late"' in await page.inner_text("#result")
        await session.shot("replayed")
        # The other task's letters (one per stage that gave up) ticked and replayed together.
        await page.goto(url + "/dead-letters")
        boxes = page.locator(f'#letters tr:has(a[href="/tasks/{other}"]) input[type=checkbox]')
        assert await boxes.count() == 2
        for i in range(2):
            await boxes.nth(i).check()
        await page.fill("#bulk input[name=reason]", "fixed the decoder")
        await page.click("#bulk button")
        await page.wait_for_selector("#outcomes")
        outcomes = await page.locator("#outcomes td.outcome").all_inner_texts()
        assert sorted(outcomes) == ["already replayed", "replayed"]
        assert len(session.dialogs) == 2
    assert (await console.status(other, "success")).returning == "late"
    reasons = [getattr(e.payload, "reason", None) for e in await console.app.history(other)]
    assert "fixed the decoder" in reasons


async def test_cancel_a_running_task(browser: Any, console: Console) -> None:
    task_id = await console.submit("sleepy", 60)
    await console.status(task_id, "process")
    async with serving(console) as url:
        session = await _session(browser, url)
        page = session.page
        await page.goto(f"{url}/tasks/{task_id}")
        await page.fill("#actions input[name=reason]", "operator said so")
        await page.click("#cancel")
        await page.wait_for_selector("#flash")
        assert session.dialogs == [("confirm", f"Cancel task {task_id}?")]
        await session.reload_until(".facts", "cancel")
        assert "operator said so" in await page.inner_text(".facts")
        await session.shot("cancelled")
    assert (await console.app.get(task_id)).status == "cancel"  # type: ignore[union-attr]


async def test_script_in_arguments_and_errors_renders_as_text(
    browser: Any, console: Console
) -> None:
    task_id = await console.submit("fails", SCRIPT, tags=[SCRIPT])
    await console.ended(task_id)
    async with serving(console) as url:
        session = await _session(browser, url)
        page = session.page
        await page.goto(f"{url}/?tag={SCRIPT}")
        assert SCRIPT in await page.inner_text("#task-rows")
        await page.goto(f"{url}/tasks/{task_id}")
        assert SCRIPT in await page.inner_text("#args")
        assert SCRIPT in await page.inner_text("#error")
        assert await page.locator("main script").count() == 0
        await session.shot("script-as-text")
        await page.wait_for_timeout(300)  # a script would have run by now
    assert session.dialogs == []


async def test_the_list_updates_live(browser: Any, console: Console) -> None:
    async with serving(console) as url:
        session = await _session(browser, url)
        page = session.page
        await page.wait_for_function("document.getElementById('live-state').textContent === 'on'")
        task_id = await console.submit("add", 40, 2)
        await page.wait_for_selector(f'#task-rows tr[data-id="{task_id}"]')
        await console.ended(task_id)
        await page.wait_for_selector(f'#task-rows tr[data-id="{task_id}"] .s-success')
        await session.shot("live")
