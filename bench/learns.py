"""``python -m bench.learns``: does Sieve learn from its reviewers, and does active learning beat a random sample?

Plays reviewers from ground truth (issue #4). Stream A is moderated by the serving model; its review queue
(``decide`` + ``ReviewSelector``) is labelled by an oracle up to a budget of N labels; the trainer's own code
turns the labels into pairs (``FeedbackStore``, ``RetrainingJob.pair_batch``), fine-tunes (``finetune``),
gates (``gate``: held-out feedback slice + held-out photo benchmark) and installs the candidate in a scratch
model repository (``save_like_serving`` + ``ModelRepository.install``). A fresh stream B is then replayed with
the serving model and with each candidate. The baseline spends the same number of labels on uploads drawn
uniformly from stream A.

The serving model of the benchmark is the v2 STN candidate, not the served v1: v1 has no trainable artifact
(the trainer records "skipped" for it), and v2 is held back precisely because it matches different photos of
one person and unrelated star fields, which is what "not a duplicate" labels should fix.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from numpy.typing import NDArray

from bench.common import ROOT, WORK_DIR, StageResult, markdown_table, write_result
from bench.learns_stream import (
    HARD_SOURCES,
    CachedEmbedder,
    FeatureCache,
    ModerationPass,
    Stream,
    build_stream,
    label_summary,
    moderate,
    oracle_label,
    random_requests,
    score_pass,
    split_heldout,
)
from services.common.config import DecisionSettings, Settings
from services.common.photos.build import load_photo_set
from services.common.schemas import FeedbackLabel, ReviewRequest
from services.evaluation.benchmark import Benchmark, build_benchmark
from services.moderator.active_learning import ReviewSelector
from services.trainer.export import load_torchscript
from services.trainer.finetune import finetune, rehearsal_choice, save_like_serving
from services.trainer.gate import gate
from services.trainer.job import RetrainingJob
from services.trainer.promotion import ModelRepository

SERVED = ROOT / "model_repo" / "sieve_embedder" / "2"
SERVING_VERSION = "sieve_embedder:2"
MIN_TRAIN_PAIRS = 4  # RetrainingJob.retrain skips below this


@dataclass
class Context:
    """What every label set is trained, gated and replayed against."""

    settings: Settings
    threshold: float
    cache: FeatureCache
    serving: CachedEmbedder
    stream_b: Stream
    cfg: DecisionSettings
    bench: Benchmark | None
    repo: ModelRepository
    workdir: Path
    nsfw_b: list[dict[str, float]]
    client: redis.Redis


def _classifier_scores(pixels: NDArray[np.uint8], use: bool, notes: list[str]) -> list[dict[str, float]]:
    """The served classifier's nsfw scores (they can send items to review too); empty when unavailable."""
    if use:
        try:
            from services.tools.explain import open_nsfw_scores

            scores = open_nsfw_scores(pixels)
            return [{"nsfw": float(s)} for s in scores[:, 0]]
        except Exception as exc:  # the classifier is optional context, not what is measured
            notes.append(f"classifier unavailable ({type(exc).__name__}: {exc}); decisions used no flag scores")
    return [{} for _ in range(len(pixels))]


def _redis(workdir: Path, notes: list[str], required: bool = False) -> tuple[redis.Redis, Any]:
    """A real redis-server for ReviewSelector's budget and diversity state; without one the selector degrades
    as it does in production when Redis is down (no budget, diversity within a batch only). ``required``
    (tests) refuses to degrade, so a run without Redis cannot pass for one with it."""
    from services.common.stack.process import StackError, free_port
    from services.common.stack.redis import RedisServer

    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        if required:
            raise StackError("redis-server not installed and --require-redis given: run scripts/setup.sh")
        notes.append("redis-server not installed: ReviewSelector ran without its Redis budget/diversity state")
        return redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2), None
    server = RedisServer(workdir / "redis")
    server.start(workdir / "logs", timeout_s=20.0)
    return redis.Redis.from_url(server.url), server


def _settings(workdir: Path) -> Settings:
    base = Settings()
    fetch = base.fetch.model_copy(update={"file_roots": [str(workdir / "uploads")]})
    return base.model_copy(update={"fetch": fetch})


