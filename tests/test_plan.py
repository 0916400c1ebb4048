"""`pushrules plan` on real git repositories: commits, branches, a template change, a rename,
a cron change across a DST date, a broken file in the working tree."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from engine.cli.main import main
from engine.review import revisions
from engine.review.plan import (
    CaseDiff,
    Plan,
    RuleChange,
    Side,
    compare,
    format_markdown,
    json_diff,
    plan_project,
)
from engine.rules.loader import Loader
from tests.helpers import REPO, commit_all, git, git_repo, make_project, write_rule

FROM = "2026-03-27T00:00:00+01:00"  # two days before Paris moves to summer time

DIGEST = """
description: Daily digest
trigger:
  cron: "0 9 * * *"
  timezone: Europe/Paris
apps:
  news-ios: {parentMessageId: "3"}
message:
  subject: Your day
  text: "Hello ${first_name}"
targets:
  - language: fr
    data: {first_name: Ami}
"""

CANCELED = """
description: Passengers of a canceled flight
trigger:
  event: flight.canceled
apps:
  flights-ios: {parentMessageId: "1"}
message:
  use: flight-canceled
targets:
  - memberId: "{{ event.member_id }}"
    data: {first_name: "{{ event.first_name }}"}
"""

REBOOK = """
trigger:
  event: flight.rebooked
apps:
  flights-ios: {parentMessageId: "2"}
message:
  subject: Rebooked
  text: "Your new flight, ${first_name}"
  interactiveButtons: {use: yes-no}
targets:
  - memberId: "{{ event.member_id }}"
    data: {first_name: "{{ event.first_name }}"}
"""

HELLO = """
description: A hello to regular readers
trigger:
  event: app.hello
apps:
  news-ios: {parentMessageId: "1"}
  news-android: {parentMessageId: "2"}
message:
  subject: Hello
  text: You are receiving a message
targets:
  - language: {operator: "=", value: en}
"""

# A rule with a warning: a category neither predefined nor declared.
WARNED = """
trigger:
  event: promo
apps:
  flights-android: {parentMessageId: "5"}
message:
  text: A promotion
  interactiveButtons:
    template: promo_category
    buttons:
      - {id: 1, action: close}
targets:
  - language: en
"""

BROKEN = """
trigger:
  event: flight.canceled
apps:
  flights-iso: {parentMessageId: "1"}
message:
  use: flight-canceled
targets:
  - memberId: "{{ event.member_id }}"
    data: {first_name: "{{ event.first_name }}"}
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A rules repository whose project is in notifications/, committed on main, with the
    branch ``feature`` checked out."""
    top = git_repo(tmp_path / "repo")
    (top / "README.md").write_text("Our push rules\n")
    project = make_project(top / "notifications")
    for name, text in (
        ("digest", DIGEST),
        ("canceled", CANCELED),
        ("rebook", REBOOK),
        ("hello", HELLO),
        ("promo", WARNED),
    ):
        write_rule(project, name, text)
    commit_all(top, "rules")
    git(top, "checkout", "-q", "-b", "feature")
    return top


def run_plan(
    capsys: pytest.CaptureFixture[str], project: Path, *args: str
) -> tuple[int, dict[str, Any], str]:
    code = main(["plan", str(project), "--format", "json", "--from", FROM, *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}, captured.err


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_nothing_changed(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, plan, _ = run_plan(capsys, repo / "notifications")
    assert code == 0
    assert plan == {
        "base": git(repo, "rev-parse", "main").strip(),
        "added": [],
        "removed": [],
        "renamed": [],
        "changed": [],
        "problems": {"new": [], "fixed": []},
    }


def test_template_change_shows_on_every_rule_using_it(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = repo / "notifications"
    edit(project / "templates/messages/flight-canceled.yaml", "Flight canceled", "Your flight")
    edit(project / "templates/buttons/yes-no.yaml", "example.com/yes", "example.com/oui")
    commit_all(repo, "templates")
    code, plan, _ = run_plan(capsys, project)
    assert code == 0
    assert [(c["rule"], c["parts"]) for c in plan["changed"]] == [
        ("canceled", ["message"]),
        ("rebook", ["buttons"]),
    ]
    assert plan["added"] == plan["removed"] == plan["renamed"] == []


CANCELED_TESTS = """
cases:
  - name: a passenger hears of it
    event: {flightref: EY5138, member_id: "765c8", first_name: Ann}
    expect: {requests: 1}
  - name: no flight number is an error
    event: {member_id: "765c8"}
    expect: {error: "event.flightref is undefined"}
  - name: quiet all the same
    event: {flightref: EY5138, member_id: "765c8", first_name: Bo}
    at: "2026-01-05 23:00"
    expect: {requests: 1}
