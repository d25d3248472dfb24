"""Banked images' served embeddings: matched by cosine, one FAISS index per bank and model version.

PDQ misses what changes the frame (crops, caption bars); the served embedding was trained for exactly those
edits. Layout in Redis (``<prefix>`` is SIEVE_REDIS_KEY_PREFIX, ``<mv>`` a model version such as
``sieve_embedder:2``):

- ``<prefix>:bankemb:<mv>``          hash    ``<bank>/<item id>`` -> float32 embedding bytes (L2-normalised)
- ``<prefix>:bankemb:<mv>:rev``      string  bumped on every change; replicas reload that version when it moves
- ``<prefix>:bankreg:<mv>``          hash    ``<bank>/<item id>`` -> the embeddings of the image's fixed regions
                                             (services/common/regions.py), len(REGIONS) x d float32: a crop
                                             of a banked photo is near one of them though far from the whole
- ``<prefix>:bankpix:<bank>``        hash    item id -> the decoded model input (uint8, 256x256x3), kept so a
                                             new model version can re-embed the bank (``reembed``)
- ``<prefix>:bankfeat:<bank>``       hash    item id -> the image's keypoints (``LocalFeatures``): an embedding
                                             match is verified with them as the recent index verifies its own;
                                             they do not depend on the model version

Embedding banks hold banked images, not exchanged hash lists, so they stay small (thousands): a replica
reloads a version's vectors whole when its revision moves rather than following a log. That is also why regions
pay for their memory here (7 KB more per 256-d image) and not in the recent window of millions.

A banked image's cosine to an upload is the best of its whole and its regions' cosines, in the first pass and
in the keypoint channel alike; verification and the bank's threshold then judge it as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import faiss
import numpy as np
import redis
from numpy.typing import NDArray

from services.common.inference import ImageModels
from services.common.regions import REGIONS, region_views
from services.common.verification import KeypointHit, KeypointIndex, LocalFeatures

log = logging.getLogger(__name__)
SEP = "/"
EmbedFn = Callable[[NDArray[np.uint8]], NDArray[np.float32]]


@dataclass(frozen=True)
class EmbeddingHit:
    bank: str
    item_id: str
    cosine: float  # the best of the image's views: the whole or one of its regions
    whole: float | None = None  # the whole image's cosine, where a region's was better


@dataclass
class _VersionIndex:
    rev: int
    banks: dict[str, tuple[faiss.IndexFlatIP, list[str]]] = field(default_factory=dict)
    # "<bank>/<item id>" -> its views' embeddings, (1 + regions, d): the whole first
    vectors: dict[str, NDArray[np.float32]] = field(default_factory=dict)
    keypoints: KeypointIndex | None = None  # built on first use: only uploads the first pass is unsure of need it
    checked_at: float = 0.0


class EmbeddingBanks:
    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        sync_interval_s: float = 1.0,
        keypoint_index: Callable[[], KeypointIndex] = KeypointIndex,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.sync_interval_s = sync_interval_s
        self.keypoint_index = keypoint_index  # an empty index with the channel's settings (Verifier.keypoint_index)
        self._versions: dict[str, _VersionIndex] = {}

    def _key(self, model_version: str) -> str:
        return f"{self.prefix}:bankemb:{model_version}"

    def _regions_key(self, model_version: str) -> str:
        return f"{self.prefix}:bankreg:{model_version}"

    def _pixels_key(self, bank: str) -> str:
        return f"{self.prefix}:bankpix:{bank}"

    def _features_key(self, bank: str) -> str:
        return f"{self.prefix}:bankfeat:{bank}"

    # -- writing --------------------------------------------------------------------------------------

    def add(
        self,
        bank: str,
        model_version: str,
        item_ids: list[str],
        embeddings: NDArray[Any],
        pixels: NDArray[Any],
        regions: NDArray[Any] | None = None,
    ) -> None:
        """Banks images' embeddings (and their model inputs, for re-embedding under a later version);
        ``regions`` (n, len(REGIONS), d) are their regions' embeddings, where known."""
        vectors = _normalised(embeddings)
        pipe = self.client.pipeline(transaction=True)
        for row, (item_id, vector, image) in enumerate(zip(item_ids, vectors, pixels, strict=True)):
            key = f"{bank}{SEP}{item_id}"
            pipe.hset(self._key(model_version), key, vector.tobytes())
            pipe.hset(self._pixels_key(bank), item_id, np.ascontiguousarray(image, dtype=np.uint8).tobytes())
            if regions is not None:
                pipe.hset(self._regions_key(model_version), key, _normalised(regions[row]).tobytes())
            else:
                pipe.hdel(self._regions_key(model_version), key)  # a re-banked image's old regions are not its own
        pipe.incr(f"{self._key(model_version)}:rev")
        pipe.execute()

    def add_features(self, bank: str, features: Mapping[str, LocalFeatures | None]) -> None:
        """Keypoints of banked images (item id -> features); images without any keep cosine-only matching."""
        known = {item: f.to_bytes() for item, f in features.items() if f is not None}
        if known:
            self.client.hset(self._features_key(bank), mapping=known)  # type: ignore[arg-type]
            pipe = self.client.pipeline(transaction=False)
            for key in self._version_keys():  # every version's keypoint channel now holds more
                pipe.incr(f"{key}:rev")
            pipe.execute()

    def features(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], LocalFeatures]:
        """(bank, item id) -> keypoints, for the ones banked with keypoints."""
        if not keys:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for bank, item_id in keys:
            pipe.hget(self._features_key(bank), item_id)
        found: dict[tuple[str, str], LocalFeatures] = {}
        for key, raw in zip(keys, pipe.execute(), strict=True):
            if raw is None:
                continue
            try:
                found[key] = LocalFeatures.from_bytes(raw)
            except (ValueError, IndexError) as exc:
                log.error("unreadable keypoints of banked item %s: %s", key, exc)
        return found

    def embed_and_add(
        self,
        bank: str,
        models: ImageModels,
        item_ids: list[str],
        pixels: NDArray[Any],
        features: list[LocalFeatures | None] | None = None,
    ) -> str:
        """Embeds (the whole and its regions) with the served model; returns the model version that answered."""
        answered: list[str] = []

        def embed(views: NDArray[np.uint8]) -> NDArray[np.float32]:
            result = models.infer(views)
            answered.append(result.model_version)
            return cast(NDArray[np.float32], result.embeddings)

        for i in range(0, len(item_ids), 8):
            chunk = pixels[i : i + 8]
            whole, regions = _embed_views(embed, chunk)
            self.add(bank, answered[-1], item_ids[i : i + 8], whole, chunk, regions)
        version = answered[-1] if answered else ""
        if features is not None:
            self.add_features(bank, dict(zip(item_ids, features, strict=True)))
        return version

    def reembed(self, models: ImageModels, banks: list[str], batch: int = 8) -> tuple[str, int]:
        """Every banked image embedded again by the served version (by hand: ``sieve banks reembed``)."""
        answered: list[str] = []

        def embed(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
            result = models.infer(pixels)
            answered.append(result.model_version)
            return cast(NDArray[np.float32], result.embeddings)

        count = self._reembed(embed, lambda: answered[-1], banks, batch)
        return (answered[-1] if answered else ""), count

    def reembed_as(self, embed: EmbedFn, model_version: str, banks: list[str], batch: int = 8) -> int:
        """Every banked image embedded by a version not served yet (a promotion, before the switch)."""
        return self._reembed(embed, lambda: model_version, banks, batch)

    def _reembed(self, embed: EmbedFn, version: Callable[[], str], banks: list[str], batch: int) -> int:
        count = 0
        for bank in banks:
            rows = cast(dict[bytes, bytes], self.client.hgetall(self._pixels_key(bank)))
            ids = [k.decode() for k in rows]
            for i in range(0, len(ids), batch):
                chunk = ids[i : i + batch]
                pixels = np.stack([np.frombuffer(rows[c.encode()], dtype=np.uint8).reshape(256, 256, 3) for c in chunk])
                whole, regions = _embed_views(embed, pixels)
                self.add(bank, version(), chunk, whole, pixels, regions)
                count += len(chunk)
        return count

    def pixels(self, bank: str, item_id: str) -> NDArray[np.uint8] | None:
        """The model input a banked image was stored as (256 x 256 RGB), or None when it was banked as hashes."""
        raw = cast(bytes | None, self.client.hget(self._pixels_key(bank), item_id))
        if raw is None:
            return None
        return np.frombuffer(raw, dtype=np.uint8).reshape(256, 256, 3)

    def has_pixels(self, bank: str, item_id: str) -> bool:
        return bool(self.client.hexists(self._pixels_key(bank), item_id))

    def banked_images(self, banks: list[str]) -> int:
        """How many images (not hashes) these banks hold: what a re-embedding has to go through."""
        pipe = self.client.pipeline(transaction=False)
        for bank in banks:
            pipe.hlen(self._pixels_key(bank))
        return int(sum(pipe.execute()))

    def remove_bank(self, bank: str) -> None:
        for key in self._version_keys():
            fields = [f for f, _ in self.client.hscan_iter(key, match=f"{bank}{SEP}*", count=1000)]
            pipe = self.client.pipeline(transaction=True)
            if fields:
                pipe.hdel(key, *fields)
                pipe.hdel(self._regions_key(key.removeprefix(f"{self.prefix}:bankemb:")), *fields)
            pipe.incr(f"{key}:rev")
            pipe.execute()
        self.client.delete(self._pixels_key(bank), self._features_key(bank))

    def vectors(self, bank: str) -> list[tuple[str, list[str], NDArray[np.float32]]]:
        """(model version, item ids, embeddings) of one bank, for every version it has embeddings in."""
        out = []
        for key in self._version_keys():
            ids, rows = [], []
            for field_name, raw in self.client.hscan_iter(key, match=f"{bank}{SEP}*", count=1000):
                ids.append(field_name.decode().partition(SEP)[2])
                rows.append(np.frombuffer(raw, dtype=np.float32))
            if ids:
                out.append((key.removeprefix(f"{self.prefix}:bankemb:"), ids, np.stack(rows)))
        return out

    def models(self) -> set[str]:
        """Models with banked embeddings in any version (``sieve_embedder`` for ``sieve_embedder:2``)."""
        versions = (k.removeprefix(f"{self.prefix}:bankemb:") for k in self._version_keys())
        return {v.rpartition(":")[0] for v in versions}

    def _version_keys(self) -> list[str]:
        keys = [k.decode() for k in self.client.scan_iter(match=f"{self.prefix}:bankemb:*", count=1000)]
        return [k for k in keys if not k.endswith(":rev")]

    # -- matching -------------------------------------------------------------------------------------

    def _index(self, model_version: str) -> _VersionIndex:
        now = time.monotonic()
        current = self._versions.get(model_version)
        if current is not None and now - current.checked_at < self.sync_interval_s:
            return current
        rev = int(cast(bytes | None, self.client.get(f"{self._key(model_version)}:rev")) or 0)
        if current is None or current.rev != rev:
            current = self._load(model_version, rev)
            self._versions[model_version] = current
        current.checked_at = now
        return current

    def _load(self, model_version: str, rev: int) -> _VersionIndex:
        """One flat index per bank over every view (whole and regions) of its images; a row maps to its item."""
        regions = {
            key.decode(): raw for key, raw in self.client.hscan_iter(self._regions_key(model_version), count=1000)
        }
        per_bank: dict[str, tuple[list[str], list[NDArray[np.float32]]]] = {}
        loaded = _VersionIndex(rev)
        for key, raw in self.client.hscan_iter(self._key(model_version), count=1000):
            name = key.decode()
            bank, _, item_id = name.partition(SEP)
            whole = np.frombuffer(raw, dtype=np.float32)
            views = whole[None]
            extra = regions.get(name)
            if extra is not None and len(extra) == len(REGIONS) * whole.nbytes:
                views = np.concatenate([views, np.frombuffer(extra, dtype=np.float32).reshape(len(REGIONS), -1)])
            ids, vectors = per_bank.setdefault(bank, ([], []))
            ids.extend([item_id] * len(views))
            vectors.append(views)
            loaded.vectors[name] = views
        for bank, (ids, vectors) in per_bank.items():
            stacked = np.concatenate(vectors)
            index = faiss.IndexFlatIP(stacked.shape[1])
            index.add(stacked)
            loaded.banks[bank] = (index, ids)
        return loaded

    def _keypoints(self, version: _VersionIndex) -> KeypointIndex:
        """Every banked image of this version's banks that was banked with keypoints, keyed ``<bank>/<item>``."""
        if version.keypoints is None:
            index = self.keypoint_index()
            for bank in version.banks:
                for item_id, raw in self.client.hscan_iter(self._features_key(bank), count=1000):
                    key = f"{bank}{SEP}{item_id.decode()}"
                    try:
                        index.add(key, LocalFeatures.from_bytes(raw), 0.0)
                    except (ValueError, IndexError) as exc:
                        log.error("unreadable keypoints of banked item %s: %s", key, exc)
            version.keypoints = index
        return version.keypoints

    def search(self, model_version: str, embedding: NDArray[Any]) -> list[EmbeddingHit]:
        """Each bank's nearest banked image for one embedding, most similar first."""
        query = _normalised(embedding.reshape(1, -1))
        hits = []
        version = self._index(model_version)
        for bank, (index, ids) in version.banks.items():
            if index.d != query.shape[1]:
                continue
            _, rows = index.search(query, 1)
            if rows[0, 0] >= 0:
                item_id = ids[int(rows[0, 0])]
                views = version.vectors[f"{bank}{SEP}{item_id}"]
                hits.append(_hit(bank, item_id, views @ query[0]))
        return sorted(hits, key=lambda h: -h.cosine)

    def views(self, model_version: str, keys: list[str]) -> dict[str, NDArray[np.float32]]:
        """``<bank>/<item id>`` -> the embeddings of its views (whole first, then regions), for those known."""
        vectors = self._index(model_version).vectors
        return {key: vectors[key] for key in keys if key in vectors}

    def search_keypoints(
        self,
        model_version: str,
        embedding: NDArray[Any],
        features: LocalFeatures,
        pick: Callable[[KeypointIndex, LocalFeatures], list[KeypointHit]],
    ) -> list[EmbeddingHit]:
        """The second pass's channel over the banks: banked images the upload's keypoints vote for (``pick``, the
        verifier's rule), each with its cosine to the upload under this version."""
        version = self._index(model_version)
        query = _normalised(embedding.reshape(1, -1))[0]
        hits = []
        for hit in pick(self._keypoints(version), features):
            views = version.vectors.get(hit.upload_id)
            if views is None or views.shape[1] != query.shape[0]:
                continue
            bank, _, item_id = hit.upload_id.partition(SEP)
            hits.append(_hit(bank, item_id, views @ query))
        return hits


def _hit(bank: str, item_id: str, cosines: NDArray[np.float32]) -> EmbeddingHit:
    """``cosines`` of the image's views, the whole first."""
    best, whole = float(np.max(cosines)), float(cosines[0])
    return EmbeddingHit(bank, item_id, best, whole if best > whole else None)


def _embed_views(embed: EmbedFn, pixels: NDArray[np.uint8]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The images' embeddings and their regions' ((n, d) and (n, len(REGIONS), d)), in one call of ``embed``."""
    n = len(pixels)
    vectors = embed(np.concatenate([pixels, region_views(pixels)]))
    return vectors[:n], vectors[n:].reshape(n, len(REGIONS), -1)


def _normalised(vectors: NDArray[Any]) -> NDArray[np.float32]:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    return cast(NDArray[np.float32], v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))
