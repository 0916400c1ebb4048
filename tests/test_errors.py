"""Issue 9: one base for the errors a user can act on, and ``main()`` turning each into a
message and an exit code, never a traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from pathlib import Path

import pytest

import engine
from engine.cli import check as cli_check
from engine.cli import main as cli_main
from engine.cli.common import EXIT_PROBLEMS, EXIT_USAGE
from engine.errors import PushrulesError

#: Exceptions of the engine that never reach a user: each is caught where it is raised and
#: turned into a problem with a line and column.
INTERNAL = {"engine.rules.yaml_source._TooLarge"}


def engine_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class the engine defines, by dotted name (all modules imported)."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(engine.__path__, "engine."):
        if info.name == "engine.__main__":  # runs the command line when imported
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def test_every_user_error_of_the_engine_derives_from_the_base() -> None:
    found = engine_exceptions()
    assert "engine.render.compiler.CompileError" in found  # the walk saw the packages
    strays = sorted(
        name
        for name, cls in found.items()
        if name not in INTERNAL and not issubclass(cls, PushrulesError)
    )
    assert strays == [], f"user-facing errors outside PushrulesError: {strays}"


#: One instance of each user-facing error, with the message ``main()`` must print.
MAKERS: dict[str, Callable[[type[BaseException]], BaseException]] = {
    "engine.render.compiler.CompileError": lambda cls: cls("r", "message.title", "no good"),
    "engine.render.compiler.BlankTarget": lambda cls: cls("r", "targets[0]", "null", None),
}


def make(name: str, cls: type[BaseException]) -> BaseException:
    maker = MAKERS.get(name)
    return maker(cls) if maker else cls(f"{cls.__name__} says what to fix")


USER_ERRORS = sorted(
    (name, cls) for name, cls in engine_exceptions().items() if name not in INTERNAL
)


@pytest.mark.parametrize(("name", "cls"), USER_ERRORS, ids=[n for n, _ in USER_ERRORS])
def test_main_turns_each_user_error_into_a_message_and_exit_code(
    name: str,
    cls: type[BaseException],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    error = make(name, cls)

    def command(_args: object) -> int:
        raise error

    monkeypatch.setattr(cli_check, "cmd_validate", command)  # looked up when the command runs
    code = cli_main.main(["validate", str(tmp_path)])
    err = capsys.readouterr().err
    usage = name == "engine.cli.common.UsageError"
    assert code == (EXIT_USAGE if usage else EXIT_PROBLEMS)
    assert err == f"pushrules: {error}\n"
    assert "Traceback" not in err


def test_a_bug_still_shows_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def command(_args: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(cli_check, "cmd_validate", command)
    with pytest.raises(KeyError):
        cli_main.main(["validate", str(tmp_path)])
