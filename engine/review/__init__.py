"""Review tooling: what a pull request changes in a project, before it is merged.

Owns rule tests (``cases``), ``explain`` and ``plan`` (``plan``: the project at a git revision
compared with the working tree; ``revisions``: reading a revision through git, never checking
it out).

May import: :mod:`engine.rules`, :mod:`engine.render`, :mod:`engine.outbox`,
:mod:`engine.accengage` and :mod:`engine.errors`; never :mod:`engine.daemon`,
:mod:`engine.send` nor :mod:`engine.cli`.
"""
