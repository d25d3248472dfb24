"""``sieve explain`` and ``sieve dedup`` against the real Triton of the stack, not the in-process fallback.

The integration tests cover both commands in-process; these check that with Triton up they really go over
gRPC, and that the answers agree with the in-process path (same artifacts, so the same numbers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.config import DecodeSettings, Settings
from services.common.imaging import decode_image
from services.common.photos.build import load_photo_set
from services.common.transforms import NEAR_DUPLICATES, encode_jpeg
from services.evaluation.embed import ServedEmbedder
from services.tools.dedup import DedupOptions, default_near, run_dedup
from services.tools.explain import explain
from tests.thresholds import expected_threshold


@pytest.fixture(scope="module")
def photo_paths() -> list[Path]:
    manifest = load_photo_set()
    held = sorted((r for r in manifest.split("heldout") if r.source == "gcompris"), key=lambda r: r.id)
    kinds: dict[str, Path] = {}
    for record in held:
        kind = record.file.split("/")[1].split("__")[0:3][-1]
        kinds.setdefault(kind, manifest.path_of(record))
    assert len(kinds) >= 4
    return list(kinds.values())[:4]


def test_triton_and_in_process_embeddings_agree(settings: Settings, photo_paths: list[Path]) -> None:
    over_grpc = ServedEmbedder.connect(settings)
    local = ServedEmbedder.in_process()
    assert over_grpc.backend == "triton" and local.backend == "in-process"
    assert over_grpc.model_version == local.model_version
    pixels = np.stack([decode_image(p.read_bytes(), DecodeSettings(), 256).pixels for p in photo_paths])
    a, b = over_grpc.embed(pixels), local.embed(pixels)
    assert a.shape == b.shape
    assert float(np.min((a * b).sum(axis=1))) > 0.999  # same artifact, same vector (float noise only)


def test_explain_goes_over_triton(settings: Settings, photo_paths: list[Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(encode_jpeg(NEAR_DUPLICATES["crop90_jpeg50"](Image.open(photo_paths[0]).convert("RGB"))))
    remote = explain(photo_paths[0], copy, tmp_path / "why.png", prefer_triton=True)
    local = explain(photo_paths[0], copy, tmp_path / "why-local.png", prefer_triton=False)
    assert remote.backend == "triton" and local.backend == "in-process"
    assert remote.similarity == pytest.approx(local.similarity, abs=2e-3)
    assert remote.verdict == local.verdict and remote.verdict.startswith("duplicate")
    assert remote.scores[0]["nsfw"] == pytest.approx(local.scores[0]["nsfw"], abs=2e-3)
    assert Image.open(tmp_path / "why.png").format == "PNG"


def test_dedup_over_triton_groups_a_planted_copy(settings: Settings, photo_paths: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for i, src in enumerate(photo_paths):
        shutil.copy(src, root / f"p{i}.jpg")
    img = Image.open(photo_paths[1]).convert("RGB")
    (root / "p1_copy.jpg").write_bytes(encode_jpeg(NEAR_DUPLICATES["jpeg30"](img)))
    embedder = ServedEmbedder.connect(settings)
    near, _ = default_near(embedder.model_version)
    assert near == pytest.approx(expected_threshold(embedder.model_version))
    out = tmp_path / "out"
    summary = run_dedup(root, out, DedupOptions(near=near, similar=near, progress=False), embedder=embedder)
    body = json.loads((out / "clusters.json").read_text())
    near_sets = [{m["path"] for m in c["members"]} for c in body["clusters"] if c["level"] == "near"]
    assert {"p1.jpg", "p1_copy.jpg"} in near_sets
    assert not any(len(s) > 2 for s in near_sets), near_sets
    assert summary["backend"] == "triton"
