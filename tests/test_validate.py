"""Problems of DESIGN.md §3 beyond their (code, line, field): wording, suggestions, severity.

The (code, line, field) of each problem is pinned by the table in tests/test_problems_table.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO, load, make_project, problems, write_rule

GOOD = """
trigger: {event: flight.canceled}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  subject: Flight canceled
  text: "Hi ${first_name}"
targets:
  - memberId: "{{ event.member_id }}"
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


def only(found: list, severity: str = "error"):
    selected = [p for p in found if p.severity == severity]
    assert len(selected) == 1, selected
    return selected[0]


def test_repository_examples_validate_clean() -> None:
    ruleset = load(REPO)
    assert ruleset.ok, ruleset.problems
    assert not [p for p in ruleset.problems if p.severity == "warning"]
    assert {"flight-canceled", "hello-all-apps", "flight-canceled-buttons"} <= set(ruleset.rules)


def test_good_rule_has_no_problem(root: Path) -> None:
    write_rule(root, "ok", GOOD)
    assert problems(root) == []


# --- code 3: credentials ---


def test_code_3_literal_password(tmp_path: Path) -> None:
    root = make_project(
        tmp_path,
        """
        accengage:
          url: https://api.example.invalid/sendInstantMessage.php
          login: {env: LOGIN}
          password: hunter2
        apps:
          flights-ios: {partner: p1, platform: ios}
        """,
    )
    p = only(problems(root))
    assert (p.file, p.line, p.code, p.field) == ("pushrules.yaml", 5, 3, "accengage.password")
    assert "hunter2" not in p.message
    assert "{env:" in p.message


# --- code 4: apps ---


def test_code_4_unknown_app_alias_with_suggestion(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("flights-ios:", "flight-ios:"))
    p = only(problems(root))
    assert (p.line, p.code, p.field) == (3, 4, "apps.flight-ios")
    assert "did you mean 'flights-ios'" in p.message


# --- code 5: message fields ---


def test_code_5_sound_outside_its_list(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("  text:", "  sound: loud\n  text:"))
    p = only(problems(root))
    assert (p.line, p.column, p.code, p.field) == (6, 10, 5, "message.sound")
    assert "None, default, custom" in p.message


def test_code_5_android_field_in_ios_app(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("  text:", "  bigPicture: cat.png\n  text:"))
    p = only(problems(root))
    assert (p.line, p.code, p.field) == (6, 5, "message.bigPicture")
    assert "Android" in p.message


def test_code_5_content_available_must_be_boolean(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("  text:", "  contentAvailable: sometimes\n  text:"))
    p = only(problems(root))
    assert (p.line, p.code) == (6, 5)
    assert "true or false" in p.message


def test_code_5_unknown_message_template(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("  subject:", "  use: flight-cancelled\n  subject:"))
    p = only(problems(root))
    assert (p.line, p.code, p.field) == (5, 5, "message.use")
    assert "did you mean 'flight-canceled'" in p.message


# --- code 9: targets ---


def test_code_9_unknown_operator(root: Path) -> None:
    write_rule(root, "r", GOOD + "  - opencount: {operator: '=>', value: '1'}\n")
    p = only(problems(root))
    assert (p.line, p.code, p.field) == (9, 9, "targets[1].opencount.operator")
    assert "did you mean" in p.message


def test_code_9_criterion_not_a_device_field(root: Path) -> None:
    write_rule(root, "r", GOOD + "  - langage: en\n")
    p = only(problems(root))
    assert (p.line, p.code) == (9, 9)
    assert "did you mean 'language'" in p.message


# --- code 13: unknown fields ---


def test_code_13_unknown_message_field_with_suggestion(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("  subject:", "  subjet: x\n  subject:"))
    p = only(problems(root))
    assert (p.line, p.column, p.code, p.field) == (5, 3, 13, "message.subjet")
    assert "did you mean 'subject'" in p.message


def test_rule_level_unknown_key_has_no_code(root: Path) -> None:
    write_rule(root, "r", GOOD + "descripton: typo\n")
    p = only(problems(root))
    assert (p.line, p.code) == (9, None)
    assert "did you mean 'description'" in p.message


