"""Retroactive actioning against the real Redis and Kafka: earlier uploads that match a newly banked item get one
updated verdict each, in resumable steps."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr
from skimage import data as skdata

from services.common.banks import HashBankStore, Signal
from services.common.banks.embeddings import EmbeddingBanks
from services.common.banks.rejudge import RejudgeRequests, RejudgeWorker
from services.common.banks.rejudging import Rejudger, kafka_publisher
from services.common.config import Settings
from services.common.exact_store import ExactMatchStore, KnownUpload
from services.common.imaging import detail_view
from services.common.index import IndexEntry, open_recent_index
from services.common.kafka_io import ensure_topics
from services.common.recent_pdq import RecentPdqLog
from services.common.schemas import Action, Verdict
from services.common.upload_keys import upload_action_key, upload_uri_key
from services.common.verification import FeatureExtractor, FeatureStore, LocalFeatures
from services.reviewer.app import build_services, create_app
from services.reviewer.settings import ReviewerSettings
from tests.e2e.conftest import read_topic

pytestmark = pytest.mark.integration
VERSION = "sieve_embedder:2"
ADMIN = "admin-token-0123456789ab"


def _flip(value: str, bits: int) -> str:
    raw = bytearray(bytes.fromhex(value))
    for bit in range(0, bits * 7, 7):
        raw[bit // 8] ^= 1 << (bit % 8)
    return raw.hex()


def test_earlier_uploads_are_re_verdicted_exactly_once(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    prefix, ttl = settings.redis.key_prefix, settings.index.retention_s
    rng = np.random.default_rng(3)
    pdq = rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex()
    vector = rng.normal(size=8).astype(np.float32)
    vector /= np.linalg.norm(vector)
    # Three uploads the moderator allowed earlier: by bytes, by PDQ, by embedding.
    ExactMatchStore(client, prefix, ttl).remember("a" * 64, None, KnownUpload("up-bytes", "allow", VERSION, {}))
    pipe = client.pipeline()
    allowed = Verdict(upload_id="up-pdq", event_id="e", model_version=VERSION, action=Action.ALLOW)
    RecentPdqLog(client, prefix, ttl).append(pipe, "up-pdq", pdq, allowed.model_version, allowed.flags)
    for upload_id in ("up-bytes", "up-pdq", "up-embedding", "up-other", "up-lookalike", "up-copy"):
        pipe.set(upload_action_key(prefix, upload_id), "allow")
    pipe.execute()
    index = open_recent_index(settings, client, VERSION, 8)
    index.add([IndexEntry("up-embedding", vector, time.time()), IndexEntry("up-other", -vector, time.time())])

    store = HashBankStore(client, prefix)
    store.create("late")
    store.add_signals(
        "late",
        [
            Signal("sha256", "a" * 64, "item-1"),
            Signal("pdq", "0" * 64, "item-0"),  # matches nothing
            Signal("pdq", _flip(pdq, 12), "item-2"),
        ],
    )
    near = vector + rng.normal(scale=0.05, size=8).astype(np.float32)
    embedded = EmbeddingBanks(client, prefix)
    embedded.add("late", VERSION, ["item-3"], near[None], np.zeros((1, 256, 256, 3), np.uint8))
    # Two banked images with keypoints, each with an earlier upload near it (directions orthogonal to the rest):
    # a look-alike above the cosine threshold that verification refutes, a copy below it that verification finds.
    q = np.linalg.qr(np.column_stack([vector, rng.normal(size=(8, 7))]))[0][:, 1:].T.astype(np.float32)
    lookalike, copy = 0.85 * q[0] + np.sqrt(1 - 0.85**2) * q[1], 0.72 * q[2] + np.sqrt(1 - 0.72**2) * q[3]
    index.add([IndexEntry("up-lookalike", lookalike, time.time()), IndexEntry("up-copy", copy, time.time())])
    embedded.add("late", VERSION, ["item-4", "item-5"], q[[0, 2]], np.zeros((2, 256, 256, 3), np.uint8))
    embedded.add_features("late", {"item-4": _features("coffee"), "item-5": _features("astronaut")})
    FeatureStore(client, prefix, ttl).put_many(
        {"up-lookalike": _features("astronaut"), "up-copy": _features("astronaut", crop=True)}
    )

    ensure_topics(settings.kafka)
    judge = Rejudger(client, settings, kafka_publisher(settings))
    first = judge.run("late", max_signals=1)
    assert (first.cursor, first.done, first.signals_total) == (1, False, 3)
    assert first.published == 3  # the embeddings (searched on the first step) and the bytes
    second = judge.run("late", max_signals=10)
    assert (second.cursor, second.done, second.published) == (3, True, 1)
    client.delete(f"{prefix}:bank:late:retro", f"{prefix}:bank:late:retro:embedded")  # from scratch: nothing twice
    again = judge.run("late")
    assert again.done and again.found == 4 and again.published == 0

    records = read_topic(settings, settings.kafka.topic_verdicts, 4, timeout_s=60)
    assert sorted(str(r["upload_id"]) for r in records) == ["up-bytes", "up-copy", "up-embedding", "up-pdq"]
    by_id = {str(r["upload_id"]): r for r in records}
    for upload_id, kind, item in (("up-bytes", "sha256", "item-1"), ("up-pdq", "pdq", "item-2")):
        verdict = by_id[upload_id]
        assert verdict["action"] == "block" and verdict["reasons"] == ["retroactive_bank_match:late"]
        assert verdict["bank_matches"][0]["signal_type"] == kind  # type: ignore[index]
        assert verdict["bank_matches"][0]["item_id"] == item  # type: ignore[index]
    assert by_id["up-pdq"]["bank_matches"][0]["distance"] == 12  # type: ignore[index]
    assert by_id["up-embedding"]["bank_matches"][0]["signal_type"] == "embedding"  # type: ignore[index]
    assert client.get(upload_action_key(prefix, "up-other")) == b"allow"
    assert client.get(upload_action_key(prefix, "up-lookalike")) == b"allow"  # 0.85 - the miss penalty < 0.80
    verified = by_id["up-copy"]["bank_matches"][0]  # type: ignore[index]
    assert verified["item_id"] == "item-5" and verified["inliers"] > 25 and verified["score"] >= 0.8


@pytest.mark.parametrize("second_pass", [True, False])
def test_a_copy_the_descriptor_lost_among_nearer_uploads_is_found_by_its_keypoints(
    settings: Settings, second_pass: bool
) -> None:
    """A turned copy uploaded before its original was banked: 60 unrelated uploads are nearer the banked image
    by cosine, so the cosine search never reaches it; the keypoint channel (the moderator's second pass, from the
    banked image's side) does, and the rule judges it as the moderator would."""
    settings = settings.model_copy(update={"verify": settings.verify.model_copy(update={"second_pass": second_pass})})
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    prefix, ttl = settings.redis.key_prefix, settings.index.retention_s
    rng = np.random.default_rng(11)
    basis = np.linalg.qr(rng.normal(size=(16, 16)))[0].T.astype(np.float32)
    banked, turned_cosine = basis[0], 0.35
    turned = turned_cosine * basis[0] + np.sqrt(1 - turned_cosine**2) * basis[1]
    nearer = [c * basis[0] + np.sqrt(1 - c**2) * basis[2 + i % 14] for i, c in enumerate(np.linspace(0.4, 0.7, 60))]
    index = open_recent_index(settings, client, VERSION, 16)
    now = time.time()
    index.add([IndexEntry("up-turned", turned.astype(np.float32), now)])
    index.add([IndexEntry(f"up-near-{i}", v.astype(np.float32), now) for i, v in enumerate(nearer)])
    pipe = client.pipeline()
    for upload_id in ["up-turned", *(f"up-near-{i}" for i in range(60))]:
        pipe.set(upload_action_key(prefix, upload_id), "allow")
    pipe.execute()
    FeatureStore(client, prefix, ttl).put_many({"up-turned": _features("astronaut", turn=True)})

    store = HashBankStore(client, prefix)
    store.create("turned")
    embedded = EmbeddingBanks(client, prefix)
    embedded.add("turned", VERSION, ["item-a"], banked[None], np.zeros((1, 256, 256, 3), np.uint8))
    embedded.add_features("turned", {"item-a": _features("astronaut")})
    ensure_topics(settings.kafka)
    progress = Rejudger(client, settings, kafka_publisher(settings)).run("turned")
    assert progress.done
    if not second_pass:
        assert progress.found == 0 and client.get(upload_action_key(prefix, "up-turned")) == b"allow"
        return
    assert (progress.found, progress.published) == (1, 1)
    [verdict] = [r for r in read_topic(settings, settings.kafka.topic_verdicts, 1, timeout_s=60)]
    assert verdict["upload_id"] == "up-turned" and verdict["action"] == "block"
    match = verdict["bank_matches"][0]  # type: ignore[index]
    assert match["signal_type"] == "embedding" and match["inliers"] > 40
    assert match["score"] >= settings.banks.embedding_thresholds[VERSION]


def _features(name: str, crop: bool = False, turn: bool = False) -> LocalFeatures:
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    if turn:
        img = img.transpose(Image.Transpose.ROTATE_90)
    if crop:
        w, h = img.size
        img = img.crop((int(w * 0.1), int(h * 0.1), int(w * 0.85), int(h * 0.85)))
    return FeatureExtractor("orb", 500).extract(detail_view(img, 512))


def test_a_review_bank_sends_earlier_matches_to_reviewers(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    prefix, ttl = settings.redis.key_prefix, settings.index.retention_s
    ExactMatchStore(client, prefix, ttl).remember("c" * 64, None, KnownUpload("up-watched", "allow", VERSION, {}))
    client.set(upload_action_key(prefix, "up-watched"), "allow")
    client.set(upload_uri_key(prefix, "up-watched"), "file:///photos/watched.jpg")
    store = HashBankStore(client, prefix)
    store.create("watch", action="review")
    store.add_signals("watch", [Signal("sha256", "c" * 64, "item-w")])

    ensure_topics(settings.kafka)
    assert Rejudger(client, settings, kafka_publisher(settings)).run("watch").published == 1
    [verdict] = read_topic(settings, settings.kafka.topic_verdicts, 1, timeout_s=60)
    assert verdict["action"] == "review" and verdict["reasons"] == ["retroactive_bank_match:watch"]
    assert verdict["bank_matches"][0]["action"] == "review"  # type: ignore[index]
    [review] = read_topic(settings, settings.kafka.topic_review, 1, timeout_s=60)
    assert (review["upload_id"], review["reason"]) == ("up-watched", "bank_match")
    assert review["image_uri"] == "file:///photos/watched.jpg"
    assert client.get(upload_action_key(prefix, "up-watched")) == b"review"


def test_admin_api_adds_are_re_judged_in_the_background_in_bounded_steps(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    prefix, ttl = settings.redis.key_prefix, settings.index.retention_s
    ExactMatchStore(client, prefix, ttl).remember("d" * 64, None, KnownUpload("up-api", "allow", VERSION, {}))
    client.set(upload_action_key(prefix, "up-api"), "allow")
    ensure_topics(settings.kafka)
    rsettings = ReviewerSettings(admin_tokens=[SecretStr(f"root:{ADMIN}")], rejudge_max_signals=1)
    services = build_services(settings, rsettings)
    services.ingestor = None
    assert isinstance(services.rejudger, RejudgeWorker)
    services.rejudger.poll_s = 0.1
    h = {"Authorization": f"Bearer {ADMIN}"}
    signals = [
        {"signal_type": "pdq", "signal_value": "0" * 64, "content_id": "c-0"},
        {"signal_type": "md5", "signal_value": "e" * 32, "content_id": "c-1"},
        {"signal_type": "sha256", "signal_value": "d" * 64, "content_id": "c-2"},
    ]
    with TestClient(create_app(rsettings, services)) as api:
        assert api.put("/api/admin/banks/api-bank", headers=h, json={}).status_code == 201
        res = api.post("/api/admin/banks/api-bank/signals", headers=h, json={"signals": signals})
        assert res.status_code == 200 and res.json()["rejudge_requested"] is True
        deadline = time.monotonic() + 60
        while (body := api.get("/api/admin/banks/api-bank/rejudge", headers=h).json())["pending"]:
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
        progress = body["progress"]
        assert (progress["state"], progress["cursor"], progress["signals_total"]) == ("done", 3, 3)
        steps = [e for e in api.get("/api/admin/audit", headers=h).json()["entries"] if e["event"] == "bank_rejudged"]
        assert len(steps) == 3  # one banked signal per step, each step's progress recorded
        assert api.post("/api/admin/banks/missing/rejudge", headers=h).status_code == 404
    [verdict] = read_topic(settings, settings.kafka.topic_verdicts, 1, timeout_s=60)
    assert (verdict["upload_id"], verdict["action"]) == ("up-api", "block")
    assert verdict["reasons"] == ["retroactive_bank_match:api-bank"]

    # A request left by a process that stopped is worked by the next worker; a newer request outlives an older run.
    requests = RejudgeRequests(client, prefix)
    requests.request("api-bank", "test")
    generation = requests.pending()["api-bank"]
    requests.request("api-bank", "test")
    assert not requests.finish("api-bank", generation) and "api-bank" in requests.pending()
    worker = RejudgeWorker(Rejudger(client, settings, kafka_publisher(settings)))
    assert worker.run_once() == 1 and requests.pending() == {}
    assert worker.run_once() == 0


def test_cli_rejudge_waits_for_the_bank_lock_the_worker_holds(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two processes stepping one bank would both read the cursor and publish the same verdicts twice."""
    from services.cli import main as sieve
    from services.ops import cli as ops_cli

    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    prefix = settings.redis.key_prefix
    ExactMatchStore(client, prefix, settings.index.retention_s).remember(
        "c" * 64, None, KnownUpload("up-locked", "allow", VERSION, {})
    )
    client.set(upload_action_key(prefix, "up-locked"), "allow")
    store = HashBankStore(client, prefix)
    store.create("locked")
    store.add_signals("locked", [Signal("sha256", "c" * 64, "item-1")])
    judge = Rejudger(client, settings, kafka_publisher(settings))
    monkeypatch.setattr(ops_cli, "REJUDGE_LOCK_WAIT_S", 0.5)
    held = judge.lock("locked")
    assert held.acquire(blocking=False)
    try:
        with pytest.raises(SystemExit, match="being re-judged by another process"):
            sieve(["banks", "rejudge", "locked", "--actor", "tester"])
        assert client.hget(f"{prefix}:bank:locked:retro", "cursor") is None  # nothing stepped
    finally:
        held.release()
    capsys.readouterr()
    assert sieve(["banks", "rejudge", "locked", "--actor", "tester"]) == 0
    progress = json.loads(capsys.readouterr().out.splitlines()[-1])["rejudge"]
    assert progress["published"] == 1 and progress["done"] is True


def test_the_worker_skips_a_bank_the_cli_holds_and_steps_the_others(settings: Settings) -> None:
    """The lock from the other side: while ``sieve banks rejudge`` holds one bank, the background worker leaves
    it alone (its cursor does not move) and still steps every other pending bank; once released, it is worked."""
    prefix = f"{settings.redis.key_prefix}-held"  # no other test's pending requests
    settings = settings.model_copy(update={"redis": settings.redis.model_copy(update={"key_prefix": prefix})})
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    store = HashBankStore(client, prefix)
    requests = RejudgeRequests(client, prefix)
    for bank, value in (("held-by-cli", "a"), ("free", "b")):
        store.create(bank)
        store.add_signals(bank, [Signal("sha256", value * 64, f"item-{bank}")])
        requests.request(bank, "test")
    judge = Rejudger(client, settings, kafka_publisher(settings))
    worker = RejudgeWorker(judge)
    held = judge.lock("held-by-cli")  # what the CLI takes before stepping a bank
    assert held.acquire(blocking=False)
    try:
        assert worker.run_once() == 1
        assert "held-by-cli" in requests.pending() and "free" not in requests.pending()
        assert client.hget(f"{prefix}:bank:held-by-cli:retro", "cursor") is None  # not stepped
    finally:
        held.release()
    assert worker.run_once() == 1 and "held-by-cli" not in requests.pending()
