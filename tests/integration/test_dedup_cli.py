"""``sieve dedup`` on real photos with planted copies, the served embedder run in-process (no stack needed).

The photos are held-out images of different kinds (tools, fish, paintings, monuments, ...), so "unrelated"
means unrelated to a person, not just different bytes; the planted copies are the moderator's own
near-duplicate edits.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from services.cli import main as sieve
from services.common.photos.build import PhotoRecord, load_photo_set
from services.common.transforms import NEAR_DUPLICATES, encode_jpeg
from services.evaluation.embed import ServedEmbedder
from services.tools.dedup import DedupOptions, default_near, run_dedup
from tests.thresholds import expected_threshold


def _kind(record: PhotoRecord) -> str:
    parts = record.file.split("/")[1].split("__")
    return parts[0] + ("/" + parts[2] if parts[0] == "categorization" and len(parts) > 2 else "")


def _unrelated_photos(n: int) -> list[Path]:
    """One held-out gcompris photo per kind of scene, in a fixed order."""
    manifest = load_photo_set()
    seen: set[str] = set()
    picked: list[Path] = []
    for record in sorted(manifest.split("heldout"), key=lambda r: r.id):
        if record.source == "gcompris" and _kind(record) not in seen:
            seen.add(_kind(record))
            picked.append(manifest.path_of(record))
    assert len(picked) >= n, "the photo set has too few kinds of held-out scenes"
    return picked[:n]


@pytest.fixture(scope="module")
def embedder() -> ServedEmbedder:
    return ServedEmbedder.in_process()


@pytest.fixture(scope="module")
def near(embedder: ServedEmbedder) -> float:
    """The served version's threshold, as ``sieve dedup`` picks it by default (thresholds are per version)."""
    chosen = default_near(embedder.model_version)[0]
    assert chosen == pytest.approx(expected_threshold(embedder.model_version))  # from the model card, not the code
    return chosen


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """8 unrelated photos in originals/, 3 of them with 2 edited copies each in uploads/, one byte-identical copy."""
    root = tmp_path / "photos"
    (root / "originals").mkdir(parents=True)
    (root / "uploads" / "deep").mkdir(parents=True)
    photos = _unrelated_photos(8)
    for i, src in enumerate(photos):
        shutil.copy(src, root / "originals" / f"p{i}.jpg")
    for i in range(3):
        img = Image.open(photos[i]).convert("RGB")
        (root / "uploads" / f"p{i}_jpeg30.jpg").write_bytes(encode_jpeg(NEAR_DUPLICATES["jpeg30"](img)))
        (root / "uploads" / "deep" / f"p{i}_crop90.jpg").write_bytes(encode_jpeg(NEAR_DUPLICATES["crop90_jpeg50"](img)))
    shutil.copy(root / "originals" / "p7.jpg", root / "uploads" / "p7_same_bytes.jpg")
    (root / "uploads" / "truncated.jpg").write_bytes((root / "originals" / "p6.jpg").read_bytes()[:300])
    # Copies are newer than their originals, as re-uploads are.
    for path in (root / "uploads").rglob("*.jpg"):
        os.utime(path, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    return root


def _near_sets(summary_dir: Path) -> list[set[str]]:
    body = json.loads((summary_dir / "clusters.json").read_text())
    return [{m["path"] for m in c["members"]} for c in body["clusters"] if c["level"] == "near"]


def test_dedup_finds_the_planted_copies_and_keeps_unrelated_photos_apart(
    folder: Path, tmp_path: Path, embedder: ServedEmbedder, near: float
) -> None:
    out = tmp_path / "out"
    view = tmp_path / "view"
    options = DedupOptions(near=near, similar=near - 0.1, batch=8, progress=False, link_view=view, link_mode="hard")
    summary = run_dedup(folder, out, options, embedder)

    assert summary["images"] == 16 and summary["embedded"] == 15
    assert list(summary["failed"]) == ["uploads/truncated.jpg"]
    found = _near_sets(out)
    expected = [
        {f"originals/p{i}.jpg", f"uploads/p{i}_jpeg30.jpg", f"uploads/deep/p{i}_crop90.jpg"} for i in range(3)
    ] + [{"originals/p7.jpg", "uploads/p7_same_bytes.jpg"}]
    assert sorted(map(sorted, found)) == sorted(map(sorted, expected))
    body = json.loads((out / "clusters.json").read_text())
    exact = [c for c in body["clusters"] if c["level"] == "exact"]
    assert [sorted(m["path"] for m in c["members"]) for c in exact] == [
        ["originals/p7.jpg", "uploads/p7_same_bytes.jpg"]
    ]
    # No "similar" cluster may join two of the unrelated originals.
    for c in body["clusters"]:
        originals = {m["path"] for m in c["members"] if m["path"].startswith("originals/")}
        assert len(originals) <= 1, f"{c['id']} merges unrelated photos: {sorted(originals)}"
    # Keeper: the original (largest, and older than its copies).
    for c in body["clusters"]:
        if c["level"] == "near":
            assert c["keeper"].startswith("originals/")

    csv_rows = (out / "clusters.csv").read_text().splitlines()
    assert csv_rows[0].startswith("level,cluster,path,keeper")
    assert len(csv_rows) == 1 + sum(c["size"] for c in body["clusters"])
    page = (out / "report.html").read_text()
    thumbs = list((out / "thumbs").glob("*.jpg"))
    assert len(thumbs) == 11 and all(t.stat().st_size < 20_000 for t in thumbs)
    assert page.count("<img") == sum(c["size"] for c in body["clusters"]) and "base64" not in page

    refs = json.loads((view / "refcounts.json").read_text())
    assert refs["images"] == 15 and refs["objects"] == 15 - 7  # 8 originals; each cluster stored once
    p0 = (folder / "originals" / "p0.jpg").stat().st_ino
    assert (view / "tree" / "uploads" / "deep" / "p0_crop90.jpg").stat().st_ino == p0


class _Interrupting:
    """The served embedder, with a Ctrl-C after ``calls`` batches; counts how many images it embedded."""

    def __init__(self, inner: ServedEmbedder, calls: int | None) -> None:
        self.inner = inner
        self.model_version = inner.model_version
        self.backend = inner.backend
        self.calls_left = calls
        self.images = 0

    def embed(self, pixels: NDArray[np.uint8], batch: int = 32) -> NDArray[np.float32]:
        if self.calls_left is not None:
            if self.calls_left == 0:
                raise KeyboardInterrupt
            self.calls_left -= 1
        self.images += len(pixels)
        return self.inner.embed(pixels, batch)


@pytest.fixture()
def clean_result(folder: Path, tmp_path: Path, embedder: ServedEmbedder, near: float) -> Iterator[dict[str, object]]:
    out = tmp_path / "clean"
    run_dedup(folder, out, DedupOptions(near=near, similar=near - 0.1, batch=4, progress=False), embedder)
    yield json.loads((out / "clusters.json").read_text())


def test_resume_after_interruption_embeds_only_the_rest(
    folder: Path, tmp_path: Path, embedder: ServedEmbedder, near: float, clean_result: dict[str, object]
) -> None:
    out = tmp_path / "resumed"
    options = DedupOptions(near=near, similar=near - 0.1, batch=4, shard_size=4, progress=False)
    first = _Interrupting(embedder, calls=2)
    with pytest.raises(KeyboardInterrupt):
        run_dedup(folder, out, options, first)
    shards = sorted((out / "embeddings").glob("shard-*.npz"))
    assert len(shards) == 2 and first.images == 8  # two full shards checkpointed before the interruption

    options.resume = True
    second = _Interrupting(embedder, calls=None)
    summary = run_dedup(folder, out, options, second)
    assert summary["from_checkpoint"] == 8
    assert second.images == 15 - 8  # nothing embedded twice (the truncated file fails in the second pass)
    resumed = json.loads((out / "clusters.json").read_text())
    assert resumed["clusters"] == clean_result["clusters"]

    # A changed file is embedded again; unchanged ones come from the checkpoints.
    os.utime(folder / "originals" / "p1.jpg", ns=(3_000_000_000_000_000_000, 3_000_000_000_000_000_000))
    third = _Interrupting(embedder, calls=None)
    again = run_dedup(folder, out, options, third)
    assert third.images == 1 and again["embedded_this_run"] == 1

    # Without --resume the checkpoints are discarded and everything is embedded again.
    options.resume = False
    fourth = _Interrupting(embedder, calls=None)
    run_dedup(folder, out, options, fourth)
    assert fourth.images == 15


def test_cli_dedup_writes_its_outputs(
    folder: Path, tmp_path: Path, near: float, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    code = sieve(["dedup", str(folder), "--out", str(out), "--no-triton", "--quiet", "--similar", "0.5"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["thresholds"] == {"near": near, "similar": 0.5}  # the served version's threshold by default
    assert printed["counts"]["near"] == 4
    assert {p.name for p in out.iterdir()} >= {"clusters.json", "clusters.csv", "report.html", "thumbs", "embeddings"}
