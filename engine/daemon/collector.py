"""Python's cyclic garbage collector, held off while a big fan-out is made.

A ``for_each`` over 100,000 items makes 100,000 target dicts that live until the fire is in the
outbox, then die by reference counting; they hold no cycles. Left alone, the collector walks
them several times meanwhile (a full collection of a heap holding them took 100-180 ms), and
the event loop stands still all that time. Held off, they are made, written and freed between
two collections.
"""

from __future__ import annotations

import gc
from typing import ClassVar


class CollectorHold:
    """The collector held off from :meth:`start` to the end of the ``with`` block.

    Holds nest (a big event's body, then its fire): the collector runs again when the last
    hold ends, if it ran before the first. Used on the event loop's thread only.
    """

    _holders: ClassVar[int] = 0
    _was_enabled: ClassVar[bool] = True

    def __init__(self) -> None:
        self._held = False

    def __enter__(self) -> CollectorHold:
        return self

    def start(self) -> None:
        if self._held:
            return
        self._held = True
        if CollectorHold._holders == 0:
            CollectorHold._was_enabled = gc.isenabled()
            gc.disable()
        CollectorHold._holders += 1

    def __exit__(self, *exc: object) -> None:
        if not self._held:
            return
        self._held = False
        CollectorHold._holders -= 1
        if CollectorHold._holders == 0 and CollectorHold._was_enabled:
            gc.enable()
