"""Every compiled request is a row before anything is sent.

Owns the store: ``states`` (the state names and which may move where), ``schema`` (tables,
version and migrations), ``store`` (the outbox state machine and attempts), ``marks`` (seen
keys, marks, pauses, unmatched events), ``instances`` (liveness, reclaim plans, leadership),
``connections`` (SQLite's pragmas, write lock and busy timeouts); write coalescing
(``batching``) and the one path a fire takes into the outbox (``firing``: ``when``, compile,
quiet hours decided with no store by ``decide``, which review tooling shares, or in steps by
``decide_steps`` for the daemon's event loop; then limit and enqueue, ``record``).

May import: :mod:`engine.render`, :mod:`engine.rules`, :mod:`engine.accengage`,
:mod:`engine.errors`.
"""
