"""Helpers for whole-pipeline tests: moderator replicas as real processes, topic readers, sample photos."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from PIL import Image

from services.common.config import Settings
from services.common.kafka_io import ensure_topics
from services.common.photos.build import (
    Manifest,
    PhotoRecord,
)
from services.common.transforms import encode_jpeg
from services.common.uploads import UploadPublisher, event_for_file

SIEVE = [sys.executable, "-m", "services.cli"]


class ModeratorProcess:
    """One moderator replica, started exactly as operators start it: ``sieve moderator``."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ModeratorProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*SIEVE, "moderator"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
        log.close()
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture()
def moderators(stack_env: dict[str, str], tmp_path: Path) -> Iterator[list[ModeratorProcess]]:
    started: list[ModeratorProcess] = []
    yield started
    for m in started:
        m.kill()


def start_moderator(moderators: list[ModeratorProcess], env: dict[str, str], tmp_path: Path) -> ModeratorProcess:
    replica = ModeratorProcess(env, tmp_path / f"moderator-{len(moderators)}.log").start()
    moderators.append(replica)
    return replica


def read_topic(
    settings: Settings, topic: str, expected: int, timeout_s: float = 180.0, key_field: str | None = "upload_id"
) -> list[dict[str, object]]:
    """Reads until ``expected`` distinct records (by key field) or the timeout; returns all records read."""
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"reader-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    records: list[dict[str, object]] = []
    keys: set[object] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(keys) < expected:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            record = json.loads(msg.value())
            records.append(record)
            keys.add(record.get(key_field) if key_field else len(records))
    finally:
        consumer.close()
    return records


def originals_then_copies(
    settings: Settings,
    env: dict[str, str],
    tmp_path: Path,
    moderators: list[ModeratorProcess],
    originals: dict[str, Path],
    copies: dict[str, tuple[Path, str]],
) -> dict[str, dict[str, object]]:
    """One moderator; the originals first (all decided), then their copies; every verdict read, by upload id."""
    ensure_topics(settings.kafka)
    start_moderator(moderators, env, tmp_path)
    publisher = UploadPublisher(settings.kafka)
    publisher.publish(event_for_file(path, uid) for uid, path in originals.items())
    assert len(read_topic(settings, settings.kafka.topic_verdicts, len(originals))) >= len(originals)
    publisher.publish(event_for_file(path, uid) for uid, (path, _) in copies.items())
    records = read_topic(settings, settings.kafka.topic_verdicts, len(originals) + len(copies))
    verdicts = {str(r["upload_id"]): r for r in records}
    assert set(verdicts) >= set(copies), moderators[0].log()[-3000:]
    return verdicts


@dataclass(frozen=True)
class PhotoSample:
    upload_id: str
    path: Path
    original: str | None  # for a planted copy: the upload_id of its original


def pick_photos(manifest: Manifest, n: int, seed: int) -> list[PhotoRecord]:
    """Distinct groups only: two frames of one video are near-duplicates, not unrelated photos."""
    records = sorted(manifest.images, key=lambda r: r.id)
    random.Random(seed).shuffle(records)
    chosen: list[PhotoRecord] = []
    groups: set[str] = set()
    for r in records:
        if r.group not in groups:
            chosen.append(r)
            groups.add(r.group)
        if len(chosen) == n:
            break
    return chosen


def write_photo(manifest: Manifest, record: PhotoRecord, folder: Path, upload_id: str) -> Path:
    with Image.open(manifest.path_of(record)) as img:
        data = encode_jpeg(img.convert("RGB"), 92)
    path = folder / f"{upload_id}.jpg"
    path.write_bytes(data)
    return path


def served_version(model: str = "sieve_embedder") -> str:
    """What Triton's "latest 1" policy serves: the highest numbered version folder."""
    root = Path(__file__).resolve().parents[2] / "model_repo" / model
    return f"{model}:{max(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / 'model.py').exists())}"