"""


def test_test_cases_before_and_after(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The working tree's tests of a changed rule, run on both versions: what each sends."""
    project = repo / "notifications"
    (project / "rule-tests").mkdir()
    (project / "rule-tests/canceled.yaml").write_text(CANCELED_TESTS)
    commit_all(repo, "tests")
    edit(project / "templates/messages/flight-canceled.yaml", "Flight canceled", "Canceled")
    edit(
        project / "rules/canceled.yaml",
        "targets:",
        'quiet_hours: {from: "22:00", to: "07:00"}\ntargets:',
    )
    code, plan, _ = run_plan(capsys, project)
    assert code == 0
    [change] = plan["changed"]
    assert change["parts"] == ["message", "limits"]
    sent, error, quiet = change["cases"]
    assert sent == {
        "name": "a passenger hears of it",
        "diff": [
            {
                "path": "requests[0].message.subject",
                "before": "Flight canceled",
                "after": "Canceled",
            }
        ],
    }
    assert error == {"name": "no flight number is an error", "diff": []}
    [(was, now)] = [
        (d.get("before"), d.get("after")) for d in quiet["diff"] if "not_sent" in d["path"]
    ]
    assert was is None and "quiet hours (22:00 to 07:00)" in now
    markdown = main(["plan", str(project), "--format", "markdown", "--from", FROM])
    text = capsys.readouterr().out
    assert markdown == 0
    assert '- requests[0].message.subject: "Flight canceled"' in text
    assert '+ requests[0].message.subject: "Canceled"' in text
    assert "1 other test case: no change." in text


