"""A warning that repeats at most once per interval: an outage seen by every request logs one line
per interval (with how many it stood for), not one per request."""

from __future__ import annotations

import logging
import time


class ThrottledWarning:
    def __init__(self, logger: logging.Logger, interval_s: float = 30.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._next_at = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> bool:
        """Logs now unless one was logged less than interval_s ago; True when it logged."""
        now = time.monotonic()
        if now < self._next_at:
            self._suppressed += 1
            return False
        if self._suppressed:
            msg += f" ({self._suppressed} more since the last such warning)"
        self.logger.warning(msg, *args)
        self._next_at, self._suppressed = now + self.interval_s, 0
        return True
