"""Outbox rows -> Accengage, each request arriving once or a person told.

Owns the dispatcher (``dispatch``: claims, sending, writing results, ``in_doubt`` parking,
credentials at send time), its pure policy (``policy``: settings, classification of answers
and errors, backoff, the texts a row is left with), the aiohttp transport under httpx that it
sends with by default (``transport``), its Prometheus counters (``metrics``), and
the running parts built from a project's settings (``runtime``: its store and its dispatcher,
the same for the CLI and the daemon).

May import: :mod:`engine.outbox` and everything below it.
"""
