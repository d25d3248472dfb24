"""The pieces of ``bench.learns`` that build and moderate a stream: photos, ground truth, the oracle reviewer.

Everything here runs the project's own code on the way: the evaluation benchmark's edit families make the
near-duplicate copies, the serving decoder turns every upload into wire pixels, ``decide`` and
``ReviewSelector`` build the review queue, and ``build_label`` (the reviewer service's validation) makes the
oracle's labels. Ground truth is known by construction: an upload is a duplicate exactly when an earlier upload
shows the same photo.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image
from torch import nn

from bench.common import precision_recall
from services.common.config import DecisionSettings, DecodeSettings
from services.common.imaging import decode_image
from services.common.index.base import IndexEntry
from services.common.index.faiss_index import FaissVectorIndex
from services.common.photos.build import Manifest, PhotoRecord
from services.common.schemas import Action, FeedbackLabel, ReviewReason, ReviewRequest
from services.common.transforms import encode_jpeg
from services.evaluation.benchmark import FAMILIES, FAMILY_EDITS, FAMILY_JPEG
from services.moderator.active_learning import Candidate, ReviewSelector
from services.moderator.decide import Decision, decide
from services.reviewer.labels import LabelBody, build_label, compared_neighbour
from services.trainer.augment import limit_side

# Groups whose photos look alike without being copies: several photos of one person, star fields.
HARD_SOURCES = ("dlib", "stellarium")
ORACLE = "oracle-reviewer"
EmbedFn = Callable[[NDArray[np.uint8]], NDArray[np.float32]]


# ------------------------------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class Upload:
    upload_id: str
    origin: str  # id of the photo it shows; two uploads are duplicates iff their origins agree
    source: str  # photo source (dlib, stellarium, gcompris, skimage)
    kind: str  # "original" or the edit family of a copy
    uri: str


@dataclass
class Stream:
    """Uploads in upload order with their wire pixels (uint8 256x256x3), as the moderator would decode them."""

    name: str
    uploads: list[Upload]
    pixels: NDArray[np.uint8]
    _by_id: dict[str, Upload] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {u.upload_id: u for u in self.uploads}

    def get(self, upload_id: str) -> Upload:
        return self._by_id[upload_id]

    def earlier_twins(self) -> list[set[str]]:
        """Per upload, the earlier uploads of the same photo: the matches a correct verdict may name."""
        seen: dict[str, set[str]] = {}
        out: list[set[str]] = []
        for u in self.uploads:
            twins = seen.setdefault(u.origin, set())
            out.append(set(twins))
            twins.add(u.upload_id)
        return out

    def describe(self) -> dict[str, Any]:
        twins = self.earlier_twins()
        hard = [u for u in self.uploads if u.source in HARD_SOURCES and u.kind == "original"]
        return {
            "uploads": len(self.uploads),
            "originals": sum(1 for u in self.uploads if u.kind == "original"),
            "copies": sum(1 for u in self.uploads if u.kind != "original"),
            "true_duplicates": sum(1 for t in twins if t),
            "hard_distractor_originals": len(hard),
            "by_source": {
                s: sum(1 for u in self.uploads if u.source == s) for s in sorted({u.source for u in self.uploads})
            },
        }


def _key(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def split_heldout(manifest: Manifest, seed: int, by: str, limit: int | None = None) -> tuple[list[PhotoRecord], ...]:
    """Two disjoint sets of held-out photos (never trained on, see the model card's splits).

    ``by="photo"`` deals each group's photos alternately to A and B, so the same people recur in the fresh
    stream (as they do on a real site); ``by="group"`` keeps each person (group) on one side, the stricter test
    of whether labels about one person generalise to another. ``limit`` caps each side (``--quick``) while
    keeping the hard sources in it.
    """
    sides: tuple[list[PhotoRecord], list[PhotoRecord]] = ([], [])
    for source in sorted({r.source for r in manifest.images}):
        records = [r for r in manifest.images if r.split == "heldout" and r.source == source]
        if by == "group":
            groups = sorted({r.group for r in records}, key=lambda g: _key(seed, g))
            side_of = {g: i % 2 for i, g in enumerate(groups)}
            for r in records:
                sides[side_of[r.group]].append(r)
        else:
            for i, r in enumerate(sorted(records, key=lambda r: (r.group, _key(seed, r.id)))):
                sides[i % 2].append(r)
    if limit is not None:
        out = []
        for side in sides:
            ordered = sorted(side, key=lambda r: (r.source not in HARD_SOURCES, _key(seed, "limit", r.id)))
            out.append(ordered[:limit])
        return tuple(out)
    return sides


def build_stream(
    name: str,
    manifest: Manifest,
    records: Sequence[PhotoRecord],
    folder: Path,
    decode: DecodeSettings,
    seed: int,
    max_copies: int = 2,
    input_size: int = 256,
) -> Stream:
    """Originals in a seeded order, each followed later by 1..max_copies edited copies (evaluation families).

    Every upload is written to ``folder`` and addressed by a file:// URI, so the trainer fetches and decodes the
    labelled images exactly as it does in production.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}:{name}:order")
    timed: list[tuple[float, Upload, bytes]] = []
    for record in sorted(records, key=lambda r: r.id):
        data = manifest.path_of(record).read_bytes()
        at = rng.random()
        original = Upload(f"{name}-{record.id[:12]}-o", record.id, record.source, "original", "")
        timed.append((at, original, data))
        edit_rng = random.Random(f"{seed}:{name}:{record.id}")
        copies = 1 + sum(1 for _ in range(max_copies - 1) if edit_rng.random() < 0.5)
        with Image.open(io.BytesIO(data)) as opened:
            base = limit_side(opened, 768)
        for c in range(copies):
            family = edit_rng.choice(FAMILIES)
            edited, _ = FAMILY_EDITS[family](base.copy(), edit_rng)
            jpeg = encode_jpeg(edited, edit_rng.randint(*FAMILY_JPEG[family]))
            copy = Upload(f"{name}-{record.id[:12]}-c{c}", record.id, record.source, family, "")
            timed.append((at + edit_rng.uniform(0.02, 0.6), copy, jpeg))
    timed.sort(key=lambda t: t[0])
    uploads: list[Upload] = []
    pixels: list[NDArray[np.uint8]] = []
    for _, upload, data in timed:
        path = folder / f"{upload.upload_id}.img"
        path.write_bytes(data)
        uploads.append(Upload(upload.upload_id, upload.origin, upload.source, upload.kind, path.resolve().as_uri()))
        pixels.append(decode_image(data, decode, input_size).pixels)
    return Stream(name, uploads, np.stack(pixels))


