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

from services.common.config import IndexSettings, StackSettings
from services.common.stack.kafka import KafkaBroker, KafkaCluster
from services.common.stack.milvus import MilvusServer
from services.common.stack.redis import RedisServer
from services.common.stack.triton import TritonServer

Part = KafkaBroker | KafkaCluster | RedisServer | TritonServer | MilvusServer


@dataclass(frozen=True)
class StackEndpoints:
    kafka_bootstrap: str
    redis_url: str
    triton_grpc: str
    triton_metrics: str
    log_dir: str
    milvus_uri: str = ""  # set when the stack runs the Milvus index backend

    def env(self) -> dict[str, str]:
        """Environment variables that point every Sieve service at this stack (and at its index backend)."""
        env = {
            "SIEVE_KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            "SIEVE_REDIS_URL": self.redis_url,
            "SIEVE_TRITON_URL": self.triton_grpc,
            "SIEVE_INDEX_BACKEND": "milvus" if self.milvus_uri else "faiss",
        }
        if self.milvus_uri:
            env["SIEVE_MILVUS_URI"] = self.milvus_uri
        return env


class LocalStack:
    def __init__(
        self,
        settings: StackSettings | None = None,
        models: tuple[str, ...] = ("sieve_embedder", "sieve_classifier"),
        with_triton: bool = True,
        brokers: int = 1,
        name: str = "",
        index: str | None = None,
    ) -> None:
        """``brokers``: 1 (the default stack) or 3 and up, a KRaft cluster with replication factor 3 and
        min.insync.replicas 2. ``name`` tells apart several stacks of one process (a fault test's own).
        ``index``: faiss or milvus (default: SIEVE_INDEX_BACKEND); milvus adds a Milvus standalone server."""
        self.settings = settings or StackSettings()
        suffix = f"{os.getpid()}-{name}" if name else str(os.getpid())
        self.home = self.settings.home / f"stack-{suffix}"
        self.log_dir = self.settings.home / "logs" / f"stack-{suffix}"
        if brokers == 2 or brokers < 1:
            raise ValueError("brokers: 1, or 3 and up (a replicated cluster needs a majority of three)")
        self.kafka: KafkaBroker | KafkaCluster = (
            KafkaBroker(
                self.home / "kafka", self.settings.cache_dir, self.settings.kafka_version, self.settings.kafka_heap
            )
            if brokers == 1
            else KafkaCluster(self.home / "kafka", self.settings.cache_dir, self.settings.kafka_version, brokers)
        )
        self.redis = RedisServer(self.home / "redis")
        self.triton = (
            TritonServer(self.home / "triton", self.settings.model_repo, list(models)) if with_triton else None
        )
        backend = index or IndexSettings().backend
        if backend not in ("faiss", "milvus"):
            raise ValueError(f"index backend: faiss or milvus, not {backend!r}")
        self.milvus = (
            MilvusServer(self.home / "milvus", self.settings.cache_dir, self.settings.milvus_version)
            if backend == "milvus"
            else None
        )
        self._started: list[Part] = []

    def start(self, progress: bool = True) -> StackEndpoints:
        atexit.register(self.stop)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL,
            None,
        ):
            # SIGTERM unwinds like Ctrl-C, so finally blocks and atexit stop the servers.
            signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
        timeout = self.settings.start_timeout_s
        parts: list[tuple[str, Part]] = [("redis", self.redis), ("kafka", self.kafka)]
        if self.milvus:
            parts.append(("milvus", self.milvus))
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
            milvus_uri=self.milvus.uri if self.milvus else "",
        )

    def pids(self) -> list[int]:
        processes = [*(self.kafka.processes() if isinstance(self.kafka, KafkaCluster) else [self.kafka.process])]
        processes += [self.redis.process, self.triton.process if self.triton else None]
        processes += [self.milvus.process if self.milvus else None]
        return [p.pid for p in processes if p is not None and p.pid and p.alive()]

    def restore(self, timeout_s: float | None = None) -> list[str]:
        """Restarts every started server that is dead or not answering; returns their names.

        Fault tests call it after each case, so a server one test killed is back and checked before the next.
        """
        timeout = timeout_s or self.settings.start_timeout_s
        restarted = []
        for part in self._started:
            if not _answers(part):
                part.restart(self.log_dir, timeout)
                restarted.append(type(part).__name__)
        return restarted

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


def _answers(part: Part) -> bool:
    """Alive and ready: a stopped (SIGSTOP) or half-started server counts as not answering."""
    try:
        if isinstance(part, KafkaCluster):
            return all(n.process is not None and n.process.alive() and n.ready() for n in part.nodes)
        return part.process is not None and part.process.alive() and part.ready()
    except Exception:
        return False
