"""Hostile input through the whole pipeline: each gets a verdict or one DLQ record with a reason; nothing hangs."""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from services.common.config import Settings
from services.common.kafka_io import ensure_topics
from services.common.photos.build import Manifest
from services.common.uploads import UploadPublisher
from tests.e2e.conftest import ModeratorProcess, pick_photos, read_topic, start_moderator
from tests.e2e.hostile_corpus import Case, _event, build_corpus


class _Hostile(http.server.BaseHTTPRequestHandler):
    photo: bytes = b""

    def do_GET(self) -> None:
        if self.path == "/photo.jpg":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.photo)))
            self.end_headers()
            self.wfile.write(self.photo)
        elif self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/iam")
            self.end_headers()
        elif self.path == "/to-private":
            self.send_response(301)
            self.send_header("Location", "http://10.1.2.3/internal.jpg")
            self.end_headers()
        elif self.path == "/slowloris":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            for _ in range(60):  # one byte a second, for at most a minute
                try:
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(1)

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture()
def hostile_server(tmp_path: Path, photo_set: Manifest) -> Iterator[tuple[str, Image.Image]]:
    record = pick_photos(photo_set, 1, 41)[0]
    photo = Image.open(photo_set.path_of(record)).convert("RGB")
    (tmp_path / "corpus").mkdir()
    photo.save(tmp_path / "served.jpg", format="JPEG")
    _Hostile.photo = (tmp_path / "served.jpg").read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", photo
    server.shutdown()


def _outcomes(settings: Settings, cases: list[Case]) -> tuple[dict[str, str], list[dict[str, object]]]:
    verdicts = read_topic(settings, settings.kafka.topic_verdicts, sum(c.expect == "verdict" for c in cases))
    dead = read_topic(
        settings, settings.kafka.topic_dlq, sum(c.expect != "verdict" for c in cases), key_field="source_offset"
    )
    outcome = {str(v["upload_id"]).removeprefix("h-"): "verdict" for v in verdicts}
    for d in dead:
        outcome[str(d["original_key"])] = str(d["error_kind"])
    return outcome, dead


def test_hostile_corpus_gets_clear_errors_and_nothing_stalls(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    hostile_server: tuple[str, Image.Image],
    moderators: list[ModeratorProcess],
) -> None:
    base, photo = hostile_server
    cases = build_corpus(photo, tmp_path / "corpus", base)
    ensure_topics(settings.kafka)
    publisher = UploadPublisher(settings.kafka)
    for case in cases:
        publisher.producer.produce(settings.kafka.topic_uploads, case.key, case.value)
    publisher.producer.flush()
    replica = start_moderator(moderators, stack_env, tmp_path)
    outcome, dead = _outcomes(settings, cases)
    keyed = {c.key: c.expect for c in cases}
    # Verdict outcomes are keyed by upload id ("h-<case>"), dead letters by the Kafka key (the case name).
    got = {k: outcome.get(k, "missing") for k in keyed}
    assert got == keyed, replica.log()[-4000:]
    assert len(dead) == sum(e != "verdict" for e in keyed.values())  # each bad message dead-lettered once
    assert all(d["detail"] for d in dead)
    assert replica.proc is not None and replica.proc.poll() is None  # no crash


def test_duplicate_event_id_for_another_upload_is_dead_lettered(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    hostile_server: tuple[str, Image.Image],
    moderators: list[ModeratorProcess],
) -> None:
    _base, photo = hostile_server
    photo.save(tmp_path / "p.jpg", format="JPEG")
    event_id = uuid.uuid4().hex
    first = _event("dup-first", (tmp_path / "p.jpg").as_uri(), event_id=event_id)
    second = _event("dup-second", (tmp_path / "p.jpg").as_uri(), event_id=event_id)
    ensure_topics(settings.kafka)
    publisher = UploadPublisher(settings.kafka)
    publisher.publish_raw("dup-first", first)
    start_moderator(moderators, stack_env, tmp_path)
    assert [v["upload_id"] for v in read_topic(settings, settings.kafka.topic_verdicts, 1)] == ["dup-first"]
    publisher.publish_raw("dup-second", second)
    dead = read_topic(settings, settings.kafka.topic_dlq, 1, key_field="source_offset")
    assert [(d["original_key"], d["error_kind"]) for d in dead] == [("dup-second", "duplicate_event")]


def test_allow_listed_server_redirects_and_slowloris_are_contained(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    hostile_server: tuple[str, Image.Image],
    moderators: list[ModeratorProcess],
) -> None:
    base, _photo = hostile_server
    now = datetime.now(UTC).isoformat()

    def event(uid: str, path: str) -> bytes:
        return json.dumps(
            {
                "event_id": uuid.uuid4().hex,
                "upload_id": uid,
                "user_id": "u",
                "image_uri": f"{base}{path}",
                "created_at": now,
            }
        ).encode()

    cases = [
        Case("served-photo", event("served-photo", "/photo.jpg"), "verdict"),
        Case("redirect-metadata", event("redirect-metadata", "/to-metadata"), "fetch_refused"),
        Case("redirect-private", event("redirect-private", "/to-private"), "fetch_refused"),
        Case("slowloris", event("slowloris", "/slowloris"), "retries_exhausted"),
    ]
    ensure_topics(settings.kafka)
    publisher = UploadPublisher(settings.kafka)
    for case in cases:
        publisher.producer.produce(settings.kafka.topic_uploads, case.key, case.value)
    publisher.producer.flush()
    env = {
        **stack_env,
        # This test's server is on loopback: allow-list exactly it, as an operator would for an internal CDN.
        "SIEVE_FETCH_ALLOW_PRIVATE_ADDRESSES": "true",
        "SIEVE_FETCH_ALLOWED_HOSTS": json.dumps(["127.0.0.1"]),
        "SIEVE_FETCH_TIMEOUT_S": "2",
        "SIEVE_MODERATOR_MAX_RETRIES": "2",
    }
    replica = start_moderator(moderators, env, tmp_path)
    outcome: dict[str, str] = {}
    verdicts = read_topic(settings, settings.kafka.topic_verdicts, 1)
    outcome.update({str(v["upload_id"]): "verdict" for v in verdicts})
    dead = read_topic(settings, settings.kafka.topic_dlq, 3, key_field="source_offset")
    outcome.update({str(d["original_key"]): str(d["error_kind"]) for d in dead})
    assert outcome == {c.key: c.expect for c in cases}, replica.log()[-4000:]
    # How long the slow server holds a worker is measured in bench/faults.py (slowloris_to_dlq_s), not here.
