"""Retraining rounds of ``sieve trainer run`` against the real Redis: labels -> pairs -> rehearsal -> gate.

The first round's gate is set so that it cannot pass: the test checks that the round used everything it should
and recorded why. The second's is set so that it must pass: the job promotes through a Triton of the test's own,
and ``sieve trainer status`` and ``sieve trainer rollback`` (twice: the second has nothing left to roll back to)
are run as operators run them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import redis
from PIL import Image

from services.common.config import REPO_ROOT, Settings
from services.common.index import IndexEntry, open_recent_index
from services.common.photos.build import Manifest
from services.common.schemas import FeedbackLabel
from services.common.stack.triton import TritonServer
from services.common.transforms import chain, crop, encode_jpeg, jpeg
from services.common.upload_keys import upload_uri_key
from services.trainer.job import RetrainingJob
from tests.promotion_support import serving_versions

SERVED_V2 = REPO_ROOT / "model_repo" / "sieve_embedder" / "2"


def _distinct(manifest: Manifest, n: int) -> list[Path]:
    seen: set[str] = set()
    paths = []
    for record in sorted(manifest.images, key=lambda r: r.id):
        if record.group not in seen:
            seen.add(record.group)
            paths.append(manifest.path_of(record))
        if len(paths) == n:
            break
    return paths


def _round_settings(settings: Settings, tmp_path: Path, gate_tolerance: float) -> Settings:
    """The test's own model repository (a copy of v2) and trainer workdir."""
    repo = tmp_path / "model_repo" / "sieve_embedder"
    shutil.copytree(SERVED_V2, repo / "2", ignore=shutil.ignore_patterns("*.onnx"))
    shutil.copy2(SERVED_V2.parent / "config.pbtxt", repo / "config.pbtxt")
    trainer = settings.trainer.model_copy(
        update={"workdir": tmp_path / "trainer", "rehearsal_images": 50, "gate_tolerance": gate_tolerance}
    )
    stack = settings.stack.model_copy(update={"model_repo": tmp_path / "model_repo"})
    return settings.model_copy(update={"trainer": trainer, "stack": stack})


def _labelled_window(settings: Settings, photo_set: Manifest, tmp_path: Path) -> list[FeedbackLabel]:
    """20 photos, 10 planted copies labelled as duplicates and 4 pairs as not; all in the serving window."""
    photos = _distinct(photo_set, 20)
    uris: dict[str, str] = {}
    for i, source in enumerate(photos):
        img = Image.open(source).convert("RGB")
        (tmp_path / f"o{i}.jpg").write_bytes(encode_jpeg(img))
        uris[f"o{i}"] = (tmp_path / f"o{i}.jpg").as_uri()
        if i < 10:
            (tmp_path / f"c{i}.jpg").write_bytes(encode_jpeg(chain(crop(0.8), jpeg(40))(img)))
            uris[f"c{i}"] = (tmp_path / f"c{i}.jpg").as_uri()
    labels = [
        FeedbackLabel(
            upload_id=f"c{i}",
            reviewer_id="alice",
            duplicate_of=f"o{i}",
            image_uri=uris[f"c{i}"],
            compared_with=f"o{i}",
            compared_uri=uris[f"o{i}"],
        )
        for i in range(10)
    ] + [
        FeedbackLabel(
            upload_id=f"o{i}",
            reviewer_id="alice",
            not_duplicate=True,
            image_uri=uris[f"o{i}"],
            compared_with=f"o{i + 1}",
            compared_uri=uris[f"o{i + 1}"],
        )
        for i in range(0, 8, 2)
    ]
    # The serving version's retention window, as the moderator leaves it: index entries plus image URIs.
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    window = open_recent_index(settings, client, "sieve_embedder:2", 256)
    rng = np.random.default_rng(0)
    window.add([IndexEntry(u, rng.normal(size=256).astype(np.float32), time.time()) for u in uris])
    for upload_id, uri in uris.items():
        client.set(upload_uri_key(settings.redis.key_prefix, upload_id), uri)

    return labels


