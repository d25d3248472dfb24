"""Parse, fetch and prepare: per-item work that reads no shared state, so it runs ahead of the decision.

Fetching waits on the network, so it runs on threads; each thread hands its bytes to ``prepare_image`` in the
worker processes (decode, hashes, keypoints: CPU work that would otherwise hold the GIL against everything else).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import trace

from services.common.config import Settings
from services.common.errors import BadInput, TransientError
from services.common.fetch import FetcherRegistry
from services.common.prepared import PrepareSpec, prepare_image
from services.common.schemas import ErrorKind
from services.common.telemetry import tracer
from services.common.timing import elapsed_ms
from services.moderator.stages.envelope import Item
from services.moderator.stages.intake import parse
from services.moderator.stages.workers import Workers

log = logging.getLogger(__name__)
_tracer = tracer("sieve.moderator")


class Preparer:
    def __init__(
        self,
        settings: Settings,
        fetcher: FetcherRegistry,
        workers: Workers,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.workers = workers
        self.spec = PrepareSpec.of(settings)
        self.sleep = sleep
        self._threads = ThreadPoolExecutor(max_workers=settings.moderator.fetch_workers, thread_name_prefix="fetch")

    def prepare(self, items: list[Item]) -> None:
        todo = [i for i in items if not i.prepared]
        for item in todo:
            parse(item)
        list(self._threads.map(self._fetch_and_prepare, [i for i in todo if i.failure is None]))
        for item in todo:
            item.prepared = True

    def close(self) -> None:
        self._threads.shutdown(wait=False)

    def _fetch_and_prepare(self, item: Item) -> None:
        assert item.event is not None
        ctx = trace.set_span_in_context(item.span)
        attempts = 0
        while True:
            attempts += 1
            try:
                with _tracer.start_as_current_span("fetch", context=ctx) as span:
                    began = time.perf_counter()
                    data = self.fetcher.fetch(item.event.image_uri)
                    item.timings["fetch_ms"] = elapsed_ms(began)
                    span.set_attribute("sieve.bytes", len(data))
                with _tracer.start_as_current_span("decode", context=ctx) as span:
                    began = time.perf_counter()
                    image = self.workers.call(prepare_image, data, self.spec)
                    item.timings["prepare_ms"] = elapsed_ms(began)  # in the worker, with the hand-over both ways
                    item.timings["decode_ms"] = image.decode_ms
                    if image.features is not None:
                        item.timings["features_ms"] = image.features_ms
                        span.set_attribute("sieve.keypoints", len(image.features))
                    span.set_attribute("sieve.format", image.format)
                item.image = image
                return
            except BadInput as exc:
                item.failure = exc
                return
            except TransientError as exc:
                if attempts >= self.settings.moderator.max_retries:
                    item.failure = BadInput(ErrorKind.RETRIES_EXHAUSTED, f"{attempts} attempts: {exc}")
                    return
                self.sleep(min(self.settings.moderator.retry_backoff_s * 2 ** (attempts - 1), 5.0))
            except Exception as exc:  # a bug or an unforeseen input must not stall the partition
                log.exception("unexpected error preparing %s", item.event.upload_id)
                item.failure = BadInput(ErrorKind.CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}")
                return
