"""The benchmark harness's own arithmetic: percentiles, recall, detection scores, PicNix clustering, ground truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from numpy.typing import NDArray

from bench.common import StageResult, Target, percentile, precision_recall, recall_at_1, summarize_ms
from bench.peers import NaiveScanMatcher, PicNixIndex, SieveMatcher, StreamItem, score_stream
from bench.stage_faiss import ClusteredVectors, ExactTop1


def unit(degrees: float) -> NDArray[np.float32]:
    r = math.radians(degrees)
    return np.array([math.cos(r), math.sin(r)], dtype=np.float32)


JOIN_30_DEG = math.cos(math.radians(30.0))


# ------------------------------------------------------------------------------------------------ percentiles


def test_percentile_interpolates_between_order_statistics() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 25) == pytest.approx(1.75)
    assert percentile([7.0], 99) == 7.0


def test_percentile_matches_numpy_linear() -> None:
    rng = np.random.default_rng(0)
    values = rng.exponential(size=101).tolist()
    for q in (1, 50, 95, 99, 99.9):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_converts_seconds_to_milliseconds() -> None:
    summary = summarize_ms([0.001] * 98 + [0.010, 0.100])
    assert summary["n"] == 100
    assert summary["p50_ms"] == pytest.approx(1.0)
    assert summary["max_ms"] == pytest.approx(100.0)
    assert 1.0 < summary["p99_ms"] < 100.0


# ---------------------------------------------------------------------------------------------- recall, scores


def test_recall_at_1_uses_the_first_column_only() -> None:
    truth = np.array([[1], [2], [3], [4]])
    found = np.array([[1, 9], [9, 2], [3, 3], [4, 0]])
    assert recall_at_1(found, truth) == pytest.approx(0.75)
    assert recall_at_1(np.array([1, 2]), np.array([1, 2])) == 1.0
    with pytest.raises(ValueError):
        recall_at_1(np.array([1, 2, 3]), np.array([1, 2]))


def test_precision_recall_from_counts() -> None:
    scores = precision_recall(tp=8, fp=2, fn=8)
    assert scores["precision"] == pytest.approx(0.8)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(2 * 0.8 * 0.5 / 1.3, abs=1e-4)
    assert precision_recall(0, 0, 0)["precision"] == 1.0
    assert precision_recall(0, 3, 0)["precision"] == 0.0


def test_target_direction() -> None:
    assert Target("p99", 1.5, 2.0, "<=").met is True
    assert Target("p99", 2.5, 2.0, "<=").met is False
    assert Target("recall", 0.98, 0.99, ">=").met is False
    assert Target("recall", None, 0.99, ">=").met is None


def test_stage_result_is_json_with_numpy_values() -> None:
    result = StageResult("t", "test", quick=True).begin()
    result.add_row("a", value=np.float32(1.5), count=np.int64(3), bad=float("nan"), arr=np.arange(2))
    out = json.loads(json.dumps(result.finish().to_dict()))
    row = out["rows"][0]
    assert row == {"case": "a", "value": 1.5, "count": 3, "bad": None, "arr": [0, 1]}
    assert "load_average_1_5_15" in out["machine"]
    assert out["load_during_run"]["samples"] >= 1


def test_score_stream_counts_planted_matches() -> None:
    items = [
        StreamItem("a", "fa", None, b""),
        StreamItem("b", "fb", None, b""),
        StreamItem("a~crop", "fa", "crop", b""),
        StreamItem("b~jpeg", "fb", "jpeg", b""),
        StreamItem("a~mirror", "fa", "mirror", b""),
        StreamItem("c", "fa", None, b""),  # another shot of scene fa: a same-scene match is not an error
    ]
    families = {i.item_id: i.family for i in items} | {"background-0": "background"}
    decisions = [None, "a", "a", None, "b", "a"]
    score = score_stream(items, decisions, families)
    assert (score.tp, score.fp, score.fn) == (1, 2, 2)  # b->a and a~mirror->b are wrong; b~jpeg, a~mirror missed
    assert score.same_scene_original_matches == 1
    assert score.per_edit == {"crop": [1, 1], "jpeg": [0, 1], "mirror": [0, 1]}
    background = score_stream(items[:3], [None, "background-0", "a"], families)
    assert (background.tp, background.fp, background.fn) == (1, 1, 0)


# --------------------------------------------------------------------------------------------------- PicNix


def test_picnix_creates_centres_beyond_the_radius() -> None:
    index = PicNixIndex(dim=2, join_similarity=JOIN_30_DEG, probe=1)
    assert index.add(unit(0)) == 0
    assert index.add(unit(10)) == 0  # 10 degrees from centre 0: inside the radius
    assert index.add(unit(90)) == 1  # far from every centre: a new one
    assert index.add(unit(95)) == 1
    assert index.add(unit(180)) == 2
    assert index.n_centres == 3
    assert index.members == [[0, 1], [2, 3], [4]]


def test_picnix_scans_only_the_probed_clusters() -> None:
    index = PicNixIndex(dim=2, join_similarity=JOIN_30_DEG, probe=1)
    index.add(unit(0))  # centre A
    index.add(unit(29))  # joins A (29 < 30 degrees)
    index.add(unit(55))  # 55 degrees from A: centre B
    query = unit(38)  # nearest centre is B (17 deg) but the nearest item is the 29-degree member of A (9 deg)
    best, sim, scanned = index.search(query)
    assert (best, scanned) == (2, 1)
    assert sim == pytest.approx(math.cos(math.radians(17)), abs=1e-5)
    index.probe = 2
    best, sim, scanned = index.search(query)
    assert (best, scanned) == (1, 3)
    assert sim == pytest.approx(math.cos(math.radians(9)), abs=1e-5)


def test_picnix_search_and_add_finds_earlier_items_only() -> None:
    index = PicNixIndex(dim=2, join_similarity=JOIN_30_DEG, probe=2, capacity=1)
    assert index.search(unit(0)) == (-1, float("-inf"), 0)
    assert index.search_and_add(unit(0))[0] == -1
    best, sim, _ = index.search_and_add(unit(3))
    assert best == 0 and sim > 0.99
    for angle in range(6, 360, 7):  # grows past the initial capacity
        index.search_and_add(unit(angle))
    assert index.n_items == 2 + len(range(6, 360, 7))
    assert sum(len(m) for m in index.members) == index.n_items


def test_picnix_validates_parameters() -> None:
    with pytest.raises(ValueError):
        PicNixIndex(dim=2, join_similarity=1.5, probe=1)
    with pytest.raises(ValueError):
        PicNixIndex(dim=2, join_similarity=0.5, probe=0)


def test_exact_matchers_agree() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 16)).astype(np.float32)
    stream = np.concatenate([base, base[:10] + 0.05 * rng.standard_normal((10, 16)).astype(np.float32)])
    stream /= np.linalg.norm(stream, axis=1, keepdims=True)
    naive = NaiveScanMatcher(16, threshold=0.9, capacity=4)
    sieve = SieveMatcher(16, threshold=0.9, top_k=5)
    a = [naive.match_and_add(f"i{i}", v) for i, v in enumerate(stream)]
    b = [sieve.match_and_add(f"i{i}", v) for i, v in enumerate(stream)]
    assert a == b
    assert a[40:] == [f"i{i}" for i in range(10)]
    assert all(m is None for m in a[:40])


# ------------------------------------------------------------------------------------------------ FAISS data


def test_clustered_vectors_are_deterministic_unit_vectors() -> None:
    gen = ClusteredVectors(dim=32, n_clusters=20)
    a, b = gen.block(3, 500), gen.block(3, 500)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, gen.block(4, 500))
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    queries, is_dup = gen.queries(1500, 50)
    assert queries.shape == (50, 32) and int(is_dup.sum()) == 40


def test_exact_top1_merges_blocks_like_one_search() -> None:
    gen = ClusteredVectors(dim=16, n_clusters=10)
    data = [gen.block(b, 300) for b in range(3)]
    queries, _ = gen.queries(900, 20)
    exact = ExactTop1(queries)
    for b, block in enumerate(data):
        exact.update(b * 300, block)
    brute = np.argmax(queries @ np.concatenate(data).T, axis=1)
    assert np.array_equal(exact.ids, brute)
