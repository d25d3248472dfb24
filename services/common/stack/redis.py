"""Debian's redis-server on a free loopback port, with append-only persistence so restarts lose nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis as redis_lib

from services.common.stack.process import ManagedProcess, StackError, free_port


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, log_dir: Path, timeout_s: float, fresh: bool = True) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise StackError("redis-server not found: run scripts/setup.sh (apt-get install redis-server)")
        if fresh:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--maxmemory",
            "1gb",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
        ]
        self.process = ManagedProcess("redis", argv, log_dir / "redis.log", cwd=self.workdir)
        self.process.start()
        self.process.wait_ready(self.ready, timeout_s)

    def ready(self) -> bool:
        return bool(redis_lib.Redis.from_url(self.url, socket_timeout=1).ping())

    def restart(self, log_dir: Path, timeout_s: float) -> None:
        self.stop()
        self.start(log_dir, timeout_s, fresh=False)

    def stop(self) -> None:
        if self.process:
            self.process.stop()
