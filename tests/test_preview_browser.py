"""`pushrules preview` pages as headless Chromium draws them: the texts and buttons a person
sees, nothing loaded from anywhere, nothing from an event run as markup.

Needs Debian's ``chromium`` (``.ci/run`` installs it) and playwright (the test extra), which
drives it without a browser of its own. Elsewhere the test is skipped; in CI it fails.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from engine.cli.main import main
from tests.helpers import REPO

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
AT = "2026-11-26T09:00:00+01:00"
FLIGHT_EVENT = {"flightref": "EY5138", "member_id": "765c8", "first_name": "Patrick"}


def missing(why: str) -> None:
    if IN_CI:
        pytest.fail(f"{why}: CI must run the preview's browser test (.ci/run installs both)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        missing("no chromium on the PATH (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        # Debian's build, not one of playwright's own: nothing is downloaded.
        launched = playwright.chromium.launch(executable_path=chromium)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1180, "height": 900})
    yield page
    page.close()


def open_preview(
    page: Page, tmp_path: Path, rule: str, event: dict[str, object] | None = None
) -> list[str]:
    """Write the rule's preview, open it, and return every URL the page asked for."""
    out = tmp_path / f"{rule}.html"
    args = ["preview", rule, "--project", str(REPO), "--at", AT, "--out", str(out)]
    if event is not None:
        source = tmp_path / "event.json"
        source.write_text(json.dumps(event))
        args += ["--event", str(source)]
    assert main(args) == 0
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.goto(out.resolve().as_uri())
    assert [url for url in asked if url != out.resolve().as_uri()] == []
    return asked


def test_android_buttons_and_texts_as_shown(page: Page, tmp_path: Path) -> None:
    open_preview(page, tmp_path, "flight-canceled-buttons", FLIGHT_EVENT)
    phones = page.locator('[data-app="flights-android"] .phone')
    assert phones.count() == 2
    first = phones.nth(0)
    assert first.locator("figcaption").inner_text() == "To memberId = 765c8"
    notification = first.locator(".notification")
    assert notification.locator(".title").inner_text() == "Flight canceled"
    assert (
        notification.locator(".text").inner_text()
        == "Hi Patrick, the flight number EY5138 is canceled"
    )
    # Android draws its button labels in capitals: the text shown, not the text written.
    buttons = notification.locator(".button")
    assert buttons.all_inner_texts() == ["CONFIRM", "NO TITLE"]
    assert all(b.is_visible() for b in buttons.all())
    actions = first.locator(".actions li")
    assert actions.nth(0).inner_text().startswith("Confirm opens http://google.fr in the browser")
    assert "opens http://mobilecrm.accengage.com inside the app" in actions.nth(1).inner_text()
    assert phones.nth(1).locator(".text").inner_text() == (
        "Hi John, the flight number EY5138 is canceled"
    )
    assert "Opening the push shows http://www.google.com inside the app" in first.inner_text()
    assert "1 request, 2 targets" in page.locator("#compiled").inner_text()


def test_ios_lock_screen_badge_and_device_chips(page: Page, tmp_path: Path) -> None:
    open_preview(page, tmp_path, "flight-canceled", FLIGHT_EVENT)
    first = page.locator('[data-app="flights-ios"] .phone').nth(0)
    assert first.locator(".clock").inner_text() == "09:00"
    assert first.locator(".notification .text").inner_text() == (
        "Hello Patrick, your flight has been canceled"
    )
    badge = first.locator(".app-icon .badge")
    assert badge.is_visible() and badge.inner_text() == "2"

    open_preview(page, tmp_path, "monday-digest")
    text = page.locator('[data-app="news-ios"] .notification .text')
    assert text.inner_text().startswith("Bonjour ${first_name}, here is the news")
    chip = text.locator(".chip")
    assert chip.inner_text() == "${first_name}" and chip.is_visible()
    assert chip.get_attribute("title") == "filled on the phone from the device database"


def test_event_markup_is_shown_as_text_and_never_runs(page: Page, tmp_path: Path) -> None:
    evil = '<img src=x onerror="document.title=1"><script>document.title=2</script>'
    asked = open_preview(page, tmp_path, "flight-canceled", {**FLIGHT_EVENT, "first_name": evil})
    text = page.locator('[data-app="flights-ios"] .phone').nth(0).locator(".notification .text")
    assert text.inner_text() == f"Hello {evil}, your flight has been canceled"
    assert page.locator("img, script").count() == 0
    assert page.title() == "flight-canceled: push preview"
    assert len(asked) == 1  # the page itself: no image, font or script fetched


def test_when_false_shows_no_phone(page: Page, tmp_path: Path) -> None:
    out = tmp_path / "page.html"
    item = tmp_path / "item.json"
    item.write_text(json.dumps({"id": "o1", "price": 500, "destination": "Rome", "followers": []}))
    args = ["preview", "price-drop", "--project", str(REPO), "--item", str(item), "--out", str(out)]
    assert main(args) == 0
    page.goto(out.resolve().as_uri())
    assert page.locator(".status").inner_text() == "Nothing would be sent."
    assert "`when` is false for this item" in page.locator(".note").inner_text()
    assert page.locator(".phone").count() == 0
