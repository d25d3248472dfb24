"""The recent-images index on its two backends, side by side in one run: FAISS (+ Redis) and Milvus (issue 16).

    python -m bench.index_backends [--quick] [--sizes 100000 1000000] [--no-e2e]
    # writes bench/results/index_backends.json and bench/results/index_backends.md

One LocalStack(index="milvus") (Kafka, Redis, Triton and one Milvus standalone server) serves the whole run. At
each size, each backend is driven through the product's own ``RecentIndex`` classes, as the moderator drives them:

- **insert**: ``add`` of the window in bulk (10k rows a call), then the last rows in moderator-sized batches (32 a
  call) into the index that is already built, as in steady state. FAISS is ``FaissRedisIndex.add`` (local
  FAISS, the Redis stream append and the read-back of the stream); Milvus is ``MilvusRecentIndex.add`` (upserts).
- **index build** (reported apart from the insert): FAISS trains its IVF (``FaissVectorIndex.reindex``, the job
  the moderator's ``maintain`` starts past SIEVE_INDEX_IVF_FROM) and compacts the stream into a snapshot; Milvus
  flushes and builds HNSW; the clock stops when every row is indexed.
- **search**: ``search(vectors, top_k, exclude)`` for one upload and for a batch of 16, with the product's
  settings (Milvus consistency Session, search_ef; FAISS IVF nprobe), and ``sync`` + ``search``, which is what one
  moderator batch pays. Milvus's search_ef is also swept (recall and batch latency) so a default can be chosen,
  and the other consistency levels (Strong, Bounded) are measured beside it.
- **search under writes**: ``sync`` + batch-of-16 ``search`` while another replica adds a moderator batch (32 rows)
  every WRITE_EVERY_S, as on a busy platform: FAISS replays them from the Redis stream in ``sync``; a Milvus
  Session search must include them, so it waits for the time tick whenever one is younger than a tick.
- **recall@1** against exact inner-product search (numpy) over the same vectors.
- **memory**: RSS growth of this process for the FAISS replica's index, Redis's memory for its stream/snapshot,
  and the Milvus server process's RSS (idle after loading, and its peak while inserting and building).
- **end to end**: the e2e stage's saturation run (Kafka -> moderator -> verdicts, distinct real photos), once
  with SIEVE_INDEX_BACKEND=faiss and once with milvus, on the same stack.

Vectors: see ``PhotoMixture``; the JSON records exactly how they were made.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import redis
from numpy.typing import NDArray

from bench.common import (
    RESULTS_DIR,
    WORK_DIR,
    Progress,
    StageResult,
    Target,
    markdown_table,
    rss_bytes,
    summarize_ms,
    write_result,
)
from services.common.config import DecisionSettings, IndexSettings, MilvusSettings, Settings
from services.common.index import RecentIndex, open_recent_index
from services.common.index.base import IndexEntry, Neighbour
from services.common.index.faiss_redis import FaissRedisIndex
from services.common.index.redis_store import RedisIndexStore
from services.common.stack import LocalStack

MODEL_VERSION = "sieve_embedder:2"  # the served embedder (model_repo/sieve_embedder/2), as the moderator names it
EMBEDDER_VERSION = 2
DIM = 256
BULK_ROWS = 10_000  # rows per add() while filling the window
MODERATOR_ROWS = 32  # rows per add() in steady state: one moderator batch (bench.stream's default batch size)
SEARCH_BATCH = 16  # uploads per search in the batch case
DUP_FRACTION = 0.8
REPOST_FRACTION = 0.1
MIB = float(1 << 20)
EF_SWEEP = (64, 128, 256, 512)
WRITE_EVERY_S = 0.1  # "other replicas" add a moderator batch this often while searches run (~320 rows/s)
UNDER_WRITES_BATCHES = 200
SETTLE_S = 1200.0  # longest wait, after every row is indexed, for compaction's re-indexing to finish (967 s at 1M)
GOAL_RECALL = 0.98
GOAL_P99_RATIO = 5.0
GOAL_E2E_RATIO = 0.8


# --------------------------------------------------------------------------------------------------- vectors


class PhotoMixture:
    """Embedding-like vectors built around the served model's real embeddings of the photo set.

    - centres: the served embedder's (sieve_embedder:2, onnxruntime in-process, the artifact Triton runs)
      L2-normalised embeddings of every photo in services/common/photos (610 images);
    - shaped noise: Gaussian with the covariance of those real embeddings (their principal directions and
      variances), so that perturbations move along the directions real images differ in, not isotropically;
    - a stored row: a centre drawn with Zipf(0.7) weights, plus shaped noise times the centre's spread
      (U(0.5, 1.0); cosine to the centre ~0.7-0.9), plus isotropic noise of norm ~0.15, renormalised;
    - reposts: 10% of the rows are instead near copies of another stored row (near-duplicate noise below), so
      planted originals have close rivals as on a real platform;
    - near-duplicate noise: shaped noise x 0.2 plus isotropic noise of norm ~0.2 (cosine to the source ~0.96);
    - queries: 80% near duplicates (a stored row + near-duplicate noise, renormalised; the stored row is the
      planted original) and 20% fresh draws from the mixture (new images: no planted original, the hard case).

    Block b of BLOCK rows is always the same vectors, so the 100k window is the first tenth of the 1M window.
    """

    BLOCK = 100_000

    def __init__(self, photos: NDArray[np.float32], seed: int = 16) -> None:
        self.seed = seed
        self.centres = photos.astype(np.float32)
        self.dim = int(photos.shape[1])
        centred = photos - photos.mean(axis=0)
        _u, s, vt = np.linalg.svd(centred, full_matrices=False)
        rank = int(np.sum(s > 1e-6 * s[0]))
        # z @ shape has the real embeddings' covariance (z ~ N(0, I_rank)).
        self.shape = (vt[:rank] * (s[:rank] / math.sqrt(len(photos) - 1))[:, None]).astype(np.float32)
        self.total_variance = float(np.sum(s**2) / (len(photos) - 1))
        rng = np.random.default_rng(seed)
        self.spread = rng.uniform(0.5, 1.0, len(photos)).astype(np.float32)
        weights = 1.0 / np.arange(1, len(photos) + 1) ** 0.7
        self.weights = rng.permutation(weights / weights.sum())
        self.explained_80 = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.8)) + 1

    def _shaped(self, rng: np.random.Generator, n: int) -> NDArray[np.float32]:
        z = rng.standard_normal((n, len(self.shape)), dtype=np.float32)
        out: NDArray[np.float32] = z @ self.shape
        return out

    def _iso(self, rng: np.random.Generator, n: int, norm: float) -> NDArray[np.float32]:
        out: NDArray[np.float32] = rng.standard_normal((n, self.dim), dtype=np.float32) * (norm / math.sqrt(self.dim))
        return out

    def near_copy(self, rng: np.random.Generator, rows: NDArray[np.float32]) -> NDArray[np.float32]:
        x = rows + 0.2 * self._shaped(rng, len(rows)) + self._iso(rng, len(rows), 0.2)
        return _normalised(x)

    def draw(self, rng: np.random.Generator, n: int) -> NDArray[np.float32]:
        labels = rng.choice(len(self.centres), size=n, p=self.weights)
        x = self.centres[labels] + self.spread[labels][:, None] * self._shaped(rng, n) + self._iso(rng, n, 0.15)
        return _normalised(x)

    def block(self, b: int, n: int) -> NDArray[np.float32]:
        rng = np.random.default_rng([self.seed, b])
        x = self.draw(rng, n)
        reposts = rng.choice(n, size=int(n * REPOST_FRACTION), replace=False)
        originals = np.setdiff1d(np.arange(n), reposts)
        sources = rng.choice(originals, size=len(reposts))
        x[reposts] = self.near_copy(rng, x[sources])
        return x

    def window(self, n: int) -> NDArray[np.float32]:
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, self.BLOCK):
            rows = min(self.BLOCK, n - start)
            out[start : start + rows] = self.block(start // self.BLOCK, rows)
        return out

    def queries(self, window: NDArray[np.float32], nq: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """(queries, planted row or -1 for a fresh image)."""
        rng = np.random.default_rng([self.seed, 10_000 + len(window)])
        n_dup = round(nq * DUP_FRACTION)
        planted = rng.choice(len(window), size=n_dup, replace=False).astype(np.int64)
        dup = self.near_copy(rng, window[planted])
        fresh = self.draw(rng, nq - n_dup)
        q = np.ascontiguousarray(np.concatenate([dup, fresh]), dtype=np.float32)
        return q, np.concatenate([planted, np.full(nq - n_dup, -1, dtype=np.int64)])

    def describe(self) -> dict[str, Any]:
        return {
            "centres": f"{len(self.centres)} real embeddings: every photo of services/common/photos through the "
            f"served embedder {MODEL_VERSION} (model_repo/sieve_embedder/{EMBEDDER_VERSION}/model.onnx via "
            "onnxruntime in-process, services.evaluation.embed.load_serving + wire_pixels, as bench/hard_edits.py),"
            " L2-normalised",
            "shaped_noise": "z @ S, z ~ N(0, I_r), S = the real embeddings' principal axes scaled by their standard "
            f"deviations (rank r = {len(self.shape)}; total variance {self.total_variance:.3f}; 80% of it in "
            f"{self.explained_80} directions): Gaussian with the covariance of the real embeddings",
            "stored_row": "centre (Zipf(0.7) weights over the photos) + spread_c * shaped noise "
            "(spread_c ~ U(0.5, 1.0) per centre) + isotropic N(0, 0.15^2/d), L2-normalised",
            "reposts": f"{REPOST_FRACTION:.0%} of the rows replaced by a near copy of another stored row of the "
            "same 100k block (near-duplicate noise below)",
            "near_duplicate_noise": "+ 0.2 * shaped noise + isotropic N(0, 0.2^2/d), then L2-normalised",
            "queries": f"{DUP_FRACTION:.0%} near duplicates of stored rows drawn uniformly from the window (planted "
            "original = that row), the rest fresh draws from the mixture (not stored)",
            "determinism": f"numpy default_rng([{self.seed}, block]) per 100k block: the 100k window is the first "
            "100k rows of the 1M window",
        }


def _normalised(x: NDArray[np.float32]) -> NDArray[np.float32]:
    out: NDArray[np.float32] = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    return out


def photo_embeddings(say: Progress) -> NDArray[np.float32]:
    """The served embedder's embeddings of the photo set, cached under var/bench."""
    cache = WORK_DIR / "index_backends" / f"photos_v{EMBEDDER_VERSION}.npy"
    if cache.exists():
        cached: NDArray[np.float32] = np.load(cache)
        return cached
    from bench.hard_edits import served_embedder
    from services.common.photos.build import load_photo_set

    manifest = load_photo_set()
    records = sorted(manifest.images, key=lambda r: r.id)
    say(f"embedding {len(records)} photos with {MODEL_VERSION} in-process")
    embedded = served_embedder(EMBEDDER_VERSION)([manifest.path_of(r).read_bytes() for r in records])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, embedded)
    return embedded


