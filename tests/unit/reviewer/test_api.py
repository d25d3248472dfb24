"""Label validation, the image route's file-root policy and the aligned-view hook, without servers."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from services.common.config import DecodeSettings, FetchSettings
from services.reviewer.app import ReviewerServices, create_app
from services.reviewer.images import AlignedView, ImageRefused, ImageSource, load_aligned_view
from services.reviewer.labels import InvalidLabel, LabelBody, build_label, label_kind
from services.reviewer.settings import ReviewerSettings
from tests.unit.reviewer.fakes import (
    FakeAdmin,
    FakeLabeller,
    FakeQueue,
    fake_aligned_view,
    fake_explain_view,
    make_request,
)

TOKEN = "rev-token-0123456789abcdef"
H = {"Authorization": f"Bearer {TOKEN}"}
CATS = ["safe", "nsfw", "violence", "spam"]


def _png() -> bytes:
    img = Image.new("RGB", (32, 24), "red")
    img.paste((0, 0, 255), (0, 0, 8, 24))  # asymmetric, so a warped view differs
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def _client(
    tmp_path: Path, aligned: bool = False, explain: bool = False, aligned_fn: AlignedView | None = None
) -> TestClient:
    queue = FakeQueue([make_request("up-1")])
    upload = tmp_path / "up-1.png"
    upload.write_bytes(_png())
    queue.pending["up-1"] = queue.pending["up-1"].model_copy(update={"image_uri": upload.as_uri()})
    neighbour = tmp_path / "nb-1.png"
    Image.new("RGB", (10, 7), (0, 200, 0)).save(neighbour, "PNG")
    queue.uris["nb-1"] = neighbour.as_uri()  # nb-2's image is no longer known
    images = ImageSource(
        FetchSettings(file_roots=[str(tmp_path)], allowed_schemes=["https", "http", "file"]),
        DecodeSettings(),
        aligned_fn or (fake_aligned_view if aligned else None),
        fake_explain_view if explain else None,
    )
    rsettings = ReviewerSettings(reviewer_tokens=[SecretStr(f"alice:{TOKEN}")])
    services = ReviewerServices(queue, FakeLabeller(queue, rsettings.categories), FakeAdmin(), images)
    return TestClient(create_app(rsettings, services))


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    with _client(tmp_path) as c:
        yield c


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "needs duplicate_of"),
        ({"duplicate_of": "nb-1", "not_duplicate": True}, "exclude each other"),
        ({"duplicate_of": "someone-else"}, "not one of this item's neighbours"),
        ({"categories": {"gore": True}}, "unknown categories"),
    ],
)
def test_labels_that_do_not_fit_the_item_are_refused(body: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidLabel, match=message):
        build_label(LabelBody.model_validate(body), make_request(), "alice", CATS)


def test_not_duplicate_needs_a_neighbour() -> None:
    lonely = make_request().model_copy(update={"neighbours": []})
    with pytest.raises(InvalidLabel, match="needs a neighbour"):
        build_label(LabelBody(not_duplicate=True), lonely, "alice", CATS)


def test_a_valid_label_carries_the_reviewer_and_the_decision() -> None:
    label = build_label(LabelBody(duplicate_of="nb-2", categories={"spam": True}), make_request(), "alice", CATS)
    assert (label.upload_id, label.reviewer_id, label.duplicate_of) == ("up-1", "alice", "nb-2")
    assert label.categories == {"spam": True} and label_kind(label) == "duplicate"
    assert label_kind(build_label(LabelBody(categories={"safe": True}), make_request(), "a", CATS)) == "category"


def test_label_route_maps_errors_to_statuses(client: TestClient) -> None:
    assert client.post("/api/items/up-1/label", headers=H, json={"not_duplicate": True}).status_code == 409
    client.post("/api/claim", headers=H)
    bad = client.post("/api/items/up-1/label", headers=H, json={"categories": {"gore": True}})
    assert bad.status_code == 422 and "unknown categories" in bad.json()["detail"]
    assert client.post("/api/items/up-1/label", headers=H, json={"extra": 1}).status_code == 422
    assert client.post("/api/items/nope/label", headers=H, json={"not_duplicate": True}).status_code == 404
    assert client.post("/api/items/up-1/label", headers=H, json={"categories": {"nsfw": True}}).status_code == 201


def test_image_route_serves_images_under_the_roots_only(client: TestClient, tmp_path: Path) -> None:
    ok = client.get("/api/image", headers=H, params={"uri": (tmp_path / "up-1.png").as_uri()})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png" and ok.content == _png()

    (tmp_path / "notes.txt").write_text("secret notes")
    text = client.get("/api/image", headers=H, params={"uri": (tmp_path / "notes.txt").as_uri()})
    assert text.status_code == 415 and "secret" not in text.text

    for uri in (
        "file:///etc/passwd",
        f"file://{tmp_path}/../../etc/passwd",
        "http://127.0.0.1:9/x.png",  # never an open proxy, even for schemes the moderator may fetch
        "https://example.com/x.png",
        "gopher://example.com/x",
    ):
        res = client.get("/api/image", headers=H, params={"uri": uri})
        assert res.status_code == 403, (uri, res.status_code)
    assert client.get("/api/image", headers=H, params={"uri": (tmp_path / "gone.png").as_uri()}).status_code == 404
    assert client.get("/api/image", params={"uri": (tmp_path / "up-1.png").as_uri()}).status_code == 401


def test_aligned_view_is_404_until_a_function_is_configured(client: TestClient, tmp_path: Path) -> None:
    assert client.get("/api/items/up-1/aligned", headers=H).status_code == 404
    assert client.post("/api/claim", headers=H).json()["item"]["aligned_url"] is None
    with _client(tmp_path, aligned=True) as c:
        item = c.post("/api/claim", headers=H).json()["item"]
        assert item["aligned_url"] == "/api/items/up-1/aligned"
        res = c.get(item["aligned_url"], headers=H)
        assert res.status_code == 200 and res.headers["content-type"] == "image/png"
        assert res.content.startswith(b"\x89PNG") and res.content != _png()


def test_labels_carry_both_images_so_the_trainer_can_use_them(tmp_path: Path) -> None:
    from services.trainer.feedback import FeedbackStore

    request = make_request()
    dup = build_label(LabelBody(duplicate_of="nb-2"), request, "alice", CATS, "file:///photos/nb-2.jpg")
    assert (dup.image_uri, dup.compared_with, dup.compared_uri) == (
        request.image_uri,
        "nb-2",
        "file:///photos/nb-2.jpg",
    )
    assert dup.model_version == request.model_version
    # "Not a duplicate" is about the top match (nb-1 scores 0.91, nb-2 0.4).
    neg = build_label(LabelBody(not_duplicate=True), make_request("up-2"), "alice", CATS, "file:///photos/nb-1.jpg")
    assert (neg.compared_with, neg.compared_uri) == ("nb-1", "file:///photos/nb-1.jpg")
    cat = build_label(LabelBody(categories={"spam": True}), make_request("up-3"), "alice", CATS, "file:///x.jpg")
    assert cat.compared_with is None and cat.compared_uri is None
    store = FeedbackStore(tmp_path)
    store.add([dup, neg, cat])
    pairs = {(p.upload_id, p.other_id, p.duplicate) for p in store.pairs()}
    assert pairs == {("up-1", "nb-2", True), ("up-2", "nb-1", False)}


def test_explain_view_answers_only_for_listed_neighbours_with_known_images(client: TestClient, tmp_path: Path) -> None:
    assert client.get("/api/items/up-1/explain", headers=H, params={"neighbour": "nb-1"}).status_code == 404
    assert all(n["explain_url"] is None for n in client.post("/api/claim", headers=H).json()["item"]["neighbours"])
    with _client(tmp_path, explain=True) as c:
        item = c.post("/api/claim", headers=H).json()["item"]
        urls = {n["upload_id"]: n["explain_url"] for n in item["neighbours"]}
        assert urls == {"nb-1": "/api/items/up-1/explain?neighbour=nb-1", "nb-2": None}
        assert c.get(urls["nb-1"]).status_code == 401
        res = c.get(urls["nb-1"], headers=H)
        assert res.status_code == 200 and res.headers["content-type"] == "image/png"
        with Image.open(tmp_path / "up-1.png") as up, Image.open(io.BytesIO(res.content)) as both:
            assert both.size == (up.width + 10, max(up.height, 7))  # the upload and the neighbour, both passed
        for other in ("nb-2", "stranger"):
            assert c.get("/api/items/up-1/explain", headers=H, params={"neighbour": other}).status_code == 404
        assert c.get("/api/items/nope/explain", headers=H, params={"neighbour": "nb-1"}).status_code == 404


def test_aligned_view_is_204_when_the_model_has_no_spatial_transformer(tmp_path: Path) -> None:
    with _client(tmp_path, aligned_fn=lambda data: None) as c:
        item = c.post("/api/claim", headers=H).json()["item"]
        res = c.get(item["aligned_url"], headers=H)
        assert res.status_code == 204 and res.content == b""


def test_aligned_view_setting_loads_a_dotted_function_on_first_use() -> None:
    assert load_aligned_view("") is None
    view = load_aligned_view("tests.unit.reviewer.fakes:fake_aligned_view")
    png = io.BytesIO()
    Image.new("RGB", (4, 2), (9, 8, 7)).save(png, "PNG")
    assert view is not None and view(png.getvalue()) == fake_aligned_view(png.getvalue())
    with pytest.raises(ModuleNotFoundError):
        load_aligned_view("tests.unit.reviewer.no_such_module:view")  # a misspelt setting fails at start


def test_a_view_whose_package_is_missing_answers_501_saying_what_to_install() -> None:
    view = load_aligned_view("tests.unit.reviewer.view_needing_a_missing_package:view")  # starts fine
    assert view is not None
    with pytest.raises(ImageRefused) as refused:
        view(b"x")
    assert refused.value.status == 501 and "sieve[train]" in refused.value.detail


def test_item_view_shows_reason_scores_and_ranked_neighbours(client: TestClient) -> None:
    item = client.post("/api/claim", headers=H).json()["item"]
    assert item["reason"] == "near_threshold_duplicate" and item["scores"] == {"nsfw": 0.5}
    assert [n["upload_id"] for n in item["neighbours"]] == ["nb-1", "nb-2"]
    assert item["image_url"].startswith("/api/image?uri=file%3A%2F%2F")
    assert 0 < item["claim_expires_in_s"] <= 60
    assert client.post("/api/items/up-1/release", headers=H).status_code == 200
    assert client.post("/api/items/up-1/release", headers=H).status_code == 409


class _AdminWithOneBankedImage(FakeAdmin):
    def banked_image(self, bank: str, item_id: str) -> bytes | None:
        return _png() if (bank, item_id) == ("watch", "img-7") else None

    def has_banked_image(self, bank: str, item_id: str) -> bool:
        return (bank, item_id) == ("watch", "img-7")


def test_item_view_shows_bank_evidence_and_keypoint_inliers(tmp_path: Path) -> None:
    from services.common.schemas import BankMatchEvidence, MatchEvidence

    request = make_request("up-9").model_copy(
        update={
            "evidence": [MatchEvidence(upload_id="nb-1", cosine=0.71, inliers=33, score=0.88)],
            "bank_matches": [
                BankMatchEvidence(
                    bank="watch", signal_type="embedding", distance=0.2, item_id="img-7", action="review"
                ),
                BankMatchEvidence(bank="hashes", signal_type="pdq", distance=12, item_id="h-1", action="review"),
            ],
        }
    )
    queue = FakeQueue([request])
    rsettings = ReviewerSettings(reviewer_tokens=[SecretStr(f"alice:{TOKEN}")])
    images = ImageSource(FetchSettings(file_roots=[str(tmp_path)]), DecodeSettings())
    services = ReviewerServices(queue, FakeLabeller(queue, rsettings.categories), _AdminWithOneBankedImage(), images)
    with TestClient(create_app(rsettings, services)) as c:
        item = c.post("/api/claim", headers=H).json()["item"]
        inliers = {n["upload_id"]: n["inliers"] for n in item["neighbours"]}
        assert inliers == {"nb-1": 33, "nb-2": None}
        banks = {b["bank"]: b for b in item["banks"]}
        assert banks["watch"]["signal_type"] == "embedding" and banks["hashes"]["distance"] == 12
        assert banks["hashes"]["image_url"] is None  # banked as hashes: nothing to show
        shown = c.get(banks["watch"]["image_url"], headers=H)
        assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
        assert c.get("/api/banks/hashes/items/h-1/image", headers=H).status_code == 404
        assert c.get(banks["watch"]["image_url"]).status_code == 401  # reviewers only


def test_a_view_that_needs_a_missing_package_only_when_called_answers_501_too() -> None:
    view = load_aligned_view("tests.unit.reviewer.view_importing_late:view")
    assert view is not None
    with pytest.raises(ImageRefused) as refused:
        view(b"x")
    assert refused.value.status == 501 and "sieve_package_that_is_not_installed" in refused.value.detail
