"""Milliseconds since a ``time.perf_counter()`` reading, rounded as every verdict's ``timings`` records them."""

from __future__ import annotations

import time


def elapsed_ms(began: float) -> float:
    return round((time.perf_counter() - began) * 1000.0, 3)
