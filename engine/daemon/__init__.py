"""``pushrules run``: the long-running process and what drives it.

Owns the process wiring (``process``), the APScheduler adapter (``scheduler``), polled feeds
(``poller``), the HTTP intake with /healthz and /metrics (``intake``, ``metrics``), hot reload
(``watcher``), the leader's housekeeping: state counts and retention (``maintenance``), the
injectable clock (``clock``), logging (``logs``) and the garbage collector held off while a
big fan-out is made (``collector``).

May import: :mod:`engine.send` and everything below it; never :mod:`engine.cli`.
"""

import sys

# httpx imports its command-line client (and with it rich and pygments: 3 MB resident in the
# daemon) whenever those are installed, which the other commands need. The daemon never runs
# it: marked absent before httpx is first imported, httpx keeps a stub ``httpx.main``.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
