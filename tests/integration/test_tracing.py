"""One upload, one connected trace: produce → consume → fetch → decode → Triton → index search → publish."""

from __future__ import annotations

import threading
from pathlib import Path

import skimage
from opentelemetry.sdk.metrics.export import MetricsData
from PIL import Image

from services.common.config import Settings
from services.common.kafka_io import ensure_topics
from services.common.telemetry import memory_exporter, memory_metrics
from services.common.transforms import encode_jpeg
from services.common.uploads import UploadPublisher, event_for_file
from services.moderator.service import Moderator
from tests.e2e.conftest import read_topic

DATA = Path(skimage.__file__).parent / "data"


def _metric_names(data: MetricsData | None) -> set[str]:
    if data is None:
        return set()
    return {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def test_one_upload_produces_one_connected_trace(settings: Settings, tmp_path: Path) -> None:
    exporter = memory_exporter()
    assert exporter is not None, "tests run with the in-memory exporter (tests/conftest.py)"
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(encode_jpeg(Image.open(DATA / "coffee.png")))
    ensure_topics(settings.kafka)
    exporter.clear()
    UploadPublisher(settings.kafka).publish([event_for_file(photo, "traced-upload")])
    moderator = Moderator(settings)
    worker = threading.Thread(target=moderator.run, daemon=True)
    worker.start()
    try:
        assert read_topic(settings, settings.kafka.topic_verdicts, 1)
    finally:
        moderator.stop_event.set()
        worker.join(30)

    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "upload.produce")
    trace_id = root.context.trace_id
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    names = {s.name for s in in_trace}
    assert {
        "upload.produce",
        "moderator.process",
        "fetch",
        "decode",
        "triton.infer",
        "index.search",
        "verdict.publish",
    } <= names
    by_id = {s.context.span_id: s for s in in_trace}
    process = next(s for s in in_trace if s.name == "moderator.process")
    assert process.parent is not None and process.parent.span_id == root.context.span_id
    for s in in_trace:
        if s.name in {"fetch", "decode", "triton.infer", "index.search", "verdict.publish"}:
            assert s.parent is not None and by_id[s.parent.span_id].name == "moderator.process", s.name
    assert process.attributes is not None
    assert process.attributes["sieve.upload_id"] == "traced-upload"
    assert process.attributes["sieve.action"] == "allow"
    assert process.attributes["messaging.destination.name"] == settings.kafka.topic_uploads
    infer = next(s for s in in_trace if s.name == "triton.infer")
    assert infer.attributes is not None and str(infer.attributes["sieve.model_version"]).startswith("sieve_embedder:")

    reader = memory_metrics()
    assert reader is not None
    names_seen = _metric_names(reader.get_metrics_data())
    assert {
        "sieve_uploads_processed",
        "sieve_stage_seconds",
        "sieve_verdicts",
        "sieve_index_size",
        "sieve_index_age_seconds",
    } <= names_seen
