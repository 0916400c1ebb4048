"""Issue 8, points 9-12: one definition of the API's rules, and problems that guide."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_project, problems, write_rule

BASE = """
trigger: {event: flight.canceled}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: Hello
targets:
  - memberId: "42"
"""


# --- 12: hints that point the right way ---------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("when: {{ event.delay > 60 }}", 'write when: "{{ event.delay > 60 }}"'),
        ("description: {{ event.id }}", 'write description: "{{ event.id }}"'),
    ],
)
def test_unquoted_jinja_hint_shows_the_authors_own_key(
    tmp_path: Path, line: str, expected: str
) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "r", BASE.replace("targets:", f"{line}\ntargets:"))
    [p] = problems(root)
    assert p.line == 6
    assert expected in p.message
    assert "memberId" not in p.message


def test_unquoted_jinja_in_a_target_shows_its_criterion(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "r", BASE.replace('memberId: "42"', "language: {{ event.lang }}"))
    [p] = problems(root)
    assert 'write language: "{{ event.lang }}"' in p.message
