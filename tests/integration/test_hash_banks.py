"""Hash banks against the real Redis: exact and PDQ matching, replicas in step, list import and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image, ImageFilter
from pydantic import SecretStr

from services.cli import main as sieve
from services.common.audit import audit_key
from services.common.banks import HashBankStore, Signal, UploadSignals
from services.common.banks.embeddings import EmbeddingBanks
from services.common.banks.exchange import export_list, import_list
from services.common.banks.images import image_signals
from services.common.config import Settings
from services.common.transforms import encode_jpeg
from services.reviewer.app import build_services, create_app
from services.reviewer.queue import QueueKeys
from services.reviewer.settings import ReviewerSettings

pytestmark = pytest.mark.integration
ADMIN = "admin-token-0123456789ab"


def _client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis.url.get_secret_value())


@pytest.fixture()
def banks(settings: Settings) -> HashBankStore:
    return HashBankStore(_client(settings), settings.redis.key_prefix, sync_interval_s=0.0)


def _pdq(rng: np.random.Generator) -> str:
    return rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex()


def _flip(value: str, bits: int, rng: np.random.Generator) -> str:
    raw = bytearray(bytes.fromhex(value))
    for bit in rng.choice(256, bits, replace=False):
        raw[bit // 8] ^= 1 << (bit % 8)
    return raw.hex()


def _names(banks: HashBankStore, sha256: str, phash: str | None = None) -> list[str]:
    return [m.bank for m in banks.match(UploadSignals(sha256=sha256, phash=phash))]


def test_a_hash_matches_every_enabled_bank_holding_it(banks: HashBankStore) -> None:
    banks.create("a")
    banks.create("b")
    banks.add_hashes("a", [("sha256", "1" * 64)])
    banks.add_hashes("b", [("sha256", "1" * 64), ("phash", "f0f0f0f0f0f0f0f0")])
    assert _names(banks, "1" * 64) == ["a", "b"]
    assert _names(banks, "2" * 64, "f0f0f0f0f0f0f0f0") == ["b"]
    assert _names(banks, "2" * 64) == []
    banks.set_enabled("a", False)
    assert _names(banks, "1" * 64) == ["b"]
    assert [(b.name, b.enabled, b.size) for b in banks.all_banks()] == [("a", False, 1), ("b", True, 2)]


def test_a_banks_action_travels_with_its_matches(banks: HashBankStore) -> None:
    assert banks.create("blocks").action == "block"
    assert banks.create("watch", action="review").action == "review"
    banks.add_hashes("blocks", [("sha256", "a" * 64)])
    banks.add_hashes("watch", [("sha256", "a" * 64), ("md5", "b" * 32)])
    found = {m.bank: m.action for m in banks.match(UploadSignals(sha256="a" * 64))}
    assert found == {"blocks": "block", "watch": "review"}
    banks.set_action("watch", "block")
    assert banks.set_enabled("watch", True, "kept").action == "block"  # other edits keep the action
    assert [m.action for m in banks.match(UploadSignals(md5="b" * 32))] == ["block"]
    with pytest.raises(ValueError):
        banks.set_action("watch", "allow")  # type: ignore[arg-type]
    legacy = {"enabled": True, "description": "", "created_at": 0.0}  # a bank from before actions
    banks.client.hset(banks.meta_key, "old", json.dumps(legacy))
    assert banks.get("old").action == "block"


def test_remove_drops_the_bank_and_its_hashes(banks: HashBankStore) -> None:
    banks.create("gone")
    banks.add_hashes("gone", [("sha256", "3" * 64)])
    banks.remove("gone")
    assert _names(banks, "3" * 64) == []
    with pytest.raises(KeyError):
        banks.get("gone")
    with pytest.raises(KeyError):
        banks.add_hashes("gone", [("sha256", "4" * 64)])


def test_pdq_near_match_reaches_another_replica_with_its_evidence(settings: Settings, banks: HashBankStore) -> None:
    rng = np.random.default_rng(5)
    replica = HashBankStore(_client(settings), settings.redis.key_prefix, sync_interval_s=0.0)
    banked, unrelated = _pdq(rng), _pdq(rng)
    assert replica.match(UploadSignals(sha256="0" * 64, pdq=banked)) == []  # its index starts empty
    banks.create("ncii")
    assert banks.add_signals("ncii", [Signal("pdq", banked, "item-1"), Signal("md5", "e" * 32, "item-2")]).added == 2

    near = _flip(banked, 25, rng)
    [match] = replica.match(UploadSignals(sha256="0" * 64, pdq=near))
    assert (match.bank, match.signal_type, match.distance, match.item_id) == ("ncii", "pdq", 25, "item-1")
    assert replica.match(UploadSignals(sha256="0" * 64, pdq=_flip(banked, 32, rng))) == []
    assert replica.match(UploadSignals(sha256="0" * 64, pdq=unrelated)) == []
    [exact] = replica.match(UploadSignals(sha256="0" * 64, md5="e" * 32))
    assert (exact.signal_type, exact.distance, exact.item_id) == ("md5", 0, "item-2")

    banks.set_enabled("ncii", False)
    assert replica.match(UploadSignals(sha256="0" * 64, pdq=near)) == []
    banks.set_enabled("ncii", True)
    assert banks.remove_signals("ncii", [Signal("pdq", banked)]) == 1
    assert replica.match(UploadSignals(sha256="0" * 64, pdq=near)) == []
    banks.add_signals("ncii", [Signal("pdq", banked, "item-1")])
    assert len(replica.match(UploadSignals(sha256="0" * 64, pdq=near))) == 1
    banks.remove("ncii")
    assert replica.match(UploadSignals(sha256="0" * 64, pdq=near)) == []


def test_a_replica_behind_a_trimmed_log_reloads_the_banks(settings: Settings, banks: HashBankStore) -> None:
    rng = np.random.default_rng(6)
    replica = HashBankStore(_client(settings), settings.redis.key_prefix, sync_interval_s=0.0)
    replica.sync(force=True)
    banks.create("big")
    values = [_pdq(rng) for _ in range(2500)]
    banks.add_signals("big", [Signal("pdq", v) for v in values])
    banks.client.xtrim(banks.log_key, maxlen=0)  # the replica never saw these entries
    assert replica.match(UploadSignals(sha256="0" * 64, pdq=_flip(values[1234], 10, rng)))[0].value == values[1234]
    assert len(replica.pdq_index) == 2500


PDQ_LIST = [
    "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22",
    "0b2e5fe5b3b2c8a4ed2d8dc1d2d2b2a5a5b4d0c2c3d2b3a5a5b4d0c2c3d2b3a5",
    "ad1f0b7ad8d2a8b4c1b1f1e0e0c0c1c3c7cfcfc7c3c1c0e0f0f8fcfefefcf8f0",
]


def test_an_hma_pdq_list_round_trips_unchanged(settings: Settings, banks: HashBankStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    text = "".join(f"pdq {v}\n" for v in [*PDQ_LIST, *(_pdq(rng) for _ in range(200))])
    banks.create("from-hma")
    first = import_list(banks, "from-hma", text, "te", "list.txt")
    assert (first.added, first.duplicate, first.malformed) == (203, 0, [])
    exported = export_list(banks, "from-hma", "te")
    assert exported == text
    again = import_list(banks, "from-hma", exported, "te", "again")
    assert (again.added, again.duplicate) == (0, 203)  # idempotent

    # Through the command line, into a second bank and out again.
    (tmp_path / "list.txt").write_text(exported)
    assert sieve(["banks", "import", "copy", str(tmp_path / "list.txt"), "--create", "--actor", "tester"]) == 0
    assert sieve(["banks", "export", "copy", "--output", str(tmp_path / "out.txt")]) == 0
    assert (tmp_path / "out.txt").read_text() == text

    csv_text = "signal_type,signal_value,content_id,source\n" + "".join(
        f"pdq,{v},case-{i},ncmec\n" for i, v in enumerate(PDQ_LIST)
    )
    banks.create("csv")
    assert import_list(banks, "csv", csv_text, "csv", "list.csv").added == 3
    assert export_list(banks, "csv", "csv") == csv_text
    entries = [f for _, f in banks.client.xrange(audit_key(banks.prefix))]
    assert [f[b"event"] for f in entries] == [b"bank_created", b"bank_imported", b"bank_exported"]  # --create too
    imported = json.loads(entries[1][b"detail"])
    assert {k: imported[k] for k in ("added", "duplicate", "malformed")} == {
        "added": 203,
        "duplicate": 0,
        "malformed": 0,
    }


def test_a_malformed_list_is_reported_row_by_row(
    settings: Settings, banks: HashBankStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        f"pdq {PDQ_LIST[0]}",
        "pdq 1234",
        f"pdq {PDQ_LIST[0]}",
        "url https://example.com",
        f"sha256 {'a' * 64}",
        f"md5 {'z' * 32}",
        "pdq",
    ]
    (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
    banks.create("mixed")
    assert sieve(["banks", "import", "mixed", str(tmp_path / "bad.txt"), "--actor", "tester"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["added"], report["duplicate"]) == (7, 2, 1)
    assert [(m["row"], m["text"]) for m in report["malformed_rows"]] == [
        (2, "pdq 1234"),
        (4, "url https://example.com"),
        (6, f"md5 {'z' * 32}"),
        (7, "pdq"),
    ]
    assert all(m["reason"] for m in report["malformed_rows"])
    [entry] = banks.client.xrange(audit_key(banks.prefix))
    assert entry[1][b"event"] == b"bank_imported" and entry[1][b"actor"] == b"cli:tester"
    assert json.loads(entry[1][b"detail"])["malformed"] == 4
    assert audit_key(banks.prefix) == QueueKeys(banks.prefix).audit  # the reviewer's audit log


def _photo_jpeg() -> bytes:
    rng = np.random.default_rng(4)
    img = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((320, 240), Image.Resampling.BICUBIC)
    return encode_jpeg(img, 90)


def _image_hashes(data: bytes, settings: Settings) -> list[tuple[str, str]]:
    return [(s.kind, s.value) for s in image_signals(data, settings)]


def test_admin_api_imports_exports_and_edits_banks(settings: Settings) -> None:
    rsettings = ReviewerSettings(admin_tokens=[SecretStr(f"root:{ADMIN}")])
    services = build_services(settings, rsettings)
    services.ingestor = None
    h = {"Authorization": f"Bearer {ADMIN}"}
    with TestClient(create_app(rsettings, services)) as api:
        assert api.put("/api/admin/banks/shared", headers=h, json={"description": "x"}).status_code == 201
        watch = {"description": "watch list", "action": "review"}
        assert api.put("/api/admin/banks/watch", headers=h, json=watch).status_code == 201
        assert api.get("/api/admin/banks/watch", headers=h).json()["action"] == "review"
        assert api.get("/api/admin/banks/shared", headers=h).json()["action"] == "block"
        bad = {"action": "allow"}
        assert api.put("/api/admin/banks/watch", headers=h, json=bad).status_code == 422
        text = f"pdq {PDQ_LIST[0]}\npdq nothex\nmd5 {'b' * 32}\n"
        res = api.post("/api/admin/banks/shared/import", headers=h, json={"text": text})
        assert res.status_code == 200, res.text
        body = res.json()
        assert (body["added"], body["duplicate"], body["malformed"]) == (2, 0, 1)
        assert body["malformed_rows"][0]["row"] == 2
        refused = api.post("/api/admin/banks/shared/import", headers=h, json={"url": "http://127.0.0.1/list.txt"})
        assert refused.status_code == 422  # a private address is not on the fetch allow-list
        signal = {"signal_type": "pdq", "signal_value": PDQ_LIST[1], "content_id": "c-9"}
        res = api.post("/api/admin/banks/shared/signals", headers=h, json={"signals": [signal]})
        assert res.json()["added"] == 1
        bad = {"signal_type": "pdq", "signal_value": "00"}
        assert api.post("/api/admin/banks/shared/signals", headers=h, json={"signals": [bad]}).status_code == 422
        res = api.get("/api/admin/banks/shared/export", headers=h, params={"signal_type": "pdq"})
        assert res.text == f"pdq {PDQ_LIST[0]}\npdq {PDQ_LIST[1]}\n"
        res = api.post("/api/admin/banks/shared/signals/remove", headers=h, json={"signals": [signal]})
        assert res.json()["removed"] == 1
        assert api.get("/api/admin/banks/missing/export", headers=h).status_code == 404

        # The match API: one hash, or an image hashed as the moderator hashes uploads.
        near = PDQ_LIST[0][:-2] + ("00" if PDQ_LIST[0][-2:] != "00" else "ff")
        res = api.get("/api/match/lookup", headers=h, params={"signal_type": "pdq", "signal": near})
        [found] = res.json()["matches"]
        assert (found["bank"], found["signal"]) == ("shared", PDQ_LIST[0]) and 0 < found["distance"] <= 8
        res = api.get("/api/match/lookup", headers=h, params={"signal_type": "md5", "signal": "b" * 32})
        assert [m["distance"] for m in res.json()["matches"]] == [0]
        assert api.get("/api/match/lookup", headers=h, params={"signal_type": "pdq", "signal": "x"}).status_code == 422
        image = _photo_jpeg()
        signals = [{"signal_type": k, "signal_value": v} for k, v in _image_hashes(image, settings) if k == "pdq"]
        api.post("/api/admin/banks/shared/signals", headers=h, json={"signals": signals})
        res = api.post("/api/match/image", headers=h, content=image, params={})
        assert [m["signal_type"] for m in res.json()["matches"]] == ["pdq"]
        assert api.post("/api/match/image", headers=h, content=b"not an image").status_code == 422
        spec = api.get("/api/match/openapi.json", headers=h).json()
        assert set(spec["paths"]) == {"/api/match/lookup", "/api/match/image", "/api/match/openapi.json"}
        assert api.get("/api/match/lookup", params={"signal_type": "md5", "signal": "b" * 32}).status_code == 401
        events = [e["event"] for e in api.get("/api/admin/audit", headers=h).json()["entries"]]
        assert events == [
            "bank_signals_added",
            "bank_signals_removed",
            "bank_exported",
            "bank_signals_added",
            "bank_imported",
            "bank_created",
            "bank_created",
        ]


def test_banked_embeddings_per_bank_and_model_version(settings: Settings, banks: HashBankStore) -> None:
    rng = np.random.default_rng(9)
    vectors = rng.normal(size=(3, 8)).astype(np.float32)
    pixels = np.zeros((3, 256, 256, 3), dtype=np.uint8)
    writer = EmbeddingBanks(banks.client, banks.prefix)
    replica = EmbeddingBanks(_client(settings), settings.redis.key_prefix, sync_interval_s=0.0)
    banks.create("emb")
    writer.add("emb", "model:1", ["i0", "i1", "i2"], vectors, pixels)
    [hit] = replica.search("model:1", vectors[1] + 0.01)
    assert (hit.bank, hit.item_id) == ("emb", "i1") and hit.cosine > 0.99
    assert replica.search("model:2", vectors[1]) == []  # another version's space is empty
    assert banks.enabled_policies(["emb"])["emb"].embedding_threshold is None
    banks.set_embedding_threshold("emb", 0.9)
    assert banks.enabled_policies(["emb"])["emb"].embedding_threshold == 0.9
    banks.set_enabled("emb", False)
    assert banks.enabled_policies(["emb"]) == {}
    banks.remove("emb")
    assert replica.search("model:1", vectors[1]) == []


def test_the_second_pass_finds_a_banked_image_by_its_keypoints_on_another_replica(
    settings: Settings, banks: HashBankStore
) -> None:
    from skimage import data as skdata

    from services.common.config import VerificationSettings
    from services.common.imaging import detail_view
    from services.common.verification import KeypointHit, KeypointIndex, LocalFeatures, Verifier

    verifier = Verifier(VerificationSettings())
    photos = {name: Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in ("coffee", "rocket", "chelsea")}
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(3, 8)).astype(np.float32)
    writer = EmbeddingBanks(banks.client, banks.prefix)
    replica = EmbeddingBanks(_client(settings), settings.redis.key_prefix, 0.0, verifier.keypoint_index)
    banks.create("kp")
    writer.add("kp", "model:1", list(photos), vectors, np.zeros((3, 256, 256, 3), dtype=np.uint8))
    turned = photos["rocket"].transpose(Image.Transpose.ROTATE_90).crop((20, 30, 380, 560))
    query = verifier.extractor.extract(detail_view(turned, 512))

    def pick(index: KeypointIndex, features: LocalFeatures) -> list[KeypointHit]:
        return verifier.keypoint_candidates(index, features, ())

    assert replica.search_keypoints("model:1", vectors[0], query, pick) == []  # banked without keypoints
    writer.add_features("kp", {n: verifier.extractor.extract(detail_view(p, 512)) for n, p in photos.items()})
    [hit] = replica.search_keypoints("model:1", vectors[0], query, pick)  # the new revision reached the replica
    assert (hit.bank, hit.item_id) == ("kp", "rocket")
    expected = float(vectors[1] @ vectors[0] / np.linalg.norm(vectors[1]) / np.linalg.norm(vectors[0]))
    assert hit.cosine == pytest.approx(expected, abs=1e-5)  # the banked embedding's cosine, for the fused score
    banks.remove("kp")
    assert replica.search_keypoints("model:1", vectors[0], query, pick) == []


def test_the_match_api_finds_an_edited_copy_of_a_banked_image(settings: Settings) -> None:
    from skimage import data as skdata

    from services.common.banks.images import banked_image
    from services.common.inference import TritonModels

    photo = Image.fromarray(skdata.coffee()).convert("RGB")
    banked = banked_image(encode_jpeg(photo, 92), settings)
    store = HashBankStore(_client(settings), settings.redis.key_prefix)
    store.create("known")
    store.add_signals("known", banked.signals)
    EmbeddingBanks(store.client, store.prefix).embed_and_add(
        "known", TritonModels(settings.triton), ["coffee"], banked.pixels[None], [banked.features]
    )
    w, h = photo.size  # an edited copy: a 70% crop under a caption bar, re-encoded; no hash of it is banked
    edited = Image.new("RGB", (int(w * 0.8), int(h * 0.85) + 60), (255, 255, 255))
    edited.paste(photo.crop((int(w * 0.1), int(h * 0.1), int(w * 0.9), int(h * 0.95))), (0, 60))
    rsettings = ReviewerSettings(admin_tokens=[SecretStr(f"root:{ADMIN}")])
    services = build_services(settings, rsettings)
    services.ingestor = None
    with TestClient(create_app(rsettings, services)) as api:
        res = api.post(
            "/api/match/image", headers={"Authorization": f"Bearer {ADMIN}"}, content=encode_jpeg(edited, 70)
        )
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["near_matches_by"].startswith("sieve_embedder:")
    [match] = [m for m in body["matches"] if m["signal_type"] == "embedding"]
    assert (match["bank"], match["content_id"]) == ("known", "coffee")
    assert match["inliers"] > 12 and match["score"] >= settings.banks.embedding_thresholds[body["near_matches_by"]]
    assert all(m["signal_type"] != "sha256" for m in body["matches"])


def test_a_crop_of_a_banked_image_is_near_one_of_its_regions(settings: Settings) -> None:
    """Banking embeds the image's fixed regions beside the whole (services/common/regions.py): a small corner
    crop, far from the whole, is near the region it came from, and the bank's search reports that cosine."""
    from skimage import data as skdata

    from services.common.banks.images import banked_image
    from services.common.inference import TritonModels
    from services.common.prepared import PrepareSpec, prepare_image
    from services.common.regions import REGIONS

    photo = Image.fromarray(skdata.astronaut()).convert("RGB")
    banked = banked_image(encode_jpeg(photo, 92), settings)
    client = _client(settings)
    prefix = f"{settings.redis.key_prefix}-regions"
    models = TritonModels(settings.triton)
    version = EmbeddingBanks(client, prefix).embed_and_add("regions", models, ["astronaut"], banked.pixels[None])
    stored = client.hget(f"{prefix}:bankreg:{version}", "regions/astronaut")
    dimensions = models.infer(banked.pixels[None]).embeddings.shape[1]
    assert stored is not None and len(stored) == len(REGIONS) * 4 * dimensions

    w, h = photo.size  # the top-left 36% of the photo, shrunk to a thumbnail and re-encoded
    crop = photo.crop((0, 0, int(w * 0.6), int(h * 0.6))).resize((150, 150))
    query = prepare_image(encode_jpeg(crop, 80), PrepareSpec.of(settings)).pixels
    embedding = models.infer(query[None]).embeddings[0]
    whole = EmbeddingBanks(client, prefix).vectors("regions")[0][2][0]
    whole_cosine = float(whole @ embedding / np.linalg.norm(embedding))
    [hit] = EmbeddingBanks(client, prefix).search(version, embedding)
    assert hit.item_id == "astronaut"
    assert hit.cosine > whole_cosine + 0.05  # a region, not the whole, is what the crop is near
    EmbeddingBanks(client, prefix).remove_bank("regions")
    assert client.hlen(f"{prefix}:bankreg:{version}") == 0


