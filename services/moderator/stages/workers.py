"""CPU stages off the main interpreter: a pool of worker processes (threads would serialise on the GIL), or in
line when none is configured. A worker that dies costs one retry in line, never an item."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def _ready() -> bool:
    return True


class Workers:
    def __init__(self, processes: int) -> None:
        self.processes = max(processes, 0)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Spawns the workers now (each imports OpenCV and NumPy once) rather than on the first upload."""
        if self.processes:
            futures = [self._executor().submit(_ready) for _ in range(self.processes)]
            for f in futures:
                f.result()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.processes:
            return fn(*args)
        return self._result(self._submit(fn, args), fn, args)

    def map(self, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> list[T]:
        """Every call submitted at once, results in order."""
        if not self.processes or len(calls) <= 1:
            return [self.call(fn, *args) for args in calls]
        futures = [self._submit(fn, args) for args in calls]
        return [self._result(f, fn, args) for f, args in zip(futures, calls, strict=True)]

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: this process runs Kafka's and OpenTelemetry's threads.
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def _submit(self, fn: Callable[..., T], args: tuple[Any, ...]) -> Future[T] | None:
        try:
            return self._executor().submit(fn, *args)
        except (BrokenProcessPool, RuntimeError):
            self._reset()
            return None

    def _result(self, future: Future[T] | None, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if future is not None:
            try:
                return future.result()
            except BrokenProcessPool:
                self._reset()
        log.warning("a worker process died; running %s in line", getattr(fn, "__name__", fn))
        return fn(*args)

    def _reset(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
