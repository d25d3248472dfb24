"""Authentication and roles of the reviewer API: nothing but health without a token, admin routes for admins."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.reviewer.app import ReviewerServices, create_app
from services.reviewer.settings import ReviewerSettings, load_token_table
from tests.unit.reviewer.fakes import FakeAdmin, FakeImages, FakeLabeller, FakeQueue, make_request

REVIEWER_TOKEN = "rev-token-0123456789abcdef"
ADMIN_TOKEN = "adm-token-0123456789abcdef"
FILE_TOKEN = "file-token-0123456789abcdef"


def _settings(tmp_path: Path) -> ReviewerSettings:
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({FILE_TOKEN: {"reviewer_id": "carol", "role": "reviewer"}}))
    return ReviewerSettings(
        reviewer_tokens=[SecretStr(f"alice:{REVIEWER_TOKEN}")],
        admin_tokens=[SecretStr(f"root:{ADMIN_TOKEN}")],
        tokens_file=tokens_file,
    )


@pytest.fixture()
def rsettings(tmp_path: Path) -> ReviewerSettings:
    return _settings(tmp_path)


@pytest.fixture()
def client(rsettings: ReviewerSettings) -> Iterator[TestClient]:
    queue = FakeQueue([make_request("up-1"), make_request("up-2")])
    services = ReviewerServices(
        queue=queue,
        labeller=FakeLabeller(queue, rsettings.categories),
        admin=FakeAdmin(),
        images=FakeImages(),
    )
    with TestClient(create_app(rsettings, services)) as c:
        yield c


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _api_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every /api route of the real app, so a route added later is covered without editing this test."""
    out: list[tuple[str, str]] = []
    for route in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, APIRoute) and route.path.startswith("/api"):
            path = re.sub(r"\{name\}", "somebank", route.path)
            path = re.sub(r"\{[^}]+\}", "up-1", path)
            out.extend((method, path) for method in sorted(route.methods or ()))
    return out


def test_every_api_route_refuses_missing_and_wrong_tokens(client: TestClient) -> None:
    routes = _api_routes(client)
    assert len(routes) >= 15, routes
    for method, path in routes:
        for headers in ({}, _auth("not-a-real-token-at-all"), {"Authorization": f"Basic {REVIEWER_TOKEN}"}):
            res = client.request(method, path, headers=headers, json={})
            assert res.status_code == 401, (method, path, headers, res.status_code)
            assert res.headers["www-authenticate"] == "Bearer"


def test_health_needs_no_token_and_the_page_holds_no_data(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"live": True}
    assert client.get("/readyz").status_code == 200
    page = client.get("/")
    assert page.status_code == 200
    assert "Sign in" in page.text and "up-1" not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_admin_routes_refuse_reviewers(client: TestClient) -> None:
    admin_routes = [(m, p) for m, p in _api_routes(client) if p.startswith("/api/admin")]
    assert len(admin_routes) >= 7
    for method, path in admin_routes:
        for token in (REVIEWER_TOKEN, FILE_TOKEN):
            res = client.request(method, path, headers=_auth(token), json={})
            assert res.status_code == 403, (method, path, res.status_code)


def test_admins_manage_thresholds_banks_and_promotions(client: TestClient) -> None:
    h = _auth(ADMIN_TOKEN)
    res = client.put("/api/admin/thresholds", headers=h, json={"duplicate_threshold": 0.93})
    assert res.status_code == 200 and res.json()["overrides"] == {"duplicate_threshold": 0.93}
    assert client.put("/api/admin/thresholds", headers=h, json={"duplicate_threshold": 1.5}).status_code == 422
    assert client.put("/api/admin/thresholds", headers=h, json={"surprise": 1}).status_code == 422

    assert client.put("/api/admin/banks/csam-v2", headers=h, json={"description": "x"}).status_code == 201
    assert client.put("/api/admin/banks/csam-v2", headers=h, json={"enabled": False}).status_code == 200
    assert client.get("/api/admin/banks", headers=h).json()["banks"]["csam-v2"]["enabled"] is False
    hashes = {"hashes": [{"kind": "sha256", "value": "a" * 64}]}
    assert client.post("/api/admin/banks/csam-v2/hashes", headers=h, json=hashes).json()["added"] == 1
    assert client.post("/api/admin/banks/nope/hashes", headers=h, json=hashes).status_code == 404
    assert client.put("/api/admin/banks/Bad Name!", headers=h, json={}).status_code in (404, 422)
    assert client.delete("/api/admin/banks/csam-v2", headers=h).status_code == 204
    assert client.delete("/api/admin/banks/csam-v2", headers=h).status_code == 404

    res = client.post("/api/admin/promote", headers=h, json={"version": "3", "reason": "gate passed"})
    assert res.status_code == 202 and res.json()["status"] == "recorded"
    assert client.post("/api/admin/promote", headers=h, json={"version": "../3"}).status_code == 422
    listed = client.get("/api/admin/promotions", headers=h).json()["requests"]
    assert [(p["version"], p["state"]) for p in listed] == [("3", "requested")]
    assert client.get(f"/api/admin/promotions/{res.json()['request_id']}", headers=h).json()["version"] == "3"
    assert client.get("/api/admin/promotions/9-9", headers=h).status_code == 404
    assert client.get("/api/admin/promotions/x", headers=h).status_code == 422