def test_a_banked_photo_pasted_into_a_collage_is_found_by_the_uploads_regions(settings: Settings) -> None:
    """The banked photo fills one corner of a collage: the whole upload's embedding is far from it while its
    keypoints agree, so the matcher embeds the upload's regions (through Triton) and judges the nearest pair of
    views again; without the served models at hand for that, the same upload is not matched."""
    from skimage import data as skdata

    from services.common.banks.images import banked_image
    from services.common.banks.near import BankEmbeddingRule, NearBankMatcher
    from services.common.inference import TritonModels
    from services.common.thresholds import ThresholdResolver
    from services.common.verification import QueryFeatures, Verifier

    photo = Image.fromarray(skdata.coffee()).convert("RGB")
    banked = banked_image(encode_jpeg(photo, 92), settings)
    client = _client(settings)
    prefix = f"{settings.redis.key_prefix}-collage"
    store = HashBankStore(client, prefix)
    store.create("known")
    models = TritonModels(settings.triton)
    EmbeddingBanks(client, prefix).embed_and_add("known", models, ["coffee"], banked.pixels[None], [banked.features])
    collage = Image.new("RGB", (600, 600))  # coffee in the top-left 60%, three softened photos around it
    collage.paste(photo.resize((360, 360)), (0, 0))
    tiles = [("astronaut", (240, 360), (360, 0)), ("chelsea", (360, 240), (0, 360)), ("rocket", (240, 240), (360, 360))]
    for name, size, at in tiles:
        tile = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size)
        collage.paste(tile.filter(ImageFilter.GaussianBlur(2)), at)
    upload = banked_image(encode_jpeg(collage, 85), settings)
    result = models.infer(upload.pixels[None])
    assert upload.features is not None
    query = QueryFeatures(upload.features)
    verifier = Verifier(settings.verify)
    rule = BankEmbeddingRule(ThresholdResolver(settings.decision, settings.banks), verifier)

    def matcher(with_regions: bool) -> NearBankMatcher:
        embeddings = EmbeddingBanks(client, prefix, keypoint_index=verifier.keypoint_index)
        return NearBankMatcher(store, embeddings, rule, models.infer if with_regions else None)

    version, embedding = result.model_version, result.embeddings[0]
    assert matcher(False).match(version, embedding, query, upload.pixels) == []
    [match] = matcher(True).match(version, embedding, query, upload.pixels)
    assert (match.bank, match.item_id) == ("known", "coffee")
    assert match.inliers is not None and match.inliers > settings.verify.inlier_floor
    assert match.score is not None and match.score >= rule.threshold(version, None)
    store.remove("known")
