"""A test run as people, tools and CI dashboards read it: text with diffs, JSON, JUnit XML.

Text names each failing case by file and line, then each expectation that does not hold at its
own line and column, then a diff of the JSON: what the case names (``-``) against what the fire
did with the same keys (``+``), so an author sees what to change without reading Python.
"""

from __future__ import annotations

import difflib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from engine.review.runner import CaseResult, Failure
from engine.review.subset import show
from engine.rules.cases import CaseFile
from engine.rules.problems import Problem, format_text

Run = Sequence[tuple[CaseFile, Sequence[CaseResult]]]


def counts(run: Run) -> dict[str, int]:
    results = [r for _, results in run for r in results]
    return {
        "files": len(run),
        "cases": len(results),
        "passed": sum(r.status == "passed" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "not_run": sum(r.status == "not_run" for r in results),
    }


def ok(run: Run, problems: Sequence[Problem]) -> bool:
    return not problems and all(r.passed for _, results in run for r in results)


def summary(run: Run, problems: Sequence[Problem]) -> str:
    n = counts(run)
    if not n["files"] and not problems:
        return "no rule tests in rule-tests/ (writing them: docs/rules.md, section 8)"
    words = [f"{n['passed']} passed"]
    if n["failed"]:
        words.append(f"{n['failed']} failed")
    if n["not_run"]:
        words.append(f"{n['not_run']} not run")
    if problems:
        words.append(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in the project")
    files = f"{n['files']} file{'s' if n['files'] != 1 else ''}"
    return f"{n['cases']} case{'s' if n['cases'] != 1 else ''} in {files}: {', '.join(words)}"


# --- text ------------------------------------------------------------------------------------


def diff_lines(expected: Any, actual: Any) -> list[str]:
    """The two values as indented JSON, line by line: ``-`` only in what the case names, ``+``
    only in what the fire did, two spaces where they agree."""
    before = _shown(expected).splitlines()
    after = _shown(actual).splitlines()
    return [line for line in difflib.ndiff(before, after) if not line.startswith("? ")]


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _shown(value: Any) -> str:
    """JSON for a diff: what prints as nothing is escaped (see :func:`show`)."""
    return show(value, indent=2)


def format_case(result: CaseResult) -> list[str]:
    """A failing or unrun case: where it is, why, and the diffs."""
    case = result.case
    head = f"{case.file}:{case.line}: {'FAIL' if result.status == 'failed' else 'NOT RUN'}"
    head += f' "{case.name}"'
    if result.fired is not None:
        head += f" (rule {case.rule}, at {result.fired.at.isoformat(timespec='minutes')})"
    if result.status == "not_run":
        return [f"{head}: {result.reason}"]
    lines = [head]
    for failure in result.failures:
        lines.extend(_failure_lines(case.file, failure))
    return lines


def _failure_lines(file: str, failure: Failure) -> list[str]:
    lines = []
    for m in failure.mismatches:
        where = file + (f":{m.line}" if m.line else "") + (f":{m.column}" if m.column else "")
        lines.append(f"  {where}: {m.field}: {m.message}")
    lines.append("    - expected (what the test says)")
    lines.append(f"    + actual ({failure.label}: the same fields)")
    lines.extend(f"    {line}" for line in diff_lines(failure.expected, failure.actual))
    return lines


def format_run_text(run: Run, problems: Sequence[Problem]) -> str:
    out: list[str] = []
    if problems:
        out.append(format_text(problems))
    for found, results in run:
        bad = [r for r in results if not r.passed]
        if not bad:
            out.append(
                f"ok    {found.file} ({len(results)} case{'s' if len(results) != 1 else ''})"
            )
            continue
        out.append(f"FAIL  {found.file} ({len(bad)} of {len(results)} cases)")
        for result in bad:
            out.extend(format_case(result))
    return "\n".join(out)


# --- json ------------------------------------------------------------------------------------


def case_data(result: CaseResult) -> dict[str, Any]:
    case = result.case
    data: dict[str, Any] = {
        "name": case.name,
        "line": case.line,
        "status": result.status,
    }
    if result.reason:
        data["reason"] = result.reason
    fired = result.fired
    if fired is not None:
        data["at"] = fired.at.isoformat()
        data["outcome"] = {
            "sent": fired.sent,
            "because": fired.because,
            "error": fired.error,
            "detail": fired.reason or fired.decision.detail,
            "notes": list(fired.notes),
            "requests": fired.bodies,
        }
    data["failures"] = [
        {
            "label": f.label,
            "mismatches": [{"file": case.file, **asdict(m)} for m in f.mismatches],
            "expected": f.expected,
            "actual": f.actual,
        }
        for f in result.failures
    ]
    return data


def format_run_json(run: Run, problems: Sequence[Problem]) -> str:
    return _json(
        {
            "ok": ok(run, problems),
            "summary": counts(run),
            "problems": [asdict(p) for p in problems],
            "files": [
                {"file": f.file, "rule": f.rule, "cases": [case_data(r) for r in results]}
                for f, results in run
            ],
        }
    )


# --- junit -----------------------------------------------------------------------------------

#: Characters XML 1.0 cannot hold at all, escaped or not (an event may carry them).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def format_run_junit(run: Run, problems: Sequence[Problem]) -> str:
    """JUnit XML: one testsuite per test file, one testcase per case (a failure with its diff,
    an error for a case that could not run), and the project's problems as errors of a
    ``pushrules validate`` suite."""
    n = counts(run)
    root = ET.Element(
        "testsuites",
        name="pushrules test",
        tests=str(n["cases"] + len(_problem_files(problems))),
        failures=str(n["failed"]),
        errors=str(n["not_run"] + len(_problem_files(problems))),
    )
    if problems:
        files = _problem_files(problems)
        suite = ET.SubElement(
            root,
            "testsuite",
            name="pushrules validate",
            tests=str(len(files)),
            failures="0",
            errors=str(len(files)),
            skipped="0",
        )
        for file, own in files.items():
            case = ET.SubElement(suite, "testcase", name=file, classname="validate", file=file)
            error = ET.SubElement(case, "error", message=_xml(_one_line(own[0])), type="problem")
            error.text = _xml(format_text(own))
    for found, results in run:
        c = counts([(found, results)])
        suite = ET.SubElement(
            root,
            "testsuite",
            name=found.file,
            tests=str(c["cases"]),
            failures=str(c["failed"]),
            errors=str(c["not_run"]),
            skipped="0",
        )
        for result in results:
            case = ET.SubElement(
                suite,
                "testcase",
                name=_xml(result.case.name),
                classname=_xml(found.rule),
                file=found.file,
                line=str(result.case.line),
            )
            if result.status == "not_run":
                error = ET.SubElement(case, "error", message=_xml(result.reason), type="not_run")
                error.text = _xml(result.reason)
            elif result.status == "failed":
                lines = format_case(result)
                failure = ET.SubElement(
                    case, "failure", message=_xml(lines[1].strip()), type="expectation"
                )
                failure.text = _xml("\n".join(lines))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def _problem_files(problems: Sequence[Problem]) -> dict[str, list[Problem]]:
    files: dict[str, list[Problem]] = {}
    for p in problems:
        files.setdefault(p.file, []).append(p)
    return files


def _one_line(problem: Problem) -> str:
    return format_text([problem])
