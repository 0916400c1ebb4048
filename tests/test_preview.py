"""`pushrules preview`: what the page says a person sees, and the command around it.

The page as a browser draws it is checked in test_preview_browser.py.
"""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.cli.main import main
from engine.render.compiler import FireContext, compile_fire
from engine.render.preview import FROM_DEVICE, FROM_MESSAGE, FROM_TARGET, Piece, fill, page_view
from tests.helpers import REPO, load, make_project, write_rule

AT = "2026-11-26T09:00:00+01:00"
FLIGHT_EVENT = {"flightref": "EY5138", "member_id": "765c8", "first_name": "Patrick"}

OFFER = """
description: A fare deal, drawn differently on each platform
trigger: {event: offer}
apps:
  flights-ios:
    parentMessageId: "1"
    message:
      badge: "+1"
      interactiveButtons: {use: yes-no}
  flights-android:
    parentMessageId: "2"
    message:
      customizedTitle: "Deal for ${first_name}"
      longText: "All week: {{ event.city }} at {{ event.price }} EUR"
      bigPicture: lisbon.jpg
      icon: ic_plane
      popup: {okButtonLabel: See it, cancelButtonLabel: Later}
      interactiveButtons:
        buttons:
          - {id: 1, title: Book, action: browser, url: "https://example.com/book"}
          - {id: 2, title: Call us, action: phone, url: "+33100000000"}
          - {id: 3, action: close}
          - {id: 4, title: Fourth, action: close}
message:
  subject: "{{ event.city }} deal"
  text: "${first_name}, fly to {{ event.city }} with code ${code}"
  sound: default
  data: {code: "{{ event.code }}"}
targets:
  - memberId: "{{ event.member_id }}"
    data: {first_name: "{{ event.first_name }}"}
  - language: en
"""
OFFER_EVENT = {
    "city": "Lisbon",
    "price": 79,
    "code": "LIS79",
    "member_id": "42",
    "first_name": "Ana",
}


def shown(text: tuple[Piece, ...]) -> str:
    return "".join(p.text for p in text)


def offer_view(tmp_path: Path) -> object:
    root = make_project(tmp_path / "p")
    write_rule(root, "offer", OFFER)
    ruleset = load(root)
    assert ruleset.ok, ruleset.problems
    rule, project = ruleset.rules["offer"], ruleset.project
    assert project is not None
    context = FireContext(now=datetime(2026, 11, 26, 8, 0, tzinfo=UTC), event=OFFER_EVENT)
    return page_view(rule, project, context, compile_fire(rule, project, context))


# --- what the page says -----------------------------------------------------------------------


def test_macros_fill_from_the_target_then_the_message_and_the_rest_stay_chips() -> None:
    pieces = fill(
        "Hi ${first_name}, ${ code } or ${first_name} for ${city}",
        {"first_name": "Ana"},
        {"first_name": "never", "code": "LIS79"},
    )
    assert [(p.text, p.source) for p in pieces if p.macro] == [
        ("Ana", FROM_TARGET),
        ("LIS79", FROM_MESSAGE),
        ("Ana", FROM_TARGET),
        ("${city}", FROM_DEVICE),
    ]
    assert shown(pieces) == "Hi Ana, LIS79 or Ana for ${city}"
    assert [p.kind for p in pieces][-1] == "device"


def test_each_platform_shows_its_own_fields(tmp_path: Path) -> None:
    view = offer_view(tmp_path)
    ios, android = view.apps  # type: ignore[attr-defined]
    assert (ios.platform, android.platform) == ("ios", "android")
    ana, everyone = ios.cards
    assert (ana.target, everyone.target) == ("memberId = 42", "language = en")
    assert shown(ana.title) == "Lisbon deal"
    assert shown(ana.text) == "Ana, fly to Lisbon with code LIS79"
    # No target data for the second target: first_name comes from the device database.
    assert shown(everyone.text) == "${first_name}, fly to Lisbon with code LIS79"
    assert [p.kind for p in everyone.text if p.macro] == ["device", "filled"]
    assert ana.badge == "+1" and ("badge", "+1: adds 1 to the number on the app's icon") in (
        ana.details
    )
    assert ("sound", "the phone's default sound") in ana.details
    # iOS buttons take their labels from the category: the page says which.
    assert [(b.label, b.placeholder) for b in ana.buttons] == [
        ("", "button 1 of yes_no_category"),
        ("", "button 2 of yes_no_category"),
    ]
    assert ana.buttons[0].does == "opens https://example.com/yes in the browser"
    assert ana.buttons[1].does == "closes the notification"

    card = android.cards[0]
    assert shown(card.title) == "Deal for Ana"
    assert card.text_from == "customizedTitle and text"
    assert shown(card.long_text) == "All week: Lisbon at 79 EUR"
    assert (card.big_picture, card.icon, card.popup) == (
        "lisbon.jpg",
        "ic_plane",
        ("Later", "See it"),
    )
    assert card.badge == ""
    assert [(b.label or b.placeholder, b.does, b.hidden) for b in card.buttons] == [
        ("Book", "opens https://example.com/book in the browser", ""),
        ("Call us", "calls +33100000000", ""),
        ("no title", "closes the notification", ""),
        ("Fourth", "closes the notification", "Android shows at most 3 buttons"),
    ]


