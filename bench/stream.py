"""Drives a real stream through N moderator replicas on the local stack and measures what operators watch.

Used by the load benchmark (issue: scale, faults and bad input) and by the end-to-end stage of the performance
harness. Everything is real: Kafka broker, Redis, Triton, and ``sieve moderator`` processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from confluent_kafka import Consumer, ConsumerGroupState, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from PIL import Image

from bench.profile import Profiler
from services.common.config import REPO_ROOT, Settings
from services.common.kafka_io import RDKAFKA_LOG, ensure_topics
from services.common.photos.build import load_photo_set
from services.common.schemas import UploadEvent
from services.common.stack import LocalStack, StackEndpoints
from services.common.transforms import encode_jpeg


@dataclass
class StreamPlan:
    model_path: int  # distinct images: each goes through the model
    exact_reuploads: int  # byte-identical re-uploads of earlier images: the sha256 fast path
    bad: int  # corrupt images: the DLQ path
    rate_per_s: float | None = None  # None: produce everything at once (saturation)

    @property
    def total(self) -> int:
        return self.model_path + self.exact_reuploads + self.bad


@dataclass
class StreamResult:
    replicas: int
    plan: dict[str, Any]
    produced: int
    verdicts: int
    dead_letters: int
    lost: int
    duration_s: float
    throughput_per_s: float
    latency_ms: dict[str, float]
    latency_model_path_ms: dict[str, float]
    startup_s: float = 0.0  # replicas launched -> the group owns every partition; not part of duration_s
    lag_samples: list[tuple[float, int]] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=dict)
    cpu_cores: dict[str, float] = field(default_factory=dict)  # mean cores each process tree used while measured
    notes: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None  # bench.profile's summary, when SIEVE_BENCH_PROFILE is set


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(arr, q)), 1) for q in (50, 95, 99)} | {"max": round(float(arr.max()), 1)}


def prepare_images(folder: Path, distinct: int, seed: int = 5) -> list[Path]:
    """Distinct JPEGs from the real photo set: each photo, then random crops of it, so every file is new content."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = load_photo_set()
    rng = random.Random(seed)
    photos = sorted(manifest.images, key=lambda r: r.id)
    paths: list[Path] = []
    for n in range(distinct):
        path = folder / f"img-{n:06d}.jpg"
        if not path.exists():
            record = photos[n % len(photos)]
            with Image.open(manifest.path_of(record)) as img:
                image = img.convert("RGB")
            if n >= len(photos):
                w, h = image.size
                f = rng.uniform(0.6, 0.95)
                x, y = rng.randint(0, int(w * (1 - f))), rng.randint(0, int(h * (1 - f)))
                image = image.crop((x, y, x + int(w * f), y + int(h * f)))
            path.write_bytes(encode_jpeg(image, 88))
        paths.append(path)
    return paths


