"""One row per problem of DESIGN.md §3: a file's text, and the one error it earns.

Each row names the file it writes (a rule, ``rules/r.yaml``, or the project settings,
``pushrules.yaml``), the text, and the (code, line, field) of the only error validation must
report. Warnings may come along; any other error fails the row. Message wording is checked in
tests/test_validate.py.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.helpers import make_project, problems

RULE = "rules/r.yaml"
SETTINGS = "pushrules.yaml"

#: A rule with no problem; most rows are this rule with one mistake put in.
GOOD = """\
trigger: {event: flight.canceled}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  subject: Flight canceled
  text: "Hi ${first_name}"
targets:
  - memberId: "{{ event.member_id }}"
"""


def before_text(line: str) -> str:
    """GOOD with ``line`` inserted in ``message:`` just above ``text:`` (so on line 6)."""
    return GOOD.replace("  text:", line + "\n  text:")


def with_target(line: str) -> str:
    """GOOD with one more line at its end (line 9), e.g. a second target."""
    return GOOD + line + "\n"


def settings(credentials: str, app: str) -> str:
    """Project settings: the Accengage URL (line 2), ``credentials`` (from line 3), one app."""
    return (
        "accengage:\n"
        "  url: https://api.example.invalid/sendInstantMessage.php\n"
        + textwrap.indent(credentials, "  ")
        + "apps:\n"
        + f"  flights-ios: {app}\n"
    )


def two_apps(rule: str) -> str:
    """``rule`` sent to both flight apps (one line longer from line 4 on)."""
    return rule.replace(
        '  flights-ios: {parentMessageId: "1"}\n',
        '  flights-ios: {parentMessageId: "1"}\n  flights-android: {parentMessageId: "2"}\n',
    )


ROWS = [
    # --- 3: credentials missing, or written in clear
    pytest.param(
        SETTINGS,
        settings("login: {env: LOGIN}\npassword: hunter2\n", "{partner: p1, platform: ios}"),
        3,
        4,
        "accengage.password",
        id="3-password-in-clear",
    ),
    pytest.param(
        SETTINGS,
        settings("password: {env: PASSWORD}\n", "{partner: p1, platform: ios}"),
        3,
        1,
        "accengage.login",
        id="3-login-missing",
    ),
    # --- 4: unknown app alias, app without partner
    pytest.param(
        RULE,
        GOOD.replace("flights-ios:", "flight-ios:"),
        4,
        3,
        "apps.flight-ios",
        id="4-unknown-app-alias",
    ),
    pytest.param(
        SETTINGS,
        settings("login: {env: LOGIN}\npassword: {env: PASSWORD}\n", "{platform: ios}"),
        4,
        6,
        "apps.flights-ios.partner",
        id="4-app-without-partner",
    ),
    # --- 5: bad message field
    pytest.param(
        RULE, before_text("  sound: loud"), 5, 6, "message.sound", id="5-value-outside-its-list"
    ),
    pytest.param(
        RULE,
        before_text("  contentAvailable: sometimes"),
        5,
        6,
        "message.contentAvailable",
        id="5-wrong-type",
    ),
    pytest.param(
        RULE,
        before_text("  bigPicture: cat.png"),
        5,
        6,
        "message.bigPicture",
        id="5-android-field-in-ios-app",
    ),
    pytest.param(
        RULE,
        GOOD.replace(
            '  flights-ios: {parentMessageId: "1"}\n',
            '  flights-ios: {parentMessageId: "1"}\n'
            "  flights-android:\n"
            '    parentMessageId: "2"\n'
            "    message: {badge: '+1'}\n",
        ),
        5,
        6,
        "apps.flights-android.message.badge",
        id="5-ios-field-in-android-override",
    ),
    pytest.param(
        RULE,
        GOOD.replace("  subject:", "  use: flight-cancelled\n  subject:"),
        5,
        5,
        "message.use",
        id="5-unknown-message-template",
    ),
    # --- 6: bad customParams
    pytest.param(
        RULE,
        before_text("  customParams: [{key: a}]"),
        6,
        6,
        "message.customParams[0]",
        id="6-custom-param-without-value",
    ),
    # --- 9: bad target
    pytest.param(
        RULE,
        with_target("  - opencount: {operator: '=>', value: '1'}"),
        9,
        9,
        "targets[1].opencount.operator",
        id="9-unknown-operator",
    ),
    pytest.param(
        RULE,
        with_target("  - opencount: {operator: '>', value: '3', valeu: '4'}"),
        9,
        9,
        "targets[1].opencount.valeu",
        id="9-misspelt-criterion-key",
    ),
    pytest.param(
        RULE,
        with_target("  - langage: en"),
        9,
        9,
        "targets[1].langage",
        id="9-criterion-not-a-device-field",
    ),
    pytest.param(
        RULE,
        two_apps(with_target("  - segmentId: '12'")),
        9,
        10,
        "targets[1].segmentId",
        id="9-segment-in-multi-app-rule",
    ),
    # --- 10: no parent message
    pytest.param(
        RULE,
        GOOD.replace('{parentMessageId: "1"}', "{}"),
        10,
        3,
        "apps.flights-ios",
        id="10-no-parent-message",
    ),
    # --- 13: field unknown
    pytest.param(
        RULE,
        GOOD.replace("  subject:", "  subjet: x\n  subject:"),
        13,
        5,
        "message.subjet",
        id="13-unknown-message-field",
    ),
    # aps keeps YAML's types: unquoted, these are a number or a boolean, which Accengage
    # refuses (validate said clean and every fire failed)
    pytest.param(
        RULE, before_text("  aps: {alert: 12:30}"), 5, 6, "message.aps.alert", id="5-aps-time"
    ),
    pytest.param(
        RULE, before_text("  aps: {sound: 1.5}"), 5, 6, "message.aps.sound", id="5-aps-number"
    ),
    pytest.param(
        RULE, before_text("  aps: {alert: Off}"), 5, 6, "message.aps.alert", id="5-aps-boolean"
    ),
    pytest.param(
        RULE,
        with_target("    aps: {alert: {body: yes}}"),
        9,
        9,
        "targets[0].aps.alert.body",
        id="9-target-aps-alert-dictionary-boolean",
    ),
    pytest.param(
        RULE,
        with_target("    aps: {alert: 'Hi', sond: x}"),
        13,
        9,
        "targets[0].aps.sond",
        id="13-unknown-field-in-target-aps",
    ),
    # --- 14: more than 100 static targets
    pytest.param(
        RULE,
        GOOD + "".join(f"  - memberId: 'm{i}'\n" for i in range(100)),
        14,
        7,
        "targets",
        id="14-more-than-100-static-targets",
    ),
    # --- 15: a ${macro} nothing can fill
    pytest.param(
        RULE,
        GOOD.replace("Hi ${first_name}", "Hi ${nickname}"),
        15,
        6,
        "message.text",
        id="15-macro-nothing-can-fill",
    ),
    pytest.param(
        RULE,
        with_target("    aps: {alert: 'Hi ${nickname}'}"),
        15,
        9,
        "targets[0].aps.alert",
        id="15-macro-in-target-aps",
    ),
    # --- 17: language not in languages
    pytest.param(
        RULE,
        before_text("  language: de"),
        17,
        6,
        "message.language",
        id="17-language-not-declared",
    ),
    # --- 23: no or bad template for buttons
    pytest.param(
        RULE,
        before_text("  interactiveButtons:\n    buttons: [{id: 1}]"),
        23,
        6,
        "message.interactiveButtons",
        id="23-ios-buttons-without-template",
    ),
    pytest.param(
        RULE,
        before_text("  interactiveButtons: {use: confirm-or-rebok}"),
        23,
        6,
        "message.interactiveButtons.use",
        id="23-unknown-button-template-file",
    ),
    # --- 24: no or bad button id
    pytest.param(
        RULE,
        before_text(
            "  interactiveButtons: {template: yes_no_category, buttons: [{id: 1}, {id: 3}]}"
        ),
        24,
        6,
        "message.interactiveButtons.buttons[1].id",
        id="24-id-beyond-its-template",
    ),
    pytest.param(
        RULE,
        before_text(
            "  interactiveButtons: {template: yes_no_category, buttons: [{id: 1}, {id: 1}]}"
        ),
        24,
        6,
        "message.interactiveButtons.buttons[1].id",
        id="24-id-repeated",
    ),
    pytest.param(
        RULE,
        before_text(
            "  interactiveButtons: {template: yes_no_category, buttons: [{action: close}]}"
        ),
        24,
        6,
        "message.interactiveButtons.buttons[0].id",
        id="24-id-missing",
    ),
    # --- 25: bad customParams for buttons
    pytest.param(
        RULE,
        before_text(
            "  interactiveButtons:\n"
            "    template: yes_no_category\n"
            "    buttons:\n"
            "      - id: 1\n"
            "        customParams: [{value: x}]"
        ),
        25,
        10,
        "message.interactiveButtons.buttons[0].customParams[0]",
        id="25-button-custom-param-without-key",
    ),
    # --- no code: YAML syntax (no field: the file could not be read into one). The parser
    # notices the unclosed "[" of line 5 on line 6, where it meets "text:".
    pytest.param(
        RULE,
        GOOD.replace("  subject: Flight canceled", "  subject: [Flight"),
        None,
        6,
        "",
        id="yaml-unclosed-flow-sequence",
    ),
    pytest.param(
        RULE,
        before_text("  subject: Again"),
        None,
        6,
        "",
        id="yaml-duplicate-key",  # on the second "subject:"; the first is on line 5
    ),
    # --- no code: triggers
    pytest.param(
        RULE,
        GOOD.replace("{event: flight.canceled}", '{cron: "0 25 * * *"}'),
        None,
        1,
        "trigger.cron",
        id="trigger-bad-cron",
    ),
    pytest.param(
        RULE,
        GOOD.replace("{event: flight.canceled}", '{cron: "0 9 * * *", timezone: Europe/Pari}'),
        None,
        1,
        "trigger.timezone",
        id="trigger-bad-timezone",
    ),
    pytest.param(
        RULE,
        GOOD.replace("{event: flight.canceled}", '{cron: "0 9 * * *", timezone: ""}'),
        None,
        1,
        "trigger.timezone",
        id="trigger-empty-timezone",
    ),
    pytest.param(
        RULE,
        GOOD.replace("{event: flight.canceled}", "{event: a, every: 5m}"),
        None,
        1,
        "trigger",
        id="trigger-two-kinds",
    ),
    # --- no code: rule-level keys
    pytest.param(
        RULE,
        with_target("descripton: typo"),
        None,
        9,
        "descripton",
        id="rule-level-unknown-key",
    ),
    # --- no code: Jinja syntax
    pytest.param(
        RULE,
        GOOD.replace("Hi ${first_name}", "Hi {{ event.name }"),
        None,
        6,
        "message.text",
        id="jinja-unclosed-expression",
    ),
    pytest.param(
        RULE,
        GOOD.replace("Hi ${first_name}", "Deal {#1 today} ${first_name}"),
        None,
        6,
        "message.text",
        id="jinja-comment-in-prose",
    ),
]


@pytest.mark.parametrize(("file", "text", "code", "line", "field"), ROWS)
def test_one_problem_at_its_line(
    tmp_path: Path, file: str, text: str, code: int | None, line: int, field: str
) -> None:
    root = make_project(tmp_path / "project", text if file == SETTINGS else None)
    if file == RULE:
        (root / RULE).write_text(text)
    errors = [(p.file, p.code, p.line, p.field) for p in problems(root, severity="error")]
    assert errors == [(file, code, line, field)]


def test_every_code_of_design_section_3_has_a_row() -> None:
    """A code added to §3 without a row here would go untested."""
    design_codes = {3, 4, 5, 6, 9, 10, 13, 14, 15, 17, 23, 24, 25, None}
    assert {row.values[2] for row in ROWS} == design_codes
