"""Failure paths through real servers, each checked by what a user sees: a DLQ record with the reason, a retry
that ends in a verdict, a 503 that turns back into a 200.

The Redis these tests stop is their own (``own_redis``), never the session's shared one.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.config import Settings
from services.common.kafka_io import ensure_topics
from services.common.photos.build import Manifest
from services.common.stack.process import free_port
from services.common.stack.redis import RedisServer
from services.common.uploads import UploadPublisher
from tests.e2e.conftest import SIEVE, ModeratorProcess, pick_photos, read_topic, start_moderator, write_photo
from tests.e2e.hostile_corpus import _event
from tests.promotion_support import wait_for

ROOT = Path(__file__).resolve().parents[2]


class _Flaky(http.server.BaseHTTPRequestHandler):
    """An image host that fails in each way the fetcher tells apart."""

    photo: bytes = b""
    hits: dict[str, int] = {}  # noqa: RUF012 - one server per test, reset by the fixture

    def do_GET(self) -> None:
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/gone.jpg":
            self.send_error(404)
        elif self.path == "/broken.jpg":
            self.send_error(500)
        elif self.path == "/once.jpg" and self.hits[self.path] == 1:
            self.send_error(503)  # a host that is briefly overloaded: the retry gets the image
        elif self.path in ("/once.jpg", "/photo.jpg"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.photo)))
            self.end_headers()
            self.wfile.write(self.photo)
        elif self.path == "/silent.jpg":
            threading.Event().wait(10)  # accepts, then never answers within the fetch time limit

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture()
def image_host(tmp_path: Path, photo_set: Manifest) -> Iterator[tuple[str, type[_Flaky]]]:
    record = pick_photos(photo_set, 1, 51)[0]
    handler = type("Host", (_Flaky,), {"photo": write_photo(photo_set, record, tmp_path, "host").read_bytes()})
    handler.hits = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()


def test_fetch_failures_and_an_unexpected_error_end_in_the_dlq_with_the_reason(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    image_host: tuple[str, type[_Flaky]],
    moderators: list[ModeratorProcess],
) -> None:
    base, host = image_host
    (tmp_path / "a-folder.jpg").mkdir()  # reading it raises IsADirectoryError: no handler expects that
    good = write_photo(photo_set, pick_photos(photo_set, 1, 52)[0], tmp_path, "good")
    cases = {
        # key: (image uri, expected outcome, what the DLQ detail must say)
        "missing-file": ((tmp_path / "nope.jpg").as_uri(), "fetch_failed", "no such file"),
        "dns-failure": ("http://no-such-host.invalid/x.jpg", "fetch_failed", "cannot resolve"),
        "http-404": (f"{base}/gone.jpg", "fetch_failed", "HTTP 404"),
        "http-500": (f"{base}/broken.jpg", "retries_exhausted", "HTTP 500"),
        "time-out": (f"{base}/silent.jpg", "retries_exhausted", "timed out"),
        "unexpected": ((tmp_path / "a-folder.jpg").as_uri(), "corrupt_image", "IsADirectoryError"),
        "retried-503": (f"{base}/once.jpg", "verdict", ""),
        "good-after": (good.as_uri(), "verdict", ""),
    }
    ensure_topics(settings.kafka)
    publisher = UploadPublisher(settings.kafka)
    for key, (uri, _, _) in cases.items():
        publisher.publish_raw(key, _event(key, uri))
    env = {
        **stack_env,
        "SIEVE_FETCH_ALLOW_PRIVATE_ADDRESSES": "true",
        "SIEVE_FETCH_ALLOWED_HOSTS": json.dumps(["127.0.0.1", "no-such-host.invalid"]),
        "SIEVE_FETCH_TIMEOUT_S": "1",
        "SIEVE_MODERATOR_MAX_RETRIES": "2",
        "SIEVE_MODERATOR_RETRY_BACKOFF_S": "0.2",
    }
    replica = start_moderator(moderators, env, tmp_path)
    verdicts = read_topic(settings, settings.kafka.topic_verdicts, 2)
    dead = read_topic(settings, settings.kafka.topic_dlq, 6, key_field="source_offset")
    outcome = {str(v["upload_id"]): ("verdict", "") for v in verdicts}
    outcome |= {str(d["original_key"]): (str(d["error_kind"]), str(d["detail"])) for d in dead}
    assert {k: o[0] for k, o in outcome.items()} == {k: c[1] for k, c in cases.items()}, replica.log()[-4000:]
    for key, (_, _, reason) in cases.items():
        assert reason in outcome[key][1], (key, outcome[key])
    assert host.hits["/once.jpg"] == 2  # failed once, then the retry fetched it
    assert host.hits["/broken.jpg"] == 2  # SIEVE_MODERATOR_MAX_RETRIES attempts, then the DLQ
    assert "unexpected error preparing unexpected" in replica.log()  # logged with its traceback for the operator
    assert replica.proc is not None and replica.proc.poll() is None


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own: the test stops it, and the session's shared one must stay up."""
    server = RedisServer(tmp_path / "redis")
    server.start(tmp_path / "logs", 30)
    yield server
    server.stop()


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


def _probe_through_a_redis_outage(base: str, redis: RedisServer, tmp_path: Path) -> None:
    """/readyz: 200, then 503 naming Redis while it is down, then 200 again; /healthz stays 200 throughout."""
    wait_for(lambda: _get(f"{base}/readyz")[0] == 200, 120, "ready with Redis up")
    redis.stop()
    try:
        wait_for(lambda: _get(f"{base}/readyz")[0] == 503, 30, "not ready with Redis down")
        status, body = _get(f"{base}/readyz")
        assert status == 503 and body["redis"] is False, body
        assert _get(f"{base}/healthz")[0] == 200  # alive: restarting the process would not bring Redis back
    finally:
        redis.start(tmp_path / "logs", 30, fresh=False)
    wait_for(lambda: _get(f"{base}/readyz")[0] == 200, 60, "ready again once Redis is back")
    assert _get(f"{base}/readyz")[1]["redis"] is True


def test_moderator_readiness_follows_redis(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    own_redis: RedisServer,
    moderators: list[ModeratorProcess],
) -> None:
    ensure_topics(settings.kafka)
    port = free_port()
    env = {**stack_env, "SIEVE_REDIS_URL": own_redis.url, "SIEVE_MODERATOR_HEALTH_PORT": str(port)}
    start_moderator(moderators, env, tmp_path)
    _probe_through_a_redis_outage(f"http://127.0.0.1:{port}", own_redis, tmp_path)


def test_reviewer_readiness_follows_redis(
    settings: Settings, stack_env: dict[str, str], tmp_path: Path, own_redis: RedisServer
) -> None:
    ensure_topics(settings.kafka)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"reviewer-token-0123456789": {"reviewer_id": "alice", "role": "reviewer"}}))
    port = free_port()
    env = {
        **os.environ,
        **stack_env,
        "SIEVE_REDIS_URL": own_redis.url,
        "SIEVE_REVIEWER_TOKENS_FILE": str(tokens),
        "SIEVE_REVIEWER_CONSUMER_GROUP": f"reviewer-{settings.redis.key_prefix}",
    }
    with (tmp_path / "reviewer.log").open("wb") as log:
        proc = subprocess.Popen(
            [*SIEVE, "reviewer", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        _probe_through_a_redis_outage(f"http://127.0.0.1:{port}", own_redis, tmp_path)
        assert proc.poll() is None, (tmp_path / "reviewer.log").read_text(errors="replace")[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
