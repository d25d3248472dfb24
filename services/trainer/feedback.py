"""Reviewer labels from the ``feedback`` topic, kept as a training set the retraining job can replay.

Labels are appended to a JSONL file (one per (upload_id, reviewer_id): a repeated label replaces nothing), and
offsets are committed only after the file is flushed to disk, so no label is lost and none is counted twice.
A stable hash of the upload_id sends a fixed slice to the held-out set that gates promotions.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Message
from pydantic import ValidationError

from services.common.config import KafkaSettings
from services.common.kafka_io import RDKAFKA_LOG
from services.common.schemas import FeedbackLabel

log = logging.getLogger(__name__)
HELDOUT_PERCENT = 20


def is_heldout(upload_id: str) -> bool:
    return int(hashlib.sha256(f"feedback:{upload_id}".encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


@dataclass(frozen=True)
class LabelledPair:
    """A duplicate decision a reviewer made: the trainer's positive or hard-negative pair."""

    upload_id: str
    image_uri: str
    other_id: str
    other_uri: str
    duplicate: bool


class FeedbackStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "labels.jsonl"
        self._seen: set[tuple[str, str]] = set()
        folder.mkdir(parents=True, exist_ok=True)
        for label in self.labels():
            self._seen.add((label.upload_id, label.reviewer_id))

    def labels(self) -> Iterator[FeedbackLabel]:
        if not self.path.exists():
            return
        with self.path.open() as fh:
            for line in fh:
                if line.strip():
                    yield FeedbackLabel.model_validate_json(line)

    def add(self, labels: list[FeedbackLabel]) -> int:
        fresh: list[FeedbackLabel] = []
        batch: set[tuple[str, str]] = set()
        for lb in labels:
            key = (lb.upload_id, lb.reviewer_id)
            if key not in self._seen and key not in batch:
                batch.add(key)
                fresh.append(lb)
        if not fresh:
            return 0
        with self.path.open("a") as fh:
            for label in fresh:
                fh.write(label.model_dump_json() + "\n")
                self._seen.add((label.upload_id, label.reviewer_id))
            fh.flush()
            os.fsync(fh.fileno())
        return len(fresh)

    def count(self) -> int:
        return len(self._seen)

    def pairs(self, heldout: bool | None = None) -> list[LabelledPair]:
        """Duplicate and not-duplicate labels that name both images; ``heldout`` picks a slice (None: all)."""
        out = []
        for label in self.labels():
            if heldout is not None and is_heldout(label.upload_id) != heldout:
                continue
            other = label.duplicate_of or label.compared_with
            if not (label.image_uri and other and label.compared_uri):
                continue
            if label.duplicate_of is None and not label.not_duplicate:
                continue
            out.append(
                LabelledPair(
                    label.upload_id,
                    label.image_uri,
                    other,
                    label.compared_uri,
                    duplicate=label.duplicate_of is not None,
                )
            )
        return out

    def category_labels(self) -> list[tuple[str, dict[str, bool]]]:
        """(image_uri, {category: bool}) for the classifier head."""
        return [(lb.image_uri, dict(lb.categories)) for lb in self.labels() if lb.image_uri and lb.categories]


class FeedbackConsumer:
    """Drains the feedback topic into a FeedbackStore, committing offsets only for what is on disk."""

    def __init__(self, settings: KafkaSettings, store: FeedbackStore, group_id: str = "sieve-trainer") -> None:
        conf: dict[str, Any] = {
            **settings.client_config(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "logger": RDKAFKA_LOG,
        }
        self.consumer = Consumer(conf)
        self.consumer.subscribe([settings.topic_feedback])
        self.store = store
        self.rejected = 0

    def poll(self, timeout_s: float = 1.0, max_messages: int = 500) -> int:
        messages: list[Message] = self.consumer.consume(num_messages=max_messages, timeout=timeout_s)
        good = [m for m in messages if m.error() is None]
        labels = []
        for msg in good:
            try:
                labels.append(FeedbackLabel.model_validate_json(msg.value() or b""))
            except ValidationError as exc:
                self.rejected += 1
                log.warning("feedback message at offset %s is not a FeedbackLabel: %s", msg.offset(), exc)
        added = self.store.add(labels)
        if good:
            self.consumer.commit(asynchronous=False)
        return added

    def close(self) -> None:
        self.consumer.close()