# ---------------------------------------------------------------------------- the embedder, trunk memoised


class FeatureCache:
    """The frozen part of the TorchScript embedder (normalise, STN warp, MobileNetV2 trunk), run once per image.

    Fine-tuning moves only ``pool.`` and ``reduce.`` (services/trainer/finetune.py), so the trunk's feature
    map of an image is the same for the serving model and for every candidate; computing it once makes
    ~30 fine-tunes and replays affordable on 2 CPU cores. The results equal the full forward (tested).
    """

    def __init__(self, frozen: torch.jit.ScriptModule) -> None:
        self.frozen = frozen.eval()
        self._maps: dict[bytes, torch.Tensor] = {}
        self.computed = 0

    @staticmethod
    def key(image: NDArray[np.uint8]) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()

    def maps(self, images: NDArray[np.uint8], batch: int = 32) -> torch.Tensor:
        keys = [self.key(img) for img in images]
        missing = [i for i, k in enumerate(keys) if k not in self._maps]
        m = self.frozen
        for start in range(0, len(missing), batch):
            rows = missing[start : start + batch]
            with torch.no_grad():
                x = m.normalise(torch.from_numpy(np.ascontiguousarray(images[rows])))
                warped = m.warp(x, m.predict_theta(x), int(m.input_size))
                out = m.features(warped)
            for i, row in enumerate(rows):
                self._maps[keys[row]] = out[i]
            self.computed += len(rows)
        return torch.stack([self._maps[k] for k in keys])


