"""One batch of upload messages in, verdicts, review requests and dead letters out: the stages in order.

Each stage lives in ``services.moderator.stages``; this module only wires them and runs a batch through them.
``prepare`` and ``infer_ahead`` may run on a background thread for batch N+1 while ``run`` decides batch N.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis
from confluent_kafka import Message
from opentelemetry import trace
from opentelemetry.trace import Span

from services.common.banks import HashBankStore
from services.common.banks.embeddings import EmbeddingBanks
from services.common.banks.near import BankEmbeddingRule, NearBankMatcher
from services.common.config import DecisionSettings, Settings
from services.common.exact_store import ExactMatchStore
from services.common.fetch import FetcherRegistry
from services.common.index import RecentIndex, open_recent_index
from services.common.inference import ImageModels
from services.common.telemetry import tracer
from services.common.thresholds import ThresholdResolver
from services.common.verification import FeatureStore, SharedKeypointIndex, Verifier
from services.moderator.active_learning import ReviewSelector
from services.moderator.metrics import ModeratorMetrics
from services.moderator.processed import ProcessedEvents
from services.moderator.stages.assemble import Assembler
from services.moderator.stages.candidates import KeypointChannel, first_pass
from services.moderator.stages.commit import Committer
from services.moderator.stages.envelope import BatchOutput, Item
from services.moderator.stages.fast_path import FastPaths
from services.moderator.stages.infer import Inference
from services.moderator.stages.intake import Redeliveries, dead_letter, start_items
from services.moderator.stages.prepare import Preparer
from services.moderator.stages.verify import VerifyStage
from services.moderator.stages.workers import Workers

log = logging.getLogger(__name__)
_tracer = tracer("sieve.moderator")

__all__ = ["BatchOutput", "Item", "Pipeline"]


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
        self.metrics = metrics or ModeratorMetrics()
        prefix, retention = settings.redis.key_prefix, settings.index.retention_s
        self.workers = Workers(settings.moderator.worker_processes)
        self.indexes: dict[str, RecentIndex] = {}
        self.banks = HashBankStore.configured(redis_client, prefix, settings.banks)
        self.verifier = Verifier(settings.verify)
        self.thresholds = ThresholdResolver(settings.decision, settings.banks, redis_client, prefix)
        embedding_banks = EmbeddingBanks(
            redis_client, prefix, settings.banks.sync_interval_s, self.verifier.keypoint_index
        )
        self.bank_rule = BankEmbeddingRule(self.thresholds, self.verifier)
        near_banks = NearBankMatcher(self.banks, embedding_banks, self.bank_rule, models.infer)
        feature_store = FeatureStore(redis_client, prefix, retention)
        self.keypoints = SharedKeypointIndex(feature_store, self.verifier.keypoint_index(), retention)
        processed = ProcessedEvents(redis_client, prefix, settings.moderator.dedup_ttl_s)

        self.redeliveries = Redeliveries(processed)
        self.preparer = Preparer(settings, fetcher or FetcherRegistry(settings.fetch), self.workers, sleep)
        self.fast_paths = FastPaths(self.banks, ExactMatchStore(redis_client, prefix, retention))
        self.inference = Inference(models, self.metrics, self.fast_paths)
        self.verify = VerifyStage(
            self.verifier,
            feature_store,
            KeypointChannel(self.verifier, self.keypoints),
            self.workers,
            self.metrics,
            models.infer,
        )
        self.assembler = Assembler(
            redis_client, prefix, ReviewSelector(redis_client, prefix, settings.review), near_banks, self.verifier
        )
        self.committer = Committer(
            settings,
            redis_client,
            lambda v: self.indexes[v],
            processed,
            self.fast_paths.exact,
            feature_store,
            self.keypoints,
        )

    def index_for(self, model_version: str, dim: int) -> RecentIndex:
        """One index per model version: embeddings of two versions never share an index."""
        index = self.indexes.get(model_version)
        if index is None:
            index = open_recent_index(self.settings, self.redis, model_version, dim)
            self.indexes[model_version] = index
        return index

    # -- ahead of the batch ---------------------------------------------------------------------------------

    def start_items(self, messages: list[Message]) -> list[Item]:
        return start_items(messages)

    def prepare(self, items: list[Item]) -> None:
        """Parse, fetch, decode and hash: reads nothing earlier batches wrote, so it runs ahead of ``run``."""
        self.preparer.prepare(items)

    def infer_ahead(self, items: list[Item]) -> None:
        self.inference.ahead(items)

    # -- the batch ------------------------------------------------------------------------------------------

    def run(self, items: list[Item]) -> BatchOutput:
        """Everything except publishing; raises TransientError when a shared dependency is down."""
        self.prepare(items)
        out = BatchOutput()
        todo = self.redeliveries.screen(items, out)
        ready = [i for i in todo if i.failure is None and i.image is not None]
        ready = self.fast_paths.answer(ready, out)
        if ready:
            for model_version, group in self.inference.by_version(ready).items():
                self._decide(model_version, group, out)
        for item in items:
            if item.failure is not None:
                out.dead_letters.append((dead_letter(item), item.span))
        return out

    def _decide(self, model_version: str, group: list[Item], out: BatchOutput) -> None:
        """Candidates, verification and the ordered decision of the items one model version answered."""
        assert group[0].inferred is not None
        index = self.index_for(model_version, int(group[0].inferred.result.embeddings.shape[1]))
        index.sync()
        if self.settings.verify.second_pass:
            self.keypoints.sync()
        cfg = self.decision_for(model_version)
        passes = first_pass(index, group, cfg.top_k)
        batch_features = {i.upload_id: i.image.features for i in group if i.image and i.image.features is not None}
        verified = self.verify.group(model_version, group, passes, cfg, index, batch_features)
        for item, first, checked in zip(group, passes, verified, strict=True):
            assert item.inferred is not None
            item.timings["infer_ms"] = round(item.inferred.infer_ms, 3)
            item.timings["search_ms"] = first.search_ms
            _child(
                item.span,
                "triton.infer",
                item.inferred.began_ns,
                item.inferred.ended_ns,
                {"sieve.model_version": model_version, "sieve.batch_size": item.inferred.batch_size},
            )
            _child(
                item.span,
                "index.search",
                first.began_ns,
                first.ended_ns,
                {"sieve.neighbours": len(checked.neighbours), "sieve.index_size": len(index)},
            )
        self.assembler.group(model_version, group, passes, verified, cfg, out)
        self.metrics.stage("index_search", sum(p.search_ms for p in passes) / 1000.0)
        self.metrics.index_size(model_version, len(index))

    def commit_index(self, out: BatchOutput) -> None:
        """After the verdicts are acknowledged: share the batch's embeddings and remember the events."""
        self.committer.commit(out)

    # -- settings -------------------------------------------------------------------------------------------

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

    def close(self) -> None:
        self.preparer.close()
        self.workers.close()


def _child(parent: Span, name: str, start_ns: int, end_ns: int, attributes: dict[str, str | int | float]) -> None:
    """A per-upload child span for a stage that ran once for the whole batch."""
    span = _tracer.start_span(
        name, context=trace.set_span_in_context(parent), start_time=start_ns, attributes=attributes
    )
    span.end(end_time=end_ns)
