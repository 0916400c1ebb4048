"""Issue 12: a reload reads only the files whose ``stat`` changed, an edit ``stat`` cannot see
is still found, and a loaded rule keeps what firing needs, not the marked YAML."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.render.compiler import FireContext, compile_fire
from engine.rules import loader as loader_module
from engine.rules.checks import parse_rule
from engine.rules.loader import Loader
from engine.rules.yaml_source import MarkedList, MarkedMap, Scalar
from tests.helpers import REPO, make_project, write_rule

RULE = """\
description: {description}
trigger: {{event: flight.canceled}}
apps:
  flights-ios: {{parentMessageId: "1"}}
message:
  use: flight-canceled
  interactiveButtons: {{use: yes-no}}
  badge: 3
targets:
  - memberId: "{{{{ event.member_id }}}}"
    data: {{first_name: Ann}}
vars: {{count: 12, flag: true, name: Ann}}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "project")
    for name in ("a", "b", "c"):
        write_rule(root, name, RULE.format(description=f"rule {name}"))
    return root


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The rule files each load reads, by name, in order."""
    seen: list[str] = []
    real = loader_module.read_source

    def counting(path: Path, root: Path, top: Path) -> str:
        seen.append(path.stem)
        return real(path, root, top)

    monkeypatch.setattr(loader_module, "read_source", counting)
    return seen


@pytest.fixture
def settled_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files count as modified long enough ago for their ``stat`` to vouch for them."""
    monkeypatch.setattr(loader_module, "RACY_SECONDS", 0.0)


def same_size_edit(path: Path, old: str, new: str) -> None:
    """Rewrite in place with the same size, then put the mtime back."""
    assert len(old) == len(new)
    before = path.stat()
    text = path.read_text()
    with path.open("r+") as handle:
        handle.write(text.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )


# --- what a reload reads -----------------------------------------------------------------------


@pytest.mark.usefixtures("settled_files")
def test_a_reload_reads_only_the_file_that_changed(project: Path, reads: list[str]) -> None:
    loader = Loader(project, workers=1)
    first = loader.load()
    assert sorted(reads) == ["a", "b", "c"]
    reads.clear()
    assert loader.load().rules == first.rules
    assert reads == []
    (project / "rules/b.yaml").write_text(RULE.format(description="rule B, edited"))
    second = loader.load()
    assert reads == ["b"]
    assert second.rules["b"].description == "rule B, edited"
    assert second.rules["a"] is first.rules["a"]


