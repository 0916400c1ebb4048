"""``pushrules sandbox``: a fake Accengage endpoint on loopback, for trials and tests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.accengage.api import SANDBOX_PORT
from engine.cli.common import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, lazy, load_settings, number


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sandbox",
        help="serve a fake Accengage endpoint on loopback for trials and tests",
        description="Serve POST /sendInstantMessage.php on loopback. Each request is checked as "
        "Accengage would check it and answered with the documented return codes; every request "
        "is recorded (GET /requests) and faults can be injected here or via POST /_faults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules sandbox\n  pushrules sandbox --fail-rate 0.2 --latency 50"
        "\n  pushrules sandbox --code 11          # every valid request: message limit exceeded",
    )
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    p.add_argument(
        "--port",
        type=number(int, 0, 65535),
        default=SANDBOX_PORT,
        help=f"default {SANDBOX_PORT}; 0 picks a free one",
    )
    p.add_argument(
        "--fail-rate",
        type=number(float, 0, 1),
        default=0.0,
        metavar="R",
        help="share of requests answered HTTP 503, from 0 to 1",
    )
    p.add_argument(
        "--latency",
        type=number(float, 0, 600_000),
        default=0.0,
        metavar="MS",
        help="delay before each answer, in milliseconds",
    )
    p.add_argument(
        "--code", type=int, metavar="N", help="answer this return code to every valid request"
    )
    p.add_argument(
        "--record", type=Path, metavar="FILE", help="append each request to FILE as JSON lines"
    )
    p.add_argument("--seed", type=int, help="makes --fail-rate repeatable")
    p.add_argument(
        "--project",
        metavar="DIR",
        type=Path,
        help="answer as this project's account would: code 17 for a language not in its "
        "languages (pushrules.yaml); default: en, fr, de, es, it, nl, pt",
    )
    p.set_defaults(func=lazy("engine.cli.sandbox", "cmd_sandbox"))


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Serve the sandbox in the foreground; 2 on a bad option, 1 when the port is taken."""
    from engine.accengage.sandbox import SandboxConfig, serve

    languages: dict[str, Any] = {}
    if args.project is not None:
        project = load_settings(args.project)
        if project.languages is not None:
            languages["languages"] = tuple(sorted(project.languages))
    try:
        config = SandboxConfig(
            fail_rate=args.fail_rate,
            latency_ms=args.latency,
            code=args.code,
            record_path=args.record,
            seed=args.seed,
            **languages,
        )
    except ValueError as problem:
        print(f"pushrules sandbox: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        serve(config, args.host, args.port)
    except OSError as problem:
        print(
            f"pushrules sandbox: cannot listen on {args.host}:{args.port}: {problem}",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    return EXIT_OK
