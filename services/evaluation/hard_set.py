"""The hard benchmark's sets: references (photos among game-texture distractors) and edited queries.

Shared by ``bench.hard_edits`` and the hard fine-tune (services.trainer.hard_finetune), whose selection set is
built the same way from other originals. Test and validation draw from different packages
(services.evaluation.hard_sources); the benchmark's validation originals are one half of the train split by
group (``VALIDATION_HALF``), the other half (``BACKGROUND_HALF``) is the background the score normalisation uses.
"""

from __future__ import annotations

import io
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from services.common.calibration import VALIDATION_HALF, background_half
from services.common.hashing import hamming, phash_hex
from services.common.photos.build import PhotoRecord, load_photo_set
from services.evaluation.benchmark import FAMILY_EDITS, FAMILY_JPEG, jpeg_bytes, wire_pixels
from services.evaluation.hard_edits import FAMILY_QUALITY, Edit, hard_family_edits
from services.evaluation.hard_sources import (
    TEST_DISTRACTORS,
    VALIDATION_DISTRACTORS,
    SourceImage,
    extra_photos,
    fillers,
    texture_images,
)

FamilyPolicy = tuple[Mapping[str, Edit], Mapping[str, tuple[int, int]]]
EDIT_MAX_SIDE = 1024


@dataclass
class HardSet:
    name: str
    ref_ids: list[str] = field(default_factory=list)
    ref_data: list[bytes] = field(default_factory=list)
    ref_kind: list[str] = field(default_factory=list)  # "photo" or "distractor"
    query_ids: list[str] = field(default_factory=list)
    query_data: list[bytes] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    truth: list[str] = field(default_factory=list)  # reference id, "" when the original is not in the database
    edits: list[str] = field(default_factory=list)

    def truth_index(self) -> NDArray[np.int64]:
        position = {rid: i for i, rid in enumerate(self.ref_ids)}
        return np.asarray([position.get(t, -1) if t else -1 for t in self.truth], dtype=np.int64)

    def summary(self) -> dict[str, Any]:
        return {
            "references": len(self.ref_ids),
            "photo_references": self.ref_kind.count("photo"),
            "distractors": self.ref_kind.count("distractor"),
            "queries": len(self.query_ids),
            "positive_queries": sum(1 for t in self.truth if t),
            "negative_queries": sum(1 for t in self.truth if not t),
        }


def _stable(key: str) -> float:
    return random.Random(key).random()


def merge_identical(originals: Sequence[SourceImage], max_distance: int = 8) -> list[SourceImage]:
    """One group for originals that are the same picture (a package may ship one photo at two sizes): otherwise
    a copy of one, matched to the other, would be scored as a false match."""
    hashes = [phash_hex(wire_pixels(image.data)) for image in originals]
    out: list[SourceImage] = []
    for i, image in enumerate(originals):
        twin = next((out[j] for j in range(i) if hamming(hashes[i], hashes[j]) <= max_distance), None)
        group = (twin.group or twin.id) if twin is not None else image.group
        out.append(SourceImage(image.id, image.data, group))
    return out


def build_set(
    name: str,
    originals: Sequence[SourceImage],
    distractors: Sequence[SourceImage],
    filler_images: Sequence[Image.Image],
    seed: int = 20261204,
    reference_fraction: float = 0.65,
    families: FamilyPolicy | None = None,
) -> HardSet:
    """Deterministic in its inputs: every original gives one query per family; ~65% of originals are in the
    database, the rest give queries that must match nothing. ``families`` defaults to the hard ones."""
    edits, qualities = families or (hard_family_edits(filler_images), FAMILY_QUALITY)
    originals = merge_identical(originals)
    out = HardSet(name)
    for image in distractors:
        out.ref_ids.append(image.id)
        out.ref_data.append(image.data)
        out.ref_kind.append("distractor")
    for image in originals:
        # By group: a frame of a clip must not be a "no original" query while its sibling is in the database.
        in_database = _stable(f"{name}:{seed}:{image.group or image.id}") < reference_fraction
        if in_database:
            out.ref_ids.append(image.id)
            out.ref_data.append(image.data)
            out.ref_kind.append("photo")
        with Image.open(io.BytesIO(image.data)) as opened:
            original = opened.convert("RGB")
        original.thumbnail((EDIT_MAX_SIDE, EDIT_MAX_SIDE))
        for family, edit in edits.items():
            qid = f"{image.id}__{family}"
            rng = random.Random(f"{name}:{seed}:{qid}")
            edited, description = edit(original.copy(), rng)
            quality = rng.randint(*qualities[family])
            out.query_ids.append(qid)
            out.query_data.append(jpeg_bytes(edited, quality))
            out.families.append(family)
            out.truth.append(image.id if in_database else "")
            out.edits.append(f"{description}+jpeg{quality}")
    return out


def photo_sources(split: str, limit: int | None, seed: int, half: int | None = None) -> list[SourceImage]:
    """``half`` 0 or 1 keeps one half of the split by group (validation originals vs the background set)."""
    manifest = load_photo_set()
    records = sorted(manifest.split(split), key=lambda r: r.id)  # type: ignore[arg-type]
    if half is not None:
        records = [r for r in records if background_half(r.group) == half]
    if limit is not None and len(records) > limit:
        records = sorted(random.Random(seed).sample(records, limit), key=lambda r: r.id)
    return sources_of(records)


def sources_of(records: Sequence[PhotoRecord]) -> list[SourceImage]:
    """Photo-set records as hard-set originals (their bytes as shipped, their group kept)."""
    manifest = load_photo_set()
    return [SourceImage(f"photos:{r.id}", manifest.path_of(r).read_bytes(), r.group) for r in records]


def build_sets(quick: bool) -> tuple[HardSet, HardSet, HardSet]:
    """Validation (hard families), test (hard families) and the current benchmark's easier families on the
    test originals and distractors, to check that they do not regress."""
    fill = fillers()
    test_originals = photo_sources("heldout", 30 if quick else None, 1) + ([] if quick else extra_photos())
    val_originals = photo_sources("train", 30 if quick else None, 2, half=VALIDATION_HALF)
    test_distractors = texture_images(TEST_DISTRACTORS, limit=150 if quick else None)
    test = build_set("test", test_originals, test_distractors, fill)
    val = build_set(
        "validation", val_originals, texture_images(VALIDATION_DISTRACTORS, limit=100 if quick else None), fill
    )
    current = build_set("current", test_originals, test_distractors, fill, families=(FAMILY_EDITS, FAMILY_JPEG))
    return val, test, current
