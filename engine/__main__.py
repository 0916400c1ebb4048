from engine.cli.main import run

raise SystemExit(run())
