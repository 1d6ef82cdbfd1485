"""Structured logging: the fields every record of the package carries, request ids, and
a JSON-lines formatter (the CLI's ``--json``).

Each record has ``token_label``, ``request_id`` and ``report_type`` attributes (passed as
``extra``; None where one does not apply), so a handler can route or index on them
without parsing messages. None of them is ever the token.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from datetime import datetime, timezone

__all__ = ["FIELDS", "fields", "new_request_id", "JsonFormatter"]

FIELDS = ("token_label", "request_id", "report_type")
"""The `extra` fields on every record the package logs."""

_PROCESS = os.urandom(4).hex()
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """An id for one call (all its attempts): a random per-process prefix and a counter,
    so ids from many processes never clash in one log, at the cost of a counter step."""
    return f"{_PROCESS}-{next(_COUNTER):x}"


def fields(
    label: str | None = None, request_id: str | None = None, report_type: str | None = None
) -> dict[str, str | None]:
    """The ``extra=`` of a record: token label, request id, report type."""
    return {"token_label": label, "request_id": request_id, "report_type": report_type}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (UTC, ISO 8601), ``level``,
    ``logger``, ``message``, the `FIELDS`, and ``error`` (the exception's class) when the
    record has one. No traceback: a log line is for machines, ``--debug`` for people.
    (The stdlib's json does this in a few lines; no dependency is worth it.)"""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            entry[name] = getattr(record, name, None)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False, default=str)
