"""One way to open Redis: every service, job and command gets the same timeouts, so none of them hangs on a
Redis that stopped answering (the admin CLI used to wait forever)."""

from __future__ import annotations

import redis

from services.common.config import RedisSettings


def connect(settings: RedisSettings, timeout_s: float | None = None) -> redis.Redis:
    """``timeout_s`` for commands that legitimately block longer (a large snapshot); the setting otherwise."""
    timeout = settings.socket_timeout_s if timeout_s is None else timeout_s
    return redis.Redis.from_url(
        settings.url.get_secret_value(),
        socket_timeout=timeout,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
    )
