"""When a banked image's nearest embedding is a match: the recent index's keypoint check has the last word.

Cosine alone over-matches images of one kind (two nebulae, two hammers, two photos of one monument): an
embedding trained for copies still puts look-alikes close. A bank match acts without a reviewer, so it must be
a copy. Each candidate within reach of its threshold is verified with the keypoints banked with the image, and
the score compared with the bank's threshold is ``Verifier.score``'s fused score (cosine, plus the inlier bonus,
minus the miss penalty when both images are keypoint-rich and no geometry agrees): the same score, and the same
meaning of a threshold, as the version's duplicate threshold for the recent index. Where either side has no
keypoints (verification off, an image banked before keypoints were kept) the fused score is the cosine.

One rule for the moderator (the upload against banked images) and for retroactive actioning (a banked image
against recent uploads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.common.config import BankSettings
from services.common.index.base import Neighbour
from services.common.verification import LocalFeatures, QueryFeatures, Verifier


@dataclass(frozen=True)
class Judged:
    """One candidate's verdict under the rule; ``inliers`` is None when it could not be verified."""

    key: str  # the candidate's id: ``<bank>/<item id>`` in the moderator, an upload id in retro
    cosine: float
    score: float  # fused; the cosine when unverified
    inliers: int | None
    matched: bool


class BankEmbeddingRule:
    def __init__(self, settings: BankSettings, verifier: Verifier) -> None:
        self.settings = settings
        self.verifier = verifier

    def threshold(self, model_version: str, own: float | None) -> float:
        """The bank's own threshold, else the version's (SIEVE_BANKS_EMBEDDING_THRESHOLDS), else the default."""
        if own is not None:
            return own
        return self.settings.embedding_thresholds.get(model_version, self.settings.embedding_threshold)

    def reach(self, threshold: float) -> float:
        return self.verifier.reach(threshold)

    def judge(
        self,
        query: QueryFeatures | None,
        candidates: Sequence[Neighbour],
        thresholds: Mapping[str, float],
        references: Mapping[str, LocalFeatures],
    ) -> list[Judged]:
        """``candidates`` most similar first, each with its threshold in ``thresholds`` (by key)."""
        verified = {}
        if query is not None and self.verifier.settings.enabled:
            verified = {v.upload_id: v for v in self.verifier.verify(query, candidates, references)}
        out = []
        for c in candidates:
            v = verified.get(c.upload_id)
            score = v.score if v is not None else c.score
            inliers = v.inliers if v is not None else None
            out.append(Judged(c.upload_id, c.score, score, inliers, score >= thresholds[c.upload_id]))
        return out
