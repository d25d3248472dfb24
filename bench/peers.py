"""Peers on the same stream: Sieve's matcher beside PicNix-style clustering, a naive scan and PDQ + FAISS (HMA).

The stream: real photos from the photo set in a shuffled order, with planted near-duplicates of some of them
inserted at random later positions: the five ``services.common.transforms.NEAR_DUPLICATES`` edits plus six
stronger ones (60% crop, 10 degree rotation, mirror, a meme caption bar, a framed border, grayscale). Each
item is matched against everything before it, then added, as a streaming service does. Ground truth: a
planted copy must match an earlier item of its own scene (the photo set's ``group``; its original is always
earlier); any match to another scene, or to the synthetic background, is a false positive.

Each method's matching step is timed per item (search + add); the feature cost is timed separately:

- ``sieve``: the serving embedder in-process (batches of 16, the moderator's batch) on ``decode_image``
  pixels, then Sieve's own ``FaissVectorIndex`` (exact inner product) with ``duplicate_threshold``;
- ``naive-scan``: the same embeddings, a numpy brute-force dot product against every stored vector;
- ``picnix``: the same embeddings in the PicNix paper's scheme: an item joins the nearest cluster centre if
  its cosine similarity to it is at least ``join_similarity``, otherwise it becomes a new centre; a query
  scans linearly only the members of the ``probe`` nearest clusters;
- ``pdq-hma``: Meta's PDQ (pdqhash) on the full-resolution decoded image, as python-threatexchange's
  ``pdq_hasher`` does, 256-bit hashes in a faiss ``IndexBinaryFlat`` (and ``IndexBinaryHNSW``), a match at
  Hamming distance <= 31 (HMA's ``PDQ_CONFIDENT_MATCH_THRESHOLD``).

The stream is run twice per method: alone, and after a synthetic background is inserted first (random PDQ
hashes; clustered unit vectors for the embeddings) so the matching step works against a non-trivial index.
"""

from __future__ import annotations

import io
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont, ImageOps

from bench.common import (
    Progress,
    StageResult,
    configure_torch_threads,
    load_serving_embedder,
    main_for,
    percentile,
    precision_recall,
)
from services.common.transforms import NEAR_DUPLICATES, Transform, crop, encode_jpeg

PDQ_THRESHOLD = 31
EMBED_BATCH = 16


# -------------------------------------------------------------------------------------------------- stream


def rotate(degrees: float) -> Transform:
    def apply(img: Image.Image) -> Image.Image:
        return img.convert("RGB").rotate(degrees, resample=Image.Resampling.BILINEAR, expand=False)

    return apply


def mirror(img: Image.Image) -> Image.Image:
    return ImageOps.mirror(img.convert("RGB"))


