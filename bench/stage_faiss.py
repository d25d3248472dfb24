"""Stage 4: FAISS lookup at 100k, 1M and 10M vectors: Flat, IVF-Flat, HNSW and IVF-PQ, plus snapshots via Redis.

Vectors are synthetic but structured like embeddings: a Gaussian mixture of a few thousand "topics" with
Zipf-like sizes and per-topic spread, L2-normalised, compared by inner product (cosine) as Sieve's index does.
Queries are mostly near-duplicates (a stored vector plus noise, cosine about 0.95: re-uploads) plus some fresh
draws from the mixture (new images, whose nearest neighbour is a near-tie among a topic's members: the hard
case for approximate search). Ground truth is exact inner-product search.

For each index and search parameter: recall@1 against exact search (all queries, and per kind), single-query
latency (p50/p99, one query per call, one FAISS thread, as one moderator thread sees it), batch throughput,
build time, memory per million vectors (the serialised size; RSS growth alongside) and the snapshot and reload
time through a real redis-server: ``faiss.serialize_index`` bytes in 64 MiB chunks SET and GET, then
``deserialize_index``. Flat is also measured in Sieve's own snapshot format (``RedisIndexStore``).

At 10M only IVF-PQ is built (the GPU-ready layout that fits here); Flat and HNSW at 10M would need about
10 GiB and 12.5 GiB of RAM and, for HNSW, an hour of single-machine build on 2 cores, so they are reported as
estimates from the 1M measurements, marked ``estimated``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import redis
from numpy.typing import NDArray

from bench.common import (
    WORK_DIR,
    Progress,
    StageResult,
    Target,
    main_for,
    recall_at_1,
    rss_bytes,
    summarize_ms,
)
from services.common.config import DecisionSettings
from services.common.index.base import IndexEntry, Snapshot
from services.common.index.faiss_index import FaissVectorIndex
from services.common.index.redis_store import RedisIndexStore
from services.common.stack.redis import RedisServer

BLOCK = 100_000
DEFAULT_DIM = 256
CHUNK_BYTES = 64 << 20
MIB = float(1 << 20)
TARGET_P99_MS = 2.0
TARGET_RECALL = 0.99
DUP_FRACTION = 0.8


# --------------------------------------------------------------------------------------------------- data


class ClusteredVectors:
    """A deterministic Gaussian mixture on the unit sphere; block b is always the same vectors."""

    def __init__(self, dim: int, n_clusters: int = 2000, seed: int = 6) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.seed = seed
        centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        # Noise norm relative to the unit centre: cosine to the centre 0.67-0.89, between members 0.45-0.8.
        self.spread = rng.uniform(0.5, 1.1, n_clusters).astype(np.float32)
        weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.7
        self.weights = rng.permutation(weights / weights.sum())

    def block(self, b: int, n: int = BLOCK) -> NDArray[np.float32]:
        rng = np.random.default_rng([self.seed, b])
        labels = rng.choice(len(self.centres), size=n, p=self.weights)
        noise = rng.standard_normal((n, self.dim), dtype=np.float32)
        x = self.centres[labels] + noise * (self.spread[labels] / math.sqrt(self.dim))[:, None]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return np.ascontiguousarray(x, dtype=np.float32)

    def blocks(self, n: int) -> Iterator[tuple[int, NDArray[np.float32]]]:
        """(start row, vectors) for rows [0, n) in blocks of BLOCK."""
        for b in range(math.ceil(n / BLOCK)):
            yield b * BLOCK, self.block(b, min(BLOCK, n - b * BLOCK))

    def queries(self, n_total: int, nq: int, seed: int = 1) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """(queries, is_duplicate): noisy copies of stored rows (from a few blocks) and fresh mixture draws."""
        rng = np.random.default_rng([self.seed, 10_000 + seed])
        n_dup = round(nq * DUP_FRACTION)
        n_blocks = math.ceil(n_total / BLOCK)
        chosen = sorted(rng.choice(n_blocks, size=min(n_blocks, 8), replace=False).tolist())
        per = [n_dup // len(chosen) + (1 if i < n_dup % len(chosen) else 0) for i in range(len(chosen))]
        sources = []
        for b, k in zip(chosen, per, strict=True):
            rows = self.block(b, min(BLOCK, n_total - b * BLOCK))
            sources.append(rows[rng.choice(len(rows), size=k, replace=False)])
        dup = np.concatenate(sources)
        noise = rng.standard_normal(dup.shape).astype(np.float32) * (0.33 / math.sqrt(self.dim))
        dup = dup + noise
        dup /= np.linalg.norm(dup, axis=1, keepdims=True)
        fresh = self.block(1_000_000 + seed, nq - n_dup)  # a block index no database ever uses
        q = np.ascontiguousarray(np.concatenate([dup, fresh]), dtype=np.float32)
        is_dup = np.concatenate([np.ones(len(dup), dtype=bool), np.zeros(len(fresh), dtype=bool)])
        return q, is_dup


class ExactTop1:
    """Exact inner-product nearest neighbour of each query, merged block by block (never holds the whole set)."""

    def __init__(self, queries: NDArray[np.float32]) -> None:
        self.queries = queries
        self.best = np.full(len(queries), -np.inf, dtype=np.float32)
        self.ids = np.full(len(queries), -1, dtype=np.int64)

    def update(self, start: int, block: NDArray[np.float32]) -> None:
        sims = self.queries @ block.T
        arg = sims.argmax(axis=1)
        val = sims[np.arange(len(self.queries)), arg]
        better = val > self.best
        self.best[better] = val[better]
        self.ids[better] = arg[better] + start


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class Built:
    name: str
    family: str
    index: faiss.Index
    n: int
    train_s: float
    add_s: float
    rss_delta_mib: float
    params: dict[str, Any]


def single_query_latency(index: faiss.Index, queries: NDArray[np.float32], k: int, passes: int = 3) -> dict[str, Any]:
    """One query per call on one FAISS thread: the per-lookup latency a moderator thread sees.

    Each query is timed ``passes`` times (wall clock and the thread's CPU time). ``p99_ms`` is the raw wall
    p99 of the first pass; ``p99_best_of_ms`` takes each query's fastest pass (drops preemption by other jobs,
    keeps the hard queries' own cost); ``p99_cpu_ms`` is the CPU time a query really used.
    """
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    wall = np.zeros((passes, len(queries)))
    cpu = np.zeros((passes, len(queries)))
    try:
        index.search(queries[:5], k)  # warm caches and lazily built tables
        for p in range(passes):
            for i in range(len(queries)):
                q = queries[i : i + 1]
                c0 = time.thread_time()
                t0 = time.perf_counter()
                index.search(q, k)
                wall[p, i] = time.perf_counter() - t0
                cpu[p, i] = time.thread_time() - c0
    finally:
        faiss.omp_set_num_threads(threads)
    first = summarize_ms(wall[0].tolist())
    best = summarize_ms(wall.min(axis=0).tolist())
    used = summarize_ms(np.median(cpu, axis=0).tolist())
    return {
        **first,
        "p50_best_of_ms": best["p50_ms"],
        "p99_best_of_ms": best["p99_ms"],
        "p99_cpu_ms": used["p99_ms"],
        "passes": passes,
    }


def evaluate(
    built: Built,
    setting: str,
    queries: NDArray[np.float32],
    is_dup: NDArray[np.bool_],
    truth: NDArray[Any],
    k: int,
    n_latency: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    _, ids = built.index.search(queries, k)
    batch_s = time.perf_counter() - t0
    lat = single_query_latency(built.index, queries[:n_latency], k)
    return {
        "setting": setting,
        "recall_at_1": round(recall_at_1(ids, truth), 4),
        "recall_at_1_dup_queries": round(recall_at_1(ids[is_dup], truth[is_dup]), 4),
        "recall_at_1_fresh_queries": round(recall_at_1(ids[~is_dup], truth[~is_dup]), 4) if (~is_dup).any() else None,
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "mean_ms": lat["mean_ms"],
        "max_ms": lat["max_ms"],
        "p50_best_of_ms": lat["p50_best_of_ms"],
        "p99_best_of_ms": lat["p99_best_of_ms"],
        "p99_cpu_ms": lat["p99_cpu_ms"],
        "latency_queries": lat["n"],
        "batch_qps": round(len(queries) / batch_s, 1),
    }


def serialized_size(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def redis_roundtrip(client: redis.Redis, index: faiss.Index, key: str, probe: NDArray[np.float32]) -> dict[str, Any]:
    """serialize_index -> SET in 64 MiB chunks -> GET -> deserialize_index, each step timed; results must match."""
    t0 = time.perf_counter()
    blob = faiss.serialize_index(index)
    t1 = time.perf_counter()
    nbytes = int(blob.nbytes)
    view = blob.data.cast("B")
    offsets = list(range(0, nbytes, CHUNK_BYTES))
    pipe = client.pipeline(transaction=False)
    for i, off in enumerate(offsets):
        pipe.set(f"{key}:{i}", view[off : off + CHUNK_BYTES])
    pipe.set(f"{key}:chunks", len(offsets))
    pipe.execute()
    t2 = time.perf_counter()
    del view, blob
    n_chunks = int(client.get(f"{key}:chunks") or 0)
    pipe = client.pipeline(transaction=False)
    for i in range(n_chunks):
        pipe.get(f"{key}:{i}")
    data = b"".join(pipe.execute())
    t3 = time.perf_counter()
    reloaded = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    t4 = time.perf_counter()
    same = bool(np.array_equal(index.search(probe, 5)[1], reloaded.search(probe, 5)[1]))
    client.delete(*[f"{key}:{i}" for i in range(n_chunks)], f"{key}:chunks")
    del data, reloaded
    gc.collect()
    return {
        "snapshot_bytes": nbytes,
        "serialize_s": round(t1 - t0, 3),
        "redis_set_s": round(t2 - t1, 3),
        "redis_get_s": round(t3 - t2, 3),
        "deserialize_s": round(t4 - t3, 3),
        "snapshot_s": round(t2 - t0, 3),
        "reload_s": round(t4 - t2, 3),
        "chunks": n_chunks,
        "reloaded_results_identical": same,
    }


def sieve_snapshot_roundtrip(client: redis.Redis, vectors: NDArray[np.float32], label: str) -> dict[str, Any]:
    """Sieve's own format (services.common.index.redis_store): generations of 16 MiB blocks of JSON ids + float32."""
    n, dim = vectors.shape
    store = RedisIndexStore(client, "bench", f"sieve-{label}")
    now = time.time()
    entries = [IndexEntry(f"upload-{i:08d}", vectors[i], now) for i in range(n)]
    out: dict[str, Any] = {"vectors": n, "dim": dim, "vector_blob_bytes": n * dim * 4}
    try:
        t0 = time.perf_counter()
        store.write_snapshot(Snapshot(entries=entries, stream_id="0-0"))
        t1 = time.perf_counter()
        snap = store.load_snapshot()
        t2 = time.perf_counter()
        assert snap is not None and len(snap.entries) == n
        index = FaissVectorIndex(dim)
        index.add(snap.entries)
        t3 = time.perf_counter()
        out.update(
            write_snapshot_s=round(t1 - t0, 3),
            load_snapshot_s=round(t2 - t1, 3),
            rebuild_index_s=round(t3 - t2, 3),
            reload_total_s=round(t3 - t1, 3),
        )
        del snap, index
    except (redis.exceptions.RedisError, OSError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(redis.exceptions.RedisError):
            store.delete_snapshot()
    del entries
    gc.collect()
    return out


# --------------------------------------------------------------------------------------------------- building


def _timed_build(
    name: str, family: str, index: faiss.Index, data: NDArray[np.float32], train_n: int, params: dict[str, Any]
) -> Built:
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    if not index.is_trained:
        index.train(data[:train_n])
    t1 = time.perf_counter()
    for off in range(0, len(data), BLOCK):
        index.add(data[off : off + BLOCK])
    t2 = time.perf_counter()
    return Built(name, family, index, len(data), t1 - t0, t2 - t1, (rss_bytes() - rss0) / MIB, params)


def build_flat(data: NDArray[np.float32]) -> Built:
    d = data.shape[1]
    return _timed_build("Flat", "flat", faiss.IndexFlatIP(d), data, 0, {})


def build_ivf_flat(data: NDArray[np.float32], nlist: int, niter: int = 10) -> Built:
    d = data.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = niter
    train_n = min(len(data), 40 * nlist)
    params = {"nlist": nlist, "train_vectors": train_n, "kmeans_iters": niter}
    return _timed_build(f"IVF{nlist},Flat", "ivf-flat", index, data, train_n, params)


def build_hnsw(data: NDArray[np.float32], m: int, ef_construction: int) -> Built:
    d = data.shape[1]
    index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    params = {"M": m, "efConstruction": ef_construction}
    return _timed_build(f"HNSW{m},Flat", "hnsw", index, data, 0, params)


def ivfpq_index(d: int, nlist: int, m: int, quantizer: faiss.Index | None, refine: bool) -> faiss.Index:
    coarse = quantizer if quantizer is not None else faiss.IndexFlatIP(d)
    ivfpq = faiss.IndexIVFPQ(coarse, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    ivfpq.cp.niter = 10
    ivfpq.pq.cp.niter = 10  # 32 sub-quantizer k-means of 25 iterations each take minutes on 2 shared cores
    if not refine:
        return ivfpq
    return faiss.IndexRefine(
        ivfpq, faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    )


def trained_quantizer(ivf: faiss.Index) -> faiss.Index:
    """A copy of a trained IVF's coarse quantizer, so IVF-PQ reuses the k-means instead of repeating it."""
    ivf_any: Any = faiss.downcast_index(ivf)
    return faiss.clone_index(ivf_any.quantizer)


def build_ivfpq(
    data: NDArray[np.float32], nlist: int, m: int, refine: bool, quantizer: faiss.Index | None = None
) -> Built:
    d = data.shape[1]
    index = ivfpq_index(d, nlist, m, quantizer, refine)
    train_n = min(len(data), max(40 * nlist, 256 * 40))
    name = f"IVF{nlist},PQ{m}" + (",RefineSQ8" if refine else "")
    params = {"nlist": nlist, "pq_m": m, "pq_bits": 8, "train_vectors": train_n, "refine": "SQ8" if refine else None}
    params["coarse_quantizer"] = "reused from IVF-Flat" if quantizer is not None else "trained"
    return _timed_build(name, "ivf-pq", index, data, train_n, params)


# -------------------------------------------------------------------------------------------------- settings


def apply_setting(built: Built, value: int | tuple[int, int]) -> str:
    index: Any = built.index
    if built.family == "flat":
        return "exact"
    if isinstance(value, tuple):
        nprobe, k_factor = value
        base: Any = faiss.downcast_index(index.base_index)
        base.nprobe = nprobe
        index.k_factor = float(k_factor)
        return f"nprobe={nprobe},k_factor={k_factor}"
    typed: Any = faiss.downcast_index(index)
    if built.family == "hnsw":
        typed.hnsw.efSearch = value
        return f"efSearch={value}"
    typed.nprobe = value
    return f"nprobe={value}"


@dataclass
class SizePlan:
    n: int
    ivf_nlist: int
    hnsw: tuple[int, int] | None  # (M, efConstruction)
    ivfpq: tuple[int, int] | None  # (nlist, m)
    flat: bool
    nprobes: tuple[int, ...]
    ef_searches: tuple[int, ...]
    pq_settings: tuple[int, ...]
    refine_settings: tuple[tuple[int, int], ...]


def plans(quick: bool) -> list[SizePlan]:
    if quick:
        return [SizePlan(20_000, 128, (16, 40), (128, 32), True, (1, 4, 16, 64), (16, 64, 256), (8, 32), ((16, 8),))]
    return [
        SizePlan(
            100_000,
            1024,
            (16, 64),
            (1024, 32),
            True,
            (1, 2, 4, 8, 16, 32, 64, 128),
            (16, 32, 64, 128, 256, 512),
            (16, 64),
            ((16, 8), (64, 16)),
        ),
        SizePlan(
            1_000_000,
            4096,
            (16, 64),
            (4096, 32),
            True,
            (1, 2, 4, 8, 16, 32, 64, 128, 256),
            (16, 32, 64, 128, 256, 512),
            (16, 64),
            ((16, 8), (32, 16), (64, 32)),
        ),
        SizePlan(10_000_000, 0, None, (2048, 32), False, (), (), (8, 16, 32, 64), ((16, 8), (32, 16), (64, 32))),
    ]


def size_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


# ------------------------------------------------------------------------------------------------------- run


class _Runner:
    def __init__(self, result: StageResult, say: Progress, client: redis.Redis, quick: bool) -> None:
        self.result = result
        self.say = say
        self.client = client
        self.quick = quick
        self.k = DecisionSettings().top_k
        self.nq = 200 if quick else 1000
        self.n_latency = 100 if quick else 1000
        self.measured: dict[tuple[int, str], dict[str, Any]] = {}

    def record(
        self,
        built: Built,
        settings: list[Any],
        queries: NDArray[np.float32],
        is_dup: NDArray[np.bool_],
        truth: NDArray[Any],
        snapshot: dict[str, Any] | None,
        nbytes: int,
        n_latency: int | None = None,
    ) -> None:
        label = size_label(built.n)
        gpu_ready = built.family in ("flat", "ivf-flat", "ivf-pq")
        base = {
            "size": built.n,
            "size_label": label,
            "index": built.name,
            "family": built.family,
            "gpu_ready": gpu_ready,
            "build_params": built.params,
            "train_s": round(built.train_s, 2),
            "add_s": round(built.add_s, 2),
            "build_s": round(built.train_s + built.add_s, 2),
            "index_bytes": nbytes,
            "mib_per_million": round(nbytes / built.n * 1e6 / MIB, 1),
            "bytes_per_vector": round(nbytes / built.n, 1),
            "rss_growth_mib": round(built.rss_delta_mib, 1),
            **({f"redis_{k}": v for k, v in snapshot.items()} if snapshot else {}),
        }
        for value in settings:
            setting = apply_setting(built, value)
            ev = evaluate(built, setting, queries, is_dup, truth, self.k, n_latency or self.n_latency)
            row = self.result.add_row(f"{label} / {built.name} / {setting}", **base, **ev)
            self.measured[(built.n, f"{built.name}/{setting}")] = row
            self.say(
                f"{label} {built.name} {setting}: recall@1 {ev['recall_at_1']:.4f} "
                f"(dup {ev['recall_at_1_dup_queries']:.4f}, fresh {ev['recall_at_1_fresh_queries']}), "
                f"p50 {ev['p50_ms']:.3f} ms, p99 {ev['p99_ms']:.3f} ms (best-of-3 {ev['p99_best_of_ms']:.3f}, "
                f"cpu {ev['p99_cpu_ms']:.3f})"
            )

    def snapshot(self, built: Built, queries: NDArray[np.float32]) -> dict[str, Any]:
        snap = redis_roundtrip(self.client, built.index, f"bench:faiss:{built.name}:{built.n}", queries[:20])
        self.say(
            f"{size_label(built.n)} {built.name}: snapshot {snap['snapshot_bytes'] / MIB:.0f} MiB, "
            f"save {snap['snapshot_s']:.2f}s, reload {snap['reload_s']:.2f}s, "
            f"identical {snap['reloaded_results_identical']}"
        )
        return snap

    def in_memory(self, plan: SizePlan, gen: ClusteredVectors) -> None:
        label = size_label(plan.n)
        self.say(f"{label}: generating {plan.n} x {gen.dim} vectors")
        data = np.concatenate([x for _, x in gen.blocks(plan.n)])
        queries, is_dup = gen.queries(plan.n, self.nq)

        flat = build_flat(data)
        truth = flat.index.search(queries, 1)[1][:, 0]
        flat_lat = min(self.n_latency, 100) if plan.n >= 1_000_000 else self.n_latency
        snap = self.snapshot(flat, queries)
        sieve = sieve_snapshot_roundtrip(self.client, data, label)
        if "error" in sieve and plan.n * gen.dim * 4 > 512 * (1 << 20):
            self.say(
                f"{label}: Sieve snapshot failed at Redis defaults ({sieve['error']}); retrying with larger limits"
            )
            self.client.config_set("proto-max-bulk-len", str(4 << 30))
            self.client.config_set("client-query-buffer-limit", str(4 << 30))
            retry = sieve_snapshot_roundtrip(self.client, data, label)
            sieve = {
                **retry,
                "at_redis_defaults": sieve["error"],
                "redis_config_for_retry": {"proto-max-bulk-len": "4gb", "client-query-buffer-limit": "4gb"},
            }
            self.client.config_set("proto-max-bulk-len", str(512 << 20))
            self.client.config_set("client-query-buffer-limit", str(1 << 30))
        self.say(f"{label}: Sieve snapshot format (RedisIndexStore, Flat): {sieve}")
        self.result.params.setdefault("sieve_snapshot_format", {})[label] = sieve
        self.record(flat, ["exact"], queries, is_dup, truth, snap, snap["snapshot_bytes"], flat_lat)
        del flat
        gc.collect()

        self.say(f"{label}: IVF-Flat nlist={plan.ivf_nlist}: training and adding")
        ivf = build_ivf_flat(data, plan.ivf_nlist)
        self.say(f"{label}: IVF-Flat built in {ivf.train_s + ivf.add_s:.1f}s")
        snap = self.snapshot(ivf, queries)
        self.record(
            ivf, [p for p in plan.nprobes if p <= plan.ivf_nlist], queries, is_dup, truth, snap, snap["snapshot_bytes"]
        )
        quantizer = trained_quantizer(ivf.index)
        del ivf
        gc.collect()

        if plan.hnsw is not None:
            m, efc = plan.hnsw
            self.say(f"{label}: HNSW M={m} efConstruction={efc}: adding (the slowest build)")
            hnsw = build_hnsw(data, m, efc)
            self.say(f"{label}: HNSW built in {hnsw.add_s:.1f}s")
            snap = self.snapshot(hnsw, queries)
            self.record(hnsw, list(plan.ef_searches), queries, is_dup, truth, snap, snap["snapshot_bytes"])
            del hnsw
            gc.collect()

        if plan.ivfpq is not None:
            nlist, m = plan.ivfpq
            reuse = quantizer if nlist == plan.ivf_nlist else None
            self.say(f"{label}: IVF-PQ nlist={nlist} PQ{m} + SQ8 refine: training and adding")
            refined = build_ivfpq(data, nlist, m, refine=True, quantizer=reuse)
            self._record_ivfpq(refined, plan, queries, is_dup, truth, snapshot_refined=True)
            del refined
        del data
        gc.collect()

    def _record_ivfpq(
        self,
        refined: Built,
        plan: SizePlan,
        queries: NDArray[np.float32],
        is_dup: NDArray[np.bool_],
        truth: NDArray[Any],
        snapshot_refined: bool,
    ) -> None:
        assert isinstance(refined.index, faiss.IndexRefine)
        base_index = faiss.downcast_index(refined.index.base_index)
        base = Built(
            refined.name.replace(",RefineSQ8", ""),
            "ivf-pq",
            base_index,
            refined.n,
            refined.train_s,
            refined.add_s,
            refined.rss_delta_mib,
            {**refined.params, "refine": None},
        )
        self.say(f"{size_label(refined.n)}: IVF-PQ built in {refined.train_s + refined.add_s:.1f}s (incl. SQ8 codes)")
        snap = self.snapshot(base, queries)
        self.record(base, list(plan.pq_settings), queries, is_dup, truth, snap, snap["snapshot_bytes"])
        refine_index: Any = faiss.downcast_index(refined.index.refine_index)
        refine_codes = int(refined.n * refine_index.code_size)
        snap_r = self.snapshot(refined, queries) if snapshot_refined else None
        nbytes = snap_r["snapshot_bytes"] if snap_r else snap["snapshot_bytes"] + refine_codes
        self.record(refined, list(plan.refine_settings), queries, is_dup, truth, snap_r, nbytes)

    def streaming(self, plan: SizePlan, gen: ClusteredVectors) -> None:
        """10M: vectors are generated block by block, added, and folded into the exact ground truth; never held."""
        assert plan.ivfpq is not None
        nlist, m = plan.ivfpq
        label = size_label(plan.n)
        queries, is_dup = gen.queries(plan.n, self.nq)
        index = ivfpq_index(gen.dim, nlist, m, None, refine=True)
        train_blocks = 2
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        train = np.concatenate([gen.block(b) for b in range(train_blocks)])
        self.say(f"{label}: training IVF{nlist},PQ{m} + SQ8 on {len(train)} vectors")
        index.train(train)
        del train
        train_s = time.perf_counter() - t0
        self.say(f"{label}: trained in {train_s:.1f}s; adding {plan.n} vectors block by block")
        exact = ExactTop1(queries)
        add_s = gen_s = gt_s = 0.0
        n_blocks = math.ceil(plan.n / BLOCK)
        for b, (start, x) in enumerate(_timed_blocks(gen, plan.n), 1):
            block, g = x
            gen_s += g
            t1 = time.perf_counter()
            index.add(block)
            t2 = time.perf_counter()
            exact.update(start, block)
            gt_s += time.perf_counter() - t2
            add_s += t2 - t1
            if b % 10 == 0 or b == n_blocks:
                eta = (add_s + gen_s + gt_s) / b * (n_blocks - b)
                self.say(f"{label}: {b}/{n_blocks} blocks, add {add_s:.0f}s, ground truth {gt_s:.0f}s, ETA {eta:.0f}s")
        params = {
            "nlist": nlist,
            "pq_m": m,
            "pq_bits": 8,
            "train_vectors": train_blocks * BLOCK,
            "refine": "SQ8",
            "coarse_quantizer": "trained",
            "vector_generation_s": round(gen_s, 1),
            "ground_truth_s": round(gt_s, 1),
        }
        refined = Built(
            f"IVF{nlist},PQ{m},RefineSQ8", "ivf-pq", index, plan.n, train_s, add_s, (rss_bytes() - rss0) / MIB, params
        )
        self._record_ivfpq(refined, plan, queries, is_dup, exact.ids, snapshot_refined=False)
        del index, refined
        gc.collect()
        self.estimates(plan.n)

    def estimates(self, n: int) -> None:
        """Flat and HNSW at n from their 1M measurements: memory scales linearly, Flat latency linearly."""
        ref_n = 1_000_000
        factor = n / ref_n
        for (size, name), row in list(self.measured.items()):
            if size != ref_n or row["family"] not in ("flat", "hnsw"):
                continue
            if row["family"] == "hnsw" and not name.endswith("efSearch=128"):
                continue
            log_factor = math.log(n) / math.log(ref_n)
            est = {
                "size": n,
                "size_label": size_label(n),
                "index": row["index"],
                "family": row["family"],
                "gpu_ready": row["gpu_ready"],
                "setting": row["setting"],
                "estimated": True,
                "index_bytes": int(row["index_bytes"] * factor),
                "mib_per_million": row["mib_per_million"],
                "build_s": round(row["build_s"] * factor * (log_factor if row["family"] == "hnsw" else 1.0), 0),
                "p50_ms": round(row["p50_ms"] * (factor if row["family"] == "flat" else log_factor), 3),
                "p99_ms": round(row["p99_ms"] * (factor if row["family"] == "flat" else log_factor), 3),
                "how": "from the 1M row: memory and Flat latency x10, HNSW build x10 x log(n) ratio, "
                "HNSW latency x log(n) ratio (recall not estimated)",
            }
            self.result.add_row(f"{size_label(n)} / {row['index']} / {row['setting']} (estimated)", **est)


def _timed_blocks(gen: ClusteredVectors, n: int) -> Iterator[tuple[int, tuple[NDArray[np.float32], float]]]:
    for b in range(math.ceil(n / BLOCK)):
        t0 = time.perf_counter()
        x = gen.block(b, min(BLOCK, n - b * BLOCK))
        yield b * BLOCK, (x, time.perf_counter() - t0)


def check_target(result: StageResult, rows: list[dict[str, Any]]) -> None:
    at_1m = [r for r in rows if r.get("size") == 1_000_000 and not r.get("estimated")]
    if not at_1m:
        return
    good = [r for r in at_1m if r["recall_at_1"] >= TARGET_RECALL]
    chosen = min(good, key=lambda r: r["p99_best_of_ms"]) if good else max(at_1m, key=lambda r: r["recall_at_1"])
    fast_enough = [r for r in good if r["p99_ms"] < TARGET_P99_MS]
    fast_best_of = [r for r in good if r["p99_best_of_ms"] < TARGET_P99_MS]
    detail = f"{chosen['index']} {chosen['setting']}" + ("" if good else " (no setting reached the recall target)")
    result.targets.append(Target("faiss 1M: recall@1 vs exact", chosen["recall_at_1"], TARGET_RECALL, ">=", detail))
    result.targets.append(Target("faiss 1M: single-query p99 ms", chosen["p99_ms"], TARGET_P99_MS, "<=", detail))
    result.targets.append(
        Target(
            "faiss 1M: single-query p99 ms, best of 3 passes per query (other jobs' preemption removed)",
            chosen["p99_best_of_ms"],
            TARGET_P99_MS,
            "<=",
            detail,
        )
    )
    gpu = [r for r in fast_enough if r["gpu_ready"]]
    result.params["target_1m"] = {
        "chosen": {
            k: chosen[k]
            for k in ("index", "setting", "recall_at_1", "p50_ms", "p99_ms", "p99_best_of_ms", "p99_cpu_ms")
        },
        "all_meeting_both": [f"{r['index']} {r['setting']} (p99 {r['p99_ms']} ms)" for r in fast_enough],
        "gpu_ready_meeting_both": [f"{r['index']} {r['setting']}" for r in gpu],
        "meeting_both_on_best_of_3": [
            f"{r['index']} {r['setting']} (p99 {r['p99_best_of_ms']} ms)" for r in fast_best_of
        ],
    }


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    """The 1M target check (chosen index and setting, its recall and latencies) and the GPU-ready choice."""
    params = out["params"]
    target = params.get("target_1m", {})
    return {
        "target_1m": {
            **target.get("chosen", {}),
            "met_raw_wall_p99": bool(target.get("all_meeting_both")),
            "met_best_of_3_p99": bool(target.get("meeting_both_on_best_of_3")),
        },
        "gpu_ready_choice": params.get("gpu_ready_choice"),
    }


def run(quick: bool = False, dim: int = DEFAULT_DIM, sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    say = Progress("faiss")
    result = StageResult("faiss", "Stage 4: FAISS lookup (Flat, IVF-Flat, HNSW, IVF-PQ) and Redis snapshots", quick)
    result.begin()
    threads = faiss.omp_get_max_threads()
    gen = ClusteredVectors(dim)
    server = RedisServer(WORK_DIR / "redis")
    server.start(WORK_DIR / "logs", timeout_s=30.0)
    client = redis.Redis.from_url(server.url, socket_timeout=600)
    # The local stack's redis-server caps memory at 1 GB and appends every write to an AOF; a 1M-vector
    # snapshot alone is 1 GB, so the benchmark lifts the cap and turns the AOF off (disk speed is not the subject).
    client.config_set("maxmemory", "0")
    client.config_set("appendonly", "no")
    runner = _Runner(result, say, client, quick)
    result.params = {
        "dim": dim,
        "metric": "inner product on L2-normalised vectors (cosine), as services/common/index/faiss_index.py",
        "data": f"Gaussian mixture, {len(gen.centres)} clusters, Zipf(0.7) sizes, spread U(0.5, 1.1), normalised",
        "queries": f"{runner.nq}: {DUP_FRACTION:.0%} noisy copies of stored vectors (cosine ~0.95), rest fresh draws",
        "k": runner.k,
        "latency": f"one query per call, 1 FAISS thread, {runner.n_latency} queries x 3 passes per setting "
        "(100 for Flat >= 1M); p99_ms = first pass, p99_best_of_ms = per-query fastest pass",
        "batch_qps": f"all queries in one call, {threads} FAISS threads",
        "redis": {
            "server": f"redis-server {server.url} via services.common.stack.redis.RedisServer",
            "config_changed": {"maxmemory": "0 (was 1gb)", "appendonly": "no (was yes)"},
            "faiss_snapshot": "serialize_index bytes in 64 MiB chunks, pipelined SET / GET",
        },
    }
    try:
        for plan in plans(quick):
            if sizes is not None and plan.n not in sizes:
                continue
            if plan.flat:
                runner.in_memory(plan, gen)
            else:
                runner.streaming(plan, gen)
    finally:
        client.close()
        server.stop()
    check_target(result, result.rows)
    result.params["gpu_ready_choice"] = (
        "IVF-Flat (nlist ~4 sqrt(n)) up to a few million vectors and IVF-PQ (+ a CPU SQ8 refine for recall) "
        "beyond: both move to faiss-gpu with faiss.index_cpu_to_gpu (GpuIndexIVFFlat / GpuIndexIVFPQ) and load "
        "from the same serialised snapshot. HNSW is CPU-only in faiss (index_cpu_to_gpu cannot take it). "
        "No GPU numbers are claimed here: none was measured."
    )
    result.notes += [
        "Flat and HNSW are not built at 10M: Flat needs 10 GiB of RAM for the vectors and ~10x the 1M single-query "
        "latency; HNSW needs ~12.5 GiB and roughly an hour to build on 2 shared cores. Rows marked estimated are "
        "extrapolated from the 1M measurements, not measured.",
        "At 10M the IVF-PQ coarse quantizer has nlist=2048 so the add (assigning 10M vectors on 2 cores) stays "
        "within minutes; k-means training uses a 200k sample.",
        "HNSW's recall on this data falls with size (fine at 100k, low at 1M for the efSearch values tried): "
        "the noise inside each synthetic topic is isotropic in all dimensions, so inside a big topic every member "
        "is nearly equidistant and greedy graph search has no gradient to follow, a known worst case; real "
        "embeddings have a much lower intrinsic dimension. A larger M / efConstruction would help, at a 1M build "
        "time well beyond the ~10 minutes M=16 already takes on 2 shared cores, so it was not tried.",
        "Memory per million vectors is the serialised index size (what the snapshot stores and a replica holds); "
        "rss_growth_mib is this process's RSS growth during the build, noisier (allocator reuse).",
    ]
    out = result.finish().to_dict()
    out["summary"] = summarize(out)
    say("done")
    return out


if __name__ == "__main__":
    raise SystemExit(main_for("faiss", run))
