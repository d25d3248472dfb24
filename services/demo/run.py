"""Runs the local stack and the moderator, streams the samples and shows verdicts live."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

from confluent_kafka import Consumer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.common.config import REPO_ROOT, Settings
from services.common.kafka_io import ensure_topics
from services.common.stack import LocalStack
from services.common.telemetry import setup_telemetry
from services.common.uploads import UploadPublisher, event_for_file
from services.demo.samples import Sample, build_samples
from services.moderator.service import Moderator


def _table(rows: list[tuple[str, str, str, str, str]]) -> Table:
    table = Table(title="Sieve verdicts (latest 15)", expand=True)
    for col in ("upload", "action", "duplicate of", "score", "expected"):
        table.add_column(col, overflow="fold")
    for row in rows[-15:]:
        table.add_row(*row)
    return table


def score_stream(samples: list[Sample], verdicts: dict[str, dict[str, Any]]) -> tuple[int, int, int]:
    """Counts planted pairs linked in either direction (streams reorder across partitions) and false links."""
    family = {s.upload_id: s.duplicate_of or s.upload_id for s in samples}
    links = {
        (uid, str(d["upload_id"]))
        for uid, v in verdicts.items()
        for d in v["duplicate_of"]
        if str(d["upload_id"]) in family
    }
    copies = [s for s in samples if s.duplicate_of]
    found = sum(1 for c in copies if any(family[a] == family[c.upload_id] and c.upload_id in (a, b) for a, b in links))
    wrong = sum(1 for a, b in links if family[a] != family[b])
    return found, len(copies), wrong


def run_demo(originals: int = 40, copies_per: int = 2, follow: bool = False) -> int:
    console = Console()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    workdir = REPO_ROOT / "var" / "demo"
    console.print("[bold]Sieve demo[/bold]: preparing sample photos ...")
    samples = build_samples(workdir / "images", originals, copies_per)
    truth = {s.upload_id: s for s in samples}

    stack = LocalStack()
    moderator: Moderator | None = None
    thread: threading.Thread | None = None
    try:
        endpoints = stack.start()
        os.environ.update(endpoints.env())
        os.environ["SIEVE_FETCH_FILE_ROOTS"] = json.dumps([str(workdir / "images")])
        os.environ.setdefault("SIEVE_OTEL_PROMETHEUS_PORT", "9464")
        settings = Settings()
        setup_telemetry(settings.telemetry, "sieve-demo")
        ensure_topics(settings.kafka)
        moderator = Moderator(settings)
        thread = threading.Thread(target=moderator.run, name="moderator", daemon=True)
        thread.start()
        console.print(
            f"[stack] kafka {endpoints.kafka_bootstrap}  redis {endpoints.redis_url}  "
            f"triton {endpoints.triton_grpc}  metrics http://127.0.0.1:"
            f"{settings.telemetry.prometheus_port}/metrics  logs {endpoints.log_dir}"
        )
        return _stream(console, settings, samples, truth, stop, follow)
    finally:
        if moderator is not None:
            moderator.stop_event.set()
        if thread is not None:
            thread.join(timeout=30)
        stack.stop()
        console.print("[stack] stopped; no processes left behind")


def _stream(
    console: Console,
    settings: Settings,
    samples: list[Sample],
    truth: dict[str, Sample],
    stop: threading.Event,
    follow: bool,
) -> int:
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"sieve-demo-{os.getpid()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.kafka.topic_verdicts])
    publisher = UploadPublisher(settings.kafka)
    progress = Progress(TextColumn("verdicts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    task = progress.add_task("verdicts", total=len(samples))
    rows: list[tuple[str, str, str, str, str]] = []
    seen: dict[str, dict[str, Any]] = {}
    began = time.monotonic()
    publisher.publish(event_for_file(s.path, s.upload_id) for s in samples)
    with Live(Group(_table(rows), progress), console=console, refresh_per_second=4) as live:
        while not stop.is_set() and (follow or len(seen) < len(samples)):
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            verdict = json.loads(msg.value() or b"{}")
            uid = verdict["upload_id"]
            if uid in seen:
                continue
            seen[uid] = verdict
            dup = verdict["duplicate_of"][0] if verdict["duplicate_of"] else None
            expected = truth[uid].duplicate_of if uid in truth else None
            rows.append(
                (
                    uid,
                    verdict["action"],
                    dup["upload_id"] if dup else "-",
                    f"{dup['score']:.3f}" if dup else "-",
                    expected or "-",
                )
            )
            progress.update(task, completed=len(seen))
            live.update(Group(_table(rows), progress))
    consumer.close()
    elapsed = time.monotonic() - began
    found, planted, wrong = score_stream(samples, seen)
    versions = sorted({str(v["model_version"]) for v in seen.values() if v.get("model_version")})
    console.print(
        f"[bold]summary[/bold]: {len(seen)}/{len(samples)} verdicts in {elapsed:.1f}s "
        f"({len(seen) / max(elapsed, 1e-9):.1f} uploads/s) by {', '.join(versions) or 'no model'}; "
        f"planted near-duplicate pairs linked {found}/{planted}; links between unrelated photos {wrong}"
    )
    return 0 if len(seen) == len(samples) else 1
