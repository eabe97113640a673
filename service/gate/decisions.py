"""What the gate decided for a turn: the closed vocabulary of `TurnRecord.decision`, the
`x-turngate-decision` header and the `decision` metric label. The admin API filters by it."""

from __future__ import annotations

from enum import StrEnum


class Decision(StrEnum):
    RANKED = "ranked"  # the best of the candidates, scored by the critic
    ACCEPTED = "accepted"  # adaptive sampling: the first candidates already passed accept_threshold
    INTERVENED = "intervened"  # chosen after one or more intervention rounds
    BELOW_THRESHOLD = "below_threshold"  # no candidate reached the threshold within the rounds allowed
    ALL_VETOED = "all_vetoed"  # every candidate failed the structural checks
    BLOCKED = "blocked"  # nothing passed; the route's block_message was sent instead
    REJECTED = "rejected"  # nothing passed; the client got 422 turn_rejected
    PASSTHROUGH = "passthrough"  # one upstream call relayed ungated
    SHADOW = "shadow"  # the actor's reply relayed, the candidates scored afterwards
    ERROR = "error"  # the client got an error
    CANCELLED = "cancelled"  # the client went away
    IMPORTED = "imported"  # loaded by `turngate import`, not served