def rehearsal_sample(stream: Stream, labels: list[FeedbackLabel], n: int) -> NDArray[np.uint8]:
    """What RetrainingJob.rehearsal_pixels takes from the retention window: the labelled stream's uploads that
    no label mentions (stream A is what the index held while reviewers labelled), seeded by their count."""
    labelled = {lb.upload_id for lb in labels} | {lb.compared_with for lb in labels if lb.compared_with}
    rows = [i for i, u in enumerate(stream.uploads) if u.upload_id not in labelled]
    chosen = sorted(rehearsal_choice(rows, n))
    return np.ascontiguousarray(stream.pixels[chosen]) if chosen else stream.pixels[:0]


def train_and_replay(ctx: Context, name: str, labels: list[FeedbackLabel], label_stream: Stream) -> dict[str, Any]:
    """One label set through the trainer's path: store -> pairs -> finetune -> gate -> install -> replay B."""
    began = time.monotonic()
    trainer = ctx.settings.trainer.model_copy(update={"workdir": ctx.workdir / "trainer" / name})
    job = RetrainingJob(ctx.settings.model_copy(update={"trainer": trainer}))
    job.store.add(labels)
    train = job.pair_batch(job.store.pairs(heldout=False))
    heldout = job.pair_batch(job.store.pairs(heldout=True))
    row: dict[str, Any] = {
        **label_summary(labels, label_stream),
        "train_pairs": len(train.duplicate),
        "heldout_pairs": len(heldout.duplicate),
    }
    if len(train.duplicate) < MIN_TRAIN_PAIRS:
        return {
            **row,
            "event": "skipped",
            "why": f"only {len(train.duplicate)} usable labelled pairs",
            "promoted": False,
        }
    scripted, meta = load_torchscript(SERVED / "model.pt")
    candidate = CachedEmbedder(scripted, ctx.cache)
    rehearsal = rehearsal_sample(label_stream, labels, ctx.settings.trainer.rehearsal_images)
    row["rehearsal_images"] = len(rehearsal)
    result = finetune(candidate, train, ctx.threshold, steps=ctx.settings.trainer.finetune_steps, rehearsal=rehearsal)
    verdict = gate(
        ctx.serving.embed, candidate.embed, heldout, ctx.threshold, ctx.bench, ctx.settings.trainer.gate_tolerance
    )
    row.update(
        event="gated",
        finetune={k: v for k, v in result.__dict__.items() if k != "trained_parameters"},
        gate={
            "promote": verdict.promote,
            "why": verdict.why,
            "serving": verdict.serving,
            "candidate": verdict.candidate,
        },
        promoted=verdict.promote,
    )
    if verdict.promote:
        staged = ctx.workdir / f"staged-{name}"
        staged.mkdir(parents=True)
        shutil.copy2(SERVED / "model.py", staged / "model.py")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save nudges towards torch.export
            save_like_serving(scripted, staged / "model.pt", {**meta, "finetuned_from": 2, "label_set": name})
        version = max(ctx.repo.versions()) + 1
        installed = ctx.repo.install(staged, version)
        row["installed_version"] = version
        scripted, _ = load_torchscript(installed / "model.pt")  # replay what was stored (fp16 heads), as served
        candidate = CachedEmbedder(scripted, ctx.cache)
    moderated = moderate(
        ctx.stream_b,
        candidate.embed(ctx.stream_b.pixels),
        ctx.nsfw_b,
        ctx.cfg,
        ReviewSelector(ctx.client, f"learns-{name}", ctx.settings.review),
        f"candidate:{name}",
    )
    row["replay_b"] = score_pass(ctx.stream_b, moderated.decisions)
    row["seconds"] = round(time.monotonic() - began, 2)
    return row


def _labels(requests: Sequence[ReviewRequest], stream: Stream) -> list[FeedbackLabel]:
    return [lb for lb in (oracle_label(r, stream) for r in requests) if lb is not None]


