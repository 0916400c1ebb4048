"""``pushrules init``: a new rules repository that validates, tests, and checks its commits."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from engine import __version__
from engine.cli.author import scaffold_files, schema_files
from engine.cli.main import build_parser, main
from tests.helpers import REPO
from tests.test_json_schema import schema_errors

#: Every file ``init`` writes.
SCAFFOLD = {
    ".github/workflows/pushrules.yml",
    ".gitignore",
    ".pre-commit-config.yaml",
    "README.md",
    "events/order-shipped.json",
    "pushrules.yaml",
    "rule-tests/order-shipped.yaml",
    "rules/order-shipped.yaml",
    "schemas/buttons.json",
    "schemas/config.json",
    "schemas/rule.json",
    "schemas/template.json",
    "schemas/tests.json",
    "templates/buttons/track-order.yaml",
    "templates/messages/order-shipped.yaml",
}

#: The schema each kind of file names on its first line, and the kind of document it is.
KIND_OF = {
    "pushrules.yaml": "config",
    "rules/": "rule",
    "templates/messages/": "template",
    "templates/buttons/": "buttons",
    "rule-tests/": "tests",
}


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """git in ``repo``, its configuration the test's own (no user's hooks or templates)."""
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False, env=ENV
    )
    assert not check or done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done


#: The environment of git and pre-commit: none of the caller's git settings (a test run from
#: a hook would hand down GIT_DIR), nor the user's configuration.
ENV = {
    **{name: value for name, value in os.environ.items() if not name.startswith("GIT_")},
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Rule Author",
    "GIT_AUTHOR_EMAIL": "author@example.com",
    "GIT_COMMITTER_NAME": "Rule Author",
    "GIT_COMMITTER_EMAIL": "author@example.com",
}


# --- what init writes ------------------------------------------------------------------------


def test_a_new_project_validates_and_its_tests_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "my-rules"
    assert main(["init", str(root)]) == 0
    out = capsys.readouterr().out
    assert files_under(root) == SCAFFOLD
    assert f"wrote {root / 'rules/order-shipped.yaml'}" in out
    assert "pre-commit install" in out and "README.md" in out
    assert main(["validate", "--strict", str(root)]) == 0
    assert main(["test", str(root)]) == 0
    assert "3 passed" in capsys.readouterr().err
    assert main(["fmt", "--check", "--project", str(root)]) == 0
    assert "@VERSION@" not in "".join(scaffold_files().values())


def test_each_file_names_its_schema_which_init_wrote_and_takes_it(tmp_path: Path) -> None:
    """The first line of every YAML file points, from its folder, at the schema of its kind in
    the new repository's schemas/; those are `pushrules schema --out`'s; each file passes."""
    assert main(["init", str(tmp_path)]) == 0
    for name, text in schema_files().items():
        assert (tmp_path / "schemas" / name).read_text() == text
    checked = 0
    for rel in sorted(files_under(tmp_path)):
        kind = next((k for prefix, k in KIND_OF.items() if rel.startswith(prefix)), None)
        if kind is None:
            continue
        path = tmp_path / rel
        first = path.read_text().splitlines()[0]
        match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
        assert match, f"{rel} names no schema on its first line"
        schema = (path.parent / match.group(1)).resolve()
        assert schema == (tmp_path / "schemas" / f"{kind}.json").resolve(), rel
        assert schema_errors(kind, path.read_text()) == [], rel
        checked += 1
    assert checked == 5


def test_a_folder_that_is_not_empty_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["init", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not empty (notes.txt)" in err and "--force" in err
    assert files_under(tmp_path) == {"notes.txt"}


def test_a_fresh_git_repository_counts_as_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    git(tmp_path, "init", "-q")
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    assert files_under(tmp_path) - {p for p in files_under(tmp_path) if p.startswith(".git/")} == (
        SCAFFOLD
    )
    out = capsys.readouterr().out
    assert "wrote rules/order-shipped.yaml" in out
    assert "cd " not in out and "git init" not in out  # here, and already a repository


def test_force_adds_what_is_missing_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "README.md").write_text("# Our notifications\n")
    (tmp_path / ".gitignore").write_text("*.pyc\npushrules.db*\n")
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "order-shipped.yaml").write_text("description: ours\n")
    assert main(["init", "--force", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "README.md").read_text() == "# Our notifications\n"
    assert (tmp_path / ".gitignore").read_text() == "*.pyc\npushrules.db*\n"
    assert (tmp_path / "rules" / "order-shipped.yaml").read_text() == "description: ours\n"
    for kept in ("README.md", ".gitignore", "rules/order-shipped.yaml"):
        assert f"skipped {tmp_path / kept}: already there, left as it is" in err
        assert f"wrote {tmp_path / kept}" not in out
    assert "add to .gitignore: pushrules-sandbox.db* preview-*.html" in err
    assert files_under(tmp_path) == SCAFFOLD
    assert "Files already there were kept" in out


def test_a_file_it_cannot_write_fails_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "rule-tests").write_text("a file where the folder goes")
    assert main(["init", "--force", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'rule-tests/order-shipped.yaml'}" in err
    assert files_under(tmp_path) == SCAFFOLD - {"rule-tests/order-shipped.yaml"} | {"rule-tests"}


def test_usage_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["init", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "a"), "--project", str(tmp_path / "b")]) == 2
    assert "name the project once" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_help_has_examples() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine", "init", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert "Examples:" in done.stdout and "pushrules init my-rules" in done.stdout
    assert "--force" in done.stdout


def test_gitignore_covers_the_outbox_and_previews(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path)]) == 0
    git(tmp_path, "init", "-q")
    ignored = [
        "pushrules.db",
        "pushrules.db-wal",
        "pushrules.db-journal",
        "pushrules-sandbox.db",
        "pushrules-sandbox.db-shm",
        "preview-order-shipped.html",
    ]
    kept = ["rules/order-shipped.yaml", "pushrules.yaml", "schemas/rule.json", "README.md"]
    done = git(tmp_path, "check-ignore", *ignored, *kept, check=False)
    assert done.stdout.split() == ignored


def test_the_workflow_validates_tests_and_posts_the_plan() -> None:
    text = scaffold_files()[".github/workflows/pushrules.yml"]
    workflow = yaml.safe_load(text)
    assert "pull_request" in workflow[True]  # YAML 1.1 reads the key `on` as true
    assert workflow["permissions"]["pull-requests"] == "write"
    steps = workflow["jobs"]["check"]["steps"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    runs = "\n".join(s.get("run", "") for s in steps)
    assert f'pip install "pushrules=={__version__}"' in runs
    assert "# The version your daemon runs" in text
    assert "pushrules validate --format github" in runs
    assert "pushrules test --format junit" in runs
    assert re.search(r"pushrules plan --base \S+ --format markdown", runs)
    assert "gh pr comment" in runs
    # Each pushrules command of the workflow is one this pushrules takes.
    commands = re.findall(r"\bpushrules (\w+[^|>\n;}]*)", runs)
    assert {c.split()[0] for c in commands} >= {"validate", "test", "plan"}
    known = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in commands:
        if command.split()[0] in known:  # plan may land from another branch after this one
            build_parser().parse_args(shlex.split(command))  # SystemExit 2 on a bad one


def test_the_pre_commit_config_uses_the_published_hooks() -> None:
    config = yaml.safe_load(scaffold_files()[".pre-commit-config.yaml"])
    published = {
        hook["id"] for hook in yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    }
    (repo,) = config["repos"]
    assert repo["rev"] == f"v{__version__}"
    assert {hook["id"] for hook in repo["hooks"]} == published


@pytest.mark.slow
def test_the_wheel_carries_the_scaffold(tmp_path: Path) -> None:
    """The scaffold is package data: a wheel built from this checkout holds every file."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("pushrules-*.whl")
    folder = REPO / "engine" / "cli" / "scaffold"
    expected = {f"engine/cli/scaffold/{rel}" for rel in files_under(folder)}
    with zipfile.ZipFile(wheel) as archive:
        held = {n for n in archive.namelist() if n.startswith("engine/cli/scaffold/")}
    assert held == expected


