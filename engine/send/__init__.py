"""Outbox rows -> Accengage, each request arriving once or a person told.

Owns the dispatcher (``dispatch``: claims, retries with backoff, ``in_doubt`` parking,
credentials at send time) and the running parts built from a project's settings
(``runtime``: its store and its dispatcher, the same for the CLI and the daemon).

May import: :mod:`engine.outbox` and everything below it.
"""
