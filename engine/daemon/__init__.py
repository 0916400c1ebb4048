"""``pushrules run``: the long-running process and what drives it.

Owns the process wiring (``process``), the APScheduler adapter (``scheduler``), polled feeds
(``poller``), the HTTP intake with /healthz and /metrics (``intake``, ``metrics``), hot reload
(``watcher``), the injectable clock (``clock``), logging (``logs``) and the garbage collector
held off while a big fan-out is made (``collector``).

May import: :mod:`engine.send` and everything below it; never :mod:`engine.cli`.
"""
