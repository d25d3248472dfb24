"""Retroactive actioning: when a bank gains items, uploads already judged that match them get a new verdict.

Recent uploads are found three ways, all bounded by the retention window:

- exact: the exact-duplicate store (``services.common.exact_store``) names the first upload of each hash;
- PDQ: the moderator appends each decided upload's PDQ to the recent PDQ log (``services.common.recent_pdq``,
  trimmed to the window); a run builds a ``PdqIndex`` of those and searches it with each banked PDQ;
- embeddings: banked images' embeddings are searched in the shared recent-images index of their model version,
  and the neighbours verified with keypoints under the moderator's rule (``banks.near``).

A run walks the bank's signals in the order they were banked, from a cursor kept in Redis
(``<prefix>:bank:<name>:retro``), at most ``max_signals`` per run, so a big list is re-judged in resumable
steps with visible progress. Each upload is re-judged once per bank (``<prefix>:bank:<name>:rejudged``); the
updated verdict goes to the verdicts topic keyed by upload id (compacted: the latest wins) with
``retroactive_bank_match:<bank>`` and the bank evidence: blocked, or for a bank whose action is review, sent to
review (a review request goes out with it, so a reviewer does see it).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import redis
from redis.lock import Lock

from services.common.banks.embeddings import EmbeddingBanks
from services.common.banks.near import BankEmbeddingRule
from services.common.banks.pdq_index import PdqIndex
from services.common.banks.signals import Signal
from services.common.banks.store import BankAction, BankMatch, HashBankStore
from services.common.config import Settings
from services.common.errors import TransientError
from services.common.exact_store import ExactMatchStore
from services.common.recent_pdq import RecentPdqLog
from services.common.schemas import Action, ReviewReason, ReviewRequest, Verdict
from services.common.thresholds import ThresholdResolver
from services.common.upload_keys import upload_action_key, upload_uri_key
from services.common.verdicts import build_verdict, over_model, with_bank_action
from services.common.verification import FeatureStore, QueryFeatures, Verifier
from services.common.verification.shared_keypoints import SharedKeypointIndex


@dataclass
class RejudgeProgress:
    bank: str
    cursor: int  # the last banked signal (insertion sequence) searched
    signals_total: int
    signals_searched: int  # in this run
    found: int  # uploads matching, in this run
    published: int  # updated verdicts published in this run (each upload once per bank, ever)
    done: bool


@dataclass(frozen=True)
class _Recent:
    upload_id: str
    model_version: str
    flags: dict[str, float]


Publish = Callable[[list[Verdict], list[ReviewRequest]], None]


class Rejudger:
    def __init__(self, client: redis.Redis, settings: Settings, publish: Publish) -> None:
        self.client = client
        self.settings = settings
        self.prefix = settings.redis.key_prefix
        self.publish = publish
        self.store = HashBankStore.configured(client, self.prefix, settings.banks)
        self.rule = BankEmbeddingRule(
            ThresholdResolver(settings.decision, settings.banks, client, self.prefix), Verifier(settings.verify)
        )
        self.features = FeatureStore(client, self.prefix, settings.index.retention_s)
        self.exact = ExactMatchStore(client, self.prefix, settings.index.retention_s)
        self.recent = RecentPdqLog(client, self.prefix, settings.index.retention_s)

    def lock(self, bank: str, lock_s: float = 600.0) -> Lock:
        """Held around each ``run`` step: two processes (the reviewer's worker, ``sieve banks rejudge``) stepping
        one bank at once would both read the cursor and publish the same updated verdicts."""
        return cast(Lock, self.client.lock(f"{self.prefix}:bank:{bank}:retro:lock", timeout=lock_s))

    def _state_key(self, bank: str) -> str:
        return f"{self.prefix}:bank:{bank}:retro"

    def _embedded_key(self, bank: str) -> str:
        return f"{self.prefix}:bank:{bank}:retro:embedded"

    def _done_key(self, bank: str) -> str:
        return f"{self.prefix}:bank:{bank}:rejudged"

    def run(self, bank: str, max_signals: int = 100_000, chunk: int = 1000) -> RejudgeProgress:
        self.store.get(bank)
        cursor = int(cast(bytes | None, self.client.hget(self._state_key(bank), "cursor")) or 0)
        ordered = self.store.signals_after(bank, cursor)
        total = self.store.signal_count(bank)
        recent = self._recent_pdq()
        progress = RejudgeProgress(bank, cursor, total, 0, 0, 0, False)
        searched = self._embedding_matches(bank)  # banked images not searched yet (few: every run looks)
        self._settle(bank, searched[0], progress)
        if searched[1]:
            self.client.sadd(self._embedded_key(bank), *searched[1])
        todo = ordered[:max_signals]
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            self._settle(bank, self._exact_matches(bank, [s for _, s in part]), progress)
            self._settle(bank, self._pdq_matches(bank, recent, [s for _, s in part]), progress)
            progress.cursor = part[-1][0]
            progress.signals_searched += len(part)
            self.client.hset(self._state_key(bank), "cursor", progress.cursor)
        progress.done = len(todo) == len(ordered)
        return progress

    def _exact_matches(self, bank: str, signals: list[Signal]) -> dict[str, tuple[_Recent, BankMatch]]:
        found: dict[str, tuple[_Recent, BankMatch]] = {}
        for kind in ("sha256", "phash"):
            wanted = [s for s in signals if s.kind == kind]
            first = self.exact.first_uploads(kind, [s.value for s in wanted])
            for s in wanted:
                known = first.get(s.value)
                if known is not None:
                    recent = _Recent(known.upload_id, known.model_version, known.flags)
                    found.setdefault(recent.upload_id, (recent, BankMatch(bank, s.kind, 0, s.item_id, s.value)))
        return found

    def _recent_pdq(self) -> PdqIndex:
        index = PdqIndex(self.settings.banks.pdq_threshold)
        for entry in self.recent.entries():
            index.add(entry.pdq, entry.upload_id, json.dumps([entry.model_version, entry.flags]))
        return index

    def _pdq_matches(self, bank: str, recent: PdqIndex, signals: list[Signal]) -> dict[str, tuple[_Recent, BankMatch]]:
        found: dict[str, tuple[_Recent, BankMatch]] = {}
        for s in signals:
            if s.kind != "pdq" or len(recent) == 0:
                continue
            for hit in recent.search(s.value):
                for upload_id, meta in hit.owners:
                    version, flags = json.loads(meta)
                    match = BankMatch(bank, "pdq", hit.distance, s.item_id, s.value)
                    found.setdefault(upload_id, (_Recent(upload_id, version, flags), match))
        return found

    def _embedding_matches(self, bank: str) -> tuple[dict[str, tuple[_Recent, BankMatch]], list[str]]:
        """Matches of banked images not searched before, and their ``<version>/<item id>`` to mark searched."""
        from services.common.index import open_recent_index

        own = self.store.get(bank).embedding_threshold
        found: dict[str, tuple[_Recent, BankMatch]] = {}
        done = {m.decode() for m in cast(set[bytes], self.client.smembers(self._embedded_key(bank)))}
        searched: list[str] = []
        embedded = EmbeddingBanks(self.client, self.prefix)
        for version, all_ids, all_vectors in embedded.vectors(bank):
            keep = [i for i, item in enumerate(all_ids) if f"{version}/{item}" not in done]
            if not keep:
                continue
            item_ids, vectors = [all_ids[i] for i in keep], all_vectors[keep]
            searched += [f"{version}/{item}" for item in item_ids]
            threshold = self.rule.threshold(version, own)
            index = open_recent_index(self.settings, self.client, version, vectors.shape[1])
            index.sync()
            banked = embedded.features([(bank, item) for item in item_ids])
            keypoints = self._keypoint_channel() if banked else None
            for item_id, vector, neighbours in zip(item_ids, vectors, index.search(vectors, 50), strict=True):
                near = [n for n in neighbours if n.score >= self.rule.reach(threshold)]
                query = banked.get((bank, item_id))
                if query is not None and keypoints is not None:
                    # The moderator's second pass, from the other side: uploads that share keypoints with the
                    # banked image (a rotated or collaged copy whose cosine the descriptor lost), with their
                    # cosines from the index, judged by the same rule.
                    # Where the index's embeddings are out of reach, the cosine-near candidates stand alone.
                    seen = {n.upload_id for n in near}
                    with contextlib.suppress(TransientError):
                        near += self.rule.verifier.keypoint_neighbours(
                            keypoints.index, query, vector, seen, index.vectors
                        )
                references = self.features.get_many([n.upload_id for n in near]) if query is not None else {}
                thresholds = {n.upload_id: threshold for n in near}
                q = QueryFeatures(query) if query is not None else None
                for j in self.rule.judge(q, near, thresholds, references):
                    if j.matched:
                        match = BankMatch(
                            bank, "embedding", round(1.0 - j.cosine, 4), item_id, "", round(j.score, 4), j.inliers
                        )
                        found.setdefault(j.key, (_Recent(j.key, version, {}), match))
        return found, searched

    def _keypoint_channel(self) -> SharedKeypointIndex | None:
        """The recent uploads' keypoints, replayed from the features log (None: the second pass is off)."""
        verifier = self.rule.verifier
        if not (verifier.settings.enabled and verifier.settings.second_pass):
            return None
        channel = SharedKeypointIndex(self.features, verifier.keypoint_index(), self.settings.index.retention_s)
        channel.sync()
        return channel

    def _settle(self, bank: str, found: dict[str, tuple[_Recent, BankMatch]], progress: RejudgeProgress) -> None:
        """Publishes for uploads not yet re-judged for this bank; marks them only once the broker has them."""
        if not found:
            return
        progress.found += len(found)
        action = Action.BLOCK if self.store.get(bank).action == "block" else Action.REVIEW
        settled = {Action.BLOCK.value.encode()} | ({Action.REVIEW.value.encode()} if action is Action.REVIEW else set())
        ids = sorted(found)
        pipe = self.client.pipeline(transaction=False)
        for upload_id in ids:
            pipe.sismember(self._done_key(bank), upload_id)
            pipe.get(upload_action_key(self.prefix, upload_id))
            pipe.get(upload_uri_key(self.prefix, upload_id))
        answers = pipe.execute()
        fresh = [u for i, u in enumerate(ids) if not answers[3 * i] and answers[3 * i + 1] not in settled]
        if not fresh:
            return
        uris = {u: answers[3 * ids.index(u) + 2] for u in fresh}
        verdicts = [self._verdict(*found[u], action) for u in fresh]
        reviews = [_review(v, uris[v.upload_id]) for v in verdicts if action is Action.REVIEW]
        self.publish(verdicts, reviews)
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(self._done_key(bank), *fresh)
        for upload_id in fresh:
            pipe.set(upload_action_key(self.prefix, upload_id), action.value, ex=self.settings.index.retention_s)
        pipe.execute()
        progress.published += len(fresh)

    @staticmethod
    def _verdict(recent: _Recent, match: BankMatch, action: Action) -> Verdict:
        policy: BankAction = "block" if action is Action.BLOCK else "review"
        outcome = over_model(Action.ALLOW, [with_bank_action(match, policy)], retroactive=True)
        return build_verdict(
            recent.upload_id,
            f"retro:{match.bank}:{recent.upload_id}",
            recent.model_version,
            outcome.action,
            outcome.reasons,
            flags=recent.flags,
            bank_matches=outcome.evidence,
        )


def _review(verdict: Verdict, uri: bytes | None) -> ReviewRequest:
    """A review bank's match, for the review queue (the uri is gone when the upload left the window)."""
    return ReviewRequest(
        upload_id=verdict.upload_id,
        image_uri=uri.decode() if uri else "",
        reason=ReviewReason.BANK_MATCH,
        priority=1.0,
        scores=verdict.flags,
        model_version=verdict.model_version,
        bank_matches=verdict.bank_matches,
        evidence=verdict.evidence,
    )


def kafka_publisher(settings: Settings) -> Publish:
    """Verdicts (and review requests) keyed by upload id, waited for until the broker acknowledges every one."""
    from services.common.kafka_io import AckedProducer

    producer = AckedProducer(settings.kafka)

    def publish(verdicts: list[Verdict], reviews: list[ReviewRequest]) -> None:
        for verdict in verdicts:
            producer.produce(settings.kafka.topic_verdicts, verdict.upload_id, verdict.model_dump_json().encode())
        for review in reviews:
            producer.produce(settings.kafka.topic_review, review.upload_id, review.model_dump_json().encode())
        producer.flush()

    return publish