def exact_top1(window: NDArray[np.float32], queries: NDArray[np.float32]) -> NDArray[np.int64]:
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    ids = np.full(len(queries), -1, dtype=np.int64)
    for start in range(0, len(window), 100_000):
        sims = queries @ window[start : start + 100_000].T
        arg = sims.argmax(axis=1)
        val = sims[np.arange(len(queries)), arg]
        better = val > best
        best[better], ids[better] = val[better], arg[better] + start
    return ids


def upload_id(row: int) -> str:
    return f"r{row:08d}"


def row_of(n: Neighbour) -> int:
    return int(n.upload_id[1:])


# ------------------------------------------------------------------------------------------------- measuring


def rss_tree(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


class PeakRss:
    """Samples a process tree's RSS every half second in the background; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_tree(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, rss_tree(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(2)
        return round(self.peak / MIB, 1)


def fill(
    add: Callable[[list[IndexEntry]], None],
    window: NDArray[np.float32],
    start: int,
    stop: int,
    batch: int,
    say: Progress,
) -> dict[str, Any]:
    """add() rows [start, stop) of the window ``batch`` at a time; entries are built outside the clock, each
    vector its own array as in a moderator (not a view of the window)."""
    now = time.time()
    spent = 0.0
    calls: list[float] = []
    last = time.monotonic()
    for first in range(start, stop, batch):
        entries = [IndexEntry(upload_id(r), window[r].copy(), now) for r in range(first, min(stop, first + batch))]
        t0 = time.perf_counter()
        add(entries)
        calls.append(time.perf_counter() - t0)
        spent += calls[-1]
        if time.monotonic() - last > 15:
            last = time.monotonic()
            say(f"  {first + len(entries):,}/{stop:,} rows, {(first + len(entries) - start) / spent:,.0f} rows/s")
    rows = stop - start
    return {
        "rows": rows,
        "rows_per_call": batch,
        "seconds": round(spent, 2),
        "rows_per_s": round(rows / spent, 1) if spent else None,
        "call_ms": summarize_ms(calls) if calls else {},
    }


def search_cases(
    search: Callable[[NDArray[np.float32], int, list[str] | None], list[list[Neighbour]]],
    sync: Callable[[], bool],
    queries: NDArray[np.float32],
    truth: NDArray[np.int64],
    planted: NDArray[np.int64],
    k: int,
    singles: int,
    with_single: bool = True,
) -> dict[str, Any]:
    """Recall@1 and batch-of-16 latency over every query; one-upload latency; sync + search per batch."""
    exclude = ["-"] * SEARCH_BATCH
    for i in range(5):  # warm-up
        search(queries[i : i + 1], k, ["-"])
        search(queries[i * SEARCH_BATCH : (i + 1) * SEARCH_BATCH], k, exclude)
    found = np.full(len(queries), -1, dtype=np.int64)
    batch_s: list[float] = []
    for start in range(0, len(queries), SEARCH_BATCH):
        q = queries[start : start + SEARCH_BATCH]
        t0 = time.perf_counter()
        rows = search(q, k, exclude[: len(q)])
        batch_s.append(time.perf_counter() - t0)
        found[start : start + len(q)] = [row_of(r[0]) if r else -1 for r in rows]
    for start in range(0, len(queries), SEARCH_BATCH):  # a second pass: p99 from 200 batches, not 100
        q = queries[start : start + SEARCH_BATCH]
        t0 = time.perf_counter()
        search(q, k, exclude[: len(q)])
        batch_s.append(time.perf_counter() - t0)
    dup = planted >= 0
    out: dict[str, Any] = {
        "recall_at_1": round(float(np.mean(found == truth)), 4),
        "recall_at_1_near_duplicates": round(float(np.mean(found[dup] == truth[dup])), 4),
        "recall_at_1_fresh": round(float(np.mean(found[~dup] == truth[~dup])), 4) if (~dup).any() else None,
        "planted_original_found": round(float(np.mean(found[dup] == planted[dup])), 4),
        "batch16_ms": summarize_ms(batch_s),
    }
    if not with_single:
        return out
    single_s: list[float] = []
    for i in range(singles):
        t0 = time.perf_counter()
        search(queries[i : i + 1], k, ["-"])
        single_s.append(time.perf_counter() - t0)
    out["single_ms"] = summarize_ms(single_s)
    sync_s: list[float] = []
    for start in range(0, min(len(queries), 100 * SEARCH_BATCH), SEARCH_BATCH):
        q = queries[start : start + SEARCH_BATCH]
        t0 = time.perf_counter()
        sync()
        search(q, k, exclude[: len(q)])
        sync_s.append(time.perf_counter() - t0)
    out["sync_plus_batch16_ms"] = summarize_ms(sync_s)
    return out


@dataclasses.dataclass
class Case:
    n: int
    window: NDArray[np.float32]
    queries: NDArray[np.float32]
    planted: NDArray[np.int64]
    truth: NDArray[np.int64]
    moderator_rows: int
    singles: int
    k: int


def search_under_writes(
    search: Callable[[NDArray[np.float32], int, list[str] | None], list[list[Neighbour]]],
    sync: Callable[[], bool],
    write: Callable[[list[IndexEntry]], object],
    case: Case,
) -> dict[str, Any]:
    """sync + batch-16 search latency while a writer thread (another replica) adds 32 rows every WRITE_EVERY_S."""
    stop = threading.Event()
    written = [0]
    errors: list[str] = []

    def writer() -> None:
        rng = np.random.default_rng(7)
        while not stop.is_set():
            rows = case.window[rng.integers(0, case.n, MODERATOR_ROWS)]
            now = time.time()
            try:
                write([IndexEntry(f"w{written[0] + i}", rows[i], now) for i in range(MODERATOR_ROWS)])
                written[0] += MODERATOR_ROWS
            except Exception as exc:  # recorded: the latencies below would not mean what they say
                errors.append(repr(exc))
            stop.wait(WRITE_EVERY_S)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(1.0)
    batches: list[float] = []
    exclude = ["-"] * SEARCH_BATCH
    try:
        for b in range(UNDER_WRITES_BATCHES):
            start = (b * SEARCH_BATCH) % (len(case.queries) - SEARCH_BATCH)
            q = case.queries[start : start + SEARCH_BATCH]
            t0 = time.perf_counter()
            sync()
            search(q, case.k, exclude)
            batches.append(time.perf_counter() - t0)
    finally:
        stop.set()
        thread.join(30)
    return {
        "sync_plus_batch16_ms": summarize_ms(batches),
        "rows_written_meanwhile": written[0],
        "write_every_s": WRITE_EVERY_S,
        "writer_errors": errors[:5],
    }


def product_index(client: redis.Redis, prefix: str, backend: str, milvus: MilvusSettings | None = None) -> RecentIndex:
    """A replica's handle as the moderator opens it (``open_recent_index``), under the case's own key prefix."""
    base = Settings()
    settings = base.model_copy(
        update={
            "redis": base.redis.model_copy(update={"key_prefix": prefix}),
            "index": base.index.model_copy(update={"backend": backend}),
            "milvus": milvus or base.milvus,
        }
    )
    return open_recent_index(settings, client, MODEL_VERSION, DIM)


# ---------------------------------------------------------------------------------------------------- FAISS


def faiss_case(case: Case, client: redis.Redis, redis_pid: int, say: Progress) -> dict[str, Any]:
    cfg = IndexSettings()
    prefix = f"benchidx-{case.n}"
    gc.collect()
    rss0 = rss_bytes()
    redis0 = rss_tree(redis_pid)
    index = product_index(client, prefix, "faiss")
    assert isinstance(index, FaissRedisIndex)
    index.sync()
    say(f"faiss {case.n:,}: bulk insert")
    bulk = fill(index.add, case.window, 0, case.n - case.moderator_rows, BULK_ROWS, say)
    say(f"faiss {case.n:,}: {bulk['rows_per_s']:,.0f} rows/s; training IVF")
    t0 = time.perf_counter()
    trained = index.local.reindex()
    ivf_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compacted = index.compact()
    compact_s = time.perf_counter() - t0
    say(f"faiss {case.n:,}: {index.local.kind} in {ivf_s:.1f}s, snapshot of {compacted} in {compact_s:.1f}s")
    steady = fill(index.add, case.window, case.n - case.moderator_rows, case.n, MODERATOR_ROWS, say)
    gc.collect()
    memory = {
        "replica_index_rss_growth_mib": round((rss_bytes() - rss0) / MIB, 1),
        "redis_rss_growth_mib": round((rss_tree(redis_pid) - redis0) / MIB, 1),
        "redis_used_memory_mib": round(int(client.info("memory")["used_memory"]) / MIB, 1),
        "faiss_vectors_mib": round(case.n * DIM * 4 / MIB, 1),
    }
    say(f"faiss {case.n:,}: searching ({index.local.kind}, nprobe {cfg.ivf_nprobe})")
    searched = search_cases(index.search, index.sync, case.queries, case.truth, case.planted, case.k, case.singles)
    say(f"faiss {case.n:,}: searching while another replica writes")
    other_replica = RedisIndexStore(client, prefix, MODEL_VERSION)  # what another replica's add() sends to Redis
    under_writes = search_under_writes(index.search, index.sync, other_replica.append, case)
    # What a new replica pays before its first search: load the snapshot + stream tail from Redis.
    del index
    gc.collect()
    rss1 = rss_bytes()
    fresh = product_index(client, prefix, "faiss")
    t0 = time.perf_counter()
    fresh.sync()
    load_s = time.perf_counter() - t0
    replica_load = {
        "seconds": round(load_s, 2),
        "rows": len(fresh),
        "rss_growth_mib": round((rss_bytes() - rss1) / MIB, 1),
        "note": "a new or restarted replica loads the snapshot and stream tail before it can search (exact Flat "
        "until its own background IVF training finishes)",
    }
    del fresh
    gc.collect()
    for key in client.scan_iter(f"{prefix}:*", count=1000):
        client.delete(key)
    return {
        "backend": "faiss",
        "n": case.n,
        "index_kind": f"{'IVF' if trained else 'Flat'} (nprobe {cfg.ivf_nprobe}) in every replica; Redis stream + "
        "snapshot as the shared record",
        "insert_bulk": bulk,
        "insert_moderator_batches": steady,
        "build": {"ivf_train_and_add_s": round(ivf_s, 2), "snapshot_compaction_s": round(compact_s, 2)},
        "memory": memory,
        "search": searched,
        "search_under_writes": under_writes,
        "new_replica_load": replica_load,
    }


# --------------------------------------------------------------------------------------------------- Milvus


def index_progress(client: Any, collection: str) -> tuple[int, int, int]:
    """(indexed rows, total rows, pending rows) of the collection's vector index."""
    name = client.list_indexes(collection)[0]
    info = client.describe_index(collection, name)
    return int(info.get("indexed_rows", 0)), int(info.get("total_rows", 0)), int(info.get("pending_index_rows", 0))


def milvus_case(
    case: Case,
    settings: MilvusSettings,
    redis_client: redis.Redis,
    milvus_pid: int,
    say: Progress,
    build_timeout_s: float = 1800.0,
) -> dict[str, Any]:
    from pymilvus import MilvusClient

    from services.common.index.milvus_index import MilvusRecentIndex

    namespace = f"benchidx{case.n}"
    client = MilvusClient(uri=settings.uri, timeout=60)
    rss_before = rss_tree(milvus_pid)

    def replica(**changes: Any) -> MilvusRecentIndex:
        """A replica's handle (the replicas' write clock in Redis included), with these MilvusSettings changed."""
        index = product_index(redis_client, namespace, "milvus", settings.model_copy(update=changes))
        assert isinstance(index, MilvusRecentIndex)
        return index

    index = replica()
    index.sync()  # creates and loads the collection with its HNSW index
    peak = PeakRss(milvus_pid)
    say(f"milvus {case.n:,}: bulk insert (upserts of {BULK_ROWS} rows per add)")
    bulk = fill(index.add, case.window, 0, case.n - case.moderator_rows, BULK_ROWS, say)
    say(f"milvus {case.n:,}: {bulk['rows_per_s']:,.0f} rows/s; flush + HNSW build")
    t0 = time.perf_counter()
    client.flush(index.collection, timeout=600)
    flush_s = time.perf_counter() - t0
    last = time.monotonic()
    trace: list[tuple[float, int, int, int]] = []
    all_indexed_s: float | None = None
    while True:
        indexed, total, pending = index_progress(client, index.collection)
        waited = time.perf_counter() - t0
        trace.append((round(waited, 1), indexed, total, pending))
        if all_indexed_s is None and indexed >= bulk["rows"]:
            all_indexed_s = waited
        # Compaction merges small sealed segments after the first build and indexes the merged ones again (the
        # old ones serve meanwhile): wait for that to settle too, a bounded while, so searches run on a quiet server.
        settled = all_indexed_s is not None and (pending == 0 or waited - all_indexed_s > SETTLE_S)
        if settled or waited > build_timeout_s:
            break
        if time.monotonic() - last > 30:
            last = time.monotonic()
            say(f"  indexed {indexed:,}/{total:,} (pending {pending:,}) after {waited:.0f}s")
        time.sleep(1.0)
    built_s = time.perf_counter() - t0
    say(
        f"milvus {case.n:,}: flushed in {flush_s:.1f}s, every row indexed "
        + (f"{all_indexed_s:.1f}s" if all_indexed_s is not None else f"not within {build_timeout_s:.0f}s")
        + f" after the last insert; pending {pending:,} at {built_s:.0f}s"
    )
    steady = fill(index.add, case.window, case.n - case.moderator_rows, case.n, MODERATOR_ROWS, say)
    build_peak = peak.stop()
    time.sleep(5)
    searched = search_cases(index.search, index.sync, case.queries, case.truth, case.planted, case.k, case.singles)
    say(
        f"milvus {case.n:,}: recall@1 {searched['recall_at_1']} (ef {settings.search_ef}), batch p99 "
        f"{searched['batch16_ms']['p99_ms']:.1f} ms; ef sweep"
    )
    sweep = []
    for ef in EF_SWEEP:
        tuned = replica(search_ef=ef)
        row = search_cases(
            tuned.search, tuned.sync, case.queries, case.truth, case.planted, case.k, 0, with_single=False
        )
        sweep.append({"search_ef": ef, **row})
        say(f"  ef {ef}: recall@1 {row['recall_at_1']}, batch16 p99 {row['batch16_ms']['p99_ms']:.1f} ms")
    levels = {}
    for level in ("Strong", "Bounded"):
        other = replica(consistency=level)
        levels[level] = search_cases(
            other.search, other.sync, case.queries, case.truth, case.planted, case.k, case.singles
        )
        say(f"  consistency {level}: batch16 p99 {levels[level]['batch16_ms']['p99_ms']:.1f} ms")
    say(f"milvus {case.n:,}: searching while another replica writes")
    other_replica = replica()
    under_writes = {
        "Session": search_under_writes(index.search, index.sync, other_replica.add, case),
        "Strong": search_under_writes(replica(consistency="Strong").search, index.sync, other_replica.add, case),
    }
    memory = {
        "milvus_rss_before_mib": round(rss_before / MIB, 1),
        "milvus_rss_loaded_mib": round(rss_tree(milvus_pid) / MIB, 1),
        "milvus_rss_peak_insert_and_build_mib": build_peak,
        "raw_vectors_mib": round(case.n * DIM * 4 / MIB, 1),
    }
    segments = []
    with contextlib.suppress(Exception):
        from pymilvus import connections, utility

        alias = f"bench{case.n}"
        connections.connect(alias, uri=settings.uri)
        segments = [
            {"rows": s.num_rows, "state": str(s.state), "index": getattr(s, "index_name", "")}
            for s in utility.get_query_segment_info(index.collection, using=alias)
        ]
        connections.disconnect(alias)
    later = dict(
        zip(("indexed_rows", "total_rows", "pending_rows"), index_progress(client, index.collection), strict=True)
    )
    client.drop_collection(index.collection)
    return {
        "backend": "milvus",
        "n": case.n,
        "index_kind": f"HNSW M={settings.hnsw_m} efConstruction={settings.hnsw_ef_construction}, search ef "
        f"{settings.search_ef}, consistency {settings.consistency}",
        "insert_bulk": bulk,
        "insert_moderator_batches": steady,
        "build": {
            "flush_s": round(flush_s, 2),
            "until_all_indexed_s": round(all_indexed_s, 2) if all_indexed_s is not None else None,
            "waited_s": round(built_s, 2),
            "indexed_rows": indexed,
            "pending_rows_at_end_of_wait": pending,
            "finished": all_indexed_s is not None,
            "progress_trace_s_indexed_total_pending": trace[:: max(1, len(trace) // 60)] + trace[-1:],
            "note": "until_all_indexed_s: from the last bulk upsert (flush included) until describe_index first "
            "reports every row indexed; the wait then continues (at most SETTLE_S) while compaction re-indexes "
            "merged segments (pending_index_rows > 0)",
        },
        "memory": memory,
        "search": searched,
        "search_ef_sweep": sweep,
        "search_strong_consistency": levels["Strong"],
        "search_bounded_consistency": levels["Bounded"],
        "search_under_writes": under_writes["Session"],
        "search_under_writes_strong": under_writes["Strong"],
        "query_segments": segments,
        "index_progress_after_searches": later,
    }


# ------------------------------------------------------------------------------------------------ end to end


def end_to_end(stack: LocalStack, uploads: int, rounds: int, say: Progress) -> dict[str, Any]:
    from bench.stream import StreamPlan, moderator_batch_size, prepare_images, run_stream
    from services.common.config import REPO_ROOT
    from services.common.index.milvus_index import MilvusRecentIndex

    images = prepare_images(REPO_ROOT / "var" / "bench" / "e2e-images", uploads)
    endpoints = stack.endpoints()
    on_faiss = dataclasses.replace(endpoints, milvus_uri="")

    used: list[Settings] = []

    def milvus_reader(settings: Settings) -> MilvusRecentIndex:
        """Strong: sees every row, and needs no write clock."""
        strong = settings.milvus.model_copy(update={"consistency": "Strong"})
        return MilvusRecentIndex(strong, settings.redis.key_prefix, MODEL_VERSION, DIM, settings.index.retention_s)

    def create_collection(settings: Settings) -> None:
        """The collection exists before the moderator starts, as in a deployment (creating it is not measured)."""
        used.append(settings)
        if settings.index.backend == "milvus":
            milvus_reader(settings).sync()

    def rows_indexed() -> int:
        """What the run left in its backend's index: proof that the moderator used that backend."""
        settings = used[-1]
        if settings.index.backend == "milvus":
            return milvus_reader(settings).count()
        client = redis.Redis.from_url(settings.redis.url.get_secret_value())
        try:
            store = RedisIndexStore(client, settings.redis.key_prefix, MODEL_VERSION)
            snapshot = store.load_snapshot()
            return int(client.xlen(store.stream_key)) + (len(snapshot.entries) if snapshot else 0)
        finally:
            client.close()

    runs: dict[str, list[dict[str, Any]]] = {"faiss": [], "milvus": []}
    previous = os.environ.get("SIEVE_INDEX_BACKEND")
    try:
        for r in range(rounds):
            for backend in ("faiss", "milvus"):
                say(f"e2e round {r + 1}/{rounds}: {uploads} uploads with SIEVE_INDEX_BACKEND={backend}")
                os.environ["SIEVE_INDEX_BACKEND"] = backend
                got = run_stream(
                    stack,
                    on_faiss if backend == "faiss" else endpoints,
                    StreamPlan(uploads, 0, 0),
                    1,
                    images,
                    f"ib-{backend}",
                    prepare=create_collection,
                )
                runs[backend].append(
                    {
                        "uploads": got.plan["total"],
                        "index_backend": used[-1].index.backend,
                        "rows_in_index_after": rows_indexed(),
                        "lost": got.lost,
                        "uploads_per_s": got.throughput_per_s,
                        "latency_ms": got.latency_ms,
                        "startup_s": got.startup_s,
                        "duration_s": got.duration_s,
                        "peak_rss_mb": got.rss_mb,
                        "cpu_cores": got.cpu_cores,
                    }
                )
                say(f"  {backend}: {got.throughput_per_s} uploads/s, lost {got.lost}")
    finally:
        if previous is None:
            os.environ.pop("SIEVE_INDEX_BACKEND", None)
        else:
            os.environ["SIEVE_INDEX_BACKEND"] = previous
    mean = {b: round(float(np.mean([x["uploads_per_s"] for x in rs])), 2) for b, rs in runs.items()}
    return {
        "uploads_per_run": uploads,
        "rounds": rounds,
        "moderator_batch_size": moderator_batch_size(),
        "replicas": 1,
        "uploads_per_s_mean": mean,
        "ratio_milvus_to_faiss": round(mean["milvus"] / mean["faiss"], 3) if mean["faiss"] else None,
        "runs": runs,
        "how": "bench.stream.run_stream saturation (StreamPlan(uploads, 0, 0)): distinct real photos and crops, all "
        "produced at once, one `sieve moderator` replica, clock from group stable to the last verdict; the index "
        "starts empty (each run has its own key prefix / collection) and grows to the run's uploads",
    }


# ---------------------------------------------------------------------------------------------------- runner


def _wait_for_quiet(say: Progress, flag: Path, deadline_utc: str | None) -> dict[str, Any]:
    """Waits for ``flag`` (another job's test run finished) or the deadline (HH:MM UTC), whichever comes first."""
    if deadline_utc is None:
        return {}
    hh, mm = (int(x) for x in deadline_utc.split(":"))
    waited = time.monotonic()
    while not flag.exists():
        now = time.gmtime()
        if (now.tm_hour, now.tm_min) >= (hh, mm):
            say(f"{flag} absent at {deadline_utc} UTC: running anyway")
            break
        time.sleep(60)
    return {
        "waited_s": round(time.monotonic() - waited, 1),
        "flag": str(flag),
        "flag_present": flag.exists(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def run(
    quick: bool = False,
    sizes: tuple[int, ...] | None = None,
    e2e: bool = True,
    uploads: int | None = None,
    rounds: int = 1,
    quiet: dict[str, Any] | None = None,
    build_timeout_s: float = 1800.0,
) -> dict[str, Any]:
    say = Progress("index_backends")
    result = StageResult("index_backends", "Recent-images index: FAISS (+Redis) vs Milvus, side by side", quick)
    result.begin()
    sizes = sizes or ((5_000, 20_000) if quick else (100_000, 1_000_000))
    nq = 320 if quick else 1600
    singles = 100 if quick else 300
    moderator_rows = 640 if quick else 9600
    k = DecisionSettings().top_k
    mixture = PhotoMixture(photo_embeddings(say))
    say(f"generating {max(sizes):,} vectors")
    full = mixture.window(max(sizes))
    result.params = {
        "dim": DIM,
        "model_version": MODEL_VERSION,
        "sizes": list(sizes),
        "queries": nq,
        "top_k": k,
        "single_query_samples": singles,
        "rows_per_bulk_add": BULK_ROWS,
        "rows_per_moderator_add": MODERATOR_ROWS,
        "moderator_batch_rows": moderator_rows,
        "search_batch": SEARCH_BATCH,
        "vectors": mixture.describe(),
        "ground_truth": "exact inner product (numpy matmul over the whole window, fp32)",
        "index_settings": IndexSettings().model_dump(),
        "milvus_settings": MilvusSettings().model_dump(exclude={"token", "uri"}),
        "milvus_server": "milvus 2.3.5 standalone (services.common.stack.milvus.MilvusServer: embedded etcd, "
        "local storage, proxy.timeTickInterval 20 ms), pymilvus client " + _version("pymilvus"),
        "redis_config_changed": {"maxmemory": "0 (stack default 1gb)", "appendonly": "no (stack default yes)"},
        "milvus_build_timeout_s": build_timeout_s,
        "wait_for_quiet": quiet or {},
        "order": "end to end first (both backends), then each size: FAISS, then Milvus",
    }
    partial = WORK_DIR / "index_backends" / f"partial{'.quick' if quick else ''}.json"
    cases: list[tuple[int, dict[str, Any] | None, dict[str, Any] | None]] = []
    e2e_result = None
    stack = LocalStack(index="milvus")
    stack.start()
    try:
        assert stack.milvus is not None and stack.milvus.process is not None and stack.milvus.process.pid
        assert stack.redis.process is not None and stack.redis.process.pid
        endpoints = stack.endpoints()
        redis_pid, milvus_pid = stack.redis.process.pid, stack.milvus.process.pid
        if e2e:
            e2e_result = end_to_end(stack, uploads or (64 if quick else 800), rounds, say)
            result.params["end_to_end"] = e2e_result
            write_result(partial.stem, result.to_dict(), partial.parent)
        client = redis.Redis.from_url(endpoints.redis_url, socket_timeout=600)
        # The stack's redis-server caps memory at 1 GB with an AOF: the FAISS backend's stream + snapshot of a
        # 1M window is ~2 GB, so the cap is lifted and the AOF turned off (as bench/stage_faiss.py does).
        client.config_set("maxmemory", "0")
        client.config_set("appendonly", "no")
        milvus_settings = MilvusSettings(uri=endpoints.milvus_uri)
        for n in sizes:
            window = full[:n]
            queries, planted = mixture.queries(window, nq)
            truth = exact_top1(window, queries)
            case = Case(n, window, queries, planted, truth, moderator_rows, singles, k)
            exact_vs_planted = round(float(np.mean(truth[planted >= 0] == planted[planted >= 0])), 4)
            say(f"{n:,} vectors: exact top-1 is the planted original for {exact_vs_planted:.3f} of near duplicates")
            rows: list[dict[str, Any] | None] = []
            for backend in ("faiss", "milvus"):
                try:
                    row = (
                        faiss_case(case, client, redis_pid, say)
                        if backend == "faiss"
                        else milvus_case(case, milvus_settings, client, milvus_pid, say, build_timeout_s)
                    )
                    result.add_row(f"{backend}_{n}", exact_top1_is_planted=exact_vs_planted, **row)
                    rows.append(row)
                except Exception as exc:  # a failed case is recorded; the others still count
                    say(f"{backend} {n:,} failed: {exc!r}")
                    result.errors.append(f"{backend} {n}: {exc!r}")
                    rows.append(None)
                write_result(partial.stem, result.to_dict(), partial.parent)
            cases.append((n, rows[0], rows[1]))
        client.close()
    finally:
        stack.stop()
    _targets(result, cases, e2e_result)
    result.notes += _notes()
    out = result.finish().to_dict()
    out["summary"] = summary_rows(out)
    return out


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _targets(
    result: StageResult,
    cases: list[tuple[int, dict[str, Any] | None, dict[str, Any] | None]],
    e2e: dict[str, Any] | None,
) -> None:
    done = [c for c in cases if c[1] is not None and c[2] is not None]
    if done:
        n, faiss_row, milvus_row = max(done, key=lambda c: c[0])
        assert faiss_row is not None and milvus_row is not None
        result.targets.append(
            Target(f"milvus recall@1 at {n:,}", milvus_row["search"]["recall_at_1"], GOAL_RECALL, ">=", "all queries")
        )
        for kind in ("single_ms", "batch16_ms"):
            ratio = milvus_row["search"][kind]["p99_ms"] / max(faiss_row["search"][kind]["p99_ms"], 1e-9)
            result.targets.append(
                Target(
                    f"milvus / faiss search p99 at {n:,} ({kind[:-3]})",
                    round(ratio, 2),
                    GOAL_P99_RATIO,
                    "<=",
                    f"{milvus_row['search'][kind]['p99_ms']:.2f} ms vs {faiss_row['search'][kind]['p99_ms']:.3f} ms",
                )
            )
        writes_f, writes_m = faiss_row["search_under_writes"], milvus_row["search_under_writes"]
        f99, m99 = writes_f["sync_plus_batch16_ms"]["p99_ms"], writes_m["sync_plus_batch16_ms"]["p99_ms"]
        result.targets.append(
            Target(
                f"milvus / faiss sync + batch16 p99 at {n:,} while another replica writes every {WRITE_EVERY_S}s",
                round(m99 / max(f99, 1e-9), 2),
                GOAL_P99_RATIO,
                "<=",
                f"{m99:.2f} ms vs {f99:.3f} ms",
            )
        )
    result.targets.append(
        Target(
            "e2e throughput milvus / faiss",
            e2e["ratio_milvus_to_faiss"] if e2e else None,
            GOAL_E2E_RATIO,
            ">=",
            f"{e2e['uploads_per_s_mean']}" if e2e else "not run",
        )
    )


def _notes() -> list[str]:
    return [
        "FAISS search is in-process (no network); Milvus search is a gRPC round trip to the server. With "
        "consistency Session (the default) a search guarantees the newest write any replica published in Redis, and "
        "waits for the proxy's time tick (20 ms in the stack's configuration) only while that write is younger than "
        "a tick; with Strong every search waits for the next tick.",
        "Every process (Kafka, Redis, Triton, Milvus, this benchmark) shares the same 2 cores; Milvus's HNSW build "
        "and the searches compete with whatever else runs (load_during_run).",
        "insert_moderator_batches: the last rows of the window, 32 per add(), into the index already built; for "
        "Milvus they land in a growing segment, which is how the steady state looks between seals.",
        "replica_index_rss_growth_mib: this process's RSS growth while holding the FaissRedisIndex (FAISS IVF "
        "vectors + per-entry Python objects), after the build; allocator reuse makes it approximate.",
    ]


def summary_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for row in out["rows"]:
        s = row["search"]
        build = row["build"]
        mem = row["memory"]
        rows.append(
            {
                "backend": row["backend"],
                "n": row["n"],
                "insert_rows_per_s_bulk": row["insert_bulk"]["rows_per_s"],
                "insert_rows_per_s_batch32": row["insert_moderator_batches"]["rows_per_s"],
                "build_s": build["until_all_indexed_s"]
                if "until_all_indexed_s" in build
                else build["ivf_train_and_add_s"],
                "single_p50_ms": s["single_ms"]["p50_ms"],
                "single_p99_ms": s["single_ms"]["p99_ms"],
                "batch16_p50_ms": s["batch16_ms"]["p50_ms"],
                "batch16_p99_ms": s["batch16_ms"]["p99_ms"],
                "recall_at_1": s["recall_at_1"],
                "recall_at_1_dup": s["recall_at_1_near_duplicates"],
                "recall_at_1_fresh": s["recall_at_1_fresh"],
                "memory_mib": mem.get("milvus_rss_loaded_mib", mem.get("replica_index_rss_growth_mib")),
                "peak_or_redis_mib": mem.get("milvus_rss_peak_insert_and_build_mib", mem.get("redis_used_memory_mib")),
            }
        )
    return rows


def write_markdown(out: dict[str, Any], path: Path) -> None:
    cols = list(out["summary"][0].keys()) if out["summary"] else []
    lines = [
        "# Recent-images index: FAISS vs Milvus (python -m bench.index_backends)",
        "",
        f"Started {out['started_at']}, {out['duration_s']:.0f} s, load during the run {out['load_during_run']}.",
        "memory_mib: FAISS = the replica's RSS growth for its index; Milvus = the server's RSS once loaded. "
        "peak_or_redis_mib: FAISS = Redis used_memory (stream + snapshot); Milvus = the server's peak RSS while "
        "inserting and building.",
        "",
        markdown_table(out["summary"], cols),
        "",
        "## Targets",
        "",
        markdown_table(out["targets"], ["name", "value", "threshold", "comparison", "met", "detail"]),
        "",
    ]
    e2e = out["params"].get("end_to_end")
    if e2e:
        lines += [
            "## End to end",
            "",
            f"uploads/s (mean of {e2e['rounds']} round(s) of {e2e['uploads_per_run']} uploads): "
            f"{e2e['uploads_per_s_mean']}; milvus/faiss {e2e['ratio_milvus_to_faiss']}",
            "",
        ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sieve benchmark: recent-images index backends")
    parser.add_argument("--quick", action="store_true", help="5k and 20k vectors, 64 uploads")
    parser.add_argument("--sizes", type=int, nargs="+", help="window sizes (default 100000 1000000)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the moderator end-to-end runs")
    parser.add_argument("--uploads", type=int, help="uploads per end-to-end run (default 800)")
    parser.add_argument("--rounds", type=int, default=1, help="end-to-end runs per backend, alternating")
    parser.add_argument("--wait-for", type=Path, help="start only once this file exists ...")
    parser.add_argument("--wait-until", help="... or at this HH:MM UTC, whichever comes first")
    parser.add_argument("--build-timeout", type=float, default=1800.0, help="longest wait for Milvus's index (s)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    quiet = _wait_for_quiet(Progress("index_backends"), args.wait_for, args.wait_until) if args.wait_for else None
    out = run(
        quick=args.quick,
        sizes=tuple(args.sizes) if args.sizes else None,
        e2e=not args.no_e2e,
        uploads=args.uploads,
        rounds=args.rounds,
        quiet=quiet,
        build_timeout_s=args.build_timeout,
    )
    name = "index_backends.quick" if args.quick else "index_backends"
    path = write_result(name, out, args.out)
    write_markdown(out, args.out / f"{name}.md")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
