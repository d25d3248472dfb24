"""Wire formats of every topic. The JSON Schema files in schemas/ are generated from these models."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

SCHEMA_VERSION = 1

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@/-]+$")]
MAX_METADATA_BYTES = 16 * 1024
MAX_URI_LENGTH = 4096


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UploadEvent(_Strict):
    """One image upload, as published by the platform on the uploads topic."""

    event_id: Identifier
    upload_id: Identifier
    user_id: Identifier
    image_uri: Annotated[str, StringConstraints(min_length=1, max_length=MAX_URI_LENGTH)]
    content_type: str | None = None
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    created_at: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        import json

        size = len(json.dumps(value, default=str).encode())
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes, limit {MAX_METADATA_BYTES}")
        return value


class Action(StrEnum):
    ALLOW = "allow"
    REVIEW = "review"
    BLOCK = "block"


class DuplicateMatch(_Strict):
    upload_id: str
    score: float


class MatchEvidence(_Strict):
    """Why a neighbour scored what it did: the descriptor's cosine and the local-feature check behind it."""

    upload_id: str
    cosine: float  # the best region's, where the upload's regions came closer (reasons: query_regions:<id>)
    inliers: int  # keypoint matches consistent with one homography (RANSAC)
    mirrored: bool = False  # matched against the mirrored upload
    score: float  # fused score, compared with the version's threshold


class BankMatchEvidence(_Strict):
    """A hash bank that holds this upload, or a near copy of it: which bank, by which signal, how near."""

    bank: str
    signal_type: str  # sha256, md5, phash (exact), pdq (Hamming distance) or embedding (cosine)
    distance: float  # bits apart for pdq, 1 - cosine for embedding, 0 for exact signals
    item_id: str  # the banked item the signal belongs to
    score: float | None = None  # embedding: the fused score (cosine + keypoint verification) the bank thresholds
    inliers: int | None = None  # embedding: keypoint inliers of the verification (None: not verified)
    action: Literal["block", "review"] = "block"  # the bank's configured action: block, or send to human review


class Verdict(_Strict):
    upload_id: str
    event_id: str
    model_version: str
    action: Action
    duplicate_of: list[DuplicateMatch] = Field(default_factory=list)
    flags: dict[str, float] = Field(default_factory=dict)
    reasons: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)  # milliseconds per stage
    evidence: list[MatchEvidence] = Field(default_factory=list)  # verified neighbours
    bank_matches: list[BankMatchEvidence] = Field(default_factory=list)
    decided_at: datetime = Field(default_factory=utcnow)


class ReviewReason(StrEnum):
    UNCERTAIN_FLAG = "uncertain_flag"
    NEAR_THRESHOLD_DUPLICATE = "near_threshold_duplicate"
    DISAGREEMENT = "duplicate_classifier_disagreement"
    BANK_MATCH = "bank_match"  # a match in a bank whose action is review (a watch list)


class ReviewRequest(_Strict):
    upload_id: str
    image_uri: str
    reason: ReviewReason
    priority: float
    scores: dict[str, float] = Field(default_factory=dict)
    neighbours: list[DuplicateMatch] = Field(default_factory=list)
    model_version: str
    # What the reviewer is shown as evidence: the banks that sent it (which signal, how near) and the neighbours'
    # keypoint verification (inliers beside the score).
    bank_matches: list[BankMatchEvidence] = Field(default_factory=list)
    evidence: list[MatchEvidence] = Field(default_factory=list)


class FeedbackLabel(_Strict):
    upload_id: str
    reviewer_id: str
    duplicate_of: str | None = None
    not_duplicate: bool = False
    categories: dict[str, bool] = Field(default_factory=dict)
    decided_at: datetime = Field(default_factory=utcnow)
    # What the retraining job needs to turn the label into a training pair without further look-ups.
    model_version: str | None = None
    image_uri: str | None = None
    compared_with: str | None = None  # the neighbour judged "not a duplicate" (or the duplicate's original)
    compared_uri: str | None = None


class ErrorKind(StrEnum):
    MALFORMED_EVENT = "malformed_event"
    SCHEMA_VIOLATION = "schema_violation"
    FETCH_REFUSED = "fetch_refused"
    FETCH_FAILED = "fetch_failed"
    TOO_LARGE = "too_large"
    UNSUPPORTED_FORMAT = "unsupported_format"
    CORRUPT_IMAGE = "corrupt_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    RETRIES_EXHAUSTED = "retries_exhausted"
    DUPLICATE_EVENT = "duplicate_event"


class DeadLetter(_Strict):
    """Carries the original bytes (base64 in JSON) so that nothing is lost and the event can be replayed."""

    original: bytes
    original_key: str | None = None
    source_topic: str
    source_partition: int
    source_offset: int
    error_kind: ErrorKind
    detail: str
    first_failed_at: datetime = Field(default_factory=utcnow)
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")


ALL_SCHEMAS: dict[str, type[BaseModel]] = {
    "upload_event": UploadEvent,
    "verdict": Verdict,
    "review_request": ReviewRequest,
    "feedback_label": FeedbackLabel,
    "dead_letter": DeadLetter,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema per topic payload, named ``<name>.v<SCHEMA_VERSION>.json``."""
    out: dict[str, dict[str, Any]] = {}
    for name, model in ALL_SCHEMAS.items():
        schema = model.model_json_schema()
        schema["$id"] = f"https://sieve.dev/schemas/{name}.v{SCHEMA_VERSION}.json"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[f"{name}.v{SCHEMA_VERSION}.json"] = schema
    return out
