"""Session fixtures: each real server starts once per test session, and every test gets its own namespace."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.config import Settings, TelemetrySettings
from services.common.photos.build import Manifest, build_photo_set, default_photo_dir, load_photo_set
from services.common.stack import LocalStack, StackEndpoints
from services.common.stack.milvus import MilvusServer
from services.common.telemetry import setup_telemetry


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    """Kafka, Redis and Triton as real local processes on free loopback ports."""
    local = LocalStack()
    local.start()
    yield local
    local.stop()


@pytest.fixture(scope="session")
def milvus_uri(stack: LocalStack) -> Iterator[str]:
    """The real Milvus server: the stack's own when SIEVE_INDEX_BACKEND=milvus, else one started here, once."""
    if stack.milvus is not None:
        yield stack.milvus.uri
        return
    settings = stack.settings
    server = MilvusServer(stack.home / "milvus", settings.cache_dir, settings.milvus_version)
    server.start(stack.log_dir, settings.start_timeout_s)
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def photo_set() -> Manifest:
    """The real-photo set from Debian packages and scikit-image; built here if setup has not built it yet."""
    try:
        return load_photo_set()
    except FileNotFoundError:
        return build_photo_set(default_photo_dir())


@pytest.fixture(scope="session")
def endpoints(stack: LocalStack) -> StackEndpoints:
    return stack.endpoints()


@pytest.fixture()
def namespace() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture()
def stack_env(
    endpoints: StackEndpoints, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """Environment for one test: its own topics, consumer group and Redis key prefix on the shared stack."""
    env = {
        **endpoints.env(),
        "SIEVE_KAFKA_TOPIC_UPLOADS": f"uploads-{namespace}",
        "SIEVE_KAFKA_TOPIC_VERDICTS": f"verdicts-{namespace}",
        "SIEVE_KAFKA_TOPIC_REVIEW": f"review-{namespace}",
        "SIEVE_KAFKA_TOPIC_FEEDBACK": f"feedback-{namespace}",
        "SIEVE_KAFKA_TOPIC_DLQ": f"uploads.dlq-{namespace}",
        "SIEVE_KAFKA_CONSUMER_GROUP": f"moderator-{namespace}",
        "SIEVE_REDIS_KEY_PREFIX": f"sieve-{namespace}",
        "SIEVE_FETCH_FILE_ROOTS": json.dumps([str(tmp_path)]),
        "SIEVE_MODERATOR_BATCH_TIMEOUT_MS": "100",
        "SIEVE_OTEL_EXPORTER": "none",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture()
def settings(stack_env: dict[str, str]) -> Settings:
    return Settings()


def _layer(item: pytest.Item) -> str:
    return Path(str(item.fspath)).relative_to(Path(__file__).parent).parts[0]


@pytest.hookimpl(tryfirst=True)  # before -m deselects: `pytest -m integration` / `-m e2e` select the layers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _layer(item) in LAYER_MARKERS:
            item.add_marker(LAYER_MARKERS[_layer(item)])
    # Fast unit tests first, so a broken build fails before the servers start.
    order = {"unit": 0, "integration": 1, "e2e": 2}
    items.sort(key=lambda it: order.get(_layer(it), 3))


# Every test under tests/integration needs the real local stack; every test under tests/e2e runs the pipeline.
LAYER_MARKERS = {"integration": pytest.mark.integration, "e2e": pytest.mark.e2e}


# This process keeps spans and metrics in memory so tests can assert on them; replicas started as
# subprocesses get exporter "none" through stack_env.
os.environ["SIEVE_OTEL_EXPORTER"] = "memory"
setup_telemetry(TelemetrySettings(), "sieve-tests")
