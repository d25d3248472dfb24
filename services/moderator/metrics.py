"""The moderator's OpenTelemetry instruments, in one place so names stay consistent with the dashboard.

Instruments are created once per process: OpenTelemetry keeps the first instrument of a name, so a second
``ModeratorMetrics`` must feed the same gauges rather than register callbacks nobody reads.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from services.common.telemetry import meter

_instruments: dict[str, Any] = {}
_live: weakref.WeakSet[ModeratorMetrics] = weakref.WeakSet()
_lock = threading.Lock()


def _each(attr: str) -> list[Any]:
    return [getattr(m, attr) for m in list(_live)]


def _observe_index(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(size, {"model_version": v}) for sizes in _each("_index_sizes") for v, size in sizes.items()]


def _observe_lag(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(v, {"partition": p}) for lags in _each("_lag") for p, v in lags.items()]


def _observe_version(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(1, {"model_version": v}) for v in set(_each("_model_version")) if v]


def _observe_index_age(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(age, {"model_version": v}) for source in _each("_index_ages") for v, age in source().items()]


def _create_instruments() -> dict[str, Any]:
    with _lock:
        if not _instruments:
            m = meter("sieve.moderator")
            _instruments.update(
                processed=m.create_counter("sieve_uploads_processed", description="uploads with a verdict"),
                verdicts=m.create_counter("sieve_verdicts", description="verdicts by action"),
                dlq=m.create_counter("sieve_dlq_messages", description="messages sent to the DLQ, by error kind"),
                reviews=m.create_counter("sieve_review_requests", description="items sent to human review"),
                stage_latency=m.create_histogram("sieve_stage_seconds", unit="s", description="latency per stage"),
                batch_size=m.create_histogram("sieve_batch_size", description="messages per consumed batch"),
            )
            m.create_observable_gauge("sieve_index_size", callbacks=[_observe_index], description="vectors")
            m.create_observable_gauge("sieve_consumer_lag", callbacks=[_observe_lag], description="messages")
            m.create_observable_gauge("sieve_model_version_info", callbacks=[_observe_version])
            m.create_observable_gauge(
                "sieve_index_age_seconds",
                unit="s",
                callbacks=[_observe_index_age],
                description="seconds since this replica's index last caught up with the shared store",
            )
        return _instruments


class ModeratorMetrics:
    def __init__(self) -> None:
        inst = _create_instruments()
        self.processed = inst["processed"]
        self.verdicts = inst["verdicts"]
        self.dlq = inst["dlq"]
        self.reviews = inst["reviews"]
        self.stage_latency = inst["stage_latency"]
        self.batch_size = inst["batch_size"]
        self._index_sizes: dict[str, int] = {}
        self._lag: dict[str, int] = {}
        self._model_version = ""
        self._index_ages: Callable[[], dict[str, float]] = dict
        _live.add(self)

    def stage(self, name: str, seconds: float) -> None:
        self.stage_latency.record(seconds, {"stage": name})

    def index_size(self, version: str, size: int) -> None:
        self._index_sizes[version] = size

    def lag(self, partition: str, value: int) -> None:
        self._lag[partition] = value

    def model_version(self, version: str) -> None:
        self._model_version = version

    def index_ages(self, source: Callable[[], dict[str, float]]) -> None:
        self._index_ages = source
