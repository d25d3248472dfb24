"""Promotion and rollback against a real Triton (its own model repository copy) and the real Redis."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from numpy.typing import NDArray
from PIL import Image

from services.common.banks import HashBankStore
from services.common.banks.embeddings import EmbeddingBanks
from services.common.banks.near import BankEmbeddingRule
from services.common.config import REPO_ROOT, Settings
from services.common.imaging import decode_image
from services.common.index import IndexEntry, open_recent_index
from services.common.inference import TritonModels
from services.common.photos.build import load_photo_set
from services.common.stack.triton import TritonServer
from services.common.thresholds import ThresholdResolver, recorded_thresholds, with_recorded
from services.common.transforms import encode_jpeg
from services.common.upload_keys import upload_uri_key
from services.common.verification import Verifier
from services.trainer.promotion import ModelRepository, promote, rollback


@pytest.fixture()
def own_triton(tmp_path: Path, stack_env: dict[str, str]) -> Iterator[tuple[TritonServer, Path]]:
    """A Triton of this test's own, over a copy of model_repo holding only version 1 of each model."""
    repo = tmp_path / "model_repo"
    for model in ("sieve_embedder", "sieve_classifier"):
        (repo / model).mkdir(parents=True)
        shutil.copy2(REPO_ROOT / "model_repo" / model / "config.pbtxt", repo / model / "config.pbtxt")
        shutil.copytree(REPO_ROOT / "model_repo" / model / "1", repo / model / "1")
    server = TritonServer(tmp_path / "triton", repo, ["sieve_embedder", "sieve_classifier"])
    server.start(tmp_path / "logs", 180)
    yield server, repo
    server.stop()


def test_promote_backfills_then_serves_and_rollback_restores(
    settings: Settings, own_triton: tuple[TritonServer, Path], tmp_path: Path
) -> None:
    server, repo_root = own_triton
    settings = settings.model_copy(update={"triton": settings.triton.model_copy(update={"url": server.grpc_url})})
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    models = TritonModels(settings.triton)
    manifest = load_photo_set()
    records = sorted(manifest.images, key=lambda r: r.id)[:6]
    paths = []
    for i, r in enumerate(records):
        path = tmp_path / f"w{i}.jpg"
        path.write_bytes(encode_jpeg(Image.open(manifest.path_of(r))))
        paths.append(path)
    pixels = np.stack([decode_image(p.read_bytes(), settings.decode, 256).pixels for p in paths])
    served = models.infer(pixels)
    assert served.model_version == "sieve_embedder:1"
    # The serving version's window, as the moderator leaves it: index entries plus each upload's image uri.
    v1 = open_recent_index(settings, client, "sieve_embedder:1", 1280)
    v1.add([IndexEntry(f"w{i}", served.embeddings[i], time.time()) for i in range(len(paths))])
    for i, p in enumerate(paths):
        client.set(upload_uri_key(settings.redis.key_prefix, f"w{i}"), p.as_uri())

    repo = ModelRepository(repo_root)
    staged = tmp_path / "staged"
    shutil.copytree(repo_root / "sieve_embedder" / "1", staged)
    # The candidate is another network: version 1's embedding turned (its dimensions rolled by one), so what the
    # promotion backfills can be told from a copy of version 1's index.
    loader = staged / "model.py"
    code = loader.read_text()
    served_line = 'return respond_per_request(pb_utils, "EMBEDDING", self._embed(batch), sizes)'
    assert served_line in code
    loader.write_text(
        code.replace(served_line, served_line.replace("self._embed(batch)", "np.roll(self._embed(batch), 1, axis=1)"))
    )

    # A bank holding one of the photos, embedded by the serving version (as `sieve banks add` banks it).
    HashBankStore(client, settings.redis.key_prefix).create("known-bad")
    banks = EmbeddingBanks(client, settings.redis.key_prefix, sync_interval_s=0.0)
    assert banks.embed_and_add("known-bad", models, ["item-5"], pixels[5:6]) == "sieve_embedder:1"
    answered: list[str] = []

    def embed(batch: NDArray[np.uint8]) -> NDArray[np.float32]:
        """The candidate, in process (as the trainer embeds with it before Triton serves it)."""
        result = models.infer(batch)
        answered.append(result.model_version)
        return np.roll(result.embeddings, 1, axis=1)

    log_path = tmp_path / "promotions.jsonl"
    version = promote(
        settings, client, repo, staged, embed, 1280, log_path, {"gate": "test"}, threshold=0.905, bank_threshold=0.83
    )
    assert version == 2
    # The version's threshold travels with it: recorded in Redis, where moderators and the trainer merge it over
    # the configured ones (a version unknown to the configuration would otherwise decide at the global default).
    recorded = recorded_thresholds(client, settings.redis.key_prefix)
    assert recorded == {"sieve_embedder:2": 0.905}
    assert with_recorded(settings.decision, recorded).threshold_for("sieve_embedder:2") == 0.905
    assert with_recorded(settings.decision, recorded).threshold_for("sieve_embedder:1") == 0.90
    # So does its bank threshold: every matcher of banked images (moderator, re-judging, match API) reads it.
    assert recorded_thresholds(client, settings.redis.key_prefix, "bank") == {"sieve_embedder:2": 0.83}
    bank_settings = settings.banks.model_copy(update={"embedding_thresholds": {}})
    resolver = ThresholdResolver(settings.decision, bank_settings, client, settings.redis.key_prefix)
    rule = BankEmbeddingRule(resolver, Verifier(settings.verify))
    assert rule.threshold("sieve_embedder:2", None) == 0.83 and rule.threshold("sieve_embedder:2", 0.9) == 0.9
    unrecorded = BankEmbeddingRule(ThresholdResolver(settings.decision, bank_settings), Verifier(settings.verify))
    assert unrecorded.threshold("sieve_embedder:2", None) == bank_settings.embedding_threshold
    assert models.infer(pixels[:1]).model_version == "sieve_embedder:2"
    v2 = open_recent_index(settings, client, "sieve_embedder:2", 1280)
    assert v2.sync() and len(v2.entries()) == len(paths)  # the new version's index is complete before its first verdict
    now_served = models.infer(pixels)  # the candidate, served by Triton now
    assert not np.allclose(now_served.embeddings, served.embeddings, atol=1e-3)  # another network indeed
    found = v2.search(now_served.embeddings[3:4], 1)[0][0]
    assert found.upload_id == "w3" and found.score > 0.99  # backfilled with the candidate's embeddings ...
    assert v2.search(served.embeddings[3:4], 1)[0][0].score < 0.99  # ... not copied from version 1's index
    assert '"event": "promoted"' in log_path.read_text()
    # The banked image was embedded by the candidate as part of the promotion, before Triton switched to it.
    assert len(answered) == 2 and set(answered) == {"sieve_embedder:1"}  # the window, then the bank
    [hit] = banks.search("sieve_embedder:2", models.infer(pixels[5:6]).embeddings[0])
    assert (hit.bank, hit.item_id) == ("known-bad", "item-5") and hit.cosine > 0.99
    assert '"banked_images_reembedded": 1' in log_path.read_text()

    assert rollback(settings, repo, log_path, "test") == 1
    assert models.infer(pixels[:1]).model_version == "sieve_embedder:1"
    assert repo.versions() == [1]
    assert '"event": "rolled_back"' in log_path.read_text()
    models.close()