# --- the round trip --------------------------------------------------------------------------


def pushrules_command() -> list[str]:
    """The command a user types: the ``pushrules`` script beside this Python."""
    script = Path(sys.executable).with_name("pushrules")
    return [str(script)] if script.exists() else [sys.executable, "-m", "engine"]


def local_hooks(config: str) -> str:
    """The scaffold's .pre-commit-config.yaml with each hook it names as this checkout's
    .pre-commit-hooks.yaml publishes it (id, entry, files...), as a ``repo: local`` hook run
    by the pushrules beside this Python (``language: system``) instead of one pre-commit
    installs: what pre-commit runs on a commit is the published hook, without the package
    install (a clone, a build and about 30 packages from the index, which .ci/run and
    test_the_wheel_carries_the_scaffold check)."""
    published = {h["id"]: h for h in yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())}
    (repo,) = yaml.safe_load(config)["repos"]
    hooks = [{**published[h["id"]], **h, "language": "system"} for h in repo["hooks"]]
    return yaml.safe_dump({"repos": [{"repo": "local", "hooks": hooks}]}, sort_keys=False)


def test_the_published_hooks_and_the_scaffolds_config_are_valid_for_pre_commit(
    tmp_path: Path,
) -> None:
    """pre-commit's own checks of the manifest this repository publishes and of the config
    init writes (keys, types, regular expressions), so the round trip's local copy of the
    hooks stands for what a rules repository installs."""
    config = tmp_path / ".pre-commit-config.yaml"
    config.write_text(scaffold_files()[".pre-commit-config.yaml"])
    for command, path in (
        ("validate-manifest", REPO / ".pre-commit-hooks.yaml"),
        ("validate-config", config),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "pre_commit", command, str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_a_rule_authors_round_trip(tmp_path: Path) -> None:
    """What a new rules repository's README walks through, as a rule author types it, in a
    real git repository: init, edit a rule, fmt, validate, test (failing, then fixed),
    preview, and commits that run the real pre-commit, refused while a rule is broken.

    pre-commit runs the hooks the scaffold's config names, as this repository's
    .pre-commit-hooks.yaml publishes them (ids, entries, file patterns), with the pushrules of
    this checkout (see local_hooks: pre-commit's install of the package is left out, about
    15 s of pip; the package, its data and the manifest are checked by their own tests).
    """
    repo = tmp_path / "shop-rules"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    env = {**ENV, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-cache")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    pushrules = pushrules_command()

    def run(*command: str, status: int = 0) -> str:
        done = subprocess.run(
            command,
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        output = done.stdout + done.stderr
        assert done.returncode == status, f"{' '.join(command)} exited {done.returncode}:\n{output}"
        return output

    def commits() -> int:
        return int(git(repo, "rev-list", "--count", "--all").stdout.strip() or 0)

    readme = (REPO / "engine/cli/scaffold/README.md").read_text()
    walk = [
        "pushrules fmt",
        "pushrules validate",
        "pushrules test",
        "pushrules preview order-shipped --event events/order-shipped.json",
        "git commit",
    ]
    place = readme.index("## Your first change")
    for step in walk:  # the README walks through the same steps, in this order
        place = readme.find(f"`{step}", place)
        assert place != -1, f"README.md: `{step}` missing, or out of order"

    # Set up: a new repository that validates and passes its tests, its first commit checked.
    run(*pushrules, "init")
    assert "0 errors, 0 warnings" in run(*pushrules, "validate")
    assert "3 passed" in run(*pushrules, "test")
    config = repo / ".pre-commit-config.yaml"
    config.write_text(local_hooks(config.read_text()))
    run(sys.executable, "-m", "pre_commit", "install")
    run("git", "add", "-A")
    out = run("git", "commit", "-m", "A new rules repository")
    assert re.search(r"pushrules validate\.+Passed", out), out
    assert re.search(r"pushrules fmt\.+Passed", out), out

    # 1. Edit the rule, as the README shows.
    rule = repo / "rules/order-shipped.yaml"
    buttons = "  interactiveButtons: {use: track-order}   # templates/buttons/track-order.yaml\n"
    subject = "  subject: Order {{ event.order_id }} is on its way\n"
    assert buttons + subject in re.sub(r"(?m)^   ", "", readme)
    assert buttons in rule.read_text()
    rule.write_text(rule.read_text().replace(buttons, buttons + subject))
    # 2. fmt quotes the text and puts it in its place.
    assert "formatted rules/order-shipped.yaml" in run(*pushrules, "fmt")
    assert '  subject: "Order {{ event.order_id }} is on its way"\n' + buttons in rule.read_text()
    # 3. validate.
    assert "0 errors, 0 warnings" in run(*pushrules, "validate")
    # 4. The test catches the change; the author writes the new title in it.
    out = run(*pushrules, "test", status=1)
    failure = (
        "rule-tests/order-shipped.yaml:13:24: expect.body.messages[0].message.subject: "
        'expected "Your order is on its way", got "Order A1042 is on its way"'
    )
    assert failure in out and failure in readme
    test_file = repo / "rule-tests/order-shipped.yaml"
    test_file.write_text(
        test_file.read_text().replace(
            "subject: Your order is on its way", "subject: Order A1042 is on its way"
        )
    )
    assert "3 passed" in run(*pushrules, "test")
    # 5. preview writes a page git ignores.
    assert "preview-order-shipped.html" in run(
        *pushrules, "preview", "order-shipped", "--event", "events/order-shipped.json"
    )
    assert (repo / "preview-order-shipped.html").stat().st_size > 1000
    # 6. Commit.
    run("git", "add", "-A")
    before = commits()
    out = run("git", "commit", "-m", "order-shipped: the order in the title")
    assert re.search(r"pushrules validate\.+Passed", out), out
    assert commits() == before + 1
    assert git(repo, "status", "--porcelain").stdout == ""
    # 7. The plan CI posts: what the commit changed.
    out = run(*pushrules, "plan", "--base", "HEAD~1", "--format", "markdown")
    assert "| `order-shipped` | changed | message |" in out, out
    assert '+ requests[0].messages[0].message.subject: "Order A1042 is on its way"' in out, out

    # A broken rule: the commit is refused by validate, with the problem's place and fix.
    quoted = '  subject: "Order {{ event.order_id }} is on its way"\n'
    rule.write_text(rule.read_text().replace(quoted, quoted + "  sound: loud\n"))
    run("git", "add", "-A")
    out = run("git", "commit", "-m", "order-shipped: a loud sound", status=1)
    assert re.search(r"pushrules validate\.+Failed", out), out
    assert re.search(r"pushrules fmt\.+Passed", out), out
    problem = (
        "rules/order-shipped.yaml:13:10: error [5] message.sound: 'loud' is not allowed; use one "
        "of: None, default, custom"
    )
    assert problem in out and problem in readme, out
    assert commits() == before + 1

    # Fixed, but written out of place: fmt's hook lays it out and stops the commit; once the
    # change is added, the commit passes.
    rule.write_text(
        rule.read_text()
        .replace("  sound: loud\n", "")
        .replace(buttons, buttons + "  sound: default\n")
    )
    run("git", "add", "-A")
    out = run("git", "commit", "-m", "order-shipped: the default sound", status=1)
    assert re.search(r"pushrules validate\.+Passed", out), out
    assert re.search(r"pushrules fmt\.+Failed", out) and "files were modified" in out, out
    assert quoted + "  sound: default\n" + buttons in rule.read_text()
    run("git", "add", "-A")
    out = run("git", "commit", "-m", "order-shipped: the default sound")
    assert commits() == before + 2
    assert "sound: default" in git(repo, "show", "HEAD:rules/order-shipped.yaml").stdout
