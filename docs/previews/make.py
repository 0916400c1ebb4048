"""Regenerate docs/previews/*.png: each example rule's `pushrules preview`, as Chromium draws it.

Run from anywhere, after `pip install -e '.[test]'` and with Debian's chromium installed
(`apt-get install chromium`; playwright drives it and downloads no browser of its own):

    python docs/previews/make.py

Each picture is the part of the page above the compiled JSON, for the event, feed item and time
given below, so the pictures only change when the rules or the page do.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

FLIGHT = {"flightref": "EY5138", "member_id": "765c8", "first_name": "Patrick"}
OFFER = {
    "id": "lis-79",
    "price": 79,
    "destination": "Lisbon",
    "followers": [{"id": "m1", "first_name": "Ana"}, {"id": "m2", "first_name": "Bruno"}],
}
#: Each example rule: its fire time and what it fires on (option, JSON), or None.
EXAMPLES: dict[str, tuple[str, tuple[str, object] | None]] = {
    "flight-canceled": ("2026-11-26T09:00:00+01:00", ("--event", FLIGHT)),
    "flight-canceled-buttons": ("2026-11-26T09:00:00+01:00", ("--event", FLIGHT)),
    "hello-all-apps": ("2026-11-26T09:00:00+01:00", ("--event", {})),
    "monday-digest": ("2026-12-21T09:00:00+01:00", None),
    "price-drop": ("2026-11-26T09:00:00+01:00", ("--item", OFFER)),
}


def main() -> int:
    sys.path.insert(0, str(REPO))
    from engine.cli.main import main as pushrules

    chromium = shutil.which("chromium")
    if chromium is None:
        print("make.py: no chromium on the PATH: apt-get install chromium", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    rules = sorted(p.stem for p in (REPO / "rules").glob("*.yaml"))
    unknown = sorted(set(rules) - set(EXAMPLES))
    if unknown:
        names = ", ".join(unknown)
        print(f"make.py: add an event or time for {names} to EXAMPLES", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as work, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1180, "height": 900})
        for rule in rules:
            at, given = EXAMPLES[rule]
            out = Path(work) / f"{rule}.html"
            args = ["preview", rule, "--project", str(REPO), "--at", at, "--out", str(out)]
            if given is not None:
                option, value = given
                source = Path(work) / f"{rule}.json"
                source.write_text(json.dumps(value), encoding="utf-8")
                args += [option, str(source)]
            if pushrules(args) != 0:
                return 1
            page.goto(out.as_uri())
            picture = HERE / f"{rule}.png"
            page.locator("#push").screenshot(path=str(picture))
            print(picture.relative_to(REPO))
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
