"""``sieve trainer run``: consume reviewer labels, fine-tune when enough arrive, gate, promote, record why."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis
from numpy.typing import NDArray

from services.common.config import Settings
from services.common.errors import BadInput, TransientError
from services.common.fetch import FetcherRegistry
from services.common.imaging import decode_image
from services.common.promotions import PromotionLedger
from services.common.redis_client import connect
from services.common.thresholds import ThresholdResolver
from services.common.upload_keys import upload_uri_key
from services.trainer.admin_promotion import AdminPromotion
from services.trainer.feedback import FeedbackConsumer, FeedbackStore, LabelledPair
from services.trainer.finetune import PairBatch, finetune, rehearsal_choice, save_like_serving
from services.trainer.gate import gate
from services.trainer.promotion import ModelRepository, PromotionFailed, promote, record, window_entries
from services.trainer.promotion_consumer import PromotionConsumer

log = logging.getLogger(__name__)


class RetrainingJob:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.trainer
        self.store = FeedbackStore(self.cfg.workdir / "feedback")
        self.repo = ModelRepository(settings.stack.model_repo)
        self.log_path = self.cfg.workdir / "promotions.jsonl"
        self.redis = connect(settings.redis, timeout_s=60.0)  # backfills write whole windows
        self.fetcher = FetcherRegistry(settings.fetch)
        self.stop = threading.Event()
        self._trained_at_count = self.store.count()
        self._last_run = time.monotonic()
        self._benchmark: Any | None = None
        self.promotions = promotion_consumer(settings, self.redis)

    def due(self) -> bool:
        new = self.store.count() - self._trained_at_count
        if new >= self.cfg.min_new_labels:
            return True
        return new > 0 and time.monotonic() - self._last_run >= self.cfg.interval_s

    def run(self, max_iterations: int | None = None) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        consumer = FeedbackConsumer(self.settings.kafka, self.store)
        n = 0
        try:
            while not self.stop.is_set() and (max_iterations is None or n < max_iterations):
                n += 1
                added = consumer.poll(timeout_s=1.0)
                if added:
                    log.info("feedback: %d new labels (%d in total)", added, self.store.count())
                self.serve_promotion_requests()
                if self.due():
                    self.retrain()
        finally:
            consumer.close()

    def serve_promotion_requests(self) -> None:
        """Admin requests run between feedback polls, never during a retrain: one promotion at a time."""
        try:
            for done in self.promotions.poll():
                log.info("promotion request %s %s: %s", done.request_id, done.state.value, done.detail)
        except redis.RedisError as exc:
            log.warning("promotion requests unavailable (%s); retrying on the next poll", exc)

    def _pixels(self, uri: str) -> NDArray[np.uint8] | None:
        try:
            return decode_image(self.fetcher.fetch(uri), self.settings.decode, self.settings.triton.input_size).pixels
        except (BadInput, TransientError) as exc:
            log.warning("label image %s unavailable: %s", uri, exc)
            return None

    def gate_benchmark(self) -> Any | None:
        """The held-out photo benchmark (originals no model trained on), built once; None without the photo set."""
        if not self.cfg.gate_benchmark:
            return None
        if self._benchmark is None:
            from services.common.photos.build import load_photo_set
            from services.evaluation.benchmark import build_benchmark
            from services.evaluation.runner import BENCHMARK_SEED

            try:
                manifest = load_photo_set()
            except (FileNotFoundError, OSError) as exc:
                log.warning("no held-out photo benchmark for the gate (%s): it checks held-out labels only", exc)
                return None
            self._benchmark = build_benchmark(
                manifest, manifest.split("heldout"), "trainer-gate", seed=BENCHMARK_SEED, copies_per_family=1
            )
        return self._benchmark

    def rehearsal_pixels(self, serving: int, dim: int, labelled: set[str]) -> NDArray[np.uint8]:
        """A seeded sample of the serving index's retention window that no label mentions."""
        want = self.cfg.rehearsal_images
        empty = np.zeros((0, 256, 256, 3), np.uint8)
        if want <= 0:
            return empty
        try:
            entries = window_entries(self.settings, self.redis, f"{self.repo.model}:{serving}", dim)
        except (TransientError, redis.RedisError) as exc:
            log.warning("no rehearsal sample (%s): fine-tuning on the labels alone", exc)
            return empty
        ids = sorted(e.upload_id for e in entries if e.upload_id not in labelled)
        chosen = rehearsal_choice(ids, want)
        prefix = self.settings.redis.key_prefix
        uris = cast(list[bytes | None], self.redis.mget([upload_uri_key(prefix, u) for u in chosen])) if chosen else []
        pixels = [p for p in (self._pixels(u.decode()) for u in uris if u is not None) if p is not None]
        return np.stack(pixels) if pixels else empty

    def pair_batch(self, pairs: list[LabelledPair]) -> PairBatch:
        left, right, dup, left_ids, right_ids = [], [], [], [], []
        for pair in pairs:
            a, b = self._pixels(pair.image_uri), self._pixels(pair.other_uri)
            if a is not None and b is not None:
                left.append(a)
                right.append(b)
                dup.append(pair.duplicate)
                left_ids.append(pair.upload_id)
                right_ids.append(pair.other_id)
        empty = np.zeros((0, 256, 256, 3), np.uint8)
        return PairBatch(
            np.stack(left) if left else empty,
            np.stack(right) if right else empty,
            np.asarray(dup, bool),
            tuple(left_ids),
            tuple(right_ids),
        )

    def retrain(self, bench: Any | None = None) -> dict[str, Any]:
        """One fine-tune, gate and (maybe) promotion; always recorded with its reason."""
        from services.trainer.export import embed_fn, load_torchscript

        self._trained_at_count, self._last_run = self.store.count(), time.monotonic()
        serving = self.repo.serving()
        artifact = self.repo.dir / str(serving) / "model.pt"
        outcome: dict[str, Any]
        if not artifact.exists():
            outcome = {"event": "skipped", "why": f"version {serving} has no trainable artifact (model.pt)"}
            record(self.log_path, outcome)
            return outcome
        train = self.pair_batch(self.store.pairs(heldout=False))
        heldout = self.pair_batch(self.store.pairs(heldout=True))
        if len(train.duplicate) < 4:
            outcome = {"event": "skipped", "why": f"only {len(train.duplicate)} usable labelled pairs"}
            record(self.log_path, outcome)
            return outcome
        # The serving version's own thresholds, resolved as the moderator resolves them: the fine-tune pushes "not a
        # duplicate" pairs below the duplicate threshold, and the gate decides at it. The fine-tune keeps the
        # parent's scale, so both carry over to the new version (without a recorded bank threshold its banked
        # images would match only at the fallback).
        resolver = ThresholdResolver(
            self.settings.decision, self.settings.banks, self.redis, self.settings.redis.key_prefix
        )
        parent = f"{self.repo.model}:{serving}"
        threshold = resolver.duplicate(parent, overrides=False).value
        bank = resolver.bank(parent)
        bank_threshold = bank.value if bank.source != "SIEVE_BANKS_EMBEDDING_THRESHOLD" else None
        serving_module, meta = load_torchscript(artifact)
        candidate, _ = load_torchscript(artifact)
        dim = int(meta.get("embed_dim", 256))
        labelled = {
            *(train.left_ids or ()),
            *(train.right_ids or ()),
            *(heldout.left_ids or ()),
            *(heldout.right_ids or ()),
        }
        rehearsal = self.rehearsal_pixels(serving, dim, labelled)
        result = finetune(candidate, train, threshold, steps=self.cfg.finetune_steps, rehearsal=rehearsal)
        bench = bench if bench is not None else self.gate_benchmark()
        verdict = gate(
            embed_fn(serving_module), embed_fn(candidate), heldout, threshold, bench, self.cfg.gate_tolerance
        )
        outcome = {
            "event": "gated",
            "from_version": serving,
            "labels": self.store.count(),
            "train_pairs": len(train.duplicate),
            "heldout_pairs": len(heldout.duplicate),
            "rehearsal_images": len(rehearsal),
            "finetune": result.__dict__,
            "gate": verdict.__dict__,
        }
        if not verdict.promote:
            record(self.log_path, {**outcome, "event": "not_promoted"})
            return outcome
        staged = self.cfg.workdir / f"staged-{int(time.time())}"
        staged.mkdir(parents=True)
        shutil.copy2(self.repo.dir / str(serving) / "model.py", staged / "model.py")
        save_like_serving(candidate, staged / "model.pt", {**meta, "finetuned_from": serving})
        card = {
            "model": self.repo.model,
            "duplicate_threshold": threshold,
            "bank_embedding_threshold": bank_threshold,
            "finetuned_from": serving,
            "finetune": result.__dict__,
            "gate": verdict.__dict__,
        }
        (staged / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        try:
            version = promote(
                self.settings,
                self.redis,
                self.repo,
                staged,
                embed_fn(candidate),
                dim,
                self.log_path,
                {"gate": verdict.__dict__, "labels": self.store.count(), "duplicate_threshold": threshold},
                threshold=threshold,
                bank_threshold=bank_threshold,
            )
        except PromotionFailed as exc:  # undone: the serving version is unchanged
            outcome["promotion_failed"] = str(exc)
            return outcome
        outcome["promoted_version"] = version
        return outcome


def promotion_consumer(settings: Settings, client: redis.Redis) -> PromotionConsumer:
    """The admin's promotion requests, run through the retraining job's own promotion."""
    ledger = PromotionLedger(client, settings.redis.key_prefix)
    handler = AdminPromotion(settings, client, settings.trainer.workdir / "promotions.jsonl")
    return PromotionConsumer(ledger, handler)


def status(settings: Settings) -> dict[str, Any]:
    repo = ModelRepository(settings.stack.model_repo)
    log_path: Path = settings.trainer.workdir / "promotions.jsonl"
    history = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    requests: list[dict[str, Any]] | str
    try:
        client = connect(settings.redis)
        requests = [r.model_dump(mode="json") for r in PromotionLedger(client, settings.redis.key_prefix).recent(10)]
    except redis.RedisError as exc:
        requests = f"unavailable: {exc}"
    return {
        "serving": repo.serving(),
        "versions": repo.versions(),
        "history": history[-10:],
        "promotion_requests": requests,
    }
