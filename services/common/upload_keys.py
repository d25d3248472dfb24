"""Redis keys the moderator writes per upload and the reviewer and trainer read: one definition for all three."""

from __future__ import annotations


def upload_uri_key(prefix: str, upload_id: str) -> str:
    """Where an upload's image URI is kept for the retention window (neighbour views, rehearsal, backfill)."""
    return f"{prefix}:upload:uri:{upload_id}"


def upload_action_key(prefix: str, upload_id: str) -> str:
    """The action of an upload's verdict, for the duplicate-vs-classifier disagreement check."""
    return f"{prefix}:upload:action:{upload_id}"
