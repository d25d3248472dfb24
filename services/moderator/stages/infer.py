"""Triton: embeddings and flag scores for a batch, ahead of its decision where possible."""

from __future__ import annotations

import logging
import time

import numpy as np

from services.common.errors import TransientError
from services.common.inference import ImageModels
from services.common.timing import elapsed_ms
from services.moderator.metrics import ModeratorMetrics
from services.moderator.stages.envelope import Inferred, Item
from services.moderator.stages.fast_path import FastPaths

log = logging.getLogger(__name__)


class Inference:
    def __init__(self, models: ImageModels, metrics: ModeratorMetrics, fast_paths: FastPaths) -> None:
        self.models = models
        self.metrics = metrics
        self.fast_paths = fast_paths

    def ahead(self, items: list[Item]) -> None:
        """Embeds a prepared batch while the previous one is still being decided.

        Deciding (index search, keypoint verification) is CPU work; without this, Triton sits idle through it.
        Items a fast path will answer are left out. Whatever is not inferred here (Triton down, a fast path that
        no longer applies) is inferred in line by ``by_version``, so a failure here costs only time.
        """
        wanted = [
            i
            for i in items
            if i.prepared
            and i.failure is None
            and i.image is not None
            and i.inferred is None
            and not self.fast_paths.likely(i)
        ]
        if not wanted:
            return
        try:
            self._infer(wanted)
        except TransientError as exc:
            log.info("inference ahead failed (%s); the batch will be inferred in line", exc)

    def by_version(self, ready: list[Item]) -> dict[str, list[Item]]:
        """Every item inferred (in line, if it was not ahead), grouped by the model version that answered, in
        arrival order: a batch answered by two versions is decided per version, each in its own index."""
        missing = [i for i in ready if i.inferred is None]
        if missing:
            self._infer(missing)
        versions: dict[str, list[Item]] = {}
        for item in ready:
            assert item.inferred is not None
            versions.setdefault(item.inferred.model_version, []).append(item)
        return versions

    def _infer(self, items: list[Item]) -> None:
        batch = np.stack([i.image.pixels for i in items if i.image is not None])
        t0 = time.time_ns()
        began = time.perf_counter()
        result = self.models.infer(batch)
        infer_ms = elapsed_ms(began)
        t1 = time.time_ns()
        self.metrics.stage("triton", infer_ms / 1000.0)
        for row, item in enumerate(items):
            item.inferred = Inferred(result, row, t0, t1, infer_ms, len(items))