def test_a_round_trains_on_labels_rehearses_the_window_and_records_the_gate(
    settings: Settings, photo_set: Manifest, tmp_path: Path
) -> None:
    settings = _round_settings(settings, tmp_path, gate_tolerance=-1.0)
    labels = _labelled_window(settings, photo_set, tmp_path)
    job = RetrainingJob(settings)
    job.store.add(labels)
    outcome = job.retrain()

    assert outcome["event"] == "gated", outcome
    assert outcome["train_pairs"] + outcome["heldout_pairs"] == len(labels)
    # Rehearsal asked for 50 and got exactly the 10 window images no label mentions (o10..o19).
    assert outcome["rehearsal_images"] == 10
    assert outcome["finetune"]["pair_loss_after"] <= outcome["finetune"]["pair_loss_before"]
    gate = outcome["gate"]
    assert "benchmark_micro_ap" in gate["serving"] and 0.3 < gate["serving"]["benchmark_micro_ap"] <= 1.0
    assert not gate["promote"] and gate["why"].startswith("worse on")
    record = [json.loads(line) for line in (tmp_path / "trainer" / "promotions.jsonl").read_text().splitlines()]
    assert record[-1]["event"] == "not_promoted" and record[-1]["gate"]["why"] == gate["why"]
    assert job.repo.versions() == [2]  # nothing was installed


def _sieve_trainer(action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "trainer", action],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )


def test_a_round_that_passes_the_gate_promotes_and_the_cli_shows_and_rolls_it_back(
    settings: Settings, stack_env: dict[str, str], photo_set: Manifest, tmp_path: Path
) -> None:
    # A tolerance no candidate can miss: the gate passes, so the job takes the branch that really promotes.
    settings = _round_settings(settings, tmp_path, gate_tolerance=10.0)
    settings = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={"gate_benchmark": False})})
    labels = _labelled_window(settings, photo_set, tmp_path)
    triton = TritonServer(tmp_path / "triton", tmp_path / "model_repo", ["sieve_embedder"])
    triton.start(tmp_path / "logs", 240)
    try:
        settings = settings.model_copy(update={"triton": settings.triton.model_copy(update={"url": triton.grpc_url})})
        job = RetrainingJob(settings)
        job.store.add(labels)
        outcome = job.retrain()
        assert outcome["gate"]["promote"] and outcome.get("promoted_version") == 3, outcome
        assert job.repo.versions() == [2, 3]
        assert serving_versions(triton.grpc_url, "sieve_embedder") == ["3"]
        card = json.loads((tmp_path / "model_repo" / "sieve_embedder" / "3" / "model_card.json").read_text())
        assert card["finetuned_from"] == 2

        env = {
            **stack_env,
            "SIEVE_TRITON_URL": triton.grpc_url,
            "SIEVE_STACK_MODEL_REPO": str(tmp_path / "model_repo"),
            "SIEVE_TRAINER_WORKDIR": str(tmp_path / "trainer"),
        }
        shown = _sieve_trainer("status", env)
        assert shown.returncode == 0, shown.stderr[-3000:]
        status = json.loads(shown.stdout)
        assert status["serving"] == 3 and status["versions"] == [2, 3]
        assert status["history"][-1]["event"] == "promoted"

        back = _sieve_trainer("rollback", env)
        assert back.returncode == 0, back.stderr[-3000:]
        assert back.stdout.strip() == "serving version 2"
        assert serving_versions(triton.grpc_url, "sieve_embedder") == ["2"]
        assert json.loads(_sieve_trainer("status", env).stdout)["history"][-1]["event"] == "rolled_back"

        # One version left: nothing to roll back to. The operator is told why, and nothing changes.
        again = _sieve_trainer("rollback", env)
        assert again.returncode == 1 and "only one version is installed" in again.stderr, again.stderr[-3000:]
        assert "Traceback" not in again.stderr
        assert job.repo.versions() == [2]
        assert serving_versions(triton.grpc_url, "sieve_embedder") == ["2"]
    finally:
        triton.stop()
