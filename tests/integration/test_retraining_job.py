"""One retraining round of ``sieve trainer run`` against the real Redis: labels -> pairs -> rehearsal -> gate.

Promotion itself (install, Triton load, backfill, rollback) is covered by test_promotion.py; here the gate is set
so that it cannot pass, and the test checks that the round used everything it should and recorded why.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import redis
from PIL import Image

from services.common.config import REPO_ROOT, Settings
from services.common.index import IndexEntry, SharedRecentIndex
from services.common.photos.build import Manifest
from services.common.schemas import FeedbackLabel
from services.common.transforms import chain, crop, encode_jpeg, jpeg
from services.common.upload_keys import upload_uri_key
from services.trainer.job import RetrainingJob

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


def test_a_round_trains_on_labels_rehearses_the_window_and_records_the_gate(
    settings: Settings, photo_set: Manifest, tmp_path: Path
) -> None:
    repo = tmp_path / "model_repo" / "sieve_embedder"
    shutil.copytree(SERVED_V2, repo / "2", ignore=shutil.ignore_patterns("*.onnx"))
    trainer = settings.trainer.model_copy(
        update={"workdir": tmp_path / "trainer", "rehearsal_images": 50, "gate_tolerance": -1.0}
    )
    stack = settings.stack.model_copy(update={"model_repo": tmp_path / "model_repo"})
    settings = settings.model_copy(update={"trainer": trainer, "stack": stack})

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
    window = SharedRecentIndex(client, settings.redis.key_prefix, "sieve_embedder:2", 256, 3600)
    rng = np.random.default_rng(0)
    window.add([IndexEntry(u, rng.normal(size=256).astype(np.float32), time.time()) for u in uris])
    for upload_id, uri in uris.items():
        client.set(upload_uri_key(settings.redis.key_prefix, upload_id), uri)

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
