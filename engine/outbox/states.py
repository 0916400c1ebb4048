"""The outbox's states: what each row of a request may be, and which moves each actor may make.

Plain names, apart from the tables (``schema``), so that commands reading them do not load the
database layer.
"""

from __future__ import annotations

from typing import Final

HELD, PENDING, SENDING, SENT = "held", "pending", "sending", "sent"
RETRYING, FAILED, DEAD, IN_DOUBT, DROPPED = "retrying", "failed", "dead", "in_doubt", "dropped"
STATES: Final = (HELD, PENDING, SENDING, SENT, RETRYING, FAILED, DEAD, IN_DOUBT, DROPPED)
#: States the dispatcher may claim once ``next_attempt_at`` has come.
DUE_STATES: Final = (PENDING, RETRYING)
#: States a result may be written over: ``in_doubt`` too, when the lease ran out while the
#: request was still in flight and its answer came after all (a known outcome beats a doubt).
RESULT_STATES: Final = (SENDING, IN_DOUBT)
RESENDABLE: Final = (IN_DOUBT, FAILED, DEAD, DROPPED)
DROPPABLE: Final = (HELD, PENDING, RETRYING, IN_DOUBT, FAILED, DEAD)
#: States a person looks at.
ATTENTION_STATES: Final = (HELD, IN_DOUBT, FAILED, DEAD)
#: States a result may set.
RESULT_TARGETS: Final = (SENT, RETRYING, FAILED, DEAD, IN_DOUBT)
#: States a row stays in until a person or retention moves it; the others (pending, sending,
#: retrying) are a short stay on the way out. Only rows at rest are in ix_outbox_rule_state,
#: so claims and results do not rewrite an index scattered by rule.
AT_REST: Final = (HELD, SENT, FAILED, DEAD, IN_DOUBT, DROPPED)
ON_THE_WAY: Final = (PENDING, SENDING, RETRYING)
