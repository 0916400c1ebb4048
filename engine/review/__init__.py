"""Review tooling: what a rule, or a change to the rules, does, shown before it runs
(``pushrules test``, ``explain``, ``plan``).

Owns the rule-test runner (``runner``: a case fired as a real fire is decided, with no store,
and judged against what it expects), subset matching of request bodies (``subset``), the
reports of a test run (``report``: text with a diff, JSON, JUnit XML), ``explain`` (why a
rule would or would not send at a given moment, step by step) and ``plan`` (the project at a
git revision compared with the working tree, rule by rule; ``revisions`` reads a revision
through git, never checking it out).

May import: :mod:`engine.outbox`, :mod:`engine.render`, :mod:`engine.rules`,
:mod:`engine.accengage`, :mod:`engine.errors`; never :mod:`engine.send`, :mod:`engine.daemon`
or :mod:`engine.cli`.
"""