def test_rename_is_neither_added_nor_removed(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = repo / "notifications"
    git(repo, "mv", "notifications/rules/hello.yaml", "notifications/rules/hello-news.yaml")
    # The warned rule moves to a subfolder under a new name, its comment edited: its warning
    # is the same warning, neither new nor fixed.
    (project / "rules/offers").mkdir()
    (project / "rules/offers/promo-2026.yaml").write_text(
        "# Spring promotion\n" + (project / "rules/promo.yaml").read_text()
    )
    (project / "rules/promo.yaml").unlink()
    code, plan, _ = run_plan(capsys, project)
    assert code == 0
    assert plan["renamed"] == [
        {"from": "hello", "to": "hello-news"},
        {"from": "promo", "to": "promo-2026"},
    ]
    assert plan["added"] == plan["removed"] == plan["changed"] == []
    assert plan["problems"] == {"new": [], "fixed": []}


def test_a_renamed_rule_that_also_changed_is_renamed_and_changed(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Renamed with its subject edited: one rule renamed, and what changed in it; a rule
    rewritten from scratch under a new name at the same time stays removed and added."""
    project = repo / "notifications"
    git(repo, "mv", "notifications/rules/hello.yaml", "notifications/rules/hi.yaml")
    edit(project / "rules/hi.yaml", "subject: Hello", "subject: Hi")
    git(repo, "rm", "-q", "notifications/rules/promo.yaml")
    (project / "rules/flash.yaml").write_text(
        'trigger: {event: flash}\napps: {news-android: {parentMessageId: "9"}}\n'
        'message: {text: "{{ event.t }}"}\ntargets: [{memberId: "{{ event.m }}"}]\n'
    )
    code, plan, err = run_plan(capsys, project)
    assert code == 0, err
    assert plan["renamed"] == [{"from": "hello", "to": "hi"}]
    assert (plan["added"], plan["removed"]) == (["flash"], ["promo"])
    [change] = plan["changed"]
    assert change["rule"] == "hi" and change["parts"] == ["message"], change


def test_cron_change_across_dst(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = repo / "notifications"
    edit(project / "rules/digest.yaml", '"0 9 * * *"', '"30 2 * * *"')
    code, plan, _ = run_plan(capsys, project)
    assert code == 0
    [change] = plan["changed"]
    assert change["rule"] == "digest"
    assert change["parts"] == ["trigger"]
    assert change["next_before"] == [
        "2026-03-27T09:00:00+01:00",
        "2026-03-28T09:00:00+01:00",
        "2026-03-29T09:00:00+02:00",
        "2026-03-30T09:00:00+02:00",
        "2026-03-31T09:00:00+02:00",
    ]
    # 02:30 does not exist on the 29th in Paris: it fires just after the change, at 03:00.
    assert change["next_after"] == [
        "2026-03-27T02:30:00+01:00",
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_a_timezone_change_in_pushrules_yaml_moves_rules_without_their_own(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = repo / "notifications"
    write_rule(project, "weekly", DIGEST.replace("  timezone: Europe/Paris\n", ""))
    commit_all(repo, "a rule in the project's timezone")
    edit(project / "pushrules.yaml", "timezone: Europe/Paris", "timezone: Europe/London")
    code, plan, _ = run_plan(capsys, project, "--base", "HEAD")
    assert code == 0
    [change] = plan["changed"]  # digest names its own timezone: unchanged
    assert (change["rule"], change["parts"]) == ("weekly", ["trigger"])
    assert change["next_before"][0] == "2026-03-27T09:00:00+01:00"
    assert change["next_after"][0] == "2026-03-27T09:00:00+00:00"


PROMO = """
trigger:
  event: promo
apps:
  flights-android: {parentMessageId: "5"}
message:
  text: A promotion
targets:
  - language: en
"""
QUIET = PROMO.replace("apps:", 'quiet_hours: {from: "21:00", to: "08:00", then: skip}\napps:')


def test_a_timezone_change_in_pushrules_yaml_moves_what_reads_the_rules_timezone(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An event rule without a timezone of its own keeps its quiet hours, and gives ``now``
    and ``rule.timezone``, in the project's: Paris -> New York changes what it sends, and
    the plan says why, though its file did not change. A rule reading none of them, or
    naming its own timezone, is unchanged."""
    project = repo / "notifications"
    write_rule(project, "quiet", QUIET)
    write_rule(project, "evening", PROMO.replace("apps:", 'when: "{{ now.hour >= 18 }}"\napps:'))
    write_rule(project, "weekday", QUIET.replace("A promotion", "Day {{ now.weekday() }}"))
    write_rule(project, "zone", PROMO.replace("A promotion", '"{{ rule.timezone }}"'))
    write_rule(project, "named", PROMO.replace("A promotion", '"{{ rule.id }}"'))
    write_rule(project, "paris", QUIET.replace("promo\n", "promo\n  timezone: Europe/Paris\n"))
    commit_all(repo, "rules that read the time")
    edit(project / "pushrules.yaml", "timezone: Europe/Paris", "timezone: America/New_York")
    code, plan, _ = run_plan(capsys, project, "--base", "HEAD")
    assert code == 0
    changed = {c["rule"]: (c["parts"], c.get("timezone")) for c in plan["changed"]}
    moved = {"before": "Europe/Paris", "after": "America/New_York"}
    assert changed == {
        "evening": (["timezone"], {**moved, "reads": ["now"]}),
        "quiet": (["timezone"], {**moved, "reads": ["quiet hours"]}),
        "weekday": (["timezone"], {**moved, "reads": ["quiet hours", "now"]}),
        "zone": (["timezone"], {**moved, "reads": ["rule.timezone"]}),
    }
    assert main(["plan", str(project), "--base", "HEAD", "--from", FROM]) == 0
    text = capsys.readouterr().out
    assert "changed    quiet: timezone: Europe/Paris -> America/New_York (quiet hours)\n" in text


def test_a_rules_own_timezone_moves_its_quiet_hours(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An event rule's ``trigger.timezone`` is where its quiet hours are judged: a push
    skipped at 22:00 in Paris is sent at that moment in New York (16:00), as its test case
    shows."""
    project = repo / "notifications"
    write_rule(project, "quiet", QUIET)
    (project / "rule-tests").mkdir()
    (project / "rule-tests/quiet.yaml").write_text(
        "cases:\n  - name: at ten in the evening in Paris\n"
        '    event: {}\n    at: "2026-01-05T22:00:00+01:00"\n    expect: {requests: 0}\n'
    )
    commit_all(repo, "a rule with quiet hours")
    edit(project / "rules/quiet.yaml", "promo\n", "promo\n  timezone: America/New_York\n")
    code, plan, _ = run_plan(capsys, project, "--base", "HEAD")
    assert code == 0
    [change] = plan["changed"]
    assert (change["rule"], change["parts"]) == ("quiet", ["trigger", "timezone"])
    assert change["timezone"]["reads"] == ["quiet hours"]
    [case] = change["cases"]
    # Held back before (the requests are the same), sent after.
    [held] = case["diff"]
    assert held["path"] == "not_sent" and "after" not in held
    assert held["before"].startswith("22:00 is in the quiet hours (21:00 to 08:00)")


def test_enabled_and_disabled(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = repo / "notifications"
    edit(project / "rules/hello.yaml", "trigger:", "enabled: false\ntrigger:")
    code, plan, _ = run_plan(capsys, project)
    [change] = plan["changed"]
    assert (change["rule"], change["parts"], change["enabled"]) == (
        "hello",
        ["enabled"],
        [True, False],
    )
    commit_all(repo, "disable hello")
    edit(project / "rules/hello.yaml", "enabled: false\n", "")
    code, plan, _ = run_plan(capsys, project, "--base", "HEAD")
    assert code == 0
    assert plan["changed"][0]["enabled"] == [False, True]


def test_parts_of_a_changed_rule(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = repo / "notifications"
    edit(project / "rules/hello.yaml", 'parentMessageId: "2"', 'parentMessageId: "20"')
    edit(project / "rules/hello.yaml", "value: en", "value: fr")
    edit(project / "rules/hello.yaml", "trigger:", 'when: "{{ event.ok }}"\ntrigger:')
    edit(project / "rules/canceled.yaml", "targets:", "limit: {count: 5, per: 1h}\ntargets:")
    edit(project / "rules/digest.yaml", "Daily digest", "Morning digest")
    code, plan, _ = run_plan(capsys, project)
    assert code == 0
    assert {c["rule"]: c["parts"] for c in plan["changed"]} == {
        "canceled": ["limits"],
        "digest": ["description"],
        "hello": ["when", "apps", "targets"],
    }
    # Only a schedule change lists fire times.
    assert all(c["next_before"] == c["next_after"] == [] for c in plan["changed"])


def test_a_layout_comment_or_quoting_change_is_no_change(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Values are sent as written: quoting one, a comment or the layout changes nothing."""
    project = repo / "notifications"
    edit(project / "rules/hello.yaml", "subject: Hello", "subject: 'Hello'   # greet them")
    edit(project / "rules/hello.yaml", "message:", "\n\nmessage:")
    edit(project / "rules/digest.yaml", "language: fr", 'language: "fr"')
    code, plan, _ = run_plan(capsys, project)
    assert code == 0
    assert plan["changed"] == []


def test_broken_file_in_the_working_tree(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = repo / "notifications"
    write_rule(project, "canceled", BROKEN)  # not committed
    code, plan, _ = run_plan(capsys, project)
    assert code == 1
    main(["validate", str(project), "--format", "json"])
    problems = json.loads(capsys.readouterr().out)["problems"]
    errors = [p for p in problems if p["severity"] == "error"]
    assert errors and plan["problems"]["new"] == errors  # as validate gives them
    assert plan["problems"]["fixed"] == []
    # The broken version cannot be checked: its parts come from the file as written.
    [change] = plan["changed"]
    assert (change["rule"], change["parts"], change["enabled"]) == (
        "canceled",
        ["apps", "description"],
        [True, True],
    )


def test_a_file_that_is_not_yaml_any_more(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = repo / "notifications"
    (project / "rules/hello.yaml").write_text("trigger: [unclosed\n")
    code, plan, _ = run_plan(capsys, project)
    assert code == 1
    [change] = plan["changed"]
    assert change["enabled"] == [True, None]
    assert set(change["parts"]) >= {"trigger", "apps", "message", "targets"}


def test_a_broken_pushrules_yaml(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No rule can be checked without the settings: the plan still tells what the files
    change, and the settings' error is the new problem."""
    project = repo / "notifications"
    edit(project / "pushrules.yaml", "apps:", "apps:\n  broken: [")
    edit(project / "rules/digest.yaml", "Daily digest", "Morning digest")
    code, plan, _ = run_plan(capsys, project)
    assert code == 1
    assert [(c["rule"], c["parts"]) for c in plan["changed"]] == [("digest", ["description"])]
    assert [p["file"] for p in plan["problems"]["new"]] == ["pushrules.yaml"]
    assert plan["problems"]["fixed"] == []


def test_fixed_problems(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = repo / "notifications"
    write_rule(project, "canceled", BROKEN)
    commit_all(repo, "broken")
    write_rule(project, "canceled", CANCELED.replace("of a canceled flight", "(fixed)"))
    code, plan, _ = run_plan(capsys, project, "--base", "HEAD")
    assert code == 0
    assert [p["field"] for p in plan["problems"]["fixed"]] == ["apps.flights-iso"]
    assert plan["problems"]["new"] == []


def test_a_problem_whose_line_moved_is_not_new(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = repo / "notifications"
    write_rule(project, "dup", HELLO + "description: twice\n")  # duplicate key, "first on line 1"
    commit_all(repo, "dup")
    (project / "rules/dup.yaml").write_text(
        "\n\n# moved\n" + (project / "rules/dup.yaml").read_text()
    )
    edit(project / "rules/promo.yaml", "trigger:", "description: a promotion\n\ntrigger:")
    code, plan, _ = run_plan(capsys, project, "--base", "HEAD")
    assert code == 1  # dup still has its error
    assert plan["problems"] == {"new": [], "fixed": []}
    assert [(c["rule"], c["parts"]) for c in plan["changed"]] == [("promo", ["description"])]


def test_a_problem_found_once_more_is_new_once(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = repo / "notifications"
    write_rule(project, "promo-2", WARNED)
    code, plan, _ = run_plan(capsys, project)
    assert code == 0
    [new] = plan["problems"]["new"]
    assert (new["file"], new["severity"], new["code"]) == ("rules/promo-2.yaml", "warning", 23)
    assert plan["added"] == ["promo-2"]


def test_added_and_removed(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = repo / "notifications"
    (project / "rules/promo.yaml").unlink()
    write_rule(project, "welcome", HELLO.replace("app.hello", "app.welcome"))
    code, plan, _ = run_plan(capsys, project)
    assert code == 0
    assert (plan["added"], plan["removed"]) == (["welcome"], ["promo"])
    assert plan["problems"]["fixed"][0]["file"] == "rules/promo.yaml"  # its warning went with it


def test_default_base_is_where_the_branch_left_main(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = repo / "notifications"
    fork = git(repo, "rev-parse", "HEAD").strip()
    write_rule(project, "welcome", HELLO.replace("app.hello", "app.welcome"))
    commit_all(repo, "welcome")
    git(repo, "checkout", "-q", "main")
    write_rule(project, "later", HELLO.replace("app.hello", "app.later"))
    commit_all(repo, "later, on main")
    git(repo, "checkout", "-q", "feature")
    code, plan, _ = run_plan(capsys, project)
    assert code == 0
    # Compared with the fork point: main's later rule is not "removed" by this branch.
    assert plan["base"] == fork
    assert (plan["added"], plan["removed"]) == (["welcome"], [])
    assert main(["plan", str(project), "--from", FROM]) == 0
    assert "merge base of HEAD and main" in capsys.readouterr().out


def test_origin_head_comes_before_a_local_main(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    git_repo(clone)  # its own author
    git(clone, "checkout", "-q", "-b", "change")
    assert main(["plan", str(clone / "notifications"), "--from", FROM]) == 0
    assert "merge base of HEAD and origin/HEAD" in capsys.readouterr().out


def test_a_shallow_clone_without_the_base_branch_is_a_usage_error(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CI checkout of the pull request's commit alone: comparing with HEAD would show no
    change at all, so plan says to fetch the history instead."""
    clone = git_repo(tmp_path / "clone")  # as actions/checkout does it by default:
    git(clone, "fetch", "-q", "--depth", "1", f"file://{repo}", "feature")
    git(clone, "checkout", "-q", "FETCH_HEAD")
    assert git(clone, "rev-parse", "--is-shallow-repository").strip() == "true"
    code, _, err = run_plan(capsys, clone / "notifications")
    assert code == 2
    assert "shallow" in err and "fetch-depth: 0" in err and "--base REV" in err


def test_on_main_the_base_is_head(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    git(repo, "checkout", "-q", "main")
    edit(repo / "notifications/rules/digest.yaml", "Daily digest", "Digest")
    code, plan, _ = run_plan(capsys, repo / "notifications")
    assert code == 0
    assert plan["base"] == git(repo, "rev-parse", "HEAD").strip()
    assert [c["rule"] for c in plan["changed"]] == ["digest"]


def test_without_main_or_master_the_base_is_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    top = git_repo(tmp_path / "repo", branch="trunk")
    write_rule(make_project(top), "hello", HELLO)
    commit_all(top, "rules")
    (top / "rules/hello.yaml").unlink()
    code, plan, err = run_plan(capsys, top)
    assert code == 0
    assert plan["removed"] == ["hello"]
    assert "comparing with HEAD" in err and "--base" in err


def test_no_history_in_common_is_a_usage_error(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    git(repo, "checkout", "-q", "--orphan", "unrelated")
    commit_all(repo, "unrelated history")
    code, _, err = run_plan(capsys, repo / "notifications")
    assert code == 2
    assert "no commit in common" in err and "--base REV" in err


def test_project_absent_at_the_base(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A project created by the branch: every rule is added."""
    first = git(repo, "rev-list", "--max-parents=0", "HEAD").strip()
    git(repo, "checkout", "-q", "-b", "bare", first)
    git(repo, "rm", "-q", "-r", "notifications")
    commit_all(repo, "no project yet")
    git(repo, "checkout", "-q", "feature")
    code, plan, _ = run_plan(capsys, repo / "notifications", "--base", "bare")
    assert code == 0
    assert plan["added"] == ["canceled", "digest", "hello", "promo", "rebook"]
    assert [p["code"] for p in plan["problems"]["new"]] == [23]  # promo's warning


def test_not_a_git_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = make_project(tmp_path / "p")
    code, _, err = run_plan(capsys, project)
    assert code == 2
    assert "not in a git repository" in err


def test_unknown_revision(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_plan(capsys, repo / "notifications", "--base", "no-such-branch")
    assert code == 2
    assert "'no-such-branch' is not a commit, branch or tag" in err
    code, _, err = run_plan(capsys, repo / "notifications", "--base=--output=x")
    assert code == 2


def test_the_working_tree_and_index_are_left_alone(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = repo / "notifications"
    edit(project / "rules/digest.yaml", "Daily digest", "Staged digest")
    git(repo, "add", "notifications/rules/digest.yaml")
    write_rule(project, "draft", HELLO)  # untracked
    edit(project / "rules/hello.yaml", "Hello", "Hi")  # modified, not staged
    status = git(repo, "status", "--porcelain")
    texts = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    head = git(repo, "rev-parse", "HEAD")
    run_plan(capsys, project, "--base", "main")
    assert git(repo, "status", "--porcelain") == status
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == texts
    assert git(repo, "rev-parse", "HEAD") == head
    assert git(repo, "stash", "list") == ""
    assert all(p.stat().st_nlink == 1 for p in texts)  # no link to a copy is left behind


def test_export_links_the_files_the_working_tree_holds_unchanged(
    repo: Path, tmp_path: Path
) -> None:
    project = repo / "notifications"
    edit(project / "rules/hello.yaml", "Hello", "Hi")
    (project / "rules/digest.yaml").unlink()
    (project / "rules/digest.yaml").symlink_to(project / "rules/canceled.yaml")
    repository = revisions.repository_of(project)
    old = tmp_path / "old"
    assert revisions.export(repository, "HEAD", old, same_as=project)
    assert (old / "rules/canceled.yaml").stat().st_ino == (
        project / "rules/canceled.yaml"
    ).stat().st_ino
    for name in ("hello", "digest"):  # changed, or a link now: the commit's text, written
        kept = old / f"rules/{name}.yaml"
        assert kept.read_text() == git(repo, "show", f"HEAD:notifications/rules/{name}.yaml")
        assert not kept.is_symlink()
        assert kept.stat().st_ino != (project / f"rules/{name}.yaml").stat().st_ino
    assert sorted(p.name for p in (old / "rules").iterdir()) == sorted(
        ["canceled.yaml", "digest.yaml", "hello.yaml", "promo.yaml", "rebook.yaml"]
    )


def test_project_at_the_top_of_the_repository(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    top = git_repo(tmp_path / "repo")
    write_rule(make_project(top), "hello", HELLO)
    commit_all(top, "rules")
    write_rule(top, "digest", DIGEST)
    code, plan, _ = run_plan(capsys, top, "--base", "HEAD")
    assert code == 0
    assert plan["added"] == ["digest"]


def test_reusing_the_working_trees_checks_gives_the_same_plan(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking once what is the same on both sides is only faster: the plan is that of two
    full loads, whether the templates changed (nothing reused) or not, rule tests included
    (their rules are checked on several cores here, as in a large project)."""
    from engine.rules import loader as loader_module

    monkeypatch.setattr(loader_module, "PARALLEL_THRESHOLD", 2)
    project = repo / "notifications"
    write_rule(project, "canceled", BROKEN)
    write_rule(project, "dup", HELLO + "description: twice\n")
    (project / "rule-tests").mkdir()
    (project / "rule-tests/rebook.yaml").write_text(
        "cases:\n  - name: rebooked\n    event: {member_id: '1', first_name: A}\n"
        "    expect: {requests: 1}\n"
    )
    (project / "rule-tests/canceled.yaml").write_text(CANCELED_TESTS)
    commit_all(repo, "a broken rule, another, tests")
    git(repo, "mv", "notifications/rules/hello.yaml", "notifications/rules/hello-news.yaml")
    edit(project / "rules/digest.yaml", '"0 9 * * *"', '"30 2 * * *"')
    write_rule(project, "canceled", CANCELED)
    (project / "rules/dup.yaml").write_text("\n" + (project / "rules/dup.yaml").read_text())
    edit(project / "rules/promo.yaml", "A promotion", "A sale")
    # A new case of an unchanged rule that its trigger cannot give: a new problem.
    with (project / "rule-tests/rebook.yaml").open("a") as tests:
        tests.write("  - name: an item\n    item: {id: 1}\n    expect: {requests: 1}\n")
    repository = revisions.repository_of(project)
    for step in ("rules only", "and a template"):
        plans = [
            plan_project(
                project,
                base="HEAD",
                base_label="HEAD",
                export=lambda folder: revisions.export(repository, "HEAD", folder, same_as=project),
                start=datetime.fromisoformat(FROM),
                reuse=reuse,
            ).to_json()
            for reuse in (True, False)
        ]
        assert plans[0] == plans[1], step
        assert plans[0]["changed"] and plans[0]["renamed"], step
        assert plans[0]["problems"]["fixed"], step
        assert any(p["file"] == "rule-tests/rebook.yaml" for p in plans[0]["problems"]["new"])
        [canceled] = [c for c in plans[0]["changed"] if c["rule"] == "canceled"]
        assert len(canceled["cases"]) == 3, step
        template = project / "templates/messages/flight-canceled.yaml"
        template.write_text(template.read_text().replace("Flight canceled", "Canceled"))


def test_cases_are_run_on_both_versions_and_diffed(tmp_path: Path) -> None:
    """The plan asks the case runner for each changed rule's cases, on each version."""
    root = make_project(tmp_path / "before")
    write_rule(root, "hello", HELLO)
    after = make_project(tmp_path / "after")
    write_rule(after, "hello", HELLO.replace("subject: Hello", "subject: Hi"))
    write_rule(after, "digest", DIGEST)
    seen = []

    def outcomes(ruleset: Any, rule_id: str) -> list[tuple[str, Any]]:
        seen.append((ruleset.root.name, rule_id))
        rule = ruleset.rules[rule_id]
        subject = rule.apps[0].message["subject"]
        return [("english", {"requests": [{"message": {"subject": subject}}]}), ("none", {})]

    plan = compare(
        Side.of(Loader(root, workers=1).load()),
        Side.of(Loader(after, workers=1).load()),
        base="x",
        base_label="x",
        start=datetime.fromisoformat(FROM),
        cases=outcomes,
    )
    assert seen == [("before", "hello"), ("after", "hello")]  # not for the added rule
    [change] = plan.changed
    assert change.cases == (
        CaseDiff(
            "english",
            ({"path": "requests[0].message.subject", "before": "Hello", "after": "Hi"},),
        ),
        CaseDiff("none", ()),
    )


def test_json_diff() -> None:
    before = {"requests": [{"a": 1, "b": [1, 2], "c": True}], "same": "x"}
    after = {"requests": [{"a": 2, "b": [1], "c": 1, "d": None}], "same": "x"}
    assert json_diff(before, after) == [
        {"path": "requests[0].a", "before": 1, "after": 2},
        {"path": "requests[0].b[1]", "before": 2},
        {"path": "requests[0].c", "before": True, "after": 1},  # true is not 1 in JSON
        {"path": "requests[0].d", "after": None},
    ]
    assert json_diff({"not_sent": "quiet hours"}, {"requests": []}) == [
        {"path": "not_sent", "before": "quiet hours"},
        {"path": "requests", "after": []},
    ]
    assert json_diff([1], [1]) == []


def test_markdown_is_a_summary_table_then_folded_details_cut_when_long() -> None:
    diff = tuple(
        {"path": f"requests[0].targets[{i}]", "after": {"memberId": str(i)}} for i in range(30)
    )
    plan = Plan(
        base="0123456789abcdef" * 2 + "01234567",
        base_label="merge base of HEAD and origin/main",
        added=("welcome",),
        renamed=(("hello", "hello-news"),),
        changed=(
            RuleChange(
                "digest",
                ("trigger", "message"),
                (True, True),
                ("2026-03-27T09:00:00+01:00",),
                ("2026-03-27T02:30:00+01:00",),
                (CaseDiff("many", diff), CaseDiff("same", ())),
            ),
            RuleChange("promo", ("enabled",), (True, False)),
        ),
    )
    text = format_markdown(plan)
    table = text.index("| rule | change | what changed |")
    assert table < text.index("<details>")
    assert "| `hello` → `hello-news` | renamed |  |" in text
    assert "| `digest` | changed | trigger, message |" in text
    assert "| `promo` | disabled |  |" in text
    assert "| 2026-03-27T09:00:00+01:00 | 2026-03-27T02:30:00+01:00 |" in text
    assert text.count("+ requests[0].targets[") == 20
    assert "… 10 more lines cut" in text
    assert "1 other test case: no change." in text
    assert "Problems: 0 new, 0 fixed." in text


def test_markdown_cuts_a_long_list_of_rules() -> None:
    plan = Plan(base="0" * 40, base_label="HEAD", added=tuple(f"r{i:03d}" for i in range(80)))
    text = format_markdown(plan)
    assert text.count("| added |") == 50
    assert "| … | 30 more rules | |" in text


def test_markdown_and_text_from_the_command(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = repo / "notifications"
    edit(project / "rules/digest.yaml", '"0 9 * * *"', '"30 2 * * *"')
    write_rule(project, "canceled", BROKEN)
    assert main(["plan", str(project), "--format", "markdown", "--from", FROM]) == 1
    text = capsys.readouterr().out
    assert text.startswith("### pushrules plan")
    assert "| `digest` | changed | trigger |" in text
    assert "<details><summary><code>digest</code>: trigger</summary>" in text
    assert "<details><summary>1 new problem</summary>" in text
    assert "**The working tree has errors**" in text
    assert main(["plan", str(project), "--from", FROM]) == 1
    text = capsys.readouterr().out
    assert "changed    digest: trigger" in text
    assert "  2026-03-29T09:00:00+02:00  2026-03-29T03:00:00+02:00" in text
    assert "rules/canceled.yaml:4:3: error [4] apps.flights-iso" in text


def test_help_has_examples() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine", "plan", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert "Examples:" in done.stdout and "--format markdown" in done.stdout


def test_a_sibling_loader_checks_only_what_differs_and_keeps_no_last_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from engine.rules import loader as loader_module

    root = make_project(tmp_path / "now")
    for name, text in (("hello", HELLO), ("digest", DIGEST), ("canceled", CANCELED)):
        write_rule(root, name, text)
    first = Loader(root, workers=1)
    now = first.load()
    old = tmp_path / "old"
    shutil.copytree(root, old)
    write_rule(old, "canceled", BROKEN)
    checked: list[str] = []
    real = loader_module.parse_rule

    def counting(rule_id: str, *args: Any) -> Any:
        checked.append(rule_id)
        return real(rule_id, *args)

    monkeypatch.setattr(loader_module, "parse_rule", counting)
    then = first.sibling(old).load()
    assert checked == ["canceled"]
    assert then.rules["hello"] is now.rules["hello"]
    assert "canceled" not in then.rules  # broken there, and not kept at this side's version
    assert then.problems == Loader(old, workers=1).load().problems


def test_a_rule_not_sent_back_is_checked_again_when_a_test_of_the_other_side_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The working tree's check did not need the digest's rule back (no test names it
    there); the old version has a test of it, so it is checked again for that test."""
    import shutil

    from engine.rules import loader as loader_module

    monkeypatch.setattr(loader_module, "PARALLEL_THRESHOLD", 2)
    root = make_project(tmp_path / "now")
    for name, text in (("hello", HELLO), ("digest", DIGEST), ("canceled", CANCELED)):
        write_rule(root, name, text)
    old = tmp_path / "old"
    shutil.copytree(root, old)
    (old / "rule-tests").mkdir()
    (old / "rule-tests/digest.yaml").write_text(
        "cases:\n  - name: an event\n    event: {x: '1'}\n    expect: {requests: 1}\n"
    )
    same = frozenset({"rules/digest.yaml", "rules/hello.yaml", "rules/canceled.yaml"})
    first = Loader(root, workers=2, tests=True, skip_rules=same)
    assert first.load().rules == {}
    then = first.sibling(old).load()
    fresh = Loader(old, workers=2, tests=True, skip_rules=same).load()
    assert then.problems == fresh.problems
    assert any("reads no event" in p.message for p in then.problems)
    assert set(then.rules) == {"digest"}
