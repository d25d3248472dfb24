"""An upload on its way through the stages: the Kafka envelope, and the records the stages made of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import Message
from opentelemetry.trace import Span

from services.common.banks import BankMatch
from services.common.errors import BadInput
from services.common.index import IndexEntry
from services.common.inference import InferenceResult
from services.common.prepared import PreparedImage
from services.common.schemas import DeadLetter, ReviewRequest, UploadEvent, Verdict
from services.common.verification import LocalFeatures


@dataclass(frozen=True)
class Inferred:
    """An item's row of one Triton answer, which may have come while the previous batch was being decided."""

    result: InferenceResult
    row: int
    began_ns: int
    ended_ns: int
    infer_ms: float
    batch_size: int

    @property
    def model_version(self) -> str:
        return self.result.model_version


@dataclass
class Item:
    message: Message
    span: Span
    timings: dict[str, float] = field(default_factory=dict)
    event: UploadEvent | None = None
    failure: BadInput | None = None
    image: PreparedImage | None = None  # decoded, hashed, keypoints extracted (possibly ahead of time)
    prepared: bool = False  # parse, fetch and prepare ran (the image is None if they failed)
    bank_check_failed: bool = False
    bank_review: list[BankMatch] = field(default_factory=list)  # hash matches in banks whose action is review
    inferred: Inferred | None = None  # embedding and scores, possibly ahead of time

    @property
    def upload_id(self) -> str:
        assert self.event is not None
        return self.event.upload_id


@dataclass
class BatchOutput:
    verdicts: list[tuple[Verdict, Span]] = field(default_factory=list)
    reviews: list[tuple[ReviewRequest, Span]] = field(default_factory=list)
    dead_letters: list[tuple[DeadLetter, Span]] = field(default_factory=list)
    index_entries: list[IndexEntry] = field(default_factory=list)
    fresh_verdicts: list[Verdict] = field(default_factory=list)  # decided by the model in this batch
    hashes: dict[str, tuple[str, str]] = field(default_factory=dict)  # upload_id -> (sha256, phash)
    pdqs: dict[str, str] = field(default_factory=dict)  # upload_id -> PDQ, for retroactive bank searches
    uris: dict[str, str] = field(default_factory=dict)  # upload_id -> image_uri, for reviewers' neighbour views
    features: dict[str, LocalFeatures] = field(default_factory=dict)  # kept for later uploads' verification
