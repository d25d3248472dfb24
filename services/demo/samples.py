"""Builds the demo's sample stream: real photos, some of them re-uploaded with near-duplicate edits."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from services.common.photos.build import Manifest, build_photo_set, default_photo_dir, load_photo_set
from services.common.transforms import NEAR_DUPLICATES, encode_jpeg


@dataclass(frozen=True)
class Sample:
    upload_id: str
    path: Path
    duplicate_of: str | None  # ground truth: the original this was made from


def photo_set() -> Manifest:
    try:
        return load_photo_set()
    except FileNotFoundError:
        return build_photo_set(default_photo_dir())


def build_samples(out: Path, originals: int, copies_per: int, seed: int = 7) -> list[Sample]:
    """Originals first, then their copies interleaved with further originals, as a real stream would."""
    manifest = photo_set()
    rng = random.Random(seed)
    chosen = rng.sample(manifest.images, min(originals, len(manifest.images)))
    out.mkdir(parents=True, exist_ok=True)
    firsts: list[Sample] = []
    later: list[Sample] = []
    names = sorted(NEAR_DUPLICATES)
    for n, record in enumerate(chosen):
        with Image.open(manifest.path_of(record)) as img:
            image = img.convert("RGB")
        upload_id = f"u{n:04d}-{record.id[:40]}".replace("/", "_")
        path = out / f"{upload_id}.jpg"
        path.write_bytes(encode_jpeg(image, 92))
        sample = Sample(upload_id, path, None)
        if n % 3 == 0:
            firsts.append(sample)
            for c in range(copies_per):
                family = names[(n + c) % len(names)]
                copy_id = f"{upload_id}--{family}"
                copy_path = out / f"{copy_id}.jpg"
                copy_path.write_bytes(encode_jpeg(NEAR_DUPLICATES[family](image), 85))
                later.append(Sample(copy_id, copy_path, upload_id))
        else:
            later.append(sample)
    rng.shuffle(later)
    return firsts + later
