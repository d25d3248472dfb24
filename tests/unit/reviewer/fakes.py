"""In-memory stand-ins for the reviewer's own interfaces (QueueAPI, LabelAPI, AdminAPI, ImageAPI).

They let the HTTP layer (auth, roles, status codes) be tested without servers; the real Redis and Kafka
behaviour is tested in tests/integration/test_reviewer_queue.py.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from typing import Any

from PIL import Image

from services.common.schemas import DuplicateMatch, ReviewReason, ReviewRequest
from services.reviewer.admin import BankHashes, BankSpec, PromotionRequest, ThresholdOverrides
from services.reviewer.labels import LabelBody, LabelOutcome, NotClaimed, build_label
from services.reviewer.queue import Claim, QueueItem, QueueStats


def make_request(upload_id: str = "up-1", priority: float = 0.5) -> ReviewRequest:
    return ReviewRequest(
        upload_id=upload_id,
        image_uri=f"file:///nowhere/{upload_id}.jpg",
        reason=ReviewReason.NEAR_THRESHOLD_DUPLICATE,
        priority=priority,
        scores={"nsfw": 0.5},
        neighbours=[DuplicateMatch(upload_id="nb-1", score=0.91), DuplicateMatch(upload_id="nb-2", score=0.4)],
        model_version="sieve_embedder:1",
    )


class FakeQueue:
    def __init__(self, requests: Sequence[ReviewRequest] = ()) -> None:
        self.pending = {r.upload_id: r for r in requests}
        self.claims: dict[str, str] = {}
        self.claim_calls: list[str] = []
        self.uris: dict[str, str] = {}

    def claim(self, reviewer_id: str, scan: int = 100) -> Claim | None:
        self.claim_calls.append(reviewer_id)
        for uid, r in self.pending.items():
            if uid not in self.claims:
                self.claims[uid] = reviewer_id
                return Claim(r, reviewer_id, int(time.time() * 1000) + 60_000, True)
        return None

    def release(self, upload_id: str, reviewer_id: str) -> bool:
        return self.claims.pop(upload_id, None) == reviewer_id

    def item(self, upload_id: str) -> QueueItem | None:
        r = self.pending.get(upload_id)
        if r is None:
            return None
        owner = self.claims.get(upload_id)
        return QueueItem(r, "claimed" if owner else "pending", owner, None, [])

    def upload_uris(self, upload_ids: Sequence[str]) -> dict[str, str]:
        return {u: self.uris[u] for u in upload_ids if u in self.uris}

    def stats(self) -> QueueStats:
        return QueueStats(len(self.pending) - len(self.claims), len(self.claims), 0)

    def ping(self) -> bool:
        return True


class FakeLabeller:
    """Enforces the claim like the real one, and answers repeats with the first label."""

    def __init__(self, queue: FakeQueue, categories: Sequence[str]) -> None:
        self.queue = queue
        self.categories = list(categories)
        self.published: list[Any] = []
        self.given: dict[tuple[str, str], Any] = {}

    def label(self, reviewer_id: str, request: ReviewRequest, body: LabelBody) -> LabelOutcome:
        key = (request.upload_id, reviewer_id)
        if key in self.given:
            return LabelOutcome(self.given[key], repeated=True)
        label = build_label(body, request, reviewer_id, self.categories)
        if self.queue.claims.get(request.upload_id) != reviewer_id:
            raise NotClaimed(request.upload_id)
        self.given[key] = label
        self.published.append(label)
        return LabelOutcome(label, repeated=False)


class FakeAdmin:
    def __init__(self) -> None:
        self.overrides: dict[str, Any] = {}
        self.bank_records: dict[str, dict[str, Any]] = {}
        self.promotions_made: list[tuple[PromotionRequest, str]] = []

    def thresholds(self) -> dict[str, Any]:
        return {"key": "k", "overrides": self.overrides, "effective": self.overrides}

    def banked_image(self, bank: str, item_id: str) -> bytes | None:
        return None

    def has_banked_image(self, bank: str, item_id: str) -> bool:
        return False

    def set_thresholds(self, overrides: ThresholdOverrides, actor: str) -> dict[str, Any]:
        self.overrides = overrides.model_dump(exclude_none=True)
        return self.thresholds()

    def banks(self) -> dict[str, dict[str, Any]]:
        return dict(self.bank_records)

    def bank(self, name: str) -> dict[str, Any] | None:
        return self.bank_records.get(name)

    def put_bank(self, name: str, spec: BankSpec, actor: str) -> bool:
        created = name not in self.bank_records
        self.bank_records[name] = {**spec.model_dump(), "updated_by": actor}
        return created

    def add_bank_hashes(self, name: str, body: BankHashes, actor: str) -> int:
        if name not in self.bank_records:
            raise KeyError(name)
        self.bank_records[name]["size"] = self.bank_records[name].get("size", 0) + len(body.hashes)
        return len(body.hashes)

    def delete_bank(self, name: str, actor: str) -> bool:
        return self.bank_records.pop(name, None) is not None

    def request_promotion(self, request: PromotionRequest, actor: str) -> str:
        self.promotions_made.append((request, actor))
        return "1-0"

    def promotions(self, count: int) -> list[dict[str, Any]]:
        return [{"request_id": "1-0", "version": r.version, "state": "requested"} for r, _ in self.promotions_made]

    def promotion(self, request_id: str) -> dict[str, Any] | None:
        return next((p for p in self.promotions(1) if p["request_id"] == request_id), None)

    def audit_log(self, count: int) -> list[dict[str, Any]]:
        return []


class FakeImages:
    has_aligned_view = False
    has_explain_view = False

    def explain(self, upload_uri: str, neighbour_uri: str) -> bytes | None:
        return None

    def load(self, uri: str) -> tuple[bytes, str]:
        return b"\x89PNG", "image/png"

    def aligned(self, uri: str) -> bytes | None:
        return None


def fake_aligned_view(data: bytes) -> bytes:
    """An aligned-view function as the model engineer will provide one: image bytes in, PNG out."""
    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, "PNG")
        return out.getvalue()


def fake_explain_view(upload: bytes, neighbour: bytes) -> bytes:
    """An explain-view function: the two images side by side, so a test can see both were passed."""
    with Image.open(io.BytesIO(upload)) as a, Image.open(io.BytesIO(neighbour)) as b:
        both = Image.new("RGB", (a.width + b.width, max(a.height, b.height)))
        both.paste(a.convert("RGB"), (0, 0))
        both.paste(b.convert("RGB"), (a.width, 0))
        out = io.BytesIO()
        both.save(out, "PNG")
        return out.getvalue()
