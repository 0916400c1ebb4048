"""The ``pushrules`` command line: one module per group of commands.

``main`` holds the parser, the shared options and the exit codes; ``send`` the commands that
send and inspect (send, fire, history, outbox); ``daemon`` those around the daemon (run, next,
pause, resume). Commands load what they need lazily, so ``--help`` stays fast.

May import: every other package; nothing imports it.
"""
