"""The recent-images index in Milvus: one collection per embedder version, shared by every replica.

Replicas hold no vectors: each search goes to Milvus, so the window can outgrow one machine and a new replica
pays nothing to start. Read-your-writes across replicas comes from the consistency level. Session (the default)
searches with the newest write timestamp any replica has published (``write_clock``), so every write acknowledged
before a search is visible to it, and a search waits for the server only when such a write is younger than one
time tick; Strong waits for the next tick on every search. Expired rows are filtered out of every
search at once and deleted in the background. Any failure to reach Milvus is a ``TransientError``: the moderator
pauses and retries the batch, and commits no offset until the batch's rows are in, so nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from numpy.typing import NDArray
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.client import ts_utils

from services.common.config import MilvusSettings
from services.common.errors import TransientError
from services.common.index.base import IndexEntry, Neighbour
from services.common.index.write_clock import WriteClock

log = logging.getLogger(__name__)
logging.getLogger("pymilvus").setLevel(logging.ERROR)  # it warns per call while the server restarts

T = TypeVar("T")
UPSERT_ROWS = 2000  # rows per upsert call: one gRPC message stays far below its 64 MB cap at 2048-d
MAX_ID_LENGTH = 512
COUNT_EVERY_S = 5.0
FAILURES = (MilvusException, grpc.RpcError, ConnectionError, TimeoutError)


def collection_name(prefix: str, namespace: str, model_version: str) -> str:
    """Milvus names allow letters, digits and '_': anything else becomes '_' plus a hash, so names never collide."""
    raw = f"{prefix}_{namespace}_{model_version}"
    clean = re.sub(r"[^A-Za-z0-9_]", "_", raw)
    if clean != raw:
        clean += "_" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return clean if clean[0].isalpha() or clean[0] == "_" else f"_{clean}"


def _unit_rows(vectors: NDArray[Any]) -> NDArray[np.float32]:
    """Inner product on unit vectors is the cosine the thresholds are stated in."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    unit: NDArray[np.float32] = v / np.maximum(norms, 1e-12)
    return unit


