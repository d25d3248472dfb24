"""Clustering, keeper choice and the link view on tiny hand-built data: no model, no photos, milliseconds."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from services.tools.dedup import (
    Catalogue,
    FileEntry,
    LinkMode,
    ShardCache,
    ShardRows,
    UnionFind,
    build_graph,
    build_link_view,
    choose_keeper,
    make_clusters,
    scan,
)

DIM = 8
VERSION = "sieve_embedder:test"


def _unit(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1.0
    return v


def _tilted(base: int, other: int, cosine: float) -> np.ndarray:
    """A unit vector whose cosine with e_base is exactly ``cosine``."""
    v = np.zeros(DIM, np.float32)
    v[base], v[other] = cosine, math.sqrt(1.0 - cosine**2)
    return v


def test_union_find_merges_transitively_and_orders_groups() -> None:
    uf = UnionFind(7)
    assert uf.union(0, 1) and uf.union(1, 2) and uf.union(4, 5)
    assert not uf.union(2, 0)  # already together
    assert uf.find(0) == uf.find(2) != uf.find(4)
    assert uf.groups() == [[0, 1, 2], [4, 5]]
    assert uf.groups(min_size=1)[-1] == [6]


def test_keeper_is_largest_then_earliest_then_path() -> None:
    cat = Catalogue(
        rels=["b.jpg", "a.jpg", "big.jpg", "old.jpg"],
        sha256=["1", "2", "3", "4"],
        width=[100, 100, 200, 100],
        height=[100, 100, 100, 100],
        size=[1, 1, 1, 1],
        mtime_ns=[50, 50, 90, 10],
    )
    assert choose_keeper([0, 1, 2, 3], cat) == 2  # the most pixels wins even though it is the newest
    assert choose_keeper([0, 1, 3], cat) == 3  # same size: the earliest mtime
    assert choose_keeper([0, 1], cat) == 1  # same size and time: the path decides, so reruns agree


def _cache(
    tmp_path: Path, rows: list[tuple[str, str, np.ndarray, tuple[int, int]]]
) -> tuple[ShardCache, list[FileEntry]]:
    cache = ShardCache(tmp_path / "embeddings")
    entries = [FileEntry(rel, 1000 + i, 10 * (i + 1)) for i, (rel, _, _, _) in enumerate(rows)]
    half = len(rows) // 2
    for chunk in (range(half), range(half, len(rows))):  # two shards, so ids cross shard boundaries
        shard = ShardRows()
        for i in chunk:
            _, sha, vector, (w, h) = rows[i]
            shard.keys.append(entries[i].key)
            shard.sha256.append(sha)
            shard.width.append(w)
            shard.height.append(h)
            shard.embeddings.append(vector)
        cache.write(shard, VERSION)
    return cache, entries


def test_exact_near_and_similar_levels(tmp_path: Path) -> None:
    rows = [
        ("a.jpg", "sha-a", _unit(0), (64, 64)),
        ("a_copy.jpg", "sha-a", _unit(0), (64, 64)),  # byte-identical
        ("a_edit.jpg", "sha-a2", _tilted(0, 5, 0.95), (80, 80)),  # near (and larger: the keeper)
        ("b.jpg", "sha-b", _unit(1), (64, 64)),
        ("b_like.jpg", "sha-b2", _tilted(1, 6, 0.85), (64, 64)),  # only "similar"
        ("c.jpg", "sha-c", _unit(2), (64, 64)),  # alone
        ("d.jpg", "sha-d", _tilted(3, 7, 0.89), (64, 64)),  # just below near with e_3 ...
        ("d2.jpg", "sha-d2", _unit(3), (64, 64)),  # ... so d and d2 are only similar
    ]
    cache, entries = _cache(tmp_path, rows)
    graph, failed = build_graph(entries, cache, VERSION, near=0.90, similar=0.80)
    assert failed == {}
    clusters = make_clusters(graph)
    by_level = {
        lvl: [sorted(m.path for m in c.members) for c in clusters if c.level == lvl]
        for lvl in ("exact", "near", "similar")
    }
    assert by_level["exact"] == [["a.jpg", "a_copy.jpg"]]
    assert by_level["near"] == [["a.jpg", "a_copy.jpg", "a_edit.jpg"]]
    # "similar" lists only what the lower threshold adds: the a-group is identical to its near cluster.
    assert sorted(by_level["similar"]) == [["b.jpg", "b_like.jpg"], ["d.jpg", "d2.jpg"]]
    near = next(c for c in clusters if c.level == "near")
    assert near.keeper == "a_edit.jpg"  # largest resolution
    assert near.members[0].keeper and near.members[0].path == "a_edit.jpg"
    assert near.min_similarity == pytest.approx(0.95, abs=1e-4)
    exact = next(c for c in clusters if c.level == "exact")
    assert exact.keeper == "a.jpg"  # same size: earliest mtime
    assert graph.edges["near"] == 3 and graph.edges["similar"] == 5


def test_near_clusters_chain_through_intermediate_images(tmp_path: Path) -> None:
    """Single linkage: x~y and y~z put x and z together even though x and z alone are below the threshold."""
    x = _unit(0)
    y = _tilted(0, 1, 0.95)
    # z: cosine 0.95 with y but about 0.81 with x.
    angle = math.acos(0.95)
    z = np.zeros(DIM, np.float32)
    z[0], z[1] = math.cos(2 * angle), math.sin(2 * angle)
    cache, entries = _cache(
        tmp_path,
        [
            ("x.jpg", "1", x, (8, 8)),
            ("y.jpg", "2", y, (8, 8)),
            ("z.jpg", "3", z, (8, 8)),
            ("w.jpg", "4", _unit(4), (8, 8)),
        ],
    )
    graph, _ = build_graph(entries, cache, VERSION, near=0.90, similar=0.50)
    near = [c for c in make_clusters(graph) if c.level == "near"]
    assert [sorted(m.path for m in c.members) for c in near] == [["x.jpg", "y.jpg", "z.jpg"]]
    assert near[0].min_similarity < 0.9  # the report shows the weakest link to the keeper


def test_changed_or_removed_files_are_not_read_from_stale_checkpoints(tmp_path: Path) -> None:
    cache, entries = _cache(tmp_path, [("a.jpg", "1", _unit(0), (8, 8)), ("b.jpg", "2", _unit(0), (8, 8))])
    touched = [entries[0], FileEntry("b.jpg", entries[1].size, entries[1].mtime_ns + 1)]
    graph, _ = build_graph(touched, cache, VERSION, near=0.9, similar=0.8)
    assert graph.catalogue.rels == ["a.jpg"]  # b changed: its old embedding must not be used
    assert cache.known_keys("sieve_embedder:other") == set()
    assert cache.shards() == []  # another model version's shards are useless and are dropped


def test_scan_skips_the_output_folder_symlinks_and_non_images(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "one.JPG").write_bytes(b"x")
    (root / "two.png").write_bytes(b"y")
    (root / "notes.txt").write_text("z")
    (root / "link.jpg").symlink_to(root / "two.png")
    (root / "out").mkdir()
    (root / "out" / "thumb.jpg").write_bytes(b"t")
    assert [e.rel for e in scan(root, exclude=[root / "out"])] == ["two.png", "sub/one.JPG"]


def _files(root: Path, names: dict[str, bytes]) -> None:
    for name, data in names.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.mark.parametrize("mode", ["hard", "sym"])
def test_link_view_stores_each_keeper_once_with_refcounts(tmp_path: Path, mode: LinkMode) -> None:
    root = tmp_path / "data"
    _files(root, {"k.jpg": b"keeper", "x/dup1.jpg": b"dup-one", "x/dup2.jpg": b"dup-two", "solo.png": b"solo"})
    keeper_of = {"k.jpg": "k.jpg", "x/dup1.jpg": "k.jpg", "x/dup2.jpg": "k.jpg", "solo.png": "solo.png"}
    sha_of = {"k.jpg": "aa11", "x/dup1.jpg": "bb22", "x/dup2.jpg": "cc33", "solo.png": "dd44"}
    view = tmp_path / "view"
    info = build_link_view(root, view, keeper_of, sha_of, mode)
    assert info["images"] == 4 and info["objects"] == 2
    assert info["bytes_stored"] == len(b"keeper") + len(b"solo")
    stored = sorted(p for p in (view / "store").rglob("*") if p.is_file() or p.is_symlink())
    assert [p.name for p in stored] == ["aa11.jpg", "dd44.png"]
    for rel in keeper_of:
        target = view / "tree" / rel
        assert target.read_bytes() == (root / keeper_of[rel]).read_bytes()
        if mode == "hard":
            assert os.stat(target).st_ino == os.stat(root / keeper_of[rel]).st_ino
        else:
            assert target.is_symlink() and not os.readlink(target).startswith("/")  # relative: the view can move
    body = json.loads((view / "refcounts.json").read_text())
    assert body["refcounts"]["aa11"]["refcount"] == 3
    assert sorted(body["refcounts"]["aa11"]["paths"]) == ["k.jpg", "x/dup1.jpg", "x/dup2.jpg"]
    assert body["refcounts"]["dd44"]["refcount"] == 1
    assert (root / "x" / "dup1.jpg").read_bytes() == b"dup-one"  # the originals are never touched

    # Rebuilding after a change replaces the old view instead of leaving stale links behind.
    keeper_of["x/dup2.jpg"] = "x/dup2.jpg"
    again = build_link_view(root, view, keeper_of, sha_of, mode)
    assert again["objects"] == 3
    assert (view / "tree" / "x" / "dup2.jpg").read_bytes() == b"dup-two"


def test_link_view_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _files(root, {"a.jpg": b"a"})
    view = tmp_path / "precious"
    _files(view, {"keep-me.txt": b"!"})
    with pytest.raises(ValueError, match="not a sieve link view"):
        build_link_view(root, view, {"a.jpg": "a.jpg"}, {"a.jpg": "ff"}, "hard")
    assert (view / "keep-me.txt").read_bytes() == b"!"


def test_true_size_reads_the_stored_size_not_the_draft_decode(tmp_path: Path) -> None:
    """decode_image decodes big JPEGs at 1/2..1/8 scale; the keeper rule needs the real pixel count."""
    import io

    from PIL import Image

    from services.common.config import DecodeSettings
    from services.common.imaging import decode_image
    from services.tools.dedup import true_size

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees
    Image.new("RGB", (2400, 1200), (10, 120, 200)).save(buf, format="JPEG", exif=exif)
    data = buf.getvalue()
    assert true_size(data) == (1200, 2400)
    decoded = decode_image(data, DecodeSettings(), 256)
    assert decoded.width * decoded.height < 1200 * 2400  # why true_size exists