def _queue_profile(stream: Stream, moderated: ModerationPass) -> dict[str, Any]:
    twins = stream.earlier_twins()
    row_of = {u.upload_id: i for i, u in enumerate(stream.uploads)}
    queue = moderated.queue
    return {
        "queued": len(queue),
        "skipped": moderated.skipped,
        "by_reason": {r: sum(1 for q in queue if q.reason.value == r) for r in sorted({q.reason.value for q in queue})},
        "true_duplicates": sum(1 for q in queue if twins[row_of[q.upload_id]]),
        "hard_distractors": sum(
            1 for q in queue if not twins[row_of[q.upload_id]] and stream.get(q.upload_id).source in HARD_SOURCES
        ),
    }


def _labels_to_reach(curve: list[dict[str, Any]], target: float) -> int | None:
    hits = [r["labels"] for r in curve if r["f1"] is not None and r["f1"] >= target]
    return min(hits) if hits else None


def run(
    budgets: Sequence[int],
    seed: int,
    random_seeds: int,
    quick: bool,
    split: str,
    threads: int,
    use_classifier: bool,
    review_margin: float | None = None,
    require_redis: bool = False,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    result = StageResult("learns", "Active learning vs a random sample: labels, retrain, gate, replay", quick).begin()
    notes = result.notes
    progress = _progress()
    workdir = WORK_DIR / ("learns-quick" if quick else "learns")
    shutil.rmtree(workdir, ignore_errors=True)
    settings = _settings(workdir)
    threshold = settings.decision.version_thresholds[SERVING_VERSION]
    cfg = settings.decision.for_version(SERVING_VERSION)  # as Pipeline.decision_for (no admin override here)
    if review_margin is not None:
        cfg = cfg.model_copy(update={"review_margin": review_margin})

    manifest = load_photo_set()
    side_a, side_b = split_heldout(manifest, seed, split, limit=14 if quick else None)
    max_copies = 1 if quick else 2
    progress(f"building streams from {len(side_a)} + {len(side_b)} held-out photos")
    stream_a = build_stream("A", manifest, side_a, workdir / "uploads" / "A", settings.decode, seed, max_copies)
    stream_b = build_stream("B", manifest, side_b, workdir / "uploads" / "B", settings.decode, seed + 1, max_copies)
    bench = None if quick else build_benchmark(manifest, side_b, "learns-gate", seed=seed, copies_per_family=1)

    serving_scripted, _ = load_torchscript(SERVED / "model.pt")
    cache = FeatureCache(serving_scripted)
    serving = CachedEmbedder(serving_scripted, cache)
    progress(f"embedding {len(stream_a.uploads)} + {len(stream_b.uploads)} uploads with the serving model")
    emb_a, emb_b = serving.embed(stream_a.pixels), serving.embed(stream_b.pixels)
    if bench is not None:
        progress(f"embedding the gate benchmark ({len(bench.reference_ids)} refs, {len(bench.query_ids)} queries)")
        serving.embed(bench.reference_pixels), serving.embed(bench.query_pixels)
    nsfw_a = _classifier_scores(stream_a.pixels, use_classifier, notes)
    nsfw_b = _classifier_scores(stream_b.pixels, use_classifier, notes)

    client, server = _redis(workdir, notes, require_redis)
    try:
        repo_root = workdir / "model_repo"
        shutil.copytree(SERVED, repo_root / "sieve_embedder" / "2", ignore=shutil.ignore_patterns("*.onnx"))
        ctx = Context(
            settings,
            threshold,
            cache,
            serving,
            stream_b,
            cfg,
            bench,
            ModelRepository(repo_root),
            workdir,
            nsfw_b,
            client,
        )
        selector = ReviewSelector(client, "learns-serving-A", settings.review)
        pass_a = moderate(stream_a, emb_a, nsfw_a, cfg, selector, SERVING_VERSION)
        pass_b = moderate(
            stream_b, emb_b, nsfw_b, cfg, ReviewSelector(client, "learns-serving-B", settings.review), SERVING_VERSION
        )
        base = score_pass(stream_b, pass_b.decisions)
        progress(f"stream A review queue: {len(pass_a.queue)} items; serving F1 on B {base['f1']}")
        rows: list[dict[str, Any]] = []
        done: dict[int, list[dict[str, Any]]] = {}  # active label count -> its active and equal-size random rows
        for n in budgets:
            active = _labels(pass_a.queue[:n], stream_a)
            size = len(active)
            progress(f"budget {n}: active learning labels {size} queued items")
            if size in done:  # the queue ran out: the same labels as a smaller budget, already trained
                rows.extend({**r, "budget": n, "same_as_budget": r["budget"]} for r in done[size])
            else:
                row = train_and_replay(ctx, f"active-{n}", active, stream_a)
                done[size] = [{"budget": n, "strategy": "active", "seed": None, **row}]
                for s in range(random_seeds):
                    labels = _labels(random_requests(stream_a, pass_a, size, seed * 100 + s), stream_a)
                    row = train_and_replay(ctx, f"random-{n}-s{s}", labels, stream_a)
                    done[size].append({"budget": n, "strategy": "random", "seed": s, **row})
                rows.extend(done[size])
            if n > size:  # the whole budget spent on a random sample, to see what random needs to catch up
                for s in range(random_seeds):
                    labels = _labels(random_requests(stream_a, pass_a, n, seed * 100 + s), stream_a)
                    row = train_and_replay(ctx, f"random_full-{n}-s{s}", labels, stream_a)
                    rows.append({"budget": n, "strategy": "random_full", "seed": s, **row})
            progress(f"budget {n}: done ({len(rows)} label sets so far)")
    finally:
        if server is not None:
            server.stop()

    summary = _summarise(rows, base)
    for row in summary["table"]:
        result.add_row(f"{row['strategy']}@{row['budget']}", **row)
    result.params = {
        "budgets": list(budgets),
        "seed": seed,
        "random_seeds": random_seeds,
        "split": split,
        "threads": threads,
        "serving_model": f"{SERVING_VERSION} ({SERVED.relative_to(ROOT)}/model.pt)",
        "duplicate_threshold": threshold,
        "review_margin": cfg.review_margin,
        "finetune_steps": settings.trainer.finetune_steps,
        "rehearsal_images": settings.trainer.rehearsal_images,
        "gate_tolerance": settings.trainer.gate_tolerance,
        "review_selection": settings.review.model_dump(),
    }
    result.notes.extend(NOTES)
    out = result.finish().to_dict()
    out.update(
        command=" ".join(
            [
                *(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("SIEVE_TRAINER_")),
                "python -m bench.learns",
                *map(shlex.quote, sys.argv[1:]),
            ]
        ),
        why_v2=("v2, the STN-CNN, is the served version and the one with a trainable artifact (v1 has none)"),
        streams={"A": stream_a.describe(), "B": stream_b.describe()},
        gate_benchmark=None if bench is None else {**bench.meta, "built_from": "stream B's originals"},
        queue_a=_queue_profile(stream_a, pass_a),
        serving_replay_b=base,
        feature_maps_computed=cache.computed,
        flag_f1={
            "value": None,
            "why": (
                "no flag ground truth: the photos carry no nsfw labels (and none would score as nsfw), the served "
                "flags come from a separate classifier the fine-tune does not touch, and v2's own flag head "
                "(edit categories from training augmentations) is not served"
            ),
            "blocked_on_b": base["blocked"],
        },
        label_sets=rows,
        summary={k: v for k, v in summary.items() if k != "table"},
    )
    return out


def _summarise(rows: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    """Mean over seeds per (strategy, budget); labels needed for half of the best gain, per strategy."""
    table: list[dict[str, Any]] = []
    keys = sorted({(r["strategy"], r["budget"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for strategy, budget in keys:
        group = [r for r in rows if r["strategy"] == strategy and r["budget"] == budget]
        replays = [r["replay_b"] for r in group if "replay_b" in r]

        def mean(key: str, replays: list[dict[str, Any]] = replays) -> float | None:
            return round(statistics.fmean(r[key] for r in replays), 4) if replays else None

        f1 = mean("f1")
        table.append(
            {
                "strategy": strategy,
                "budget": budget,
                "labels": round(statistics.fmean(r["labels"] for r in group), 1),
                "not_dup": round(statistics.fmean(r["not_duplicate"] for r in group), 1),
                "hard_items": round(statistics.fmean(r["hard_distractor_items"] for r in group), 1),
                "runs": len(group),
                "promoted": sum(1 for r in group if r.get("promoted")),
                "f1": f1,
                "delta_f1": None if f1 is None else round(f1 - base["f1"], 4),
                "precision": mean("precision"),
                "recall": mean("recall"),
                "false_matches_hard": mean("false_matches_hard"),
                "review_candidates": mean("review_candidates"),
            }
        )
    best_active = max((r["f1"] for r in table if r["strategy"] == "active" and r["f1"] is not None), default=None)
    out: dict[str, Any] = {"table": table, "serving_f1_b": base["f1"], "best_active_f1_b": best_active}
    if best_active is not None and best_active > base["f1"]:
        target = round(base["f1"] + (best_active - base["f1"]) / 2, 4)
        out["half_gain_target_f1"] = target
        out["labels_to_half_gain"] = {
            s: _labels_to_reach([r for r in table if r["strategy"].startswith(s)], target) for s in ("active", "random")
        }
    else:
        out["labels_to_half_gain"] = None
    return out


NOTES = [
    "streams A (labelled) and B (replayed) hold disjoint held-out photos (the manifest's 'heldout' split, which v2 "
    "never trained on); copies are made with the evaluation benchmark's edit families and JPEG ranges",
    "the review queue is the moderator's: decide() at the version threshold, ReviewSelector per batch of 16 (real "
    "Redis for its budget and diversity), then reviewers claim highest priority first; no reach metadata, so "
    "priority = uncertainty",
    "'random' spends exactly as many labels as active learning did at that budget (the equal-size comparison); "
    "'random_full' spends the whole budget N where the active queue ran out before N",
    "the gate's photo benchmark is built from stream B's originals (never from A's, which the fine-tune saw); the "
    "held-out feedback slice is FeedbackStore's 20% hash split of the labels",
    "the trunk's feature maps are computed once per image and shared by all models (only pool./reduce. are "
    "fine-tuned); the replay of a promoted candidate loads the artifact save_like_serving wrote (fp16 weights)",
    "labels are built by services.reviewer.labels.build_label with the compared image's URI, as the reviewer "
    "service's Labeller does",
]


def _progress() -> Any:
    from rich.console import Console

    console = Console(stderr=True)
    t0 = time.monotonic()

    def say(msg: str) -> None:
        console.log(f"[bold]learns[/] {time.monotonic() - t0:6.1f}s {msg}")

    return say


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else "")
    parser.add_argument("--budgets", default="10,25,50,100", help="label budgets N, comma separated")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--random-seeds", type=int, default=3, help="random samples per budget")
    parser.add_argument("--split", choices=("photo", "group"), default="photo", help="how A and B share people")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to others)")
    parser.add_argument("--no-classifier", action="store_true", help="skip the nsfw classifier's scores")
    parser.add_argument("--quick", action="store_true", help="tiny streams, no photo benchmark in the gate")
    parser.add_argument(
        "--review-margin",
        type=float,
        default=None,
        help="the moderator's uncertainty band around the threshold (SIEVE_DECISION_REVIEW_MARGIN; default: as "
        "configured). Wider sends more items to review, so active learning can spend a larger budget",
    )
    parser.add_argument(
        "--require-redis", action="store_true", help="fail instead of running without redis-server (tests)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    result = run(
        budgets,
        args.seed,
        args.random_seeds,
        args.quick,
        args.split,
        args.threads,
        not args.no_classifier,
        args.review_margin,
        args.require_redis,
    )
    path = write_result("learns.quick" if args.quick else "learns", result, args.out)
    print(markdown_table(result["rows"], TABLE_COLUMNS))
    print(f"serving (v2) on stream B: {json.dumps(result['serving_replay_b'])}")
    print(f"labels to half of the best active gain: {result['summary']['labels_to_half_gain']}")
    print(f"wrote {path}", file=sys.stderr)
    return 0


TABLE_COLUMNS = (
    "strategy",
    "budget",
    "labels",
    "not_dup",
    "hard_items",
    "promoted",
    "runs",
    "f1",
    "delta_f1",
    "precision",
    "recall",
    "false_matches_hard",
)

if __name__ == "__main__":
    raise SystemExit(main())
