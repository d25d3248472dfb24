"""The admin API and ``sieve banks`` are two faces of the same bank operations (services.common.banks.operations):
driven through the same steps, they leave the same bank state (hashes, embeddings, keypoints, threshold, action)
and the same audit records, in the stream and in the one audit file, differing only in who acted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr
from skimage import data as skdata

from services.cli import main as sieve
from services.common.audit import AuditLog
from services.common.banks import HashBankStore
from services.common.banks.embeddings import EmbeddingBanks
from services.common.banks.exchange import export_list
from services.common.banks.images import banked_image
from services.common.config import Settings
from services.common.transforms import encode_jpeg
from services.reviewer.app import build_services, create_app
from services.reviewer.settings import ReviewerSettings

ADMIN = "admin-token-0123456789ab"
PDQ = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"


def test_the_api_and_the_cli_give_the_same_bank_and_the_same_audit(
    stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    audit_file = tmp_path / "audit.jsonl"
    monkeypatch.setenv("SIEVE_AUDIT_FILE", str(audit_file))
    settings = Settings()
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(encode_jpeg(Image.fromarray(skdata.coffee()).convert("RGB"), 92))

    rsettings = ReviewerSettings(admin_tokens=[SecretStr(f"root:{ADMIN}")])
    services = build_services(settings, rsettings)
    services.ingestor = None
    h = {"Authorization": f"Bearer {ADMIN}"}
    with TestClient(create_app(rsettings, services)) as api:
        spec = {"description": "known", "action": "review"}
        assert api.put("/api/admin/banks/by-api", headers=h, json=spec).status_code == 201
        added = api.post("/api/admin/banks/by-api/images", headers=h, content=photo.read_bytes())
        assert added.status_code == 200, added.text
        assert added.json()["embedded_with"].startswith("sieve_embedder:") and added.json()["rejudge_requested"]
        signal = {"signal_type": "pdq", "signal_value": PDQ}
        assert api.post("/api/admin/banks/by-api/signals", headers=h, json={"signals": [signal]}).status_code == 200
        assert api.put("/api/admin/banks/by-api/threshold", headers=h, json={"embedding_threshold": 0.9}).is_success
        reembedded = api.post("/api/admin/banks/by-api/reembed", headers=h)
        assert reembedded.json()["images"] == 1, reembedded.text
        assert (
            api.put("/api/admin/banks/missing/threshold", headers=h, json={"embedding_threshold": 0.9}).status_code
            == 404
        )

    cli = ["--actor", "tester"]
    assert sieve(["banks", "create", "by-cli", "--description", "known", "--action", "review", *cli]) == 0
    assert sieve(["banks", "add", "by-cli", str(photo), *cli]) == 0
    assert sieve(["banks", "add", "by-cli", "--signal", f"pdq:{PDQ}", *cli]) == 0
    assert sieve(["banks", "threshold", "by-cli", "--threshold", "0.9", *cli]) == 0
    assert sieve(["banks", "reembed", "by-cli", *cli]) == 0

    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    store = HashBankStore(client, settings.redis.key_prefix)
    api_bank, cli_bank = store.get("by-api"), store.get("by-cli")
    same = ("enabled", "description", "size", "embedding_threshold", "action")
    assert {k: getattr(api_bank, k) for k in same} == {k: getattr(cli_bank, k) for k in same}
    assert api_bank.embedding_threshold == 0.9 and api_bank.action == "review"
    assert export_list(store, "by-api", "te") == export_list(store, "by-cli", "te")
    assert len(export_list(store, "by-api", "te").splitlines()) >= 4  # the photo's hashes and the pdq signal
    embeddings = EmbeddingBanks(client, settings.redis.key_prefix)
    assert embeddings.banked_images(["by-api"]) == embeddings.banked_images(["by-cli"]) == 1
    item = banked_image(photo.read_bytes(), settings).item_id
    features = embeddings.features([("by-api", item), ("by-cli", item)])
    assert len(features) == 2  # both faces banked the image's keypoints

    def trail(bank: str) -> list[tuple[str, str]]:
        """The face's own operations: the API's background re-judge worker records its steps too, whenever
        it gets to them (banking embeds seven views of an image, time enough for a step in between)."""
        entries = AuditLog(client, settings.redis.key_prefix).recent(100)
        return [
            (e["event"], e["actor"])
            for e in reversed(entries)
            if e["subject"] == bank and e["actor"] != "rejudge-worker"
        ]

    api_trail, cli_trail = trail("by-api"), trail("by-cli")
    assert [e for e, _ in api_trail] == [e for e, _ in cli_trail]
    assert [e for e, _ in api_trail] == [
        "bank_created",
        "bank_images_added",
        "bank_signals_added",
        "bank_threshold",
        "bank_reembedded",
    ]
    assert {a for _, a in api_trail} == {"root"} and {a for _, a in cli_trail} == {"cli:tester"}
    in_file = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert [r["event"] for r in in_file if r["subject"] == "by-cli"] == [e for e, _ in cli_trail]
    assert [r["event"] for r in in_file if r["subject"] == "by-api"] == [e for e, _ in api_trail]
