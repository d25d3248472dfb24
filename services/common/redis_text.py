"""Redis replies as text: clients built without ``decode_responses`` return bytes, tests' fakes return str."""

from __future__ import annotations

from typing import Any


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