@pytest.mark.usefixtures("settled_files")
def test_rehash_reads_every_file_and_rechecks_none_that_is_the_same(
    project: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = Loader(project, workers=1)
    first = loader.load()
    reads.clear()
    checked: list[str] = []
    real = loader_module.parse_rule

    def counting(rule_id: str, *args: Any, **kwargs: Any) -> Any:
        checked.append(rule_id)
        return real(rule_id, *args, **kwargs)

    monkeypatch.setattr(loader_module, "parse_rule", counting)
    again = loader.load(rehash=True)
    assert sorted(reads) == ["a", "b", "c"]
    assert checked == []
    assert again.rules == first.rules


@pytest.mark.usefixtures("settled_files")
def test_an_edit_keeping_size_and_mtime_is_seen_by_its_ctime(project: Path) -> None:
    loader = Loader(project, workers=1)
    loader.load()
    same_size_edit(project / "rules/a.yaml", "rule a", "rule A")
    assert loader.load().rules["a"].description == "rule A"


@pytest.mark.usefixtures("settled_files")
def test_what_stat_cannot_show_the_rehash_finds(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system whose ``stat`` shows nothing of an edit (here, every stat alike): the
    daemon's rehash on its watcher's content re-scan or on SIGHUP still finds it."""
    monkeypatch.setattr(loader_module, "_stat_key", lambda path: (1, 2, 3, 4, 5))
    loader = Loader(project, workers=1)
    loader.load()
    (project / "rules/a.yaml").write_text(RULE.format(description="rule A"))
    assert loader.load().rules["a"].description == "rule a"  # trusted the stat
    assert loader.load(rehash=True).rules["a"].description == "rule A"


def test_a_file_modified_just_before_it_was_read_is_read_again(
    project: Path, reads: list[str]
) -> None:
    """Within the file system's timestamp granularity a second edit of the same size may keep
    every ``stat`` field (mtime and ctime in the same tick): such a file is not trusted."""
    loader = Loader(project, workers=1)
    loader.load()
    reads.clear()
    loader.load()
    assert sorted(reads) == ["a", "b", "c"]  # all written within RACY_SECONDS


@pytest.mark.usefixtures("settled_files")
def test_a_file_changing_while_read_is_read_again_and_never_half_loaded(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = Loader(project, workers=1)
    assert loader.load().rules["a"].description == "rule a"
    real = loader_module.read_source
    path = project / "rules/a.yaml"

    def torn(file: Path, root: Path, top: Path) -> str:
        """The writer is half-way: the read sees a cut file, then the writer finishes."""
        text = real(file, root, top)
        if file == path:
            path.write_text(RULE.format(description="rule a, complete"))
            return text[: len(text) // 2]
        return text

    monkeypatch.setattr(loader_module, "read_source", torn)
    path.write_text(RULE.format(description="rule a, written"))
    during = loader.load()
    assert during.rules["a"].description == "rule a"  # the last good version, not half a file
    assert "a" in during.stale
    monkeypatch.setattr(loader_module, "read_source", real)
    after = loader.load()
    assert after.rules["a"].description == "rule a, complete"
    assert after.ok


@pytest.mark.usefixtures("settled_files")
def test_a_changed_template_rechecks_every_rule_without_a_stat_change(
    project: Path, reads: list[str]
) -> None:
    loader = Loader(project, workers=1)
    loader.load()
    reads.clear()
    template = project / "templates/messages/flight-canceled.yaml"
    template.write_text(template.read_text().replace("Flight canceled", "Flight cancelled"))
    again = loader.load()
    assert sorted(reads) == ["a", "b", "c"]
    assert again.rules["a"].apps[0].message["subject"] == "Flight cancelled"


@pytest.mark.usefixtures("settled_files")
def test_a_removed_file_is_gone_and_a_new_one_is_read(project: Path, reads: list[str]) -> None:
    loader = Loader(project, workers=1)
    loader.load()
    reads.clear()
    (project / "rules/a.yaml").unlink()
    write_rule(project, "d", RULE.format(description="rule d"))
    again = loader.load()
    assert reads == ["d"]
    assert sorted(again.rules) == ["b", "c", "d"]


# --- what a loaded rule keeps -------------------------------------------------------------------


def walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from walk(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from walk(item)


def kept_data(rule: Any) -> list[Any]:
    parts = [rule.trigger, rule.vars, list(rule.targets), [p.message for p in rule.apps]]
    return list(walk(parts))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_loaded_rule_keeps_plain_data_and_the_yaml_types_it_sends(
    project: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader_module, "PARALLEL_THRESHOLD", 1)
    rule = Loader(project, workers=workers).load().rules["a"]
    values = kept_data(rule)
    assert not [v for v in values if isinstance(v, MarkedMap | MarkedList)]
    scalars = [v for v in values if isinstance(v, Scalar)]
    assert scalars and all(s.typed is not None for s in scalars)  # 12, true, badge 3, ids
    assert rule.vars == {"count": "12", "flag": "true", "name": "Ann"}
    assert type(rule.vars["name"]) is str


def test_rules_using_one_template_share_its_values(project: Path) -> None:
    rules = Loader(project, workers=1).load().rules
    a, b = (rules[n].apps[0].message for n in ("a", "b"))
    assert a["customParams"] == {"testKey": "testValue", "testKey2": "testValue2"}
    assert a["customParams"] is b["customParams"]
    assert a["interactiveButtons"]["buttons"] is b["interactiveButtons"]["buttons"]


def example_rules() -> list[str]:
    return sorted(p.stem for p in (REPO / "rules").glob("*.yaml"))


@pytest.mark.parametrize("rule_id", example_rules())
def test_a_kept_rule_sends_what_the_checked_rule_sends(rule_id: str) -> None:
    ruleset = Loader(REPO, workers=1).load()
    kept = ruleset.rules[rule_id]
    project, fragments = ruleset.project, ruleset.fragments
    assert project is not None
    text = (REPO / kept.file).read_text()
    checked, _ = parse_rule(rule_id, kept.file, text, project, fragments, kept.digest)
    assert checked is not None and checked == kept
    context = FireContext(
        now=datetime(2026, 3, 2, 9, 0, tzinfo=UTC),
        event={"member_id": "m1", "first_name": "Ann", "flightref": "EY5138", "passengers": []},
        item={"id": "i1", "title": "t", "price": 10, "url": "https://e.example"},
    )
    try:
        expected = [r.body for r in list(compile_fire(checked, project, context))]
    except Exception as exc:  # the same error both ways
        with pytest.raises(type(exc)):
            list(compile_fire(kept, project, context))
        return
    assert [r.body for r in list(compile_fire(kept, project, context))] == expected
