"""One batch of upload messages in, verdicts, review requests and dead letters out."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import redis
from confluent_kafka import Message
from numpy.typing import NDArray
from opentelemetry import trace
from opentelemetry.trace import Span
from pydantic import ValidationError

from services.common.banks import BankMatch, HashBankStore, UploadSignals, pdq_hex
from services.common.banks.embeddings import EmbeddingBanks
from services.common.banks.near import BankEmbeddingRule, NearBankMatcher
from services.common.banks.retro import remember_pdq
from services.common.config import DecisionSettings, Settings
from services.common.errors import BadInput, TransientError
from services.common.fetch import FetcherRegistry
from services.common.hashing import informative_phash, md5_hex, phash_hex, sha256_hex
from services.common.imaging import DecodedImage, decode_image
from services.common.index import IndexEntry, Neighbour, RecentIndex, open_recent_index
from services.common.index.batch import with_batch_neighbours
from services.common.inference import ImageModels, InferenceResult
from services.common.schemas import (
    Action,
    BankMatchEvidence,
    DeadLetter,
    DuplicateMatch,
    ErrorKind,
    MatchEvidence,
    ReviewReason,
    ReviewRequest,
    UploadEvent,
    Verdict,
)
from services.common.telemetry import extract_context, tracer
from services.common.thresholds import ThresholdResolver
from services.common.upload_keys import upload_action_key, upload_uri_key
from services.common.verdicts import build_verdict, over_model
from services.common.verification import (
    FeatureStore,
    LocalFeatures,
    QueryFeatures,
    SharedKeypointIndex,
    Verification,
    Verifier,
    rescored,
)
from services.moderator.active_learning import Candidate, ReviewSelector
from services.moderator.decide import Decision, decide
from services.moderator.exact import ExactMatchStore, KnownUpload
from services.moderator.metrics import ModeratorMetrics
from services.moderator.processed import ProcessedEvents

log = logging.getLogger(__name__)
_tracer = tracer("sieve.moderator")


@dataclass(frozen=True)
class Inferred:
    """An item's row of one Triton answer, which may have come while the previous batch was being decided."""

    result: InferenceResult
    row: int
    began_ns: int
    ended_ns: int
    infer_ms: float
    batch_size: int


@dataclass
class Item:
    message: Message
    span: Span
    timings: dict[str, float] = field(default_factory=dict)
    event: UploadEvent | None = None
    image: DecodedImage | None = None
    failure: BadInput | None = None
    sha256: str = ""
    phash: str = ""
    md5: str = ""
    pdq: str = ""  # "" when the image is too flat for PDQ to mean anything (quality below the setting)
    bank_check_failed: bool = False
    bank_review: list[BankMatch] = field(default_factory=list)  # hash matches in banks whose action is review
    features: LocalFeatures | None = None  # local features for verification, computed while preparing
    prepared: bool = False  # parsed, fetched and decoded (possibly ahead of time, while the last batch infers)
    inferred: Inferred | None = None  # embedding and scores, possibly ahead of time


@dataclass
class _Evidence:
    matches: list[MatchEvidence] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


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


def _upload_signals(item: Item) -> UploadSignals:
    """What the banks are matched on: every hash of the upload that carries information."""
    return UploadSignals(
        sha256=item.sha256,
        md5=item.md5 or None,
        phash=item.phash if informative_phash(item.phash) else None,
        pdq=item.pdq or None,
    )