def caption(img: Image.Image) -> Image.Image:
    """A meme-style caption bar across the top fifth of the picture."""
    out = img.convert("RGB").copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, 0, w, h // 5), fill=(255, 255, 255))
    font = ImageFont.load_default(size=max(10, h // 14))
    draw.text((w // 20, h // 20), "WHEN THE BENCHMARK PASSES", fill=(0, 0, 0), font=font)
    return out


def border(img: Image.Image) -> Image.Image:
    rgb = img.convert("RGB")
    pad = max(rgb.size) // 8
    return ImageOps.expand(rgb, border=pad, fill=(20, 20, 20))


def grayscale(img: Image.Image) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


STRONG_EDITS: dict[str, Transform] = {
    "crop60": crop(0.6),
    "rotate10": rotate(10.0),
    "mirror": mirror,
    "caption": caption,
    "border": border,
    "grayscale": grayscale,
}
EDITS: dict[str, Transform] = {**NEAR_DUPLICATES, **STRONG_EDITS}


@dataclass(frozen=True)
class StreamItem:
    item_id: str
    family: str  # the scene: the photo set's group (frames of one clip share it)
    edit: str | None  # None for an original upload
    data: bytes


def build_stream(n_originals: int, n_planted: int, seed: int = 6) -> list[StreamItem]:
    from services.common.photos.build import load_photo_set

    manifest = load_photo_set()
    rng = random.Random(seed)
    records = sorted(manifest.images, key=lambda r: r.id)
    rng.shuffle(records)
    records = records[:n_originals]
    stream: list[StreamItem] = [StreamItem(r.id, r.group, None, manifest.path_of(r).read_bytes()) for r in records]
    for r in rng.sample(records, min(n_planted, len(records))):
        with Image.open(manifest.path_of(r)) as im:
            original = im.convert("RGB")
        for name, edit in EDITS.items():
            copy = StreamItem(f"{r.id}~{name}", r.group, name, encode_jpeg(edit(original), quality=90))
            at = next(i for i, s in enumerate(stream) if s.item_id == r.id)
            stream.insert(rng.randint(at + 1, len(stream)), copy)
    return stream


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class StreamScore:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    same_scene_original_matches: int = 0
    per_edit: dict[str, list[int]] = field(default_factory=dict)  # edit -> [found, planted]

    def to_dict(self) -> dict[str, Any]:
        return {
            **precision_recall(self.tp, self.fp, self.fn),
            "same_scene_original_matches": self.same_scene_original_matches,
            "recall_by_edit": {e: round(f / n, 3) for e, (f, n) in sorted(self.per_edit.items())},
        }


def score_stream(items: Sequence[StreamItem], matches: Sequence[str | None], families: dict[str, str]) -> StreamScore:
    """Score each item's decision (the matched item id, or None) against the planted ground truth.

    ``families`` maps every id that can be matched (stream items and background) to its scene; background
    ids map to a scene no stream item has.
    """
    score = StreamScore()
    for item, match in zip(items, matches, strict=True):
        same = match is not None and families.get(match) == item.family
        if item.edit is None:
            if match is not None and same:
                score.same_scene_original_matches += 1  # another shot of the same scene: not planted, not wrong
            elif match is not None:
                score.fp += 1
            continue
        found_planted = score.per_edit.setdefault(item.edit, [0, 0])
        found_planted[1] += 1
        if same:
            score.tp += 1
            found_planted[0] += 1
        else:
            score.fn += 1
            if match is not None:
                score.fp += 1
    return score


# ------------------------------------------------------------------------------------------------ matchers


class Matcher(Protocol):
    name: str

    def match_and_add(self, item_id: str, feature: NDArray[Any]) -> str | None: ...

    def prefill(self, ids: list[str], features: NDArray[Any]) -> None: ...


class PicNixIndex:
    """Leader clustering with a radius, then a linear scan inside the nearest few clusters (PicNix).

    An item whose cosine similarity to every centre is below ``join_similarity`` (it is farther than the
    radius from all of them) becomes a new centre; otherwise it joins the nearest centre's cluster. Centres
    stay where they were created. A query compares itself with all centres, then scans the members of the
    ``probe`` nearest clusters and returns the most similar member.
    """

    def __init__(self, dim: int, join_similarity: float, probe: int, capacity: int = 1024) -> None:
        if not -1.0 <= join_similarity <= 1.0:
            raise ValueError("join_similarity is a cosine similarity in [-1, 1]")
        if probe < 1:
            raise ValueError("probe must be at least 1")
        self.dim = dim
        self.join_similarity = join_similarity
        self.probe = probe
        self._vectors = np.empty((capacity, dim), dtype=np.float32)
        self._centres = np.empty((capacity, dim), dtype=np.float32)
        self.n_items = 0
        self.n_centres = 0
        self.members: list[list[int]] = []

    def _centre_sims(self, v: NDArray[np.float32]) -> NDArray[np.float32]:
        return np.asarray(self._centres[: self.n_centres] @ v, dtype=np.float32)

    def search(self, v: NDArray[np.float32], centre_sims: NDArray[np.float32] | None = None) -> tuple[int, float, int]:
        """(best item index or -1, its similarity, members scanned)."""
        if self.n_centres == 0:
            return -1, float("-inf"), 0
        sims = self._centre_sims(v) if centre_sims is None else centre_sims
        k = min(self.probe, self.n_centres)
        nearest = np.argpartition(-sims, k - 1)[:k] if k < self.n_centres else np.arange(self.n_centres)
        ids = np.fromiter((i for c in nearest for i in self.members[c]), dtype=np.int64)
        if len(ids) == 0:
            return -1, float("-inf"), 0
        member_sims = self._vectors[ids] @ v
        best = int(np.argmax(member_sims))
        return int(ids[best]), float(member_sims[best]), len(ids)

    def add(self, v: NDArray[np.float32], centre_sims: NDArray[np.float32] | None = None) -> int:
        """Stores v; returns its cluster (a new one when it is farther than the radius from every centre)."""
        if self.n_items == len(self._vectors):
            self._vectors = np.concatenate([self._vectors, np.empty_like(self._vectors)])
        idx = self.n_items
        self._vectors[idx] = v
        self.n_items += 1
        sims = self._centre_sims(v) if centre_sims is None else centre_sims
        if self.n_centres and float(sims.max()) >= self.join_similarity:
            cluster = int(np.argmax(sims))
            self.members[cluster].append(idx)
            return cluster
        if self.n_centres == len(self._centres):
            self._centres = np.concatenate([self._centres, np.empty_like(self._centres)])
        self._centres[self.n_centres] = v
        self.members.append([idx])
        self.n_centres += 1
        return self.n_centres - 1

    def search_and_add(self, v: NDArray[np.float32]) -> tuple[int, float, int]:
        """A streaming step: the best earlier match, then v is stored (one centre comparison for both)."""
        sims = self._centre_sims(v)
        found = self.search(v, sims)
        self.add(v, sims)
        return found


class PicNixMatcher:
    def __init__(self, dim: int, threshold: float, join_similarity: float, probe: int) -> None:
        self.name = f"picnix (join>={join_similarity}, probe {probe})"
        self.index = PicNixIndex(dim, join_similarity, probe)
        self.threshold = threshold
        self.ids: list[str] = []
        self.scanned: list[int] = []

    def match_and_add(self, item_id: str, feature: NDArray[Any]) -> str | None:
        best, sim, scanned = self.index.search_and_add(np.asarray(feature, dtype=np.float32))
        self.ids.append(item_id)
        self.scanned.append(scanned)
        return self.ids[best] if best >= 0 and sim >= self.threshold else None

    def prefill(self, ids: list[str], features: NDArray[Any]) -> None:
        for item_id, vec in zip(ids, features, strict=True):
            self.index.add(np.asarray(vec, dtype=np.float32))  # clustering is sequential by design
            self.ids.append(item_id)


class NaiveScanMatcher:
    def __init__(self, dim: int, threshold: float, capacity: int = 1024) -> None:
        self.name = "naive-scan (numpy)"
        self.threshold = threshold
        self._vectors = np.empty((capacity, dim), dtype=np.float32)
        self.ids: list[str] = []

    def match_and_add(self, item_id: str, feature: NDArray[Any]) -> str | None:
        n = len(self.ids)
        found: str | None = None
        if n:
            sims = self._vectors[:n] @ feature
            best = int(np.argmax(sims))
            found = self.ids[best] if float(sims[best]) >= self.threshold else None
        if n == len(self._vectors):
            self._vectors = np.concatenate([self._vectors, np.empty_like(self._vectors)])
        self._vectors[n] = feature
        self.ids.append(item_id)
        return found

    def prefill(self, ids: list[str], features: NDArray[Any]) -> None:
        n = len(self.ids)
        if n + len(ids) > len(self._vectors):
            grown = np.empty((2 * (n + len(ids)), self._vectors.shape[1]), dtype=np.float32)
            grown[:n] = self._vectors[:n]
            self._vectors = grown
        self._vectors[n : n + len(ids)] = features
        self.ids.extend(ids)


class SieveMatcher:
    """Sieve's own index class (IndexIDMap2(IndexFlatIP)) and decision threshold."""

    def __init__(self, dim: int, threshold: float, top_k: int) -> None:
        from services.common.index.faiss_index import FaissVectorIndex

        self.name = "sieve (FaissVectorIndex, Flat IP)"
        self.index = FaissVectorIndex(dim)
        self.threshold = threshold
        self.top_k = top_k
        self.now = time.time()

    def match_and_add(self, item_id: str, feature: NDArray[Any]) -> str | None:
        from services.common.index.base import IndexEntry

        hits = self.index.search(feature[None, :], self.top_k)[0]
        self.index.add([IndexEntry(item_id, feature, self.now)])
        return hits[0].upload_id if hits and hits[0].score >= self.threshold else None

    def prefill(self, ids: list[str], features: NDArray[Any]) -> None:
        from services.common.index.base import IndexEntry

        self.index.add([IndexEntry(i, v, self.now) for i, v in zip(ids, features, strict=True)])


class PdqMatcher:
    """HMA's matcher: 256-bit PDQ hashes in a faiss binary index, a match at Hamming distance <= 31."""

    def __init__(self, kind: str, threshold: int = PDQ_THRESHOLD) -> None:
        import faiss

        self.name = f"pdq-hma ({kind})"
        self.index = faiss.IndexBinaryFlat(256) if kind == "IndexBinaryFlat" else faiss.IndexBinaryHNSW(256, 16)
        self.threshold = threshold
        self.ids: list[str] = []

    def match_and_add(self, item_id: str, feature: NDArray[Any]) -> str | None:
        code = feature[None, :]
        found: str | None = None
        if self.ids:
            dist, idx = self.index.search(code, 1)
            if idx[0, 0] >= 0 and int(dist[0, 0]) <= self.threshold:
                found = self.ids[int(idx[0, 0])]
        self.index.add(code)
        self.ids.append(item_id)
        return found

    def prefill(self, ids: list[str], features: NDArray[Any]) -> None:
        self.index.add(np.ascontiguousarray(features, dtype=np.uint8))
        self.ids.extend(ids)


# ------------------------------------------------------------------------------------------------ features


def pdq_hash(data: bytes) -> tuple[NDArray[np.uint8], int]:
    """As python-threatexchange's pdq_hasher: the decoded image at full resolution into pdqhash.compute."""
    import pdqhash

    image: Image.Image = Image.open(io.BytesIO(data))
    if image.mode != "RGB":
        image = image.convert("RGB")
    bits, quality = pdqhash.compute(np.asarray(image))
    return np.packbits(np.asarray(bits, dtype=np.uint8)), int(quality)


@dataclass
class Features:
    embeddings: NDArray[np.float32]
    pdq: NDArray[np.uint8]
    pdq_quality: list[int]
    costs: dict[str, dict[str, float]]
    embedder: dict[str, Any]


def extract_features(items: Sequence[StreamItem], say: Progress) -> Features:
    from services.common.config import DecodeSettings
    from services.common.imaging import decode_image

    settings = DecodeSettings()
    decode_s: list[float] = []
    pixels = []
    for item in items:
        t0 = time.perf_counter()
        pixels.append(decode_image(item.data, settings).pixels)
        decode_s.append(time.perf_counter() - t0)
    say(f"decoded {len(items)} items for the embedder")

    embedder = load_serving_embedder()
    threads = pick_torch_threads(embedder, np.stack(pixels[:EMBED_BATCH]))
    batch = np.stack(pixels)
    embed_s = 0.0
    chunks = []
    for off in range(0, len(batch), EMBED_BATCH):
        t0 = time.perf_counter()
        chunks.append(embedder.embed(batch[off : off + EMBED_BATCH]))
        embed_s += time.perf_counter() - t0
    embeddings = np.concatenate(chunks)
    say(f"embedded with v{embedder.version} ({embedder.kind}, dim {embedder.dim}, {threads} torch threads)")

    hash_s: list[float] = []
    codes = []
    quality = []
    for item in items:
        t0 = time.perf_counter()
        code, q = pdq_hash(item.data)
        hash_s.append(time.perf_counter() - t0)
        codes.append(code)
        quality.append(q)
    say(f"PDQ-hashed {len(items)} items")
    n = len(items)
    costs = {
        "embedding (decode_image + serving embedder, batch 16)": {
            "decode_ms_per_item": round(1000 * sum(decode_s) / n, 3),
            "embed_ms_per_item": round(1000 * embed_s / n, 3),
            "ms_per_item": round(1000 * (sum(decode_s) + embed_s) / n, 3),
            "torch_threads": threads,
        },
        "pdq (full decode + pdqhash.compute)": {
            "ms_per_item": round(1000 * sum(hash_s) / n, 3),
            "p99_ms": round(1000 * percentile(hash_s, 99), 3),
        },
    }
    return Features(embeddings, np.stack(codes), quality, costs, embedder.describe())


def pick_torch_threads(embedder: Any, sample: NDArray[np.uint8]) -> int:
    """1 or all cores, whichever embeds a batch faster right now (OpenMP spinning hurts on a shared machine)."""
    import torch

    cores = configure_torch_threads()
    best, best_t = cores, float("inf")
    for n in sorted({1, cores}):
        torch.set_num_threads(n)
        embedder.embed(sample)
        t0 = time.perf_counter()
        embedder.embed(sample)
        if (elapsed := time.perf_counter() - t0) < best_t:
            best, best_t = n, elapsed
    torch.set_num_threads(best)
    return best


# ------------------------------------------------------------------------------------------------------ run


def run_matcher(
    matcher: Matcher,
    items: Sequence[StreamItem],
    features: NDArray[Any],
    background: NDArray[Any] | None,
) -> tuple[list[str | None], list[float], float]:
    """(decisions, per-item matching seconds, seconds spent inserting the background)."""
    t_bg = 0.0
    if background is not None:
        t0 = time.perf_counter()
        matcher.prefill([f"background-{i}" for i in range(len(background))], background)
        t_bg = time.perf_counter() - t0
    decisions: list[str | None] = []
    times: list[float] = []
    for item, vec in zip(items, features, strict=True):
        t0 = time.perf_counter()
        decisions.append(matcher.match_and_add(item.item_id, vec))
        times.append(time.perf_counter() - t0)
    return decisions, times, t_bg


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    """Per method, on the stream alone: accuracy, matching items/s and feature cost per item."""
    keys = ("precision", "recall", "f1", "match_items_per_s", "feature_ms_per_item", "items_per_s_one_core")
    return {r["method"]: {k: r[k] for k in keys} for r in out["rows"] if r["background_items"] == 0}


def run(quick: bool = False) -> dict[str, Any]:
    from bench.stage_faiss import ClusteredVectors
    from services.common.config import DecisionSettings

    say = Progress("peers")
    result = StageResult("peers", "Peers on the same stream: Sieve vs PicNix, naive scan, PDQ + FAISS (HMA)", quick)
    result.begin()
    n_originals, n_planted, n_background = (40, 10, 1_000) if quick else (610, 150, 20_000)
    items = build_stream(n_originals, n_planted)
    n_copies = sum(1 for i in items if i.edit)
    say(f"stream: {len(items)} items, {n_copies} planted copies of {n_planted} originals, {len(EDITS)} edits")
    feats = extract_features(items, say)
    decision = DecisionSettings()
    dim = feats.embeddings.shape[1]
    join_similarity, probe = 0.75, 3

    rng = np.random.default_rng(6)
    bg_vectors = ClusteredVectors(dim, n_clusters=500, seed=99).block(0, n_background)
    bg_hashes = rng.integers(0, 256, size=(n_background, 32), dtype=np.uint8)
    families = {i.item_id: i.family for i in items} | {f"background-{i}": "background" for i in range(n_background)}

    import faiss

    default_threads = faiss.omp_get_max_threads()
    makers: list[tuple[str, Callable[[], Matcher], NDArray[Any], NDArray[Any], str]] = [
        (
            "sieve",
            lambda: SieveMatcher(dim, decision.duplicate_threshold, decision.top_k),
            feats.embeddings,
            bg_vectors,
            "embedding",
        ),
        (
            f"sieve (faiss {default_threads} threads)",
            lambda: SieveMatcher(dim, decision.duplicate_threshold, decision.top_k),
            feats.embeddings,
            bg_vectors,
            "embedding",
        ),
        (
            "naive-scan",
            lambda: NaiveScanMatcher(dim, decision.duplicate_threshold),
            feats.embeddings,
            bg_vectors,
            "embedding",
        ),
        (
            "picnix",
            lambda: PicNixMatcher(dim, decision.duplicate_threshold, join_similarity, probe),
            feats.embeddings,
            bg_vectors,
            "embedding",
        ),
        ("pdq-hma", lambda: PdqMatcher("IndexBinaryFlat"), feats.pdq, bg_hashes, "pdq"),
        ("pdq-hma-hnsw", lambda: PdqMatcher("IndexBinaryHNSW"), feats.pdq, bg_hashes, "pdq"),
    ]
    cost_key = {
        "embedding": "embedding (decode_image + serving embedder, batch 16)",
        "pdq": "pdq (full decode + pdqhash.compute)",
    }
    for method, make, features, background, feature_kind in makers:
        # One FAISS thread for every matcher (numpy's scan is single-threaded at these sizes too), except the
        # row that shows what FAISS's OpenMP default costs per single-vector call on a shared machine.
        threads = default_threads if "threads)" in method else 1
        for bg in (None, background):
            matcher = make()
            faiss.omp_set_num_threads(threads)
            try:
                decisions, times, t_bg = run_matcher(matcher, items, features, bg)
            finally:
                faiss.omp_set_num_threads(default_threads)
            score = score_stream(items, decisions, families).to_dict()
            match_s = sum(times)
            feature_ms = feats.costs[cost_key[feature_kind]]["ms_per_item"]
            extra: dict[str, Any] = {}
            if isinstance(matcher, PicNixMatcher):
                extra = {
                    "picnix_clusters": matcher.index.n_centres,
                    "picnix_mean_members_scanned": round(statistics.fmean(matcher.scanned[-len(items) :]), 1),
                }
            row = result.add_row(
                f"{method} / background {0 if bg is None else len(bg)}",
                method=method,
                matcher=matcher.name,
                feature=cost_key[feature_kind],
                faiss_threads=threads if "naive" not in method and "picnix" not in method else None,
                background_items=0 if bg is None else len(bg),
                stream_items=len(items),
                planted=n_copies,
                threshold=PDQ_THRESHOLD if feature_kind == "pdq" else decision.duplicate_threshold,
                match_items_per_s=round(len(items) / match_s, 1),
                match_p50_ms=round(1000 * percentile(times, 50), 4),
                match_p99_ms=round(1000 * percentile(times, 99), 4),
                feature_ms_per_item=feature_ms,
                items_per_s_one_core=round(1000.0 / (feature_ms + 1000 * match_s / len(items)), 1),
                background_insert_s=round(t_bg, 2),
                **score,
                **extra,
            )
            say(
                f"{row['case']}: match {row['match_items_per_s']} items/s, precision {row['precision']}, "
                f"recall {row['recall']}"
            )
    result.params = {
        "stream": {
            "items": len(items),
            "originals": n_originals,
            "planted_copies": n_copies,
            "planted_from_originals": n_planted,
            "edits": list(EDITS),
            "order": "shuffled originals; each copy inserted at a random position after its original",
        },
        "serving_embedder": feats.embedder,
        "sieve_threshold": decision.duplicate_threshold,
        "sieve_top_k": decision.top_k,
        "picnix": {"join_similarity": join_similarity, "probe_clusters": probe, "match_threshold": "as Sieve"},
        "pdq": {
            "threshold_hamming": PDQ_THRESHOLD,
            "low_quality_items (<50)": sum(1 for q in feats.pdq_quality if q < 50),
        },
        "feature_costs": feats.costs,
        "background": {
            "items": n_background,
            "embeddings": "synthetic clustered unit vectors (never near a real photo's embedding)",
            "pdq": "uniformly random 256-bit hashes (expected distance 128 from anything)",
        },
    }
    result.notes += [
        "match_items_per_s covers only the matching step (search, then add) per stream item; feature costs "
        "(decode + embed, or decode + PDQ) are in params.feature_costs and feature_ms_per_item; "
        "items_per_s_one_core adds the two.",
        "sieve, naive-scan and picnix share the same embeddings, so their accuracy differs only by the index; "
        "sieve and naive-scan are both exact and must agree.",
        "Matching runs with one FAISS (OpenMP) thread; the 'sieve (faiss N threads)' rows keep FAISS's default "
        "to show the cost of waking OpenMP threads for one vector at a time on a shared machine.",
        "HMA's PDQ hasher feeds the full-resolution image to pdqhash (no draft decode), which is why hashing a "
        "multi-megapixel photo costs more than Sieve's draft-mode decode.",
    ]
    out = result.finish().to_dict()
    out["summary"] = summarize(out)
    say("done")
    return out


if __name__ == "__main__":
    raise SystemExit(main_for("peers", run))
