"""Which turns a route records (its `record` setting): every one, none, or a deterministic share.

The share is decided by a hash of the turn id, not a random draw: every replica, and both writes
of a shadow turn (the provisional record held before the reply, the scored one after), agree on
whether a turn is kept, and a test can know in advance which turns a share keeps.
"""

from __future__ import annotations

import hashlib

from service.settings import RouteSettings


def share_of(turn_id: str) -> float:
    """A number in [0, 1) that depends only on the turn id (uniform over random ids)."""
    return int.from_bytes(hashlib.blake2b(turn_id.encode(), digest_size=8).digest(), "big") / 2**64


def recorded(route: RouteSettings, turn_id: str) -> bool:
    """Whether the turn goes to the store under the route's `record` setting."""
    if route.record == "all":
        return True
    if route.record == "off":
        return False
    return share_of(turn_id) < route.record_sample
