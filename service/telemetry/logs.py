"""Log output of `turngate serve`: plain lines or JSON lines, at the level the settings name.

The same configuration is handed to uvicorn (its error and access loggers) and to the root logger
(turngate's own `service.*` and `turngate*` loggers), so one process writes one format to stderr.
Records made while a request is served carry its request id (`x-request-id`).
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import Any

# The request being served, set by service.api.requests for the duration of one HTTP request.
REQUEST_ID: ContextVar[str | None] = ContextVar("turngate_request_id", default=None)

# Attributes every LogRecord has; anything else on a record was passed with `extra=` and is data.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to records made inside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} [request_id={request_id}]" if request_id else text


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request id, `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def log_config(level: str, fmt: str) -> dict[str, Any]:
    """A logging.config.dictConfig dictionary (uvicorn's `log_config` takes the same)."""
    formatter = {"()": f"{__name__}.{'JSONFormatter' if fmt == 'json' else 'PlainFormatter'}"}
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "main",
               "filters": ["request_id"]}
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"main": formatter},
        "handlers": {"stderr": handler},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # uvicorn's loggers write through the root's handler, not their own.
            **{name: {"handlers": [], "level": level, "propagate": True}
               for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
            # A line per Alembic plugin at every start says nothing; the migrations it runs still do.
            "alembic.runtime.plugins": {"level": "DEBUG" if level == "DEBUG" else "WARNING"},
        },
    }
