"""The moderator's OpenTelemetry instruments, in one place so names stay consistent with the dashboard."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Observation

from services.common.telemetry import meter


class ModeratorMetrics:
    def __init__(self) -> None:
        m = meter("sieve.moderator")
        self.processed = m.create_counter("sieve_uploads_processed", description="uploads with a verdict")
        self.verdicts = m.create_counter("sieve_verdicts", description="verdicts by action")
        self.dlq = m.create_counter("sieve_dlq_messages", description="messages sent to the DLQ, by error kind")
        self.reviews = m.create_counter("sieve_review_requests", description="items sent to human review")
        self.stage_latency = m.create_histogram("sieve_stage_seconds", unit="s", description="latency per stage")
        self.batch_size = m.create_histogram("sieve_batch_size", description="messages per consumed batch")
        self._index_sizes: dict[str, int] = {}
        self._lag: dict[str, int] = {}
        self._model_version = ""
        m.create_observable_gauge("sieve_index_size", callbacks=[self._observe_index], description="vectors")
        m.create_observable_gauge("sieve_consumer_lag", callbacks=[self._observe_lag], description="messages")
        m.create_observable_gauge("sieve_model_version_info", callbacks=[self._observe_version])
        self._index_ages: Callable[[], dict[str, float]] = dict
        m.create_observable_gauge(
            "sieve_index_age_seconds",
            unit="s",
            callbacks=[self._observe_index_age],
            description="seconds since this replica's index last caught up with the shared store",
        )

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

    def _observe_index_age(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(age, {"model_version": v}) for v, age in self._index_ages().items()]

    def _observe_index(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(size, {"model_version": v}) for v, size in self._index_sizes.items()]

    def _observe_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v, {"partition": p}) for p, v in self._lag.items()]

    def _observe_version(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1, {"model_version": self._model_version})] if self._model_version else []
