"""Every compiled request is a row before anything is sent.

Owns the store (``store``: schema, migrations, outbox states, seen keys, marks, pauses,
leadership and instances), write coalescing (``batching``) and the one path a fire takes into
the outbox (``firing``: ``when``, quiet hours, limit, compile, enqueue).

May import: :mod:`engine.render`, :mod:`engine.rules`, :mod:`engine.accengage`,
:mod:`engine.errors`.
"""