# --- code 15: macros ---


def test_code_15_macro_nothing_can_fill(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("Hi ${first_name}", "Hi ${nickname}"))
    p = only(problems(root))
    assert (p.line, p.code, p.field) == (6, 15, "message.text")
    assert "${nickname}" in p.message


def test_code_15_filled_by_target_data_is_fine(root: Path) -> None:
    rule = GOOD.replace("Hi ${first_name}", "Hi ${nickname}")
    write_rule(root, "r", rule + "    data: {nickname: Pat}\n")
    assert problems(root) == []


# --- code 23 / 24: buttons ---


def test_code_23_unknown_button_template_file(root: Path) -> None:
    rule = GOOD.replace("  text:", "  interactiveButtons: {use: confirm-or-rebok}\n  text:")
    write_rule(root, "r", rule)
    p = only(problems(root))
    assert (p.line, p.code, p.field) == (6, 23, "message.interactiveButtons.use")
    assert "did you mean 'confirm-or-rebook'" in p.message


def test_code_23_undeclared_category_is_a_warning(root: Path) -> None:
    rule = GOOD.replace(
        "  text:", "  interactiveButtons: {template: my_cat, buttons: [{id: 1}]}\n  text:"
    )
    write_rule(root, "r", rule)
    p = only(problems(root), "warning")
    assert (p.line, p.code) == (6, 23)
    assert not problems(root, severity="error")


@pytest.mark.parametrize(
    ("buttons", "words"),
    [
        ("[{id: 1}, {id: 3}]", "beyond template 'yes_no_category'"),
        ("[{id: 1}, {id: 1}]", "used twice"),
        ("[{id: first}]", "button's number"),
        ("[{action: close}]", "missing"),
    ],
)
def test_code_24_bad_button_ids(root: Path, buttons: str, words: str) -> None:
    rule = GOOD.replace(
        "  text:",
        f"  interactiveButtons: {{template: yes_no_category, buttons: {buttons}}}\n  text:",
    )
    write_rule(root, "r", rule)
    p = only(problems(root))
    assert (p.line, p.code) == (6, 24)
    assert words in p.message


# --- warnings ---


def test_warnings_do_not_fail(root: Path) -> None:
    rule = GOOD.replace(
        "  text:",
        "  sound: custom\n"
        "  richPushOpening: popup\n"
        "  interactiveButtons:\n"
        "    template: yes_no_category\n"
        "    buttons: [{id: 1, action: urlSheme, title: Go}]\n"
        "  text:",
    )
    write_rule(root, "r", rule)
    found = problems(root)
    assert all(p.severity == "warning" for p in found), found
    messages = " | ".join(p.message for p in found)
    assert "soundName" in messages
    assert "richPushOpening" in messages
    assert "urlScheme" in messages
    assert "Android only" in messages
    assert load(root).ok


def test_oversized_payload_is_a_warning(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("Hi ${first_name}", "x" * 5000))
    p = only(problems(root), "warning")
    assert "4,096 bytes" in p.message


def test_too_many_buttons_for_android_is_a_warning(root: Path) -> None:
    rule = GOOD.replace("flights-ios", "flights-android").replace(
        "  text:",
        "  interactiveButtons: {buttons: [{id: 1}, {id: 2}, {id: 3}, {id: 4}]}\n  text:",
    )
    write_rule(root, "r", rule)
    p = only(problems(root), "warning")
    assert "at most 3" in p.message


# --- no code: YAML, triggers, Jinja ---


def test_yaml_syntax_error_has_line(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("  subject: Flight canceled", "  subject: [Flight"))
    p = only(problems(root))
    assert p.code is None
    assert p.line is not None and p.line >= 5
    assert "YAML syntax" in p.message


def test_duplicate_key_is_an_error(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("  text:", "  subject: Again\n  text:"))
    p = only(problems(root))
    assert (p.line, p.code) == (6, None)
    assert "duplicate key 'subject' (first set on line 5)" in p.message