def test_ios_shows_apples_alert_in_place_of_subject_and_text() -> None:
    ruleset = load(REPO)
    rule, project = ruleset.rules["flight-canceled"], ruleset.project
    assert project is not None
    context = FireContext(now=datetime(2026, 11, 26, 8, 0, tzinfo=UTC), event=FLIGHT_EVENT)
    [app] = page_view(rule, project, context, compile_fire(rule, project, context)).apps
    patrick, john = app.cards
    assert shown(patrick.text) == "Hello Patrick, your flight has been canceled"
    assert patrick.title == ()
    assert "target's aps.alert" in patrick.text_from
    assert ("action label", "OK, thank you! (aps.alert action-loc-key)") in patrick.details
    assert patrick.badge == "2"
    assert ("sound", "sound.wav (Apple's aps.sound)") in patrick.details
    # The second target has no aps of its own: the message's alert, filled from its data.
    assert shown(john.text) == "Hello Sir, the flight number EY5138 is canceled"
    assert "message's aps.alert" in john.text_from
    assert john.badge == ""  # 0 clears it: nothing drawn on the icon
    assert ("badge", "0: clears the number on the app's icon") in john.details
    assert john.rich_push == "Opening the push shows http://www.google.com inside the app"


def test_targets_beyond_three_are_counted_not_drawn() -> None:
    ruleset = load(REPO)
    rule, project = ruleset.rules["price-drop"], ruleset.project
    assert project is not None
    followers = [{"id": f"m{i}", "first_name": f"F{i}"} for i in range(5)]
    item = {"id": "o1", "price": 79, "destination": "Lisbon", "followers": followers}
    context = FireContext(now=datetime(2026, 11, 26, 8, 0, tzinfo=UTC), item=item)
    view = page_view(rule, project, context, compile_fire(rule, project, context))
    [app] = view.apps
    assert [shown(c.text) for c in app.cards] == [
        f"F{i}, a new fare to Lisbon just came in" for i in range(3)
    ]
    assert app.more == 2 and view.targets == 5


# --- the command ------------------------------------------------------------------------------


def run_preview(
    tmp_path: Path, rule: str, event: dict[str, object] | None, *extra: str
) -> tuple[int, list[str]]:
    args = ["preview", rule, "--project", str(REPO), "--at", AT]
    if event is not None:
        source = tmp_path / "event.json"
        source.write_text(json.dumps(event))
        args += ["--event", str(source)]
    args += extra
    return main(args), args


