"""After the verdicts are acknowledged: what this batch teaches the shared state (index, keypoints, exact hashes,
processed events), so later uploads and other replicas see it."""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from services.common.config import Settings
from services.common.exact_store import ExactMatchStore, KnownUpload
from services.common.hashing import informative_phash
from services.common.index import IndexEntry, RecentIndex
from services.common.recent_pdq import RecentPdqLog
from services.common.upload_keys import upload_action_key, upload_uri_key
from services.common.verification import FeatureStore, SharedKeypointIndex
from services.moderator.processed import ProcessedEvents
from services.moderator.stages.envelope import BatchOutput

log = logging.getLogger(__name__)


class Committer:
    def __init__(
        self,
        settings: Settings,
        redis_client: redis.Redis,
        index_of: Callable[[str], RecentIndex],
        processed: ProcessedEvents,
        exact: ExactMatchStore,
        feature_store: FeatureStore,
        keypoints: SharedKeypointIndex,
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        self.index_of = index_of
        self.processed = processed
        self.exact = exact
        self.feature_store = feature_store
        self.keypoints = keypoints
        self.recent_pdq = RecentPdqLog(redis_client, settings.redis.key_prefix, settings.index.retention_s)

    def commit(self, out: BatchOutput) -> None:
        by_version: dict[str, list[IndexEntry]] = {}
        for entry, verdict in zip(out.index_entries, out.fresh_verdicts, strict=True):
            by_version.setdefault(verdict.model_version, []).append(entry)
        for version, entries in by_version.items():
            self.index_of(version).add(entries)
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
        fresh_ids = {v.upload_id for v in out.fresh_verdicts}
        fresh = {u: f for u, f in out.features.items() if u in fresh_ids}
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
                    pdq = out.pdqs[verdict.upload_id]
                    self.recent_pdq.append(pipe, verdict.upload_id, pdq, verdict.model_version, verdict.flags)
            pipe.execute()
        except redis.RedisError:
            pass  # only reviewers' neighbour thumbnails and the disagreement check lose this batch
