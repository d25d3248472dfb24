"""One object that starts, health-checks and stops the whole local stack; used by make run, sieve and tests."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from types import TracebackType

from services.common.config import StackSettings
from services.common.stack.kafka import KafkaBroker
from services.common.stack.redis import RedisServer
from services.common.stack.triton import TritonServer


@dataclass(frozen=True)
class StackEndpoints:
    kafka_bootstrap: str
    redis_url: str
    triton_grpc: str
    triton_metrics: str
    log_dir: str

    def env(self) -> dict[str, str]:
        """Environment variables that point every Sieve service at this stack."""
        return {
            "SIEVE_KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            "SIEVE_REDIS_URL": self.redis_url,
            "SIEVE_TRITON_URL": self.triton_grpc,
        }


class LocalStack:
    def __init__(
        self,
        settings: StackSettings | None = None,
        models: tuple[str, ...] = ("sieve_embedder", "sieve_classifier"),
        with_triton: bool = True,
    ) -> None:
        self.settings = settings or StackSettings()
        self.home = self.settings.home / f"stack-{os.getpid()}"
        self.log_dir = self.settings.home / "logs" / f"stack-{os.getpid()}"
        self.kafka = KafkaBroker(
            self.home / "kafka", self.settings.cache_dir, self.settings.kafka_version, self.settings.kafka_heap
        )
        self.redis = RedisServer(self.home / "redis")
        self.triton = (
            TritonServer(self.home / "triton", self.settings.model_repo, list(models)) if with_triton else None
        )
        self._started: list[KafkaBroker | RedisServer | TritonServer] = []

    def start(self, progress: bool = True) -> StackEndpoints:
        atexit.register(self.stop)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL,
            None,
        ):
            # SIGTERM unwinds like Ctrl-C, so finally blocks and atexit stop the servers.
            signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
        timeout = self.settings.start_timeout_s
        parts: list[tuple[str, KafkaBroker | RedisServer | TritonServer]] = [
            ("redis", self.redis),
            ("kafka", self.kafka),
        ]
        if self.triton:
            parts.append(("triton", self.triton))
        try:
            for name, part in parts:
                began = time.monotonic()
                if progress:
                    print(f"[stack] starting {name} ...", flush=True)
                part.start(self.log_dir, timeout)
                self._started.append(part)
                if progress:
                    print(f"[stack] {name} ready in {time.monotonic() - began:.1f}s", flush=True)
        except BaseException:
            self.stop()
            raise
        endpoints = self.endpoints()
        (self.home / "endpoints.json").write_text(json.dumps(asdict(endpoints), indent=2))
        return endpoints

    def endpoints(self) -> StackEndpoints:
        return StackEndpoints(
            kafka_bootstrap=self.kafka.bootstrap,
            redis_url=self.redis.url,
            triton_grpc=self.triton.grpc_url if self.triton else "",
            triton_metrics=f"http://127.0.0.1:{self.triton.metrics_port}/metrics" if self.triton else "",
            log_dir=str(self.log_dir),
        )

    def pids(self) -> list[int]:
        out = []
        for part in (self.kafka, self.redis, self.triton):
            if part is not None and part.process is not None and part.process.pid and part.process.alive():
                out.append(part.process.pid)
        return out

    def stop(self) -> None:
        for part in reversed(self._started):
            with contextlib.suppress(Exception):
                part.stop()
        self._started.clear()
        shutil.rmtree(self.home, ignore_errors=True)  # data only; logs stay in var/logs

    def __enter__(self) -> StackEndpoints:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
