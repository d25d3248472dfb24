"""Which candidate channels should the second pass use? Each one's gain, CPU per upload and memory, on validation.

    python -m bench.second_pass_channels [--quick]   # writes bench/results/second_pass_channels.json

The hard benchmark's validation set (train-split photos among openarena textures; never the test set), the served
first pass (sieve_embedder:2's top candidates, ORB-verified and fused), then for every upload that the first pass
is not sure of, the candidates of each channel verified and fused the same way:

- ``keypoints``: the references the upload's ORB descriptors vote for (services/common/verification/
  keypoint_index.py); costs the vote and the verification, and 10 KB of memory per indexed image;
- ``rotations``: the upload turned 90°, 180° and 270°, embedded, their 3 nearest references each; three more
  embeddings per uncertain upload;
- ``query_regions``: six fixed regions of the upload (centre 70% and 50%, four 60% corners), embedded, their 3
  nearest references each; six more embeddings.

Costs are wall time on this machine (one process; the embedder is the served ONNX graph through onnxruntime).
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from bench.common import RESULTS_DIR, machine_info, write_result
from bench.hard_edits import TOP_K, features_of, keypoint_index_of, pil, score_table
from services.common.calibration import VALIDATION_HALF
from services.common.config import DecisionSettings, DecodeSettings, VerificationSettings
from services.common.imaging import decode_image, detail_view
from services.common.index.base import Neighbour
from services.common.regions import REGIONS  # the regions the moderator embeds
from services.common.verification import QueryFeatures, Verifier
from services.evaluation.embed import load_serving
from services.evaluation.hard_set import build_set, photo_sources
from services.evaluation.hard_sources import VALIDATION_DISTRACTORS, fillers, texture_images
from services.evaluation.metrics import top_k

PER_VIEW = 3
CHANNELS = ("keypoints", "rotations", "query_regions")


def _nearest(views: NDArray[np.float32], refs: NDArray[np.float32]) -> set[int]:
    sims = views @ refs.T
    return {int(i) for row in sims for i in np.argsort(-row)[:PER_VIEW]}


def run(quick: bool) -> dict[str, Any]:
    began = time.perf_counter()
    originals = photo_sources("train", 30 if quick else None, 2, half=VALIDATION_HALF)
    distractors = texture_images(VALIDATION_DISTRACTORS, limit=100 if quick else None)
    val = build_set("validation", originals, distractors, fillers())
    serve = load_serving(2)

    def embed(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
        out = np.concatenate([serve(pixels[i : i + 32]) for i in range(0, len(pixels), 32)])
        normed: NDArray[np.float32] = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return normed

    def wire(data: bytes) -> NDArray[np.uint8]:
        pixels: NDArray[np.uint8] = decode_image(data, DecodeSettings(), 256).pixels
        return pixels

    refs = embed(np.stack([wire(d) for d in val.ref_data]))
    queries = embed(np.stack([wire(d) for d in val.query_data]))
    sim = queries @ refs.T
    threshold = DecisionSettings().threshold_for("sieve_embedder:2")
    verifier = Verifier(VerificationSettings())
    cfg = verifier.settings
    ref_features = features_of(val.ref_data, verifier.extractor, cfg.detail_side)
    keypoints = keypoint_index_of(ref_features, verifier)

    def by_keypoints(q: int, query: QueryFeatures, data: bytes, done: set[str]) -> set[int]:
        return {int(h.upload_id) for h in verifier.keypoint_candidates(keypoints, query.features, done)}

    def by_rotations(q: int, query: QueryFeatures, data: bytes, done: set[str]) -> set[int]:
        pixels = wire(data)
        return _nearest(embed(np.stack([np.ascontiguousarray(np.rot90(pixels, k)) for k in (1, 2, 3)])), refs)

    def by_regions(q: int, query: QueryFeatures, data: bytes, done: set[str]) -> set[int]:
        with Image.open(io.BytesIO(data)) as opened:
            img = opened.convert("RGB")
        w, h = img.size
        views = [
            np.asarray(img.crop((int(a * w), int(b * h), int(c * w), int(d * h))).resize((256, 256)), np.uint8)
            for a, b, c, d in REGIONS
        ]
        return _nearest(embed(np.stack(views)), refs)

    channels: dict[str, Callable[[int, QueryFeatures, bytes, set[str]], set[int]]] = {
        "keypoints": by_keypoints,
        "rotations": by_rotations,
        "query_regions": by_regions,
    }
    variants: dict[str, tuple[str, ...]] = {"first_pass_only": (), **{c: (c,) for c in CHANNELS}}
    variants["all_three"] = CHANNELS
    fused = {name: np.asarray(sim, dtype=np.float64).copy() for name in variants}
    spent = dict.fromkeys(CHANNELS, 0.0)
    verify_s = dict.fromkeys(variants, 0.0)
    idx, scores = top_k(sim, max(TOP_K, cfg.top_k))
    uncertain = 0
    for q, data in enumerate(val.query_data):
        neighbours = [Neighbour(str(int(i)), float(s)) for i, s in zip(idx[q], scores[q], strict=True)]
        chosen = verifier.candidates(neighbours, threshold, DecisionSettings().review_margin)
        gray = detail_view(pil(data, cfg.detail_side), cfg.detail_side)
        query = QueryFeatures(verifier.extractor.extract(gray), partial(verifier.extractor.extract_mirrored, gray))
        first = verifier.verify(query, chosen, {n.upload_id: ref_features[int(n.upload_id)] for n in chosen})
        for out in fused.values():
            for v in first:
                out[q, int(v.upload_id)] = v.score
        best = max((v.score for v in first), default=None if chosen else (neighbours[0].score if neighbours else None))
        if not verifier.needs_second_pass(best, threshold):
            continue
        uncertain += 1
        done = {n.upload_id for n in chosen}
        found: dict[str, set[int]] = {}
        for name, channel in channels.items():
            t = time.perf_counter()
            found[name] = channel(q, query, data, done) - {int(u) for u in done}
            spent[name] += time.perf_counter() - t
        for name, used in variants.items():
            picked = sorted(set().union(*(found[c] for c in used))) if used else []
            extra = [Neighbour(str(r), float(sim[q, r])) for r in picked]
            t = time.perf_counter()
            for v in verifier.verify(query, extra, {n.upload_id: ref_features[int(n.upload_id)] for n in extra}):
                fused[name][q, int(v.upload_id)] = v.score
            verify_s[name] += time.perf_counter() - t
    truth = val.truth_index()
    per_image = keypoints.memory_bytes() / max(len(keypoints), 1)
    memory = {"keypoints": round(per_image), "rotations": 0, "query_regions": 0}
    rows: dict[str, Any] = {}
    for name, used in variants.items():
        table = score_table(fused[name], truth, val.families, threshold)
        rows[name] = {
            "micro_ap": table["micro_ap"],
            "at_served_threshold": table["at_served_threshold"],
            "families": table["families"],
            "candidates_ms_per_uncertain_upload": round(sum(spent[c] for c in used) * 1000 / max(uncertain, 1), 1),
            "verify_ms_per_uncertain_upload": round(verify_s[name] * 1000 / max(uncertain, 1), 1),
            "index_bytes_per_image": sum(memory[c] for c in used),
        }
    return {
        "benchmark": "second_pass_channels",
        "quick": quick,
        "set": val.summary(),
        "uncertain_uploads": uncertain,
        "served_threshold": threshold,
        "variants": rows,
        "machine": machine_info(),
        "seconds": round(time.perf_counter() - began, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.quick)
    path = write_result("second_pass_channels" + ("_quick" if args.quick else ""), result, RESULTS_DIR)
    for name, row in result["variants"].items():
        print(name, row["micro_ap"], row["at_served_threshold"], row["candidates_ms_per_uncertain_upload"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
