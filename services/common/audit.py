"""The audit log: who changed what, from whichever face (the reviewer's admin API, ``sieve banks``, the bank
re-judging worker, promotions). One writer, one stream, one optional JSON-lines file.

Every writer builds it from the same settings (``SIEVE_AUDIT_FILE``), so a change made from the command line
lands in the same file as one made through the API; ``GET /api/admin/audit`` reads the stream.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from services.common.redis_text import text


def audit_key(prefix: str) -> str:
    """Beside the review queue's keys (one hash slot with them: ``{<prefix>:review}``)."""
    return f"{{{prefix}:review}}:audit"


class AuditLog:
    """Append-only record of who did what: the Redis stream, and optionally a JSON-lines file."""

    def __init__(self, client: redis.Redis, prefix: str, file: Path | None = None) -> None:
        self.client = client
        self.key = audit_key(prefix)
        self.file = file
        self._lock = threading.Lock()

    def record(self, event: str, actor: str, subject: str, detail: Mapping[str, Any]) -> None:
        detail_json = json.dumps(detail, sort_keys=True, default=str)
        self.client.xadd(self.key, {"event": event, "actor": actor, "subject": subject, "detail": detail_json})
        self.append_file(event, actor, subject, detail_json)

    def append_file(self, event: str, actor: str, subject: str, detail_json: str) -> None:
        if self.file is None:
            return
        line = json.dumps(
            {"ts": round(time.time(), 3), "event": event, "actor": actor, "subject": subject, "detail": detail_json}
        )
        with self._lock, self.file.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def recent(self, count: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        out: list[dict[str, Any]] = []
        for entry_id, fields in self.client.xrevrange(self.key, count=count) or []:
            f = {text(k): text(v) for k, v in (fields or {}).items()}
            out.append(
                {
                    "id": text(entry_id),
                    "ts": int(text(entry_id).split("-", 1)[0]) / 1000.0,
                    "event": f.get("event", ""),
                    "actor": f.get("actor", ""),
                    "subject": f.get("subject", ""),
                    "detail": json.loads(f.get("detail") or "{}"),
                }
            )
        return out