def words(page: str) -> str:
    """The page's text without its tags."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def compiled_json(page: str) -> object:
    """The JSON the page shows under "Compiled requests"."""
    match = re.search(r'<section id="compiled">.*?<pre>(.*?)</pre>', page, re.S)
    assert match
    return json.loads(html.unescape(match.group(1)))


def test_default_writes_preview_rule_html_here_and_prints_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _ = run_preview(tmp_path, "flight-canceled", FLIGHT_EVENT)
    assert code == 0
    assert capsys.readouterr().out.strip() == "preview-flight-canceled.html"
    page = (tmp_path / "preview-flight-canceled.html").read_text()
    assert "Hello Patrick, your flight has been canceled" in words(page)
    assert {p.name for p in tmp_path.iterdir()} == {"event.json", "preview-flight-canceled.html"}


def test_the_page_shows_exactly_what_compile_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, args = run_preview(tmp_path, "flight-canceled-buttons", FLIGHT_EVENT, "--out", "-")
    page = capsys.readouterr().out
    assert code == 0
    assert main(["compile", *args[1:-2]]) == 0
    assert compiled_json(page) == json.loads(capsys.readouterr().out)


def test_when_false_the_page_says_nothing_would_be_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    item = {"id": "o1", "price": 500, "destination": "Rome", "followers": [{"id": "m1"}]}
    source = tmp_path / "item.json"
    source.write_text(json.dumps(item))
    out = tmp_path / "page.html"
    args = ["preview", "price-drop", "--project", str(REPO), "--item", str(source)]
    assert main([*args, "--out", str(out)]) == 0
    assert "`when` is false for this item" in capsys.readouterr().err
    page = html.unescape(out.read_text())
    assert "Nothing would be sent." in page and "`when` is false for this item" in page
    assert 'class="phone"' not in page and compiled_json(out.read_text()) == []


def test_targets_to_nobody_the_page_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    item = {"id": "o1", "price": 50, "destination": "Rome", "followers": []}
    source = tmp_path / "item.json"
    source.write_text(json.dumps(item))
    args = ["preview", "price-drop", "--project", str(REPO), "--item", str(source), "--out", "-"]
    assert main(args) == 0
    page = html.unescape(capsys.readouterr().out)
    assert "Nothing would be sent." in page and "the targets expanded to nobody" in page


def test_event_text_is_shown_never_run_as_markup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
    code, _ = run_preview(
        tmp_path, "flight-canceled", {**FLIGHT_EVENT, "first_name": evil}, "--out", "-"
    )
    page = capsys.readouterr().out
    assert code == 0
    assert "<script" not in page and "<img" not in page
    assert html.escape(evil, quote=False).replace('"', "&#34;") in page


@pytest.mark.parametrize("rule", ["flight-canceled", "hello-all-apps", "monday-digest"])
def test_the_page_loads_nothing_from_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rule: str
) -> None:
    code, _ = run_preview(tmp_path, rule, FLIGHT_EVENT, "--out", "-")
    page = capsys.readouterr().out
    assert code == 0
    for needle in ("<script", "<link", "<img", "<iframe", " src=", " href=", "@import", "url("):
        assert needle not in page, needle


def test_failures_exit_as_compile_does_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["preview", "nope", "--project", str(REPO)]) == 1
    assert "no rule 'nope'" in capsys.readouterr().err
    # The rule reads an event it was not given: the same hint as compile.
    assert main(["preview", "flight-canceled", "--project", str(REPO)]) == 1
    assert "pass --event FILE" in capsys.readouterr().err
    assert main(["preview", "flight-canceled", "--project", str(REPO), "--at", "soon"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_out_is_a_usage_error_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "missing-folder" / "page.html"
    code, _ = run_preview(tmp_path, "hello-all-apps", None, "--out", str(out))
    assert code == 2
    assert f"cannot write the page to {out}" in capsys.readouterr().err
    assert not out.parent.exists()


def test_an_invalid_rule_prints_its_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "x", OFFER.replace("sound: default", "sound: loud"))
    assert main(["preview", "x", "--project", str(root), "--out", str(tmp_path / "x.html")]) == 1
    assert "message.sound" in capsys.readouterr().out
    assert not (tmp_path / "x.html").exists()


def test_every_example_rule_has_its_preview_picture_in_the_guide() -> None:
    guide = (REPO / "docs" / "rules.md").read_text()
    for rule in sorted(p.stem for p in (REPO / "rules").glob("*.yaml")):
        assert (REPO / "docs" / "previews" / f"{rule}.png").is_file(), rule
        assert f"](previews/{rule}.png)" in guide, rule


def test_a_large_fire_shows_its_first_requests_and_counts_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    followers = [{"id": f"m{i}", "first_name": f"F{i}"} for i in range(1150)]
    item = {"id": "o1", "price": 50, "destination": "Rome", "followers": followers}
    source = tmp_path / "item.json"
    source.write_text(json.dumps(item))
    args = ["preview", "price-drop", "--project", str(REPO), "--item", str(source), "--out", "-"]
    assert main(args) == 0
    page = capsys.readouterr().out
    shown = compiled_json(page)
    assert isinstance(shown, list) and len(shown) == 10
    assert shown[-1]["body"]["sendInstantMessage"]["targets"][-1]["memberId"] == "m999"
    text = words(page)
    assert "12 requests, 1150 targets" in text
    assert "2 more, with the other targets, are left out of this page" in text
    assert "and 1147 more targets" in text


@pytest.mark.parametrize(
    ("then", "sent", "clock"), [("skip", False, "23:30"), ("defer", True, "08:00")]
)
def test_inside_quiet_hours_the_page_says_what_becomes_of_the_push(
    tmp_path: Path, then: str, sent: bool, clock: str
) -> None:
    """Skipped: nothing would be sent (the phones were drawn as if it were). Deferred: the
    phones show the time it arrives, the end of the quiet hours, not the fire's."""
    root = make_project(tmp_path / "p")
    rule = (REPO / "rules" / "monday-digest.yaml").read_text()
    write_rule(root, "digest", rule.replace("then: defer", f"then: {then}"))
    out = tmp_path / "page.html"
    args = ["preview", "digest", "--project", str(root), "--at", "2026-01-05 23:30"]
    assert main([*args, "--out", str(out)]) == 0
    page = html.unescape(out.read_text())
    assert ("Nothing would be sent." not in page) == sent
    assert f'<div class="clock">{clock}</div>' in page
