"""In-memory PDQ index, exact within the match radius: a FAISS binary flat scan, then multi-index hashing.

Up to ``FLAT_MAX`` hashes a flat scan (``IndexBinaryFlat``, SIMD popcount over 32 bytes a hash) is the cheaper:
at 1M hashes a search costs 1.2 ms of CPU (median) where multi-index hashing costs 1.75 ms
(bench/results/hash_banks.json), but it grows linearly. Past that, ``IndexBinaryMultiHash``: the 256 bits are cut
into 16 tables of 16 bits; two hashes within distance r differ in at most r // 16 bits of some table
(pigeonhole), so probing each table with ``nflip = r // 16`` flipped bits finds every banked hash within r while
comparing only the few candidates in those buckets. Removals leave tombstones until a rebuild.

Memory matters at a million hashes per replica: owners are tuples, and an item id that an import derived from the
hash itself (``default_item_id``) is not stored but derived again for the few hashes a search returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from services.common.banks.signals import default_item_id, pdq_bytes

TABLES = 16
BITS_PER_TABLE = 256 // TABLES
FLAT_MAX = 2_000_000


@dataclass(frozen=True)
class PdqHit:
    value: str  # the banked PDQ hex
    distance: int
    owners: frozenset[tuple[str, str]]  # (bank, item id)


class PdqIndex:
    def __init__(self, radius: int = 31, flat_max: int = FLAT_MAX) -> None:
        self.radius = radius
        self.flat_max = flat_max
        self._index = self._empty(0)
        self._values: list[str] = []  # row -> hex
        self._rows: dict[str, int] = {}  # hex -> row
        self._owners: dict[int, tuple[tuple[str, str], ...]] = {}  # live rows only; "" item id: derived
        self._pending: list[str] = []  # added but not yet in the FAISS index (added in bulk on the next search)

    def _empty(self, size: int) -> faiss.IndexBinary:
        if size <= self.flat_max:
            return faiss.IndexBinaryFlat(256)
        index = faiss.IndexBinaryMultiHash(256, TABLES, BITS_PER_TABLE)
        index.nflip = self.radius // BITS_PER_TABLE
        return index

    @property
    def kind(self) -> str:
        return "flat" if isinstance(self._index, faiss.IndexBinaryFlat) else "multi-index hashing"

    def __len__(self) -> int:
        return len(self._owners)

    def add(self, value: str, bank: str, item_id: str) -> None:
        row = self._rows.get(value)
        if row is None:
            row = len(self._values)
            self._values.append(value)
            self._rows[value] = row
            self._pending.append(value)
        owner = (bank, "" if item_id == default_item_id("pdq", value) else item_id)
        current = self._owners.get(row, ())
        if owner not in current:
            self._owners[row] = (*current, owner)

    def remove(self, value: str, bank: str, item_id: str | None = None) -> None:
        """Drops the bank's claim (for one item, or all of the bank's items with this hash)."""
        row = self._rows.get(value)
        owners = self._owners.get(row) if row is not None else None
        if row is None or owners is None:
            return
        kept = tuple(
            o
            for o in owners
            if not (o[0] == bank and (item_id is None or (o[1] or default_item_id("pdq", value)) == item_id))
        )
        if kept:
            self._owners[row] = kept
        else:
            del self._owners[row]
        self._maybe_rebuild()

    def drop_bank(self, bank: str) -> None:
        for row, owners in list(self._owners.items()):
            kept = tuple(o for o in owners if o[0] != bank)
            if kept:
                self._owners[row] = kept
            else:
                del self._owners[row]
        self._maybe_rebuild()

    def _maybe_rebuild(self) -> None:
        dead = len(self._values) - len(self._owners)
        if dead > max(1000, len(self._values) // 4):
            self.rebuild()

    def rebuild(self) -> None:
        """Re-creates the index from the live rows: tombstones gone, row numbers compacted."""
        live = [(self._values[row], owners) for row, owners in sorted(self._owners.items())]
        self._index = self._empty(len(live))
        self._values = [v for v, _ in live]
        self._rows = {v: i for i, v in enumerate(self._values)}
        self._owners = {i: owners for i, (_, owners) in enumerate(live)}
        self._pending = list(self._values)

    def _flush(self) -> None:
        if self.kind == "flat" and len(self._values) > self.flat_max:
            self._index, self._pending = self._empty(len(self._values)), list(self._values)  # rows keep their ids
        if self._pending:
            self._index.add(pdq_bytes(self._pending))
            self._pending = []

    def search(self, value: str, radius: int | None = None) -> list[PdqHit]:
        """Banked hashes within ``radius`` (at most the index's), closest first."""
        self._flush()
        r = self.radius if radius is None else min(radius, self.radius)
        if self._index.ntotal == 0:
            return []
        lims, dist, ids = self._index.range_search(pdq_bytes([value]), r + 1)  # FAISS keeps distance < radius
        hits = []
        for d, row in zip(dist[lims[0] : lims[1]], ids[lims[0] : lims[1]], strict=True):
            owners = self._owners.get(int(row))
            if owners:
                banked = self._values[int(row)]
                full = frozenset((bank, item or default_item_id("pdq", banked)) for bank, item in owners)
                hits.append(PdqHit(banked, int(d), full))
        hits.sort(key=lambda h: (h.distance, h.value))
        return hits

    def distances(self, value: str, others: list[str]) -> list[int]:
        """Plain Hamming distances, for tests and explanations."""
        a = np.unpackbits(pdq_bytes([value]))
        return [int(np.count_nonzero(a != np.unpackbits(pdq_bytes([o])))) for o in others]
