"""Audit records for bank changes made outside the reviewer service (the ``sieve banks`` command).

They go to the reviewer's audit stream (``services.reviewer.labels.AuditLog``), so admins see every bank
change, whichever way it was made, in ``GET /api/admin/audit``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis


def audit_key(prefix: str) -> str:
    """The reviewer's audit stream (``QueueKeys(prefix).audit``), written here without importing that service."""
    return f"{{{prefix}:review}}:audit"


def record(client: redis.Redis, prefix: str, event: str, actor: str, subject: str, detail: Mapping[str, Any]) -> None:
    fields = {"event": event, "actor": actor, "subject": subject, "detail": json.dumps(detail, sort_keys=True)}
    client.xadd(audit_key(prefix), fields)  # type: ignore[arg-type]
