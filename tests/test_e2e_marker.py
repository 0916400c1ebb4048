"""The ``e2e`` marker: a test that starts a real daemon must carry it (conftest enforces it)."""

from __future__ import annotations

import pytest

from tests.daemon_process import Daemon, Project


def test_an_unmarked_test_cannot_start_a_daemon(one_rule_project: Project) -> None:
    """Every launch asks Daemon.env(), so a daemon test without the marker fails at once,
    saying what to add, instead of slipping into the fast ``-m "not e2e"`` run."""
    with pytest.raises(AssertionError, match=r"mark it @pytest\.mark\.e2e"):
        Daemon(one_rule_project).env()


@pytest.mark.e2e
def test_a_marked_test_may_start_one(one_rule_project: Project) -> None:
    assert Daemon(one_rule_project).env()["TEST_LOGIN"] == "test-login"
