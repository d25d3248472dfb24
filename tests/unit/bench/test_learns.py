"""bench.learns: the oracle tells the truth, the metrics count what they claim, and the memoised-trunk embedder is
the TorchScript model (so fine-tuning through it trains the artifact that gets saved)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from bench.learns_stream import (
    CachedEmbedder,
    FeatureCache,
    Stream,
    Upload,
    build_stream,
    moderate,
    oracle_label,
    random_requests,
    score_pass,
    split_heldout,
)
from services.common.config import DecodeSettings, Settings
from services.common.index.base import Neighbour
from services.common.photos.build import Manifest
from services.common.schemas import FeedbackLabel
from services.common.stack.process import free_port
from services.moderator.active_learning import ReviewSelector
from services.moderator.decide import decide
from services.trainer.export import load_torchscript
from services.trainer.feedback import FeedbackStore
from services.trainer.finetune import PairBatch, finetune

MODEL = Path(__file__).resolve().parents[3] / "model_repo" / "sieve_embedder" / "2" / "model.pt"


@pytest.fixture(scope="module")
def manifest(photo_set: Manifest) -> Manifest:
    return photo_set


@pytest.fixture(scope="module")
def small_stream(manifest: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Stream:
    side_a, _ = split_heldout(manifest, seed=7, by="photo", limit=8)
    return build_stream("T", manifest, side_a, tmp_path_factory.mktemp("uploads"), DecodeSettings(), seed=7)


def _unreachable_redis() -> redis.Redis:
    """ReviewSelector without Redis degrades as in production (no budget); enough to check the labels."""
    return redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)


def test_streams_are_disjoint_and_keep_people_on_both_sides_or_not(manifest: Manifest) -> None:
    a, b = split_heldout(manifest, seed=7, by="photo")
    assert {r.id for r in a}.isdisjoint({r.id for r in b})
    assert all(r.split == "heldout" for r in [*a, *b])
    people = {r.group for r in a if r.source == "dlib"} & {r.group for r in b if r.source == "dlib"}
    assert people, "by photo: the same person recurs in the fresh stream"
    ga, gb = split_heldout(manifest, seed=7, by="group")
    assert {r.group for r in ga}.isdisjoint({r.group for r in gb})


def test_stream_ground_truth_follows_upload_order(small_stream: Stream) -> None:
    twins = small_stream.earlier_twins()
    position = {u.upload_id: i for i, u in enumerate(small_stream.uploads)}
    for upload, earlier in zip(small_stream.uploads, twins, strict=True):
        assert all(position[t] < position[upload.upload_id] for t in earlier)
        assert all(small_stream.get(t).origin == upload.origin for t in earlier)
    firsts = [u for u, t in zip(small_stream.uploads, twins, strict=True) if not t]
    assert len(firsts) == len({u.origin for u in small_stream.uploads})  # one first upload per photo
    assert small_stream.pixels.shape == (len(small_stream.uploads), 256, 256, 3)


def test_oracle_labels_match_ground_truth_and_become_trainer_pairs(small_stream: Stream, tmp_path: Path) -> None:
    scripted, _ = load_torchscript(MODEL)
    embedder = CachedEmbedder(scripted, FeatureCache(scripted))
    cfg = Settings().decision.for_version("sieve_embedder:2")
    selector = ReviewSelector(_unreachable_redis(), "t", Settings().review)
    n = len(small_stream.uploads)
    moderated = moderate(small_stream, embedder.embed(small_stream.pixels), [{}] * n, cfg, selector, "v")

    requests = random_requests(small_stream, moderated, 6, seed=1)
    assert len(requests) == 6 and requests == random_requests(small_stream, moderated, 6, seed=1)
    assert {r.upload_id for r in requests} != {r.upload_id for r in random_requests(small_stream, moderated, 6, 2)}
    labels = [oracle_label(r, small_stream) for r in requests]
    assert all(isinstance(lb, FeedbackLabel) for lb in labels)
    for request, label in zip(requests, labels, strict=True):
        assert label is not None
        origin = small_stream.get(request.upload_id).origin
        shown_twin = any(small_stream.get(nb.upload_id).origin == origin for nb in request.neighbours)
        assert (label.duplicate_of is not None) == shown_twin
        assert label.not_duplicate == (not shown_twin)
        assert label.compared_uri == small_stream.get(label.compared_with or "").uri

    store = FeedbackStore(tmp_path / "feedback")
    store.add([lb for lb in labels if lb is not None])
    pairs = store.pairs()
    assert len(pairs) == 6
    for pair in pairs:
        same = small_stream.get(pair.upload_id).origin == small_stream.get(pair.other_id).origin
        assert pair.duplicate == same


def test_score_pass_counts_a_wrong_match_as_false_positive_and_miss() -> None:
    uploads = [
        Upload("a", "p1", "gcompris", "original", "u:a"),
        Upload("b", "p2", "dlib", "original", "u:b"),
        Upload("c", "p1", "gcompris", "crop", "u:c"),
        Upload("d", "p3", "dlib", "original", "u:d"),
    ]
    stream = Stream("S", uploads, np.zeros((4, 2, 2, 3), np.uint8))
    cfg = Settings().decision.model_copy(update={"duplicate_threshold": 0.86})
    decisions = [
        decide([], {}, cfg),
        decide([Neighbour("a", 0.2)], {}, cfg),
        decide([Neighbour("b", 0.95), Neighbour("a", 0.9)], {}, cfg),  # names the wrong twin first
        decide([Neighbour("b", 0.91)], {}, cfg),  # another face of someone: a hard false match
    ]
    scores = score_pass(stream, decisions)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (0, 2, 1)
    assert scores["false_matches_hard"] == 1
    assert scores["false_match_pairs"] == 2


def test_cached_embedder_is_the_torchscript_model_and_finetunes_it_in_place(small_stream: Stream) -> None:
    scripted, _ = load_torchscript(MODEL)
    cache = FeatureCache(scripted)
    candidate_ts, _ = load_torchscript(MODEL)
    candidate = CachedEmbedder(candidate_ts, cache)
    images = small_stream.pixels[:6]
    with torch.no_grad():
        full = scripted(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(candidate.embed(images), full, atol=1e-5)
    assert cache.computed == 6
    before = candidate_ts.reduce.weight.detach().clone()
    pairs = PairBatch(images[:3], images[3:6], np.asarray([False, False, False]))
    result = finetune(candidate, pairs, threshold=0.2, steps=5)
    assert result.trained_parameters == ["pool.p", "reduce.weight", "reduce.bias"]
    assert not torch.equal(candidate_ts.reduce.weight, before)
    with torch.no_grad():
        after = candidate_ts(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(candidate.embed(images), after, atol=1e-5)
    assert cache.computed == 6  # the trunk ran once per image, however often the heads did


def test_required_redis_refuses_to_degrade_when_redis_server_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.learns as learns
    from services.common.stack.process import StackError

    monkeypatch.setattr(learns.shutil, "which", lambda _name: None)
    monkeypatch.setattr(learns.Path, "exists", lambda _self: False)
    notes: list[str] = []
    with pytest.raises(StackError, match="redis-server not installed"):
        learns._redis(tmp_path, notes, required=True)
    _client, server = learns._redis(tmp_path, notes, required=False)  # the benchmark's documented fallback
    assert server is None and "not installed" in notes[0]
