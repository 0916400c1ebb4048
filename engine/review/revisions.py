"""A project as it was at a git revision, read through git without touching the working tree.

Only git's plumbing is used (``rev-parse``, ``merge-base``, ``ls-tree``, ``cat-file --batch``):
nothing is checked out, so an author's uncommitted work is never at risk, and the project may
sit in any folder of the repository.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from engine.errors import PushrulesError
from engine.rules.cases import TESTS_DIR
from engine.rules.fragments import BUTTONS_DIR, MESSAGES_DIR
from engine.rules.loader import RULES_DIR
from engine.rules.project import CONFIG_NAME

#: What a project is made of, relative to its folder: all that is read of an old revision.
PROJECT_PATHS = (CONFIG_NAME, *(str(d) for d in (RULES_DIR, MESSAGES_DIR, BUTTONS_DIR, TESTS_DIR)))
#: Branches a pull request is usually merged into, in the order the default base tries them.
DEFAULT_BRANCHES = ("origin/HEAD", "origin/main", "origin/master", "main", "master")

_BLOB_MODES = {"100644", "100755"}
_LINK_MODE = "120000"


class RevisionError(PushrulesError):
    """The revision cannot be read (not a git repository, unknown revision): a usage error."""


@dataclass(frozen=True, slots=True)
class Repository:
    """The git repository holding a project: its top folder, and the project's folder in it
    (``""`` at the top, else like ``notifications/``)."""

    top: Path
    prefix: str


@dataclass(frozen=True, slots=True)
class Base:
    """The revision a plan compares with: its commit and how it was chosen, for people."""

    commit: str
    label: str


def _git(repo: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            ["git", "--literal-pathspecs", "-C", str(repo), "-c", "core.quotepath=off", *args],
            input=input,
            capture_output=True,
            check=False,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"},
        )
    except FileNotFoundError:
        raise RevisionError(
            "git is not installed (or not on PATH): plan reads the old revision through git"
        ) from None


def repository_of(project: Path) -> Repository:
    """The repository ``project`` is in; :class:`RevisionError` when it is in none."""
    done = _git(project, "rev-parse", "--show-toplevel", "--show-prefix")
    if done.returncode != 0:
        raise RevisionError(
            f"{project} is not in a git repository: plan compares a revision of the project "
            "with its working tree; run it in a clone of the rules repository"
        )
    top, prefix = done.stdout.decode().splitlines()[:2] if done.stdout.strip() else ("", "")
    return Repository(Path(top), prefix)


def resolve(repo: Repository, rev: str) -> str:
    """The commit ``rev`` (a branch, tag, commit or expression like ``HEAD~2``) names."""
    done = None
    if not rev.startswith("-"):
        done = _git(repo.top, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if done is None or done.returncode != 0:
        raise RevisionError(
            f"'{rev}' is not a commit, branch or tag of this repository; check the name "
            "(git log --oneline, git branch -a), or fetch it first (git fetch origin)"
        )
    return done.stdout.decode().strip()


def default_base(repo: Repository) -> Base:
    """Where the current branch left the branch it will be merged into: the merge base of
    ``HEAD`` with the first of :data:`DEFAULT_BRANCHES` that exists; else ``HEAD`` itself."""
    if _git(repo.top, "rev-parse", "--verify", "--quiet", "HEAD^{commit}").returncode:
        raise RevisionError(
            "this repository has no commit yet: commit the project first, then plan shows "
            "what later changes do"
        )
    shallow = _git(repo.top, "rev-parse", "--is-shallow-repository").stdout.strip() == b"true"
    fetch = "this clone is shallow: fetch the whole history (in CI, fetch-depth: 0), or "
    for branch in DEFAULT_BRANCHES:
        if _git(repo.top, "rev-parse", "--verify", "--quiet", f"{branch}^{{commit}}").returncode:
            continue
        done = _git(repo.top, "merge-base", "HEAD", branch)
        if done.returncode == 0:
            return Base(done.stdout.decode().strip(), f"merge base of HEAD and {branch}")
        raise RevisionError(
            f"HEAD and {branch} have no commit in common; {fetch if shallow else ''}name the "
            "revision to compare with: --base REV"
        )
    if shallow:  # a CI checkout of one commit: comparing with HEAD would show no change
        raise RevisionError(
            f"no {', '.join(DEFAULT_BRANCHES[:-1])} or {DEFAULT_BRANCHES[-1]} here to compare "
            f"with; {fetch}name the revision to compare with: --base REV"
        )
    return Base(resolve(repo, "HEAD"), "HEAD")


def export(repo: Repository, commit: str, dest: Path, *, same_as: Path | None = None) -> bool:
    """Write the project's files as they are at ``commit`` into ``dest``; False when the
    project's folder did not exist at that commit (nothing written).

    ``same_as``: the project's folder in the working tree. A file there whose content is the
    commit's is hard-linked into ``dest`` instead of written (where the file system allows),
    which costs a fraction of creating it: ``dest`` is only ever read.
    """
    prefix = repo.prefix
    paths = [f"{prefix}{p}" for p in PROJECT_PATHS]
    listing = _git(repo.top, "ls-tree", "-r", "-z", "--full-tree", commit, "--", *paths)
    if listing.returncode != 0:
        raise RevisionError(
            f"cannot list the files of {commit[:12]}: {listing.stderr.decode().strip()}"
        )
    entries: list[tuple[str, str, str]] = []  # mode, object id, path below the project
    for record in listing.stdout.split(b"\0"):
        if not record:
            continue
        meta, _, path = record.decode("utf-8", "surrogateescape").partition("\t")
        mode, kind, object_id = meta.split(" ")
        if kind == "blob" and (mode in _BLOB_MODES or mode == _LINK_MODE):
            entries.append((mode, object_id, path[len(prefix) :]))
    if not entries:
        probe = f"{commit}:{prefix}" if prefix else commit
        exists = _git(repo.top, "cat-file", "-e", probe).returncode == 0
        if not exists:
            return False
    same: dict[str, tuple[Path, bytes]] = {}  # path below the project -> working file, bytes
    if same_as is not None:
        for mode, object_id, rel in entries:
            source = same_as / PurePosixPath(rel)
            if mode in _BLOB_MODES and not source.is_symlink() and source.is_file():
                try:
                    data = source.read_bytes()
                except OSError:
                    continue
                if _object_id(data, len(object_id)) == object_id:
                    same[rel] = (source, data)
    contents = _blobs(repo, sorted({o for _, o, rel in entries if rel not in same}))
    dest.mkdir(parents=True, exist_ok=True)
    for mode, object_id, rel in entries:
        target = dest / PurePosixPath(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == _LINK_MODE:
            os.symlink(os.fsdecode(contents[object_id]), target)
        elif rel in same:
            source, data = same[rel]
            try:
                os.link(source, target)
            except OSError:  # another file system, or links not allowed: a copy then
                target.write_bytes(data)
        else:
            target.write_bytes(contents[object_id])
    return True


def _object_id(data: bytes, length: int) -> str:
    """git's id of a file holding ``data``, in the repository's hash (SHA-1's 40 hex digits,
    or SHA-256's 64)."""
    digest = hashlib.sha1 if length == 40 else hashlib.sha256
    return digest(b"blob %d\0" % len(data) + data).hexdigest()


def _blobs(repo: Repository, object_ids: list[str]) -> dict[str, bytes]:
    """The contents of blobs, read in one ``git cat-file --batch``."""
    if not object_ids:
        return {}
    done = _git(
        repo.top, "cat-file", "--batch", input="".join(f"{o}\n" for o in object_ids).encode()
    )
    if done.returncode != 0:
        raise RevisionError(f"cannot read files from git: {done.stderr.decode().strip()}")
    out = done.stdout
    found: dict[str, bytes] = {}
    at = 0
    for object_id in object_ids:
        end = out.index(b"\n", at)
        header = out[at:end].decode().split(" ")
        if len(header) != 3:
            raise RevisionError(f"git could not read object {object_id}: {' '.join(header)}")
        size = int(header[2])
        found[object_id] = out[end + 1 : end + 1 + size]
        at = end + 1 + size + 1  # the content is followed by a newline
    return found
