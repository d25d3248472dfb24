"""An admin's promotion request, end to end: the reviewer's HTTP API, ``sieve trainer run``, Triton, the CLI.

Three requests against a private model on the session's Triton (tests/promotion_support.py): a staged candidate
(promoted, its index backfilled before it serves), a version that exists nowhere (refused), and a candidate that
Triton cannot load (undone and refused, with the promoted version still serving).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from numpy.typing import NDArray

from services.common.config import Settings
from services.common.imaging import decode_image
from services.common.index import IndexEntry, open_recent_index
from services.common.inference import TritonModels
from services.common.kafka_io import ensure_topics
from services.common.photos.build import Manifest
from services.common.thresholds import recorded_thresholds
from services.common.upload_keys import upload_uri_key
from tests.e2e.conftest import SIEVE, pick_photos, write_photo
from tests.promotion_support import private_model, serving_versions, stage_candidate, wait_for

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "root-admin-token-0123456789"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, None


@contextmanager
def _process(argv: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture()
def env(stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({ADMIN_TOKEN: {"reviewer_id": "root", "role": "admin"}}))
    extra = {
        "SIEVE_TRAINER_WORKDIR": str(tmp_path / "trainer"),
        "SIEVE_TRAINER_GATE_BENCHMARK": "false",
        "SIEVE_REVIEWER_TOKENS_FILE": str(tokens),
        "SIEVE_REVIEWER_CONSUMER_GROUP": f"reviewer-{stack_env['SIEVE_REDIS_KEY_PREFIX']}",
    }
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    return {**stack_env, **extra}


def _seed_window(settings: Settings, model: str, manifest: Manifest, folder: Path) -> NDArray[np.uint8]:
    """Version 1's recent-images index as moderators leave it: entries plus each upload's image URI."""
    paths = [write_photo(manifest, r, folder, f"w{i}") for i, r in enumerate(pick_photos(manifest, 4, seed=19))]
    pixels: NDArray[np.uint8] = np.stack([decode_image(p.read_bytes(), settings.decode, 256).pixels for p in paths])
    models = TritonModels(settings.triton.model_copy(update={"embedder_model": model}))
    served = models.infer(pixels)
    models.close()
    assert served.model_version == f"{model}:1"
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    prefix, dim = settings.redis.key_prefix, served.embeddings.shape[1]
    v1 = open_recent_index(settings, client, f"{model}:1", dim)
    v1.add([IndexEntry(f"w{i}", served.embeddings[i], time.time()) for i in range(len(paths))])
    for i, p in enumerate(paths):
        client.set(upload_uri_key(prefix, f"w{i}"), p.as_uri())
    return pixels


def test_admin_requests_end_promoted_or_refused_in_the_api_and_the_cli(
    env: dict[str, str], photo_set: Manifest, namespace: str, tmp_path: Path
) -> None:
    settings = Settings()
    ensure_topics(settings.kafka)
    root, url, workdir = settings.stack.model_repo, settings.triton.url, settings.trainer.workdir
    with private_model(root, url, namespace) as model:
        pixels = _seed_window(settings, model, photo_set, tmp_path)
        stage_candidate(workdir, model, 2, root)
        stage_candidate(workdir, model, 3, root, broken=True)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        reviewer = [*SIEVE, "reviewer", "serve", "--host", "127.0.0.1", "--port", str(port)]
        with (
            _process(reviewer, env, tmp_path / "reviewer.log") as api,
            _process([*SIEVE, "trainer", "run"], env, tmp_path / "trainer.log") as trainer,
        ):
            wait_for(lambda: api.poll() is None and _call("GET", f"{base}/readyz")[0] == 200, 90, "the reviewer")
            ids = []
            for version, reason in (("2", "gate passed offline"), ("9", "typo"), ("3", "broken build")):
                request = {"model": model, "version": version, "reason": reason}
                status, reply = _call("POST", f"{base}/api/admin/promote", request)
                assert status == 202, reply
                ids.append(reply["request_id"])
            assert _call("GET", f"{base}/api/admin/promotions/{ids[0]}")[1]["state"] in ("requested", "running")

            def states() -> dict[str, dict[str, Any]]:
                listed = _call("GET", f"{base}/api/admin/promotions")[1]["requests"]
                return {r["request_id"]: r for r in listed}

            def finished() -> bool:
                assert trainer.poll() is None, (tmp_path / "trainer.log").read_text(errors="replace")
                return all(states().get(i, {}).get("state") in ("promoted", "refused") for i in ids)

            wait_for(finished, 420, "the trainer to finish the three requests")
            promoted, unknown, broken = (states()[i] for i in ids)
            trainer.send_signal(signal.SIGTERM)
            assert trainer.wait(60) == 0

        assert (promoted["state"], promoted["requested_by"], promoted["from_version"]) == ("promoted", "root", 1)
        assert promoted["detail"] == f"version 2 of {model} serves (was 1)"
        assert promoted["requested_at"] <= promoted["started_at"] <= promoted["finished_at"]
        assert unknown["state"] == "refused"
        assert unknown["detail"] == f"version 9 of {model} is neither installed nor staged as a candidate"
        assert broken["state"] == "refused" and broken["detail"].startswith("Triton did not load version 3:")

        # Version 2 serves, with the whole window already in its own index; the broken 3 was taken back out.
        assert serving_versions(url, model) == ["2"]
        assert sorted(p.name for p in (root / model).iterdir() if p.name.isdigit()) == ["1", "2"]
        models = TritonModels(settings.triton.model_copy(update={"embedder_model": model}))
        served = models.infer(pixels)
        models.close()
        assert served.model_version == f"{model}:2"
        client = redis.Redis.from_url(settings.redis.url.get_secret_value())
        v2 = open_recent_index(settings, client, f"{model}:2", served.embeddings.shape[1])
        assert v2.sync() and len(v2.entries()) == len(pixels)
        assert [hits[0].upload_id for hits in v2.search(served.embeddings, 1)] == ["w0", "w1", "w2", "w3"]
        card = json.loads((root / model / "2" / "model_card.json").read_text())
        recorded = recorded_thresholds(client, settings.redis.key_prefix)
        assert recorded.get(f"{model}:2") == card["duplicate_threshold"] and f"{model}:3" not in recorded

        cli = subprocess.run(
            [*SIEVE, "trainer", "status"], env={**os.environ, **env}, cwd=ROOT, capture_output=True, timeout=120
        )
        assert cli.returncode == 0, cli.stderr.decode(errors="replace")
        shown = {r["request_id"]: r for r in json.loads(cli.stdout)["promotion_requests"]}
        assert [(shown[i]["state"], shown[i]["detail"]) for i in ids] == [
            (r["state"], r["detail"]) for r in (promoted, unknown, broken)
        ]
