"""Reviewer labels from the real feedback topic into the retraining job's store: durable and idempotent."""

from __future__ import annotations

from pathlib import Path

from services.common.config import Settings
from services.common.kafka_io import AckedProducer, ensure_topics
from services.common.schemas import FeedbackLabel
from services.trainer.feedback import FeedbackConsumer, FeedbackStore, is_heldout


def _label(upload: str, reviewer: str, dup: bool) -> FeedbackLabel:
    return FeedbackLabel(
        upload_id=upload,
        reviewer_id=reviewer,
        duplicate_of="orig" if dup else None,
        not_duplicate=not dup,
        image_uri=f"file:///x/{upload}.jpg",
        compared_with="orig",
        compared_uri="file:///x/orig.jpg",
    )


def test_labels_are_stored_once_and_split_stably(settings: Settings, tmp_path: Path) -> None:
    ensure_topics(settings.kafka)
    producer = AckedProducer(settings.kafka)
    labels = [_label(f"u{i}", "alice", i % 2 == 0) for i in range(30)]
    for label in [*labels, labels[0], labels[1]]:  # redelivered labels
        producer.produce(settings.kafka.topic_feedback, label.upload_id, label.model_dump_json().encode())
    producer.produce(settings.kafka.topic_feedback, "junk", b'{"not": "a label"}')
    producer.flush()

    store = FeedbackStore(tmp_path / "fb")
    consumer = FeedbackConsumer(settings.kafka, store, group_id=f"trainer-{settings.redis.key_prefix}")
    total = 0
    for _ in range(20):
        total += consumer.poll(timeout_s=1.0)
        if total >= 30:
            break
    consumer.close()
    assert total == 30 and store.count() == 30 and consumer.rejected == 1
    reopened = FeedbackStore(tmp_path / "fb")  # survives a restart of the job
    assert reopened.count() == 30
    held = reopened.pairs(heldout=True)
    train = reopened.pairs(heldout=False)
    assert len(held) + len(train) == 30 and held and train
    assert all(is_heldout(p.upload_id) for p in held)
    assert {p.duplicate for p in train} == {True, False}