def test_bad_cron_is_reported_on_the_trigger(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("{event: flight.canceled}", '{cron: "0 25 * * *"}'))
    p = only(problems(root))
    assert (p.line, p.code, p.field) == (1, None, "trigger.cron")
    assert "25" in p.message


def test_bad_timezone_suggests(root: Path) -> None:
    rule = GOOD.replace("{event: flight.canceled}", '{cron: "0 9 * * *", timezone: Europe/Pari}')
    write_rule(root, "r", rule)
    p = only(problems(root))
    assert p.field == "trigger.timezone"
    assert "Europe/Paris" in p.message


def test_two_triggers_is_an_error(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("{event: flight.canceled}", "{event: a, every: 5m}"))
    p = only(problems(root))
    assert p.field == "trigger"
    assert "exactly one" in p.message


def test_jinja_syntax_error(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("Hi ${first_name}", "Hi {{ event.name }"))
    p = only(problems(root))
    assert (p.line, p.code, p.field) == (6, None, "message.text")
    assert "Jinja syntax" in p.message


def test_jinja_comment_in_prose_is_reported(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("Hi ${first_name}", "Deal {#1 today} ${first_name}"))
    p = only(problems(root))
    assert p.line == 6
    assert "{{ '{#' }}" in p.message


def test_one_broken_file_does_not_hide_others(root: Path) -> None:
    write_rule(root, "a-broken", "trigger: [")
    write_rule(root, "b-good", GOOD)
    write_rule(root, "c-bad", GOOD.replace("  text:", "  sound: loud\n  text:"))
    ruleset = load(root)
    files = {p.file for p in ruleset.problems}
    assert files == {"rules/a-broken.yaml", "rules/c-bad.yaml"}
    assert set(ruleset.rules) == {"b-good"}


def test_broken_template_file_is_reported_and_rules_using_it_fail(root: Path) -> None:
    (root / "templates" / "buttons" / "bad.yaml").write_text("template: x\nbuttons: [{idd: 1}]\n")
    rule = GOOD.replace("  text:", "  interactiveButtons: {use: bad}\n  text:")
    write_rule(root, "r", rule)
    found = problems(root, severity="error")
    by_file = {p.file: p for p in found}
    assert by_file["templates/buttons/bad.yaml"].code == 13
    assert by_file["rules/r.yaml"].code == 23


def test_last_good_version_is_kept_after_a_file_breaks(root: Path) -> None:
    from engine.rules.loader import Loader

    write_rule(root, "r", GOOD)
    loader = Loader(root, workers=1)
    first = loader.load()
    assert "r" in first.rules
    write_rule(root, "r", GOOD.replace("  text:", "  sound: loud\n  text:"))
    second = loader.load()
    assert second.rules["r"] is first.rules["r"]
    assert second.stale == {"r"}
    assert not second.ok


@pytest.mark.parametrize(
    "off",
    [
        'enabled: "false"',  # a type error: enabled takes YAML's true/false
        "enabled: 'no'  # stop it now",
        "enabled: false\nmessage_typo: x",  # a good switch in a file broken otherwise
    ],
)
def test_a_broken_file_that_switches_its_rule_off_stops_its_last_good_version(
    root: Path, off: str
) -> None:
    """The off switch of an emergency must not keep the push running because of how it is
    spelt (or of another mistake in the file): the last good version is kept, switched off."""
    from engine.rules.loader import Loader

    write_rule(root, "r", GOOD)
    loader = Loader(root, workers=1)
    assert loader.load().rules["r"].enabled
    write_rule(root, "r", GOOD + off + "\n")
    second = loader.load()
    assert not second.ok
    assert second.rules["r"].enabled is False
    assert second.stale == {"r"}
    write_rule(root, "r", GOOD)  # mended: the file says again what runs
    assert loader.load().rules["r"].enabled


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("store: whatever", "store"),
        ("listen: nonsense", "listen"),
        ("dispatch: {timeout: 10 seconds}", "dispatch.timeout"),
        ("timezone: GMT+2", "timezone"),
    ],
)
def test_settings_with_a_shape_are_checked(tmp_path: Path, setting: str, field: str) -> None:
    root = make_project(tmp_path / "p")
    config = root / "pushrules.yaml"
    key = setting.split(":")[0]
    lines = [line for line in config.read_text().splitlines() if not line.startswith(key + ":")]
    config.write_text("\n".join([*lines, setting]) + "\n")
    p = only(problems(root))
    assert (p.file, p.field) == ("pushrules.yaml", field)
    assert p.line == len(lines) + 1


