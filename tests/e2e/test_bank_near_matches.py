"""Banked images come back cropped, re-encoded and captioned: the stream blocks them, with the bank's evidence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from bench.hash_banks import caption
from services.common.banks import HashBankStore
from services.common.banks.embeddings import EmbeddingBanks
from services.common.banks.exchange import import_list
from services.common.banks.images import banked_image, image_signals
from services.common.config import Settings
from services.common.inference import TritonModels
from services.common.kafka_io import ensure_topics
from services.common.photos.build import Manifest
from services.common.transforms import crop, encode_jpeg, resize
from services.common.uploads import UploadPublisher, event_for_file
from tests.e2e.conftest import ModeratorProcess, pick_photos, read_topic, start_moderator

pytestmark = pytest.mark.e2e


def test_edited_copies_of_banked_images_are_blocked_in_the_stream(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    photos = [Image.open(photo_set.path_of(r)).convert("RGB") for r in pick_photos(photo_set, 6, 23)]
    originals = [encode_jpeg(p, 92) for p in photos]
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    store = HashBankStore(client, settings.redis.key_prefix)
    store.create("known-bad", "banked images")
    banked = [banked_image(data, settings) for data in originals[:3]]  # what `sieve banks add` banks
    for image in banked:
        store.add_signals("known-bad", image.signals)
    pixels = np.stack([image.pixels for image in banked])
    ids = [image.item_id for image in banked]
    EmbeddingBanks(client, settings.redis.key_prefix).embed_and_add(
        "known-bad", TritonModels(settings.triton), ids, pixels, [image.features for image in banked]
    )
    # A shared hash list: photo 4 known only by its PDQ, as an HMA / ThreatExchange list carries it.
    pdq = next(s.value for s in image_signals(originals[4], settings) if s.kind == "pdq")
    store.create("shared-list", "imported")
    assert import_list(store, "shared-list", f"pdq {pdq}\n", "te", "test").added == 1

    # A watch list: its action is review, so its match goes to a reviewer instead of being blocked.
    store.create("watch", "watch list", action="review")
    watched = next(s.value for s in image_signals(originals[5], settings) if s.kind == "pdq")
    assert import_list(store, "watch", f"pdq {watched}\n", "te", "test").added == 1

    edits = {
        "watched": encode_jpeg(photos[5], 40),
        "cropped": encode_jpeg(crop(0.85)(photos[0]), 90),
        "reencoded": encode_jpeg(photos[1], 35),
        "captioned": encode_jpeg(caption()(photos[2]), 90),
        "unrelated": originals[3],
        "listed-copy": encode_jpeg(resize(0.6)(photos[4]), 50),
    }
    for name, data in edits.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
    ensure_topics(settings.kafka)
    UploadPublisher(settings.kafka).publish([event_for_file(tmp_path / f"{n}.jpg") for n in edits])
    start_moderator(moderators, stack_env, tmp_path)
    verdicts = {str(r["upload_id"]): r for r in read_topic(settings, settings.kafka.topic_verdicts, len(edits))}

    for name, item in (("cropped", 0), ("reencoded", 1), ("captioned", 2)):
        verdict = verdicts[name]
        assert verdict["action"] == "block", (name, verdict["reasons"])
        assert "bank_match:known-bad" in verdict["reasons"]  # type: ignore[operator]
        [match] = verdict["bank_matches"]  # type: ignore[misc]
        assert match["bank"] == "known-bad" and match["item_id"] == ids[item], (name, match)
    for name in ("cropped", "captioned"):
        [match] = verdicts[name]["bank_matches"]  # type: ignore[misc]
        assert match["signal_type"] == "embedding", (name, match)
        assert match["inliers"] is not None and match["score"] >= 1.0 - match["distance"], match  # verified
    listed = verdicts["listed-copy"]
    assert listed["action"] == "block" and listed["reasons"] == ["bank_match:shared-list"]
    [match] = listed["bank_matches"]  # type: ignore[misc]
    assert match["signal_type"] == "pdq" and match["distance"] <= settings.banks.pdq_threshold
    assert not any(str(r).startswith("bank_match") for r in verdicts["unrelated"]["reasons"])  # type: ignore[union-attr]
    assert verdicts["unrelated"]["bank_matches"] == []
    watched_verdict = verdicts["watched"]
    assert watched_verdict["action"] == "review" and "bank_review:watch" in watched_verdict["reasons"]  # type: ignore[operator]
    [match] = watched_verdict["bank_matches"]  # type: ignore[misc]
    assert (match["bank"], match["action"], match["signal_type"]) == ("watch", "review", "pdq")
    reviews = read_topic(settings, settings.kafka.topic_review, len(edits), timeout_s=15)
    assert [r["reason"] for r in reviews if r["upload_id"] == "watched"] == ["bank_match"]
    assert all(r["upload_id"] not in ("cropped", "reencoded", "captioned", "listed-copy") for r in reviews)
