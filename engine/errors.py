"""The one base of the errors a user can act on.

Every error whose message is meant for a rule author or an operator (a secret that cannot be
read, a template that fails, a store that cannot be reached...) derives from
:class:`PushrulesError`, so the command line prints its message and exits 1 instead of showing
a traceback, and a traceback always means a bug. It imports nothing, so every package may use it.
"""

from __future__ import annotations


class PushrulesError(Exception):
    """An error whose message says what to fix; shown without a traceback."""
