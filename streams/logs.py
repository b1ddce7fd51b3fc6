"""Structured JSON logs with secrets and PII scrubbed before anything is written.

Payloads never get logged on purpose; the filter is the safety net for the
messages that do (exception texts can quote a URL with a key or an email).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_SECRET_PARAM = re.compile(
    r"(?i)((?:api_secret|write_?key|token|password|secret|authorization)[\"']?\s*[=:]\s*[\"']?)"
    r"([^\s&\"',;]+)"
)
_BASIC = re.compile(r"(?i)(basic|bearer)\s+[A-Za-z0-9+/=._-]{8,}")


def redact(text: str) -> str:
    text = _EMAIL.sub("<email>", text)
    text = _BASIC.sub(r"\1 <redacted>", text)  # before the key=value rule eats the scheme
    return _SECRET_PARAM.sub(r"\1<redacted>", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def logging_dict_config(level: str = "INFO") -> dict[str, object]:
    """dictConfig for processes whose framework configures logging itself (the Faust worker)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "streams.logs.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {"httpx": {"level": "WARNING"}},
    }


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
