"""The benchmarks' one way of printing a table of figures."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: set[int]) -> None:
    """Columns in ``left`` are aligned left, the others (figures) right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (
            value.ljust(width) if i in left else value.rjust(width)
            for i, (value, width) in enumerate(zip(row, widths, strict=True))
        )
        print("  ".join(cells).rstrip())
