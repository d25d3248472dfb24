"""The multi-index-hashing PDQ index finds exactly what a flat scan finds within the radius."""

from __future__ import annotations

import faiss
import numpy as np

from services.common.banks.pdq_index import PdqIndex
from services.common.banks.signals import default_item_id, pdq_bytes


def _flip(value: str, bits: int, rng: np.random.Generator) -> str:
    raw = bytearray(bytes.fromhex(value))
    for bit in rng.choice(256, bits, replace=False):
        raw[bit // 8] ^= 1 << (bit % 8)
    return raw.hex()


def test_multi_index_hashing_finds_what_a_flat_scan_finds_at_every_distance() -> None:
    rng = np.random.default_rng(7)
    values = [rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex() for _ in range(3000)]
    index = PdqIndex(31, flat_max=1000)  # past flat_max: multi-index hashing
    for i, v in enumerate(values):
        index.add(v, "bank", str(i))
    index.search(values[0])
    assert index.kind == "multi-index hashing"
    flat = faiss.IndexBinaryFlat(256)
    flat.add(pdq_bytes(values))
    for bits in (0, 1, 15, 16, 17, 30, 31, 32, 40):
        for j in range(20):
            query = _flip(values[j], bits, rng)
            got = {h.value: h.distance for h in index.search(query)}
            _, dist, ids = flat.range_search(pdq_bytes([query]), 32)
            assert got == {values[int(i)]: int(d) for d, i in zip(dist, ids, strict=True)}
            assert (values[j] in got) == (bits <= 31)


def test_tighter_radius_and_removals() -> None:
    rng = np.random.default_rng(1)
    value = rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex()
    near = _flip(value, 20, rng)
    index = PdqIndex(31)
    index.add(value, "a", "1")
    index.add(value, "b", "2")
    assert index.search(near, radius=10) == []
    assert index.search(near)[0].owners == frozenset({("a", "1"), ("b", "2")})
    index.remove(value, "a")
    assert index.search(near)[0].owners == frozenset({("b", "2")})
    index.drop_bank("b")
    assert index.search(near) == [] and len(index) == 0


def test_rebuild_drops_tombstones_and_keeps_live_rows() -> None:
    rng = np.random.default_rng(2)
    values = [rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex() for _ in range(3000)]
    index = PdqIndex(31, flat_max=2500)
    for v in values:
        index.add(v, "a", v[:8])
    index.search(values[0])
    assert index.kind == "multi-index hashing"
    for v in values[:2000]:
        index.remove(v, "a")  # passes the tombstone limit: rebuilt
    assert len(index) == 1000 and index.kind == "flat"  # rebuilt below flat_max: a flat scan again
    assert index.search(values[2500])[0].value == values[2500]
    assert index.search(values[10]) == []


def test_derived_item_ids_come_back() -> None:
    value = "ab" * 32
    index = PdqIndex(31)
    index.add(value, "a", default_item_id("pdq", value))
    index.add(value, "b", "case-7")
    assert index.search(value)[0].owners == frozenset({("a", default_item_id("pdq", value)), ("b", "case-7")})
    index.remove(value, "a", default_item_id("pdq", value))
    assert index.search(value)[0].owners == frozenset({("b", "case-7")})


def test_a_growing_index_turns_from_flat_to_multi_index_hashing_keeping_rows() -> None:
    rng = np.random.default_rng(4)
    values = [rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex() for _ in range(300)]
    index = PdqIndex(31, flat_max=200)
    for v in values[:150]:
        index.add(v, "a", v[:6])
    assert index.search(values[10])[0].owners == frozenset({("a", values[10][:6])}) and index.kind == "flat"
    for v in values[150:]:
        index.add(v, "a", v[:6])
    assert [h.value for h in index.search(values[10])] == [values[10]]
    assert [h.value for h in index.search(values[290])] == [values[290]] and index.kind == "multi-index hashing"