class MilvusRecentIndex:
    def __init__(
        self,
        settings: MilvusSettings,
        namespace: str,
        model_version: str,
        dim: int,
        retention_s: int,
        connect: Callable[[], MilvusClient] | None = None,
        write_clock: WriteClock | None = None,
    ) -> None:
        if settings.consistency == "Session" and write_clock is None:
            raise ValueError("Milvus consistency Session needs the replicas' shared write clock (Redis)")
        self.settings = settings
        self.write_clock = write_clock
        self.model_version = model_version
        self.dim = dim
        self.retention_s = retention_s
        self.collection = collection_name(settings.collection_prefix, namespace, model_version)
        self.last_sync = 0.0
        self.milvus_ok = True
        self._connect = connect or self._default_connect
        self._client: MilvusClient | None = None
        self._ready = False
        self._count = 0
        self._counted_at = 0.0
        self._swept_at = 0.0
        self._lock = threading.Lock()
        self._ts_lock = threading.Lock()
        self._own_write_ts = 0  # newest Milvus timestamp of this handle's writes
        self._unpublished_ts = 0  # ... not yet in the shared write clock
        self._publish_failing = False

    def _default_connect(self) -> MilvusClient:
        token = self.settings.token.get_secret_value()
        return MilvusClient(uri=self.settings.uri, token=token, timeout=self.settings.timeout_s)

    # -- plumbing ------------------------------------------------------------------------------------

    def _call(self, what: str, work: Callable[[MilvusClient], T], ensure: bool = True) -> T:
        """Runs one Milvus call; an unreachable, slow or failing server becomes a TransientError for the caller.

        ``ensure``: first make sure the collection exists and is loaded (once per handle)."""
        try:
            if self._client is None:
                self._client = self._connect()
            if ensure and not self._ready:
                self._ensure_collection(self._client)
                self._ready = True
            result = work(self._client)
        except FAILURES as exc:
            if self.milvus_ok:
                log.warning("index %s: Milvus unavailable during %s (%s)", self.model_version, what, exc)
            self.milvus_ok = False
            raise TransientError("milvus", f"{what} on {self.collection}: {exc}") from exc
        if not self.milvus_ok:
            log.info("index %s: Milvus reachable again", self.model_version)
        self.milvus_ok = True
        self.last_sync = time.time()
        return result

    def _ensure_collection(self, client: MilvusClient, drop_first: bool = False) -> None:
        """Creates the version's collection with its HNSW index and loads it; several replicas may race here."""
        timeout = self.settings.timeout_s
        if drop_first and client.has_collection(self.collection, timeout=timeout):
            client.drop_collection(self.collection, timeout=timeout)
        if not client.has_collection(self.collection, timeout=timeout):
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("upload_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
            schema.add_field("added_at", DataType.DOUBLE)
            schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dim)
            index = client.prepare_index_params()
            index.add_index(
                field_name="embedding",
                index_type="HNSW",
                metric_type="IP",
                params={"M": self.settings.hnsw_m, "efConstruction": self.settings.hnsw_ef_construction},
            )
            try:
                client.create_collection(
                    self.collection,
                    schema=schema,
                    index_params=index,
                    consistency_level=self.settings.consistency,
                    timeout=timeout,
                )
                log.info("index %s: created Milvus collection %s (%d-d)", self.model_version, self.collection, self.dim)
            except MilvusException:
                if not client.has_collection(self.collection, timeout=timeout):
                    raise  # not another replica's creation: a real failure
        else:
            found = collection_dim(client, self.collection, timeout)
            if found != self.dim:
                raise ValueError(f"{self.collection} holds {found}-d vectors, not {self.dim}-d: a version mix-up")
        client.load_collection(self.collection, timeout=timeout)

    def _read_consistency(self) -> dict[str, Any]:
        """Session: guarantee the newest write any replica has published, and this handle's own. When Redis is
        unreachable, or no write is known (a fresh collection, a lost key): Strong, slower but never stale."""
        if self.settings.consistency != "Session" or self.write_clock is None:
            return {"consistency_level": self.settings.consistency}
        self._publish_pending()
        try:
            ts = max(self.write_clock.read(), self._own_write_ts)
        except TransientError:
            return {"consistency_level": "Strong"}
        if ts <= 0:
            return {"consistency_level": "Strong"}
        return {"consistency_level": "Customized", "guarantee_timestamp": ts}

    def _publish_pending(self) -> None:
        """Other replicas see this handle's writes once their timestamp is in Redis. While Redis is away the
        write still lands in Milvus (as FAISS additions wait in a replica), and is published when it is back."""
        ts = self._unpublished_ts
        if self.write_clock is None or ts <= 0:
            return
        try:
            self.write_clock.advance(ts)
        except TransientError as exc:
            if not self._publish_failing:
                log.warning("index %s: write timestamp not published yet (%s)", self.model_version, exc)
            self._publish_failing = True
            return
        if self._publish_failing:
            log.info("index %s: write timestamps published again", self.model_version)
        self._publish_failing = False
        with self._ts_lock:
            if self._unpublished_ts == ts:  # no newer write came in meanwhile
                self._unpublished_ts = 0

    # -- the RecentIndex interface -------------------------------------------------------------------

    def __len__(self) -> int:
        """Rows as last counted (counting on every call would cost a query per search)."""
        return self._count

    def sync(self) -> bool:
        """Nothing to replay (Milvus is the one copy): asks the server only until it has answered, or after a
        failure, so a healthy moderator pays no extra round trip per batch."""
        if self._ready and self.milvus_ok:
            return True
        try:
            self._call("sync", lambda c: c.has_collection(self.collection, timeout=self.settings.timeout_s))
            return True
        except TransientError:
            return False

    def search(self, vectors: NDArray[Any], k: int, exclude: list[str] | None = None) -> list[list[Neighbour]]:
        if len(vectors) == 0:
            return []
        cutoff = time.time() - self.retention_s
        ef = max(self.settings.search_ef, k + 1)
        data = _unit_rows(vectors).tolist()
        consistency = self._read_consistency()
        hits = self._call(
            "search",
            lambda c: c.search(
                self.collection,
                data=data,
                limit=k + 1,
                filter=f"added_at >= {cutoff!r}",
                search_params={"metric_type": "IP", "params": {"ef": ef}},
                timeout=self.settings.timeout_s,
                **consistency,
            ),
        )
        out = []
        for i, row in enumerate(hits):
            own = exclude[i] if exclude else None
            found = [Neighbour(str(h["id"]), float(h["distance"])) for h in row if str(h["id"]) != own]
            out.append(found[:k])
        return out

    def vectors(self, upload_ids: list[str]) -> dict[str, NDArray[Any]]:
        if not upload_ids:
            return {}
        cutoff = time.time() - self.retention_s
        wanted = f"upload_id in {json.dumps(upload_ids)} and added_at >= {cutoff!r}"
        consistency = self._read_consistency()
        rows = self._call(
            "vectors",
            lambda c: c.query(
                self.collection,
                filter=wanted,
                output_fields=["upload_id", "embedding"],
                timeout=self.settings.timeout_s,
                **consistency,
            ),
        )
        return {str(r["upload_id"]): np.asarray(r["embedding"], np.float32) for r in rows}

    def add(self, entries: list[IndexEntry]) -> None:
        """Upserts by upload id; raises TransientError until Milvus has every row (the caller retries)."""
        for start in range(0, len(entries), UPSERT_ROWS):
            chunk = entries[start : start + UPSERT_ROWS]
            vectors = _unit_rows(np.stack([e.vector for e in chunk]))
            rows = [
                {"upload_id": e.upload_id, "added_at": float(e.added_at), "embedding": vectors[i].tolist()}
                for i, e in enumerate(chunk)
            ]
            self._upsert(rows)
        self._count += len(entries)  # upserts of known ids over-count until the next count

    def _upsert(self, rows: list[dict[str, Any]]) -> None:
        self._call("upsert", lambda c: c.upsert(self.collection, rows, timeout=self.settings.timeout_s))
        # pymilvus keeps the newest write timestamp per collection of this process (MilvusClient.upsert does not
        # return it): at least this write's, so publishing it covers this write.
        ts = int(ts_utils.get_collection_ts(self.collection) or 0)
        with self._ts_lock:
            self._own_write_ts = max(self._own_write_ts, ts)
            self._unpublished_ts = max(self._unpublished_ts, ts)
        self._publish_pending()

    def maintain(self) -> None:
        """Deletes expired rows now and then (searches already skip them) and refreshes the row count."""
        now = time.time()
        self._publish_pending()
        try:
            if now - self._swept_at >= self.settings.retention_sweep_s:
                cutoff = now - self.retention_s
                expired = f"added_at < {cutoff!r}"
                self._call(
                    "retention", lambda c: c.delete(self.collection, filter=expired, timeout=self.settings.timeout_s)
                )
                self._swept_at = now
            if now - self._counted_at >= COUNT_EVERY_S:
                self.count()
        except TransientError:
            pass  # the next search pauses the moderator if Milvus stays away

    def count(self) -> int:
        """Rows in the collection now (expired rows not yet swept included)."""

        consistency = self._read_consistency()

        def rows(client: MilvusClient) -> int:
            timeout = self.settings.timeout_s
            found = client.query(self.collection, filter="", output_fields=["count(*)"], timeout=timeout, **consistency)
            return int(found[0]["count(*)"]) if found else 0

        self._count = self._call("count", rows, ensure=False)
        self._counted_at = time.time()
        return self._count

    def entries(self) -> list[IndexEntry]:
        cutoff = time.time() - self.retention_s

        def read(client: MilvusClient) -> list[IndexEntry]:
            found: list[IndexEntry] = []
            iterator = client.query_iterator(
                self.collection,
                batch_size=1000,
                filter=f"added_at >= {cutoff!r}",
                output_fields=["upload_id", "added_at", "embedding"],
                timeout=self.settings.timeout_s,
                consistency_level="Strong",  # a backfill reads rarely and must see every row
            )
            try:
                while batch := iterator.next():
                    found += [
                        IndexEntry(str(r["upload_id"]), np.asarray(r["embedding"], np.float32), float(r["added_at"]))
                        for r in batch
                    ]
            finally:
                iterator.close()
            return found

        return self._call("read window", read)

    def replace(self, entries: list[IndexEntry]) -> None:
        """A fresh collection holding exactly ``entries``; the promotion switches to it only after this returns."""
        with self._lock:
            if not entries and not self.dim:  # nothing to hold, dimension unknown: the first upload creates it
                self._call(
                    "drop", lambda c: c.drop_collection(self.collection, timeout=self.settings.timeout_s), ensure=False
                )
                self._ready, self._count = False, 0
                return
            self._call("recreate", lambda c: self._ensure_collection(c, drop_first=True), ensure=False)
            self._ready = True
            self.add(entries)
            self._call("flush", lambda c: c.flush(self.collection, timeout=max(self.settings.timeout_s, 60.0)))
            self._count = len(entries)


def collection_dim(client: MilvusClient, collection: str, timeout: float) -> int:
    fields = client.describe_collection(collection, timeout=timeout)["fields"]
    vector = next(f for f in fields if f["name"] == "embedding")
    return int(vector["params"]["dim"])


def milvus_index_dim(settings: MilvusSettings, namespace: str, model_version: str) -> int | None:
    """The dimension of a version's collection (None: it has none)."""
    name = collection_name(settings.collection_prefix, namespace, model_version)
    try:
        client = MilvusClient(uri=settings.uri, token=settings.token.get_secret_value(), timeout=settings.timeout_s)
        if not client.has_collection(name, timeout=settings.timeout_s):
            return None
        return collection_dim(client, name, settings.timeout_s)
    except FAILURES as exc:
        raise TransientError("milvus", f"cannot describe {name}: {exc}") from exc