def _now_ns() -> int:
    return time.time_ns()


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        models: ImageModels,
        redis_client: redis.Redis,
        fetcher: FetcherRegistry | None = None,
        metrics: ModeratorMetrics | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.models = models
        self.redis = redis_client
        self.fetcher = fetcher or FetcherRegistry(settings.fetch)
        self.metrics = metrics or ModeratorMetrics()
        self.processed = ProcessedEvents(redis_client, settings.redis.key_prefix, settings.moderator.dedup_ttl_s)
        self.exact = ExactMatchStore(redis_client, settings.redis.key_prefix, settings.index.retention_s)
        self.banks = HashBankStore.configured(redis_client, settings.redis.key_prefix, settings.banks)
        self.indexes: dict[str, RecentIndex] = {}
        self.selector = ReviewSelector(redis_client, settings.redis.key_prefix, settings.review)
        self.verifier = Verifier(settings.verify)
        self.embedding_banks = EmbeddingBanks(
            redis_client, settings.redis.key_prefix, settings.banks.sync_interval_s, self.verifier.keypoint_index
        )
        self.thresholds = ThresholdResolver(settings.decision, settings.banks, self.redis, settings.redis.key_prefix)
        self.bank_rule = BankEmbeddingRule(self.thresholds, self.verifier)
        self.near_banks = NearBankMatcher(self.banks, self.embedding_banks, self.bank_rule)
        self.feature_store = FeatureStore(redis_client, settings.redis.key_prefix, settings.index.retention_s)
        self.keypoints = SharedKeypointIndex(
            self.feature_store, self.verifier.keypoint_index(), settings.index.retention_s
        )
        self._priorities: dict[str, float] = {}
        self.sleep = sleep
        self._pool = ThreadPoolExecutor(max_workers=settings.moderator.fetch_workers, thread_name_prefix="fetch")

    def index_for(self, model_version: str, dim: int) -> RecentIndex:
        """One index per model version: embeddings of two versions never share an index."""
        index = self.indexes.get(model_version)
        if index is None:
            index = open_recent_index(self.settings, self.redis, model_version, dim)
            self.indexes[model_version] = index
        return index

    # -- stages ---------------------------------------------------------------------------------------

    def _parse(self, item: Item) -> None:
        raw = item.message.value() or b""
        try:
            item.event = UploadEvent.model_validate_json(raw)
            item.span.set_attribute("sieve.upload_id", item.event.upload_id)
            item.span.set_attribute("sieve.event_id", item.event.event_id)
        except ValidationError as exc:
            kind = ErrorKind.MALFORMED_EVENT if _is_json_error(exc, raw) else ErrorKind.SCHEMA_VIOLATION
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
            item.failure = BadInput(kind, detail[:2000])

    def _fetch_decode(self, item: Item) -> None:
        assert item.event is not None
        ctx = trace.set_span_in_context(item.span)
        attempts = 0
        while True:
            attempts += 1
            try:
                with _tracer.start_as_current_span("fetch", context=ctx) as span:
                    began = time.perf_counter()
                    data = self.fetcher.fetch(item.event.image_uri)
                    item.timings["fetch_ms"] = _ms(began)
                    item.sha256 = sha256_hex(data)
                    item.md5 = md5_hex(data)
                    span.set_attribute("sieve.bytes", len(data))
                with _tracer.start_as_current_span("decode", context=ctx) as span:
                    began = time.perf_counter()
                    verify = self.settings.verify
                    detail_side = verify.detail_side if verify.enabled else 0
                    item.image = decode_image(
                        data, self.settings.decode, self.settings.triton.input_size, detail_side, pdq=True
                    )
                    item.phash = phash_hex(item.image.pixels)
                    pdq, quality = pdq_hex(
                        item.image.pdq_view if item.image.pdq_view is not None else item.image.pixels
                    )
                    item.pdq = pdq if quality >= self.settings.banks.pdq_min_quality else ""
                    item.timings["decode_ms"] = _ms(began)
                    span.set_attribute("sieve.format", item.image.format)
                if item.image.detail is not None:
                    with _tracer.start_as_current_span("features", context=ctx) as span:
                        began = time.perf_counter()
                        item.features = self.verifier.extractor.extract(item.image.detail)
                        item.timings["features_ms"] = _ms(began)
                        span.set_attribute("sieve.keypoints", len(item.features))
                return
            except BadInput as exc:
                item.failure = exc
                return
            except TransientError as exc:
                if attempts >= self.settings.moderator.max_retries:
                    item.failure = BadInput(ErrorKind.RETRIES_EXHAUSTED, f"{attempts} attempts: {exc}")
                    return
                self.sleep(min(self.settings.moderator.retry_backoff_s * 2 ** (attempts - 1), 5.0))
            except Exception as exc:  # a bug or an unforeseen input must not stall the partition
                log.exception("unexpected error preparing %s", item.event.upload_id)
                item.failure = BadInput(ErrorKind.CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}")
                return

    # -- the batch ------------------------------------------------------------------------------------

    def start_items(self, messages: list[Message]) -> list[Item]:
        items = []
        for msg in messages:
            parent = extract_context(msg.headers())
            span = _tracer.start_span(
                "moderator.process",
                context=parent,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.destination.name": msg.topic() or "",
                    "messaging.kafka.partition": msg.partition() or 0,
                    "messaging.kafka.offset": msg.offset() or 0,
                },
            )
            items.append(Item(message=msg, span=span))
        return items

    def prepare(self, items: list[Item]) -> None:
        """Parse, fetch and decode: per-item work that needs no shared state, so it can run ahead of ``run``.

        The moderator prepares batch N+1 on a background thread while batch N waits on Triton. Nothing here
        reads what earlier batches wrote (event ids, hashes, the index): that all happens in ``run``.
        """
        todo = [i for i in items if not i.prepared]
        for item in todo:
            began = time.perf_counter()
            self._parse(item)
            item.timings["parse_ms"] = _ms(began)
        list(self._pool.map(self._fetch_decode, [i for i in todo if i.failure is None and i.event is not None]))
        for item in todo:
            item.prepared = True

    def run(self, items: list[Item]) -> BatchOutput:
        """Everything except publishing; raises TransientError when a shared dependency is down."""
        self.prepare(items)
        out = BatchOutput()
        live = [i for i in items if i.event is not None]  # parsed; a fetch or decode failure may follow
        known = self.processed.get_many([i.event.event_id for i in live if i.event])
        todo: list[Item] = []
        batch_events: dict[str, str] = {}
        for item in live:
            assert item.event is not None
            twin = batch_events.setdefault(item.event.event_id, item.event.upload_id)
            if twin != item.event.upload_id:
                item.failure = BadInput(
                    ErrorKind.DUPLICATE_EVENT, f"event_id {item.event.event_id} was already used for upload {twin}"
                )
                continue
            previous = known.get(item.event.event_id)
            if previous is not None and previous.upload_id == item.event.upload_id:
                item.failure = None  # redelivery: republish the same verdict, whatever a new fetch says
                out.verdicts.append((previous, item.span))
                item.span.set_attribute("sieve.redelivered", True)
            elif previous is not None:
                item.failure = BadInput(
                    ErrorKind.DUPLICATE_EVENT,
                    f"event_id {item.event.event_id} was already used for upload {previous.upload_id}",
                )
            else:
                todo.append(item)

        ready = [i for i in todo if i.failure is None and i.image is not None]
        ready = self._fast_paths(ready, out)

        if ready:
            self._infer_and_decide(ready, out)

        for item in items:
            if item.failure is not None:
                out.dead_letters.append((self._dead_letter(item), item.span))
        return out

    def _fast_paths(self, ready: list[Item], out: BatchOutput) -> list[Item]:
        """Bank matches block and exact re-uploads reuse the first verdict; neither needs the model."""
        remaining: list[Item] = []
        first_in_batch: dict[str, Item] = {}
        for item in ready:
            assert item.event is not None
            began = time.perf_counter()
            try:
                banks = self.banks.match(_upload_signals(item))
            except redis.RedisError:
                banks, item.bank_check_failed = [], True
            if any(m.action == "block" for m in banks):
                item.timings["hash_ms"] = _ms(began)
                outcome = over_model(Action.BLOCK, banks)
                verdict = self._fast_verdict(item, outcome.action, [], {}, "", outcome.reasons, outcome.evidence)
                out.verdicts.append((verdict, item.span))
                continue
            if banks:  # only review banks: the model still judges it, and a reviewer sees it whatever it says
                item.timings["hash_ms"] = _ms(began)
                item.bank_review = banks
                remaining.append(item)
                continue
            known = self._exact_lookup(item)
            item.timings["hash_ms"] = _ms(began)
            if known is None and item.sha256 in first_in_batch:
                remaining.append(item)  # decided after its twin, by the model's near-duplicate search
                continue
            if known is not None:
                upload, kind = known
                match = [DuplicateMatch(upload_id=upload.upload_id, score=1.0)]
                reasons = [f"exact_hash_match:{kind}:{upload.upload_id}"]
                verdict = self._fast_verdict(
                    item, Action(upload.action), match, upload.flags, upload.model_version, reasons
                )
                out.verdicts.append((verdict, item.span))
                continue
            first_in_batch[item.sha256] = item
            remaining.append(item)
        return remaining

    def _exact_lookup(self, item: Item) -> tuple[KnownUpload, str] | None:
        assert item.event is not None
        try:
            found = self.exact.lookup(item.sha256, item.phash if informative_phash(item.phash) else None)
        except redis.RedisError:
            return None  # the model path still finds it as a near-duplicate
        if found is None or found[0].upload_id == item.event.upload_id:
            return None
        return found

    def _fast_verdict(
        self,
        item: Item,
        action: Action,
        matches: list[DuplicateMatch],
        flags: dict[str, float],
        model_version: str,
        reasons: list[str],
        bank_matches: list[BankMatchEvidence] | None = None,
    ) -> Verdict:
        assert item.event is not None
        item.span.set_attribute("sieve.action", action.value)
        item.span.set_attribute("sieve.fast_path", reasons[0].split(":", 1)[0])
        return build_verdict(
            item.event.upload_id,
            item.event.event_id,
            model_version,
            action,
            reasons,
            duplicate_of=matches,
            flags=flags,
            timings=item.timings,
            bank_matches=bank_matches or [],
        )

    def infer_ahead(self, items: list[Item]) -> None:
        """Embeds a prepared batch while the previous one is still being decided.

        Deciding (index search, keypoint verification) is CPU work in this process; without this, Triton sits
        idle through it. Items a fast path will answer are left out. Whatever is not inferred here (Triton down,
        a fast path that no longer applies) is inferred in line by ``run``, so a failure here costs only time.
        """
        wanted = [
            i
            for i in items
            if i.prepared
            and i.failure is None
            and i.image is not None
            and i.inferred is None
            and not self._fast_path_likely(i)
        ]
        if not wanted:
            return
        try:
            self._infer(wanted)
        except TransientError as exc:
            log.info("inference ahead failed (%s); the batch will be inferred in line", exc)

    def _embedding_bank_matches(
        self, item: Item, model_version: str, embedding: NDArray[np.float32]
    ) -> list[BankMatch]:
        """Enabled banks holding an image this upload is a verified near copy of (``banks.near``'s rule)."""
        query = None
        if item.features is not None and item.image is not None and item.image.detail is not None:
            detail = item.image.detail
            query = QueryFeatures(item.features, lambda: self.verifier.extractor.extract_mirrored(detail))
        began = time.perf_counter()
        try:
            found = self.near_banks.match(model_version, embedding, query)
        except redis.RedisError:
            return []  # the hash banks were checked already; a banked embedding is a second chance
        item.timings["bank_verify_ms"] = _ms(began)
        return found

    def _fast_path_likely(self, item: Item) -> bool:
        """A read-only look at the banks and exact-match store, as of the batches committed so far."""
        assert item.event is not None
        try:
            banks = self.banks.match(_upload_signals(item))
            if banks:
                return any(m.action == "block" for m in banks)  # review banks still need the model
            return self._exact_lookup(item) is not None
        except redis.RedisError:
            return False

    def _infer(self, items: list[Item]) -> None:
        batch = np.stack([i.image.pixels for i in items if i.image is not None])
        t0 = _now_ns()
        began = time.perf_counter()
        result = self.models.infer(batch)
        infer_ms = _ms(began)
        t1 = _now_ns()
        self.metrics.stage("triton", infer_ms / 1000.0)
        for row, item in enumerate(items):
            item.inferred = Inferred(result, row, t0, t1, infer_ms, len(items))

    def _infer_and_decide(self, ready: list[Item], out: BatchOutput) -> None:
        missing = [i for i in ready if i.inferred is None]
        if missing:
            self._infer(missing)
        versions: dict[str, list[Item]] = {}
        for item in ready:
            assert item.inferred is not None
            versions.setdefault(item.inferred.result.model_version, []).append(item)
        for model_version, group in versions.items():  # one embedding space per index, in arrival order
            self._decide(model_version, group, out)

    def _decide(self, model_version: str, ready: list[Item], out: BatchOutput) -> None:
        dim = next(int(i.inferred.result.embeddings.shape[1]) for i in ready if i.inferred is not None)
        index = self.index_for(model_version, dim)
        index.sync()
        if self.settings.verify.second_pass:
            self.keypoints.sync()
        cfg = self.decision_for(model_version)
        search_total = 0.0
        decided: list[tuple[Item, Decision, list[str]]] = []
        item_evidence: dict[str, list[MatchEvidence]] = {}
        item_banks: dict[str, list[BankMatch]] = {}
        batch_actions: dict[str, str] = {}
        # One search for the whole batch (one round trip to a remote index); items earlier in the batch are added
        # to each later item's neighbours here, as the shared index has not got them yet.
        began = time.perf_counter()
        rows: list[tuple[NDArray[np.float32], str]] = []
        for each in ready:
            assert each.inferred is not None and each.event is not None
            rows.append((each.inferred.result.embeddings[each.inferred.row], each.event.upload_id))
        shared = index.search(np.stack([v for v, _ in rows]), cfg.top_k, exclude=[u for _, u in rows])
        batch_search_ms = _ms(began) / len(rows)
        earlier: list[IndexEntry] = []
        for position, item in enumerate(ready):
            assert item.event is not None and item.inferred is not None
            inferred = item.inferred
            result, row = inferred.result, inferred.row
            _child(
                item.span,
                "triton.infer",
                inferred.began_ns,
                inferred.ended_ns,
                {"sieve.model_version": model_version, "sieve.batch_size": inferred.batch_size},
            )
            item.timings["infer_ms"] = round(inferred.infer_ms, 3)
            s0 = _now_ns()
            began = time.perf_counter()
            neighbours = with_batch_neighbours(shared[position], result.embeddings[row], earlier, cfg.top_k)
            item.timings["search_ms"] = round(batch_search_ms + _ms(began), 3)
            neighbours, evidence = self._verify(item, neighbours, cfg, out, index, result.embeddings[row])
            scores = {c: float(result.scores[row, k]) for k, c in enumerate(result.categories)}
            twins = [n.upload_id for n in neighbours if n.score >= cfg.duplicate_threshold]
            decision = decide(neighbours, scores, cfg, self._actions_of(twins, batch_actions))
            batch_actions[item.event.upload_id] = decision.action.value
            entry = IndexEntry(item.event.upload_id, result.embeddings[row], time.time())
            earlier.append(entry)  # later items of this batch must see it
            if item.features is not None:
                out.features[item.event.upload_id] = item.features  # and verify against its features
            search_total += item.timings["search_ms"]
            _child(
                item.span,
                "index.search",
                s0,
                _now_ns(),
                {"sieve.neighbours": len(neighbours), "sieve.index_size": len(index)},
            )
            out.index_entries.append(entry)
            extra = ["bank_check_unavailable"] if item.bank_check_failed else []
            decided.append((item, decision, extra + evidence.reasons))
            item_evidence[item.event.upload_id] = evidence.matches
            item_banks[item.event.upload_id] = self._embedding_bank_matches(item, model_version, result.embeddings[row])

        selected = self._select_reviews(decided)
        for item, decision, extra in decided:
            assert item.event is not None
            action = decision.action
            reasons = decision.reasons + extra
            skip = selected.get(item.event.upload_id)
            banked = item.bank_review + item_banks.get(item.event.upload_id, [])
            # A near copy of a banked image: the bank's action (a blocked one needs no reviewer).
            outcome = over_model(action, banked)
            action, reasons, watched = outcome.action, outcome.reasons + reasons, outcome.watched
            if decision.review_reason is not None and skip and not banked:
                reasons.append(skip)
                if action is Action.REVIEW:
                    action = Action.ALLOW  # REVIEW always means a reviewer will see it; this one will not
            verdict = build_verdict(
                item.event.upload_id,
                item.event.event_id,
                model_version,
                action,
                reasons,
                duplicate_of=decision.duplicate_of,
                flags=decision.flags,
                timings=item.timings,
                evidence=item_evidence.get(item.event.upload_id, []),
                bank_matches=outcome.evidence,
            )
            out.hashes[verdict.upload_id] = (item.sha256, item.phash)
            if item.pdq:
                out.pdqs[verdict.upload_id] = item.pdq
            out.uris[verdict.upload_id] = item.event.image_uri
            item.span.set_attribute("sieve.action", action.value)
            out.verdicts.append((verdict, item.span))
            out.fresh_verdicts.append(verdict)
            if watched or (decision.review_reason is not None and not skip and not banked):
                request = ReviewRequest(
                    upload_id=item.event.upload_id,
                    image_uri=item.event.image_uri,
                    reason=ReviewReason.BANK_MATCH if watched else cast(ReviewReason, decision.review_reason),
                    priority=1.0 if watched else self._priorities.get(item.event.upload_id, decision.review_priority),
                    scores=decision.flags,
                    neighbours=decision.neighbours,
                    model_version=model_version,
                )
                out.reviews.append((request, item.span))
        self.metrics.stage("index_search", search_total / 1000.0)
        self.metrics.index_size(model_version, len(index))

    def _verify(
        self,
        item: Item,
        neighbours: list[Neighbour],
        cfg: DecisionSettings,
        out: BatchOutput,
        index: RecentIndex,
        embedding: NDArray[np.float32],
    ) -> tuple[list[Neighbour], _Evidence]:
        """Local-feature check of the nearest candidates; their fused scores replace the cosines. Where none is
        surely a copy, the second pass verifies the references that the upload's keypoints point to as well."""
        evidence = _Evidence()
        threshold = cfg.duplicate_threshold
        if item.features is None or item.image is None or item.image.detail is None:
            return neighbours, evidence
        chosen = self.verifier.candidates(neighbours, threshold, cfg.review_margin)
        best = neighbours[0].score if neighbours and not chosen else None
        if not chosen and not self.verifier.needs_second_pass(best, threshold):
            return neighbours, evidence
        began = time.perf_counter()
        detail = item.image.detail
        query = QueryFeatures(item.features, lambda: self.verifier.extractor.extract_mirrored(detail))
        verified: list[Verification] = []
        if chosen:  # an upload with no first-pass candidate goes straight to the second pass
            verified = self.verifier.verify(query, chosen, self._reference_features(chosen, out, evidence))
            item.timings["verify_ms"] = _ms(began)
            self.metrics.stage("verify", item.timings["verify_ms"] / 1000.0)
        found: list[Verification] = []
        if self.verifier.needs_second_pass(max((v.score for v in verified), default=best), threshold):
            began = time.perf_counter()
            found = self._second_pass(item, query, {n.upload_id for n in chosen}, index, embedding, out, evidence)
            known = {f.upload_id for f in found}
            neighbours = [n for n in neighbours if n.upload_id not in known]
            neighbours += [Neighbour(v.upload_id, v.cosine) for v in found]
            item.timings["second_pass_ms"] = _ms(began)
            self.metrics.stage("second_pass", item.timings["second_pass_ms"] / 1000.0)
        for kind, group in (("verified_match", verified), ("keypoint_match", found)):
            evidence.reasons += [f"{kind}:{v.upload_id}:{v.inliers}" for v in group if v.score >= threshold > v.cosine]
        verified += found
        evidence.matches = [
            MatchEvidence(
                upload_id=v.upload_id, cosine=round(v.cosine, 6), inliers=v.inliers, mirrored=v.mirrored, score=v.score
            )
            for v in verified
        ]
        item.span.set_attribute("sieve.verified", len(verified))
        return rescored(neighbours, verified), evidence

    def _reference_features(
        self, candidates: list[Neighbour], out: BatchOutput, evidence: _Evidence
    ) -> dict[str, LocalFeatures]:
        """This batch's own features first, then the shared store's."""
        wanted = [n.upload_id for n in candidates]
        references = {u: out.features[u] for u in wanted if u in out.features}
        missing = [u for u in wanted if u not in references]
        try:
            references.update(self.feature_store.get_many(missing))
        except redis.RedisError:
            if "verification_unavailable" not in evidence.reasons:
                evidence.reasons.append("verification_unavailable")  # the descriptor's scores stand
        return references

    def _second_pass(
        self,
        item: Item,
        query: QueryFeatures,
        verified: set[str],
        index: RecentIndex,
        embedding: NDArray[np.float32],
        out: BatchOutput,
        evidence: _Evidence,
    ) -> list[Verification]:
        """References that share keypoints with the upload (a crop inside a meme, a chain of edits the descriptor
        lost), with their cosines from the index, verified and fused exactly like the first pass's."""
        assert item.event is not None and item.features is not None
        exclude = verified | {item.event.upload_id}
        try:
            extra = self.verifier.keypoint_neighbours(
                self.keypoints.index, item.features, embedding, exclude, index.vectors
            )
        except TransientError:
            evidence.reasons.append("second_pass_unavailable")
            return []
        if not extra:
            return []
        found = self.verifier.verify(query, extra, self._reference_features(extra, out, evidence))
        item.span.set_attribute("sieve.second_pass_candidates", len(extra))
        return found

    def _select_reviews(self, decided: list[tuple[Item, Decision, list[str]]]) -> dict[str, str]:
        """upload_id -> why it is not sent to review ("" when it is)."""
        candidates = [
            Candidate(item.event.upload_id, decision.review_priority, decision.neighbours, item.event.metadata)
            for item, decision, _ in decided
            if decision.review_reason is not None and item.event is not None
        ]
        if not candidates:
            return {}
        chosen = self.selector.select(candidates)
        self._priorities = {c.upload_id: c.priority for c in chosen}
        return {c.upload_id: c.skipped_because for c in chosen}

    def _actions_of(self, upload_ids: list[str], batch_actions: dict[str, str]) -> dict[str, str]:
        """Earlier verdicts of the near-duplicates found, for the disagreement check."""
        found = {u: batch_actions[u] for u in upload_ids if u in batch_actions}
        rest = [u for u in upload_ids if u not in found]
        if rest:
            try:
                keys = [upload_action_key(self.settings.redis.key_prefix, u) for u in rest]
                values = cast(list[bytes | None], self.redis.mget(keys))
                found.update({u: v.decode() for u, v in zip(rest, values, strict=True) if v})
            except redis.RedisError:
                pass
        return found

    def commit_index(self, out: BatchOutput, model_versions: list[str] | None = None) -> None:
        """After the verdicts are acknowledged: share the batch's embeddings and remember the events."""
        by_version: dict[str, list[IndexEntry]] = {}
        for verdict in out.fresh_verdicts:
            by_version.setdefault(verdict.model_version, [])
        for entry, verdict in zip(out.index_entries, out.fresh_verdicts, strict=True):
            by_version[verdict.model_version].append(entry)
        for version, entries in by_version.items():
            if entries:
                self.indexes[version].add(entries)
        self.processed.put_many(out.fresh_verdicts)
        self._remember_uploads(out)
        self._remember_features(out)
        for verdict in out.fresh_verdicts:
            sha, phash = out.hashes[verdict.upload_id]
            known = KnownUpload(verdict.upload_id, verdict.action.value, verdict.model_version, verdict.flags)
            try:
                self.exact.remember(sha, phash if informative_phash(phash) else None, known)
            except redis.RedisError:
                break  # only the fast path is lost; the model still catches the re-upload

    def _remember_features(self, out: BatchOutput) -> None:
        """Computed once per upload, read whenever it is a later upload's candidate."""
        fresh = {u: f for u, f in out.features.items() if u in {v.upload_id for v in out.fresh_verdicts}}
        try:
            self.feature_store.put_many(fresh)
        except redis.RedisError:
            log.warning("could not store local features of %d uploads; they stay unverifiable", len(fresh))
        self.keypoints.add(fresh)

    def _remember_uploads(self, out: BatchOutput) -> None:
        """Reviewers see an upload beside its neighbours (by uri); the disagreement check needs their actions."""
        prefix, ttl = self.settings.redis.key_prefix, self.settings.index.retention_s
        try:
            pipe = self.redis.pipeline(transaction=False)
            for upload_id, uri in out.uris.items():
                pipe.set(upload_uri_key(prefix, upload_id), uri, ex=ttl)
            for verdict in out.fresh_verdicts:
                pipe.set(upload_action_key(prefix, verdict.upload_id), verdict.action.value, ex=ttl)
                if verdict.upload_id in out.pdqs:
                    remember_pdq(pipe, prefix, ttl, verdict.upload_id, out.pdqs[verdict.upload_id], verdict)
            pipe.execute()
        except redis.RedisError:
            pass  # only reviewers' neighbour thumbnails and the disagreement check lose this batch

    def decision_for(self, model_version: str) -> DecisionSettings:
        """The decision settings for the version that answered (services.common.thresholds resolves them)."""
        return self.thresholds.decision_for(model_version)

    def apply_threshold_overrides(self) -> None:
        """Admins change thresholds through the reviewer API and promotions record a new version's thresholds;
        both land in Redis and take effect here."""
        if self.thresholds.refresh(force=True):
            merged = self.thresholds.decision
            log.info("decision thresholds now %s", merged.model_dump())
            self.settings = self.settings.model_copy(update={"decision": merged})

    def _dead_letter(self, item: Item) -> DeadLetter:
        assert item.failure is not None
        msg = item.message
        key = msg.key()
        item.span.set_attribute("sieve.dlq", item.failure.kind.value)
        item.span.set_status(trace.Status(trace.StatusCode.ERROR, item.failure.detail[:200]))
        return DeadLetter(
            original=msg.value() or b"",
            original_key=key.decode(errors="replace") if isinstance(key, bytes) else key,
            source_topic=msg.topic() or "",
            source_partition=msg.partition() or 0,
            source_offset=msg.offset() or 0,
            error_kind=item.failure.kind,
            detail=item.failure.detail,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _is_json_error(exc: ValidationError, raw: bytes) -> bool:
    if any(e["type"] == "json_invalid" for e in exc.errors()):
        return True
    try:
        json.loads(raw)
    except ValueError:
        return True
    return False


def _ms(began: float) -> float:
    return round((time.perf_counter() - began) * 1000.0, 3)


def _child(parent: Span, name: str, start_ns: int, end_ns: int, attributes: dict[str, str | int | float]) -> None:
    """A per-upload child span for a stage that ran once for the whole batch."""
    span = _tracer.start_span(
        name, context=trace.set_span_in_context(parent), start_time=start_ns, attributes=attributes
    )
    span.end(end_time=end_ns)
