"""What the benchmarks share: printing a table of figures, starting the sandbox, a scratch
PostgreSQL schema."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

REPO = Path(__file__).resolve().parent.parent


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: set[int]) -> None:
    """Columns in ``left`` are aligned left, the others (figures) right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (
            value.ljust(width) if i in left else value.rjust(width)
            for i, (value, width) in enumerate(zip(row, widths, strict=True))
        )
        print("  ".join(cells).rstrip())


def start_sandbox(*options: str) -> tuple[subprocess.Popen[str], str]:
    """`pushrules sandbox` in a process of its own (so it does not share the measured process's
    interpreter) on a free loopback port; returns the process and the URL to POST to."""
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "sandbox", "--port", "0", *options],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # "pushrules sandbox: POST http://..."
    if "POST " not in line:
        process.kill()
        raise RuntimeError(f"the sandbox did not start: {line!r}")
    return process, line.split("POST ", 1)[1].strip()


class ScratchSchema:
    """On PostgreSQL, a schema of its own, dropped afterwards: the benchmark leaves no tables."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.name = f"pushrules_bench_{secrets.token_hex(4)}"
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={self.name}"})
        self.url = url.render_as_string(hide_password=False)
        self._admin(f'CREATE SCHEMA "{self.name}"')

    @classmethod
    def for_url(cls, url: str) -> ScratchSchema | None:
        parsed = make_url(url)
        if parsed.get_backend_name() != "postgresql" or "options" in parsed.query:
            return None
        return cls(url)

    def _admin(self, sql: str) -> None:
        engine = create_engine(self.base_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    def drop(self) -> None:
        self._admin(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