def test_unquoted_yaml_indicators_say_to_quote(root: Path) -> None:
    write_rule(root, "r", GOOD.replace("{event: flight.canceled}", "{cron: */15 * * * *}"))
    p = only(problems(root))
    assert "must be quoted" in p.message


def test_poll_key_template_is_checked(root: Path) -> None:
    rule = GOOD.replace(
        "{event: flight.canceled}",
        '{poll: {url: "http://127.0.0.1:1/feed", every: 5m, key: "{{ itm.id }}"}}',
    ).replace('"{{ event.member_id }}"', "'1'")
    write_rule(root, "r", rule)
    p = only(problems(root))
    assert p.field == "trigger.poll.key"
    assert "itm" in p.message


def test_tests_are_checked_against_their_rules_when_checked_on_several_cores(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many files are checked in worker processes that send no rule back to validate; the
    rules the tests name come back all the same, so a test is checked against its rule
    however many files the project has."""
    from engine.rules import loader as loader_module
    from engine.rules.loader import Loader

    write_rule(root, "digest", GOOD.replace("{event: flight.canceled}", '{cron: "0 9 * * *"}'))
    for i in range(4):
        write_rule(root, f"other-{i}", GOOD)
    (root / "rule-tests").mkdir()
    (root / "rule-tests/digest.yaml").write_text(
        "cases:\n  - name: an event\n    event: {member_id: '1'}\n    expect: {requests: 1}\n"
    )
    monkeypatch.setattr(loader_module, "PARALLEL_THRESHOLD", 2)
    alone = Loader(root, workers=1, problems_only=True, tests=True).load()
    several = Loader(root, workers=2, problems_only=True, tests=True).load()
    assert several.problems == alone.problems
    [problem] = several.problems
    assert problem.file == "rule-tests/digest.yaml" and "reads no event" in problem.message
    assert set(several.rules) == {"digest"}  # the others' rules were not sent back


def test_a_macro_written_inside_jinja_is_not_checked_as_one(root: Path) -> None:
    """Jinja's output is neutralised when filled in: `{{ '${x}' }}` never reaches Accengage as
    a macro, so it cannot be one nothing fills; a macro written outside Jinja still is."""
    inside = GOOD.replace('text: "Hi ${first_name}"', "text: \"Hi {{ '${nickname}' }}\"")
    assert inside != GOOD
    write_rule(root, "inside", inside)
    write_rule(root, "named", GOOD.replace("${first_name}", "${ {{ event.field }} }"))
    write_rule(root, "outside", GOOD.replace("${first_name}", "${nickname}"))
    found = {(p.file, p.code) for p in problems(root) if p.code == 15}
    assert found == {("rules/outside.yaml", 15)}


def test_a_limit_longer_than_the_sent_rows_are_kept_is_a_warning(tmp_path: Path) -> None:
    """The limit counts the outbox's rows, which retention prunes: a 7-day limit over rows
    kept 1 day lets more through than it says."""
    root = make_project(tmp_path / "p")
    config = root / "pushrules.yaml"
    config.write_text(config.read_text() + "retention:\n  sent: 1d\n")
    write_rule(root, "weekly", GOOD + "limit: {count: 2, per: 7d}\n")
    write_rule(root, "hourly", GOOD + "limit: {count: 2, per: 1h}\n")
    found = [(p.file, p.field, p.severity) for p in problems(root)]
    assert found == [("rules/weekly.yaml", "limit.per", "warning")]