def test_reviewers_claim_and_label_with_their_own_identity(client: TestClient) -> None:
    me = client.get("/api/me", headers=_auth(REVIEWER_TOKEN)).json()
    assert me == {"reviewer_id": "alice", "role": "reviewer", "categories": ["safe", "nsfw", "violence", "spam"],
                  "claim_ttl_s": 300}  # fmt: skip
    item = client.post("/api/claim", headers=_auth(REVIEWER_TOKEN)).json()["item"]
    assert item["claimed_by"] == "alice" and item["neighbours"][0]["upload_id"] == "nb-1"
    uid = item["upload_id"]

    # carol (from the tokens file) holds no claim on alice's item
    assert (
        client.post(f"/api/items/{uid}/label", headers=_auth(FILE_TOKEN), json={"not_duplicate": True}).status_code
        == 409
    )
    res = client.post(f"/api/items/{uid}/label", headers=_auth(REVIEWER_TOKEN), json={"duplicate_of": "nb-1"})
    assert res.status_code == 201
    assert res.json()["label"]["reviewer_id"] == "alice" and res.json()["kind"] == "duplicate"
    again = client.post(f"/api/items/{uid}/label", headers=_auth(REVIEWER_TOKEN), json={"not_duplicate": True})
    assert again.status_code == 200 and again.json()["repeated"] is True
    assert again.json()["label"]["duplicate_of"] == "nb-1"  # the first decision stands


def test_tokens_file_changes_take_effect_without_restart(client: TestClient, rsettings: ReviewerSettings) -> None:
    assert rsettings.tokens_file is not None
    assert client.get("/api/me", headers=_auth(FILE_TOKEN)).status_code == 200
    new_token = "rotated-token-0123456789abcdef"
    rsettings.tokens_file.write_text(json.dumps({new_token: {"reviewer_id": "dave", "role": "admin"}}))
    st = rsettings.tokens_file.stat()
    os.utime(rsettings.tokens_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert client.get("/api/me", headers=_auth(FILE_TOKEN)).status_code == 401  # revoked
    assert client.get("/api/me", headers=_auth(new_token)).json()["role"] == "admin"
    assert client.get("/api/me", headers=_auth(REVIEWER_TOKEN)).status_code == 200  # env tokens stay


def test_a_broken_tokens_file_keeps_the_old_tokens_and_logs_no_secret(
    client: TestClient, rsettings: ReviewerSettings, caplog: pytest.LogCaptureFixture
) -> None:
    assert rsettings.tokens_file is not None
    leaked = "half-written-secret-0123456789"
    rsettings.tokens_file.write_text('{"' + leaked + '": {"reviewer_id": ')
    st = rsettings.tokens_file.stat()
    os.utime(rsettings.tokens_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    with caplog.at_level(logging.DEBUG):
        assert client.get("/api/me", headers=_auth(FILE_TOKEN)).status_code == 200
    assert "not reloaded" in caplog.text
    assert leaked not in caplog.text and FILE_TOKEN not in caplog.text


def test_settings_never_show_tokens(rsettings: ReviewerSettings) -> None:
    dumped = repr(rsettings) + str(rsettings.model_dump()) + rsettings.model_dump_json()
    assert REVIEWER_TOKEN not in dumped and ADMIN_TOKEN not in dumped


def test_tokens_from_env_and_their_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIEVE_REVIEWER_REVIEWER_TOKENS", json.dumps(["bob:" + "b" * 20, "c" * 20]))
    monkeypatch.setenv("SIEVE_REVIEWER_ADMIN_TOKENS", json.dumps(["root:" + "a" * 20]))
    table = load_token_table(ReviewerSettings())
    ids = sorted((p.reviewer_id, p.role.value) for p in table.values())
    assert ("bob", "reviewer") in ids and ("root", "admin") in ids
    anonymous = [i for i, _ in ids if i.startswith("reviewer-")]
    assert len(anonymous) == 1 and "c" * 20 not in anonymous[0]
    monkeypatch.setenv("SIEVE_REVIEWER_ADMIN_TOKENS", json.dumps(["root:short"]))
    with pytest.raises(ValueError, match="shorter"):
        load_token_table(ReviewerSettings())


def test_no_tokens_means_not_ready_and_everything_refused() -> None:
    queue = FakeQueue([make_request()])
    services = ReviewerServices(queue, FakeLabeller(queue, ["safe"]), FakeAdmin(), FakeImages())
    with TestClient(create_app(ReviewerSettings(), services)) as c:
        assert c.get("/readyz").status_code == 503
        assert c.post("/api/claim", headers=_auth("")).status_code == 401