class Replica:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "moderator"],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _rss_tree_mb(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        return float(round(sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20, 1))
    except psutil.Error:
        return 0.0


def moderator_batch_size() -> int:
    """The moderators' batch in these benchmarks: SIEVE_MODERATOR_BATCH_SIZE if set, else 32."""
    return int(os.environ.get("SIEVE_MODERATOR_BATCH_SIZE", "32"))


def wait_for_group(settings: Settings, replicas: int, partitions: int, timeout_s: float) -> None:
    """Blocks until the moderators' group is stable with every replica in it and every partition assigned."""
    conf: dict[str, Any] = {**settings.kafka.client_config(), "logger": RDKAFKA_LOG}
    admin = AdminClient(conf)
    group = settings.kafka.consumer_group
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            desc = admin.describe_consumer_groups([group], request_timeout=5)[group].result(timeout=10)
            assigned = sum(
                1
                for m in desc.members
                for tp in (m.assignment.topic_partitions if m.assignment else [])
                if tp.topic == settings.kafka.topic_uploads
            )
            if desc.state == ConsumerGroupState.STABLE and len(desc.members) == replicas and assigned == partitions:
                return
        except Exception:  # the group does not exist until the first replica joins
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{group}: {replicas} replicas did not own {partitions} partitions within {timeout_s:.0f}s")


def _cpu_tree_s(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total
    except psutil.Error:
        return 0.0


def run_stream(
    stack: LocalStack,
    endpoints: StackEndpoints,
    plan: StreamPlan,
    replicas: int,
    images: list[Path],
    label: str,
    progress: bool = True,
    timeout_s: float = 3600,
    prepare: Callable[[Settings], None] | None = None,
) -> StreamResult:
    """``prepare``: called with the run's settings before the replicas start (e.g. to create an index)."""
    ns = f"{label}-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        **endpoints.env(),
        "SIEVE_KAFKA_TOPIC_UPLOADS": f"uploads-{ns}",
        "SIEVE_KAFKA_TOPIC_VERDICTS": f"verdicts-{ns}",
        "SIEVE_KAFKA_TOPIC_REVIEW": f"review-{ns}",
        "SIEVE_KAFKA_TOPIC_DLQ": f"dlq-{ns}",
        "SIEVE_KAFKA_TOPIC_FEEDBACK": f"feedback-{ns}",
        "SIEVE_KAFKA_CONSUMER_GROUP": f"moderator-{ns}",
        "SIEVE_KAFKA_PARTITIONS": "8",
        "SIEVE_REDIS_KEY_PREFIX": f"bench-{ns}",
        "SIEVE_FETCH_FILE_ROOTS": json.dumps([str(images[0].parent)]),
        "SIEVE_OTEL_EXPORTER": "none",
        "SIEVE_MODERATOR_BATCH_SIZE": str(moderator_batch_size()),
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("SIEVE_")})
    settings = Settings()
    ensure_topics(settings.kafka)
    if prepare is not None:
        prepare(settings)
    log_dir = Path(stack.log_dir)
    procs = [Replica(env, log_dir / f"{ns}-replica{i}.log") for i in range(replicas)]
    stop = threading.Event()
    lag: list[tuple[float, int]] = []
    rss_peak: dict[str, float] = {}
    launched = time.monotonic()
    wait_for_group(settings, replicas, partitions=int(env["SIEVE_KAFKA_PARTITIONS"]), timeout_s=180)
    startup = time.monotonic() - launched
    profiler = Profiler.from_env(ns)
    if profiler is not None:
        profiler.start(procs[0].proc.pid)
    # Throughput is measured at steady state: the clock starts once every replica has joined and owns partitions.
    began = time.monotonic()

    cpu_first: dict[str, tuple[float, float]] = {}
    cpu_last: dict[str, tuple[float, float]] = {}

    def pids() -> dict[str, int]:
        found = {f"moderator-{i}": p.proc.pid for i, p in enumerate(procs)}
        parts = (("kafka", stack.kafka), ("redis", stack.redis), ("triton", stack.triton), ("milvus", stack.milvus))
        for name, part in parts:
            if part is not None and part.process is not None and part.process.pid:
                found[name] = part.process.pid
        return found

    def watch() -> None:
        conf: dict[str, Any] = {**settings.kafka.client_config(), "logger": RDKAFKA_LOG}
        admin = AdminClient(conf)
        probe = Consumer({**conf, "group.id": f"probe-{ns}"})
        while not stop.is_set():
            try:
                committed = admin.list_consumer_group_offsets(
                    [ConsumerGroupTopicPartitions(settings.kafka.consumer_group)], request_timeout=5
                )[settings.kafka.consumer_group].result(timeout=10)
                total = 0
                for tp in committed.topic_partitions:
                    _low, high = probe.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=2)
                    total += high - max(tp.offset, 0)
                lag.append((round(time.monotonic() - began, 1), total))
            except Exception:  # the group may not exist yet
                pass
            now = time.monotonic()
            for name, pid in pids().items():
                rss_peak[name] = max(rss_peak.get(name, 0.0), _rss_tree_mb(pid))
                used = _cpu_tree_s(pid)
                cpu_first.setdefault(name, (now, used))
                cpu_last[name] = (now, used)
            stop.wait(2.0)
        probe.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    produced_at: dict[str, float] = {}
    kinds: dict[str, str] = {}
    base: dict[str, Any] = {**settings.kafka.client_config(), "logger": RDKAFKA_LOG}
    producer = Producer({**base, "linger.ms": 20, "enable.idempotence": True})
    consumer = Consumer({**base, "group.id": f"reader-{ns}", "auto.offset.reset": "earliest"})
    consumer.subscribe([settings.kafka.topic_verdicts, settings.kafka.topic_dlq])
    bad_file = images[0].parent / "bad-truncated.jpg"
    bad_file.write_bytes(images[0].read_bytes()[:1500])
    schedule: list[tuple[str, Path]] = [(f"m{n:06d}", images[n % len(images)]) for n in range(plan.model_path)]
    schedule += [(f"x{n:06d}", images[n % max(plan.model_path, 1) % len(images)]) for n in range(plan.exact_reuploads)]
    schedule += [(f"b{n:06d}", bad_file) for n in range(plan.bad)]
    rng = random.Random(3)
    head, tail = schedule[: min(len(images), plan.model_path)], schedule[min(len(images), plan.model_path) :]
    rng.shuffle(tail)
    schedule = head + tail  # originals lead, so re-uploads have something to match

    def produce_all() -> None:
        start = time.monotonic()
        for n, (uid, path) in enumerate(schedule):
            if plan.rate_per_s:
                delay = start + n / plan.rate_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            event = UploadEvent(
                event_id=uuid.uuid4().hex,
                upload_id=uid,
                user_id="bench",
                image_uri=path.as_uri(),
                created_at=datetime.now(UTC),
            )
            kinds[uid] = uid[0]
            produced_at[uid] = time.time()
            while True:
                try:
                    producer.produce(settings.kafka.topic_uploads, key=uid, value=event.model_dump_json().encode())
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        producer.flush(60)

    producer_thread = threading.Thread(target=produce_all, daemon=True)
    producer_thread.start()
    seen: dict[str, float] = {}
    dead = 0
    last_print = 0.0
    try:
        while len(seen) < plan.total and time.monotonic() - began < timeout_s:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                key = (msg.key() or b"").decode()
                if key and key not in seen:
                    ts = msg.timestamp()[1] / 1000.0
                    seen[key] = ts
                    if msg.topic() == settings.kafka.topic_dlq:
                        dead += 1
            if progress and time.monotonic() - last_print > 5:
                last_print = time.monotonic()
                rate = len(seen) / max(time.monotonic() - began, 1e-9)
                print(
                    f"[{label}] {len(seen)}/{plan.total} decided, {rate:.1f}/s, lag {lag[-1][1] if lag else '?'}",
                    flush=True,
                )
    finally:
        duration = time.monotonic() - began
        stop.set()
        profile = profiler.stop() if profiler is not None else None
        for p in procs:
            p.stop()
        consumer.close()
    latencies = [(seen[u] - produced_at[u]) * 1000.0 for u in seen if u in produced_at]
    model_lat = [(seen[u] - produced_at[u]) * 1000.0 for u in seen if u in produced_at and kinds.get(u) == "m"]
    return StreamResult(
        replicas=replicas,
        plan=plan.__dict__ | {"total": plan.total},
        produced=len(produced_at),
        verdicts=len(seen) - dead,
        dead_letters=dead,
        lost=plan.total - len(seen),
        duration_s=round(duration, 1),
        throughput_per_s=round(len(seen) / duration, 2),
        latency_ms=percentiles(latencies),
        latency_model_path_ms=percentiles(model_lat),
        startup_s=round(startup, 1),
        lag_samples=lag,
        rss_mb=rss_peak,
        cpu_cores={
            k: round((cpu_last[k][1] - cpu_first[k][1]) / (cpu_last[k][0] - cpu_first[k][0]), 2)
            for k in cpu_last
            if cpu_last[k][0] > cpu_first[k][0]
        },
        profile=profile,
    )
