"""The ``pushrules`` command line: one module per group of commands, each registering its own.

``main`` holds the root parser and turns user-facing errors into messages; ``common`` the exit
codes, shared options and input readers; ``check`` validate and compile; ``review`` test and
explain; ``plan`` plan; ``author`` schema and fmt; ``preview``; ``sandbox`` the fake Accengage;
``send`` send, fire, history, outbox; ``daemon`` run, next, pause, resume. A group's module
registers its parsers at every start, so it loads what its commands use only when one runs
(``--help`` and ``validate`` stay fast).

``author`` also holds ``init``, which writes the files of ``scaffold/``: package data, not
code (a rules repository's settings, rule, templates, test, hooks, workflow and README).

May import: every other package; nothing imports it.
"""