class CachedEmbedder(nn.Module):
    """uint8 NHWC -> L2-normalised embedding, like the TorchScript model, with the trunk from a FeatureCache.

    Its children are the scripted model's own ``pool`` and ``reduce``, so ``finetune`` (which trains the
    parameters named ``pool.*``/``reduce.*``) updates the TorchScript module in place, ready to be saved.
    """

    def __init__(self, scripted: torch.jit.ScriptModule, cache: FeatureCache) -> None:
        super().__init__()
        self.pool = scripted.pool
        self.reduce = scripted.reduce
        self.scripted = [scripted]  # a list: not a child, so .train() never reaches the trunk's BatchNorm
        self.cache = cache

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.cache.maps(images.numpy())
        out: torch.Tensor = F.normalize(self.reduce(self.pool(maps)), dim=1)
        return out

    def embed(self, pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
        with torch.no_grad():
            out = np.concatenate(
                [self(torch.from_numpy(pixels[s : s + 64])).numpy() for s in range(0, len(pixels), 64)]
            )
        return np.asarray(out, dtype=np.float32)


# -------------------------------------------------------------------------------------------- moderation


@dataclass
class ModerationPass:
    """One model's verdicts on a stream, and the review queue its decisions and ReviewSelector produced."""

    model_version: str
    decisions: list[Decision]
    queue: list[ReviewRequest]  # selected for review, highest priority first (the reviewers' claim order)
    skipped: dict[str, int]  # why candidates were not queued


def moderate(
    stream: Stream,
    embeddings: NDArray[np.float32],
    scores: Sequence[dict[str, float]],
    cfg: DecisionSettings,
    selector: ReviewSelector,
    model_version: str,
    batch_size: int = 16,
    uploads_per_s: float = 1.0,
) -> ModerationPass:
    """The moderator's model path in upload order: search the earlier uploads, ``decide``, select reviews per batch.

    As in services/moderator/pipeline.py: later items of a batch see earlier ones, review candidates of a
    batch go through ``ReviewSelector.select`` together (its budget and diversity state live in Redis), and
    the batch clock advances with the upload rate so the per-minute budget applies as it would live.
    """
    index = FaissVectorIndex(int(embeddings.shape[1]))
    decisions: list[Decision] = []
    actions: dict[str, str] = {}
    queue: list[tuple[float, int, ReviewRequest]] = []
    skipped: dict[str, int] = {}
    for start in range(0, len(stream.uploads), batch_size):
        now = 1_700_000_000.0 + start / uploads_per_s
        batch: list[tuple[Upload, Decision]] = []
        for row in range(start, min(start + batch_size, len(stream.uploads))):
            upload = stream.uploads[row]
            neighbours = index.search(embeddings[row : row + 1], cfg.top_k)[0]
            twins = {n.upload_id: actions[n.upload_id] for n in neighbours if n.score >= cfg.duplicate_threshold}
            decision = decide(neighbours, dict(scores[row]), cfg, twins)
            actions[upload.upload_id] = decision.action.value
            index.add([IndexEntry(upload.upload_id, embeddings[row], now)])
            decisions.append(decision)
            batch.append((upload, decision))
        candidates = [
            Candidate(u.upload_id, d.review_priority, d.neighbours, {}) for u, d in batch if d.review_reason is not None
        ]
        chosen = {c.upload_id: c for c in selector.select(candidates, now=now)} if candidates else {}
        for upload, decision in batch:
            c = chosen.get(upload.upload_id)
            if c is None or decision.review_reason is None:
                continue
            if not c.selected:
                reason = c.skipped_because.split(":", 1)[0]
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            request = ReviewRequest(
                upload_id=upload.upload_id,
                image_uri=upload.uri,
                reason=decision.review_reason,
                priority=c.priority,
                scores=decision.flags,
                neighbours=decision.neighbours,
                model_version=model_version,
            )
            queue.append((c.priority, len(queue), request))
    queue.sort(key=lambda q: (-q[0], q[1]))
    return ModerationPass(model_version, decisions, [q[2] for q in queue], skipped)


def score_pass(stream: Stream, decisions: Sequence[Decision]) -> dict[str, Any]:
    """Duplicate verdicts against ground truth, per upload: a verdict is right when its best match is a true twin.

    A duplicate verdict naming the wrong upload counts as a false positive (and, if the upload had a twin, a
    miss). ``false_matches_hard`` counts hard distractors (faces, star fields that are originals) declared a
    duplicate: the failure that keeps v2 from being served.
    """
    twins = stream.earlier_twins()
    tp = fp = fn = 0
    hard_false = wrong_pairs = review = blocked = 0
    for upload, truth, d in zip(stream.uploads, twins, decisions, strict=True):
        predicted = bool(d.duplicate_of)
        correct = predicted and d.duplicate_of[0].upload_id in truth
        tp += int(correct)
        fp += int(predicted and not correct)
        fn += int(bool(truth) and not correct)
        wrong_pairs += sum(1 for m in d.duplicate_of if m.upload_id not in truth)
        if predicted and not truth and upload.source in HARD_SOURCES:
            hard_false += 1
        review += int(d.review_reason is not None)
        blocked += int(d.action is Action.BLOCK)
    return {
        **precision_recall(tp, fp, fn),
        "false_matches_hard": hard_false,
        "false_match_pairs": wrong_pairs,
        "review_candidates": review,
        "blocked": blocked,
    }


# ---------------------------------------------------------------------------------------------- the oracle


def oracle_label(request: ReviewRequest, stream: Stream) -> FeedbackLabel | None:
    """A reviewer who knows the ground truth: "duplicate of X" for a true twin among the neighbours shown, else
    "not a duplicate" (of the top neighbour). Built by the reviewer service's ``build_label``, with the compared
    image's URI as its Labeller looks it up, so the trainer gets exactly what a real reviewer's label carries.
    """
    if not request.neighbours:
        return None
    origin = stream.get(request.upload_id).origin
    twins = [n.upload_id for n in request.neighbours if stream.get(n.upload_id).origin == origin]
    body = LabelBody(duplicate_of=twins[0]) if twins else LabelBody(not_duplicate=True)
    compared = compared_neighbour(body, request)
    compared_uri = stream.get(compared).uri if compared else None
    return build_label(body, request, ORACLE, sorted(request.scores), compared_uri)


def random_requests(stream: Stream, moderated: ModerationPass, n: int, seed: int) -> list[ReviewRequest]:
    """The baseline: n uploads drawn uniformly (seeded) from those with a neighbour to compare with."""
    eligible = [i for i, d in enumerate(moderated.decisions) if d.neighbours]
    rows = sorted(random.Random(f"random:{seed}").sample(eligible, min(n, len(eligible))))
    out = []
    for row in rows:
        d, u = moderated.decisions[row], stream.uploads[row]
        out.append(
            ReviewRequest(
                upload_id=u.upload_id,
                image_uri=u.uri,
                reason=d.review_reason or ReviewReason.NEAR_THRESHOLD_DUPLICATE,  # the field is required
                priority=d.review_priority,
                scores=d.flags,
                neighbours=d.neighbours,
                model_version=moderated.model_version,
            )
        )
    return out


def label_summary(labels: Sequence[FeedbackLabel], stream: Stream) -> dict[str, int]:
    return {
        "labels": len(labels),
        "duplicate": sum(1 for lb in labels if lb.duplicate_of),
        "not_duplicate": sum(1 for lb in labels if lb.not_duplicate),
        "hard_distractor_items": sum(1 for lb in labels if stream.get(lb.upload_id).source in HARD_SOURCES),
    }
