"""What a fault costs a moderator replica: memory while Triton hangs, and time held by a slow image host.

The fault tests check the behaviour (back-pressure, a DLQ record with the reason); the figures live here:

- ``stalled_triton_rss_growth_mib``: Triton frozen (SIGSTOP) while 300 uploads wait; how much the replica's
  resident memory grows in 10 s (target: under 100 MiB; the consumer's prefetch is bounded).
- ``slowloris_to_dlq_s``: a host that sends one byte a second; time from the replica's start to the upload's
  DLQ record with SIEVE_FETCH_TIMEOUT_S=2 and SIEVE_MODERATOR_MAX_RETRIES=2 (target: under 60 s).

Run: ``python -m bench.faults [--quick]``; writes bench/results/faults.json.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer

from bench.common import Progress, StageResult, Target, main_for
from bench.stream import Replica, prepare_images
from services.common.config import Settings
from services.common.kafka_io import ensure_topics
from services.common.stack import LocalStack
from services.common.uploads import UploadPublisher, event_for_file


def _namespace_env(stack: LocalStack, workdir: Path) -> dict[str, str]:
    ns = uuid.uuid4().hex[:6]
    return {
        **os.environ,
        **stack.endpoints().env(),
        "SIEVE_KAFKA_TOPIC_UPLOADS": f"uploads-{ns}",
        "SIEVE_KAFKA_TOPIC_VERDICTS": f"verdicts-{ns}",
        "SIEVE_KAFKA_TOPIC_REVIEW": f"review-{ns}",
        "SIEVE_KAFKA_TOPIC_FEEDBACK": f"feedback-{ns}",
        "SIEVE_KAFKA_TOPIC_DLQ": f"uploads.dlq-{ns}",
        "SIEVE_KAFKA_CONSUMER_GROUP": f"moderator-{ns}",
        "SIEVE_REDIS_KEY_PREFIX": f"faults-{ns}",
        "SIEVE_FETCH_FILE_ROOTS": json.dumps([str(workdir)]),
        "SIEVE_MODERATOR_BATCH_TIMEOUT_MS": "100",
        "SIEVE_OTEL_EXPORTER": "none",
    }


def _settings(env: dict[str, str]) -> Settings:
    previous = dict(os.environ)
    os.environ.update(env)
    try:
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(previous)


def _count(settings: Settings, topic: str, expected: int, timeout_s: float) -> tuple[int, float]:
    """Records read from the topic (until ``expected`` or the timeout) and when the last one arrived."""
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"bench-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    n, last = 0, 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while n < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.3)
            if msg is not None and not msg.error():
                n, last = n + 1, time.monotonic()
    finally:
        consumer.close()
    return n, last


def _rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def stalled_triton(stack: LocalStack, workdir: Path, images: list[Path], progress: Progress) -> dict[str, Any]:
    env = {**_namespace_env(stack, workdir), "SIEVE_TRITON_TIMEOUT_S": "120"}
    settings = _settings(env)
    ensure_topics(settings.kafka)
    replica = Replica(env, workdir / "moderator-stall.log")
    publisher = UploadPublisher(settings.kafka)
    try:
        publisher.publish(event_for_file(images[i % len(images)], f"s-{i:04d}") for i in range(4))
        _count(settings, settings.kafka.topic_verdicts, 4, 180)
        assert stack.triton is not None and stack.triton.process is not None and stack.triton.process.pid
        before = _rss_mib(replica.proc.pid)
        os.killpg(stack.triton.process.pid, signal.SIGSTOP)
        try:
            publisher.publish(event_for_file(images[i % len(images)], f"s-{i:04d}") for i in range(4, 300))
            time.sleep(10)  # the window measured: how much the replica buffers while nothing answers
            after = _rss_mib(replica.proc.pid)
        finally:
            os.killpg(stack.triton.process.pid, signal.SIGCONT)
        progress(f"stalled Triton: RSS {before:.0f} -> {after:.0f} MiB")
        decided, _ = _count(settings, settings.kafka.topic_verdicts, 300, 600)
        return {"rss_before_mib": round(before, 1), "rss_after_mib": round(after, 1), "decided_after": decided}
    finally:
        replica.stop()


class _Slowloris(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        for _ in range(60):
            try:
                self.wfile.write(b"\xff")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(1)

    def log_message(self, *_args: object) -> None:
        return


def slowloris(stack: LocalStack, workdir: Path, progress: Progress) -> float:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slowloris)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        **_namespace_env(stack, workdir),
        "SIEVE_FETCH_ALLOW_PRIVATE_ADDRESSES": "true",
        "SIEVE_FETCH_ALLOWED_HOSTS": json.dumps(["127.0.0.1"]),
        "SIEVE_FETCH_TIMEOUT_S": "2",
        "SIEVE_MODERATOR_MAX_RETRIES": "2",
    }
    settings = _settings(env)
    ensure_topics(settings.kafka)
    event = {
        "event_id": uuid.uuid4().hex,
        "upload_id": "slowloris",
        "user_id": "bench",
        "image_uri": f"http://127.0.0.1:{server.server_address[1]}/slow.jpg",
        "created_at": datetime.now(UTC).isoformat(),
    }
    UploadPublisher(settings.kafka).publish_raw("slowloris", json.dumps(event).encode())
    began = time.monotonic()
    replica = Replica(env, workdir / "moderator-slowloris.log")
    try:
        n, last = _count(settings, settings.kafka.topic_dlq, 1, 300)
    finally:
        replica.stop()
        server.shutdown()
    seconds = round(last - began, 2) if n else float("nan")
    progress(f"slowloris: DLQ record after {seconds} s (including the replica's start)")
    return seconds


def run(quick: bool = False) -> dict[str, Any]:
    result = StageResult("faults", "What a fault costs a replica: memory under a stalled Triton, slow hosts", quick)
    result.begin()
    progress = Progress("faults")
    stack = LocalStack(name="faultbench")
    with tempfile.TemporaryDirectory(prefix="sieve-faults-") as tmp:
        workdir = Path(tmp)
        images = prepare_images(workdir / "images", 12)
        stack.start(progress=False)
        try:
            stall = stalled_triton(stack, workdir, images, progress)
            slow = slowloris(stack, workdir, progress)
        finally:
            stack.stop()
    growth = round(stall["rss_after_mib"] - stall["rss_before_mib"], 1)
    result.add_row("stalled Triton, 296 uploads waiting, 10 s", rss_growth_mib=growth, **stall)
    result.add_row("slowloris host, fetch timeout 2 s, 2 attempts", to_dlq_s=slow)
    result.targets.append(Target("stalled_triton_rss_growth_mib", growth, 100.0, "<=", "MiB"))
    result.targets.append(Target("slowloris_to_dlq_s", slow, 60.0, "<=", "seconds, including the replica's start"))
    return result.finish().to_dict()


if __name__ == "__main__":
    raise SystemExit(main_for("faults", run))
