"""Publishing upload events, as the platform would: used by the demo, the benchmarks and the tests."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from opentelemetry import trace

from services.common.config import KafkaSettings
from services.common.kafka_io import AckedProducer
from services.common.schemas import UploadEvent
from services.common.telemetry import inject_headers, tracer

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
_tracer = tracer("sieve.uploader")


def event_for_file(path: Path, upload_id: str | None = None, user_id: str = "demo-user") -> UploadEvent:
    data = path.read_bytes()
    return UploadEvent(
        event_id=uuid.uuid4().hex,
        upload_id=upload_id or path.stem,
        user_id=user_id,
        image_uri=path.resolve().as_uri(),
        sha256=hashlib.sha256(data).hexdigest(),
        created_at=datetime.now(UTC),
    )


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class UploadPublisher:
    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.producer = AckedProducer(settings)

    def publish(self, events: Iterable[UploadEvent]) -> int:
        count = 0
        for event in events:
            with _tracer.start_as_current_span(
                "upload.produce", kind=trace.SpanKind.PRODUCER, attributes={"sieve.upload_id": event.upload_id}
            ):
                self.producer.produce(
                    self.settings.topic_uploads, event.upload_id, event.model_dump_json().encode(), inject_headers()
                )
            count += 1
        self.producer.flush()
        return count

    def publish_raw(self, key: str | None, value: bytes) -> None:
        self.producer.produce(self.settings.topic_uploads, key, value)
        self.producer.flush()
