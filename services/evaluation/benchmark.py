"""A Copydays / DISC21-style copy-detection benchmark built from originals that training never saw.

The originals are split by ``group`` into references (the database) and distractor originals. Every
original yields transformed queries in five families; copies of references must find their reference, copies
of distractors must find nothing (DISC21's queries without a match). Edits use parameters and styles that the
training policy does not draw (serif fonts, other glyphs, watermarks, shear, caption bars, other canvases),
and every query passes through the serving decoder, so the numbers are about what production would see.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from services.common.config import DecodeSettings
from services.common.imaging import decode_image
from services.common.photos.build import Manifest, PhotoRecord
from services.trainer.augment import (
    add_border,
    blur,
    colour,
    crop_area,
    grayscale,
    limit_side,
    load_font,
    mirror,
    overlay_glyphs,
    overlay_text,
    perspective,
    random_colour,
    rescale,
    rotate,
    screenshot,
    to_rgb,
)

FAMILIES: tuple[str, ...] = ("mild", "crop", "geometric", "overlay", "combined")
EVAL_FONTS = ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "LiberationSans-Regular.ttf", "DejaVuSansMono.ttf")
# Disjoint from the training glyphs.
EVAL_EMOJI = "☹☎☘☝☣♪♫⚑⚡⚽⚓✂✎✿❀➜☞"
EVAL_WORDS = (
    "Unbelievable!", "caption this", "RT if you agree", "spotted today", "no way", "Friday vibes",
    "exclusive", "who did this", "repost", "@someone", "2024", "the end",
)  # fmt: skip

FamilyEdit = Callable[[Image.Image, random.Random], tuple[Image.Image, str]]


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _shear(img: Image.Image, amount: float, fill: tuple[int, int, int]) -> Image.Image:
    w, h = img.size
    offset = abs(amount) * h
    out_w = round(w + offset)
    coeffs = (1.0, amount, -offset if amount > 0 else 0.0, 0.0, 1.0, 0.0)
    return img.transform((out_w, h), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=fill)


def _watermark(img: Image.Image, text: str, rng: random.Random) -> Image.Image:
    """Semi-transparent tiled diagonal text, the stock-photo kind (training draws only opaque captions)."""
    base = to_rgb(img).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = load_font(rng.choice(EVAL_FONTS), max(10, min(base.size) // 9))
    alpha = rng.randint(70, 130)
    step = max(20, min(base.size) // 3)
    for y in range(-step, base.height + step, step):
        for x in range(-step, base.width + step, step * 2):
            draw.text((x + (y // step % 2) * step, y), text, font=font, fill=(255, 255, 255, alpha))
    layer = layer.rotate(rng.uniform(20, 40), resample=Image.Resampling.BILINEAR)
    return Image.alpha_composite(base, layer).convert("RGB")


def _caption_bars(img: Image.Image, rng: random.Random) -> Image.Image:
    """Classic meme layout: white bars above and below the photo with black serif text."""
    w, h = img.size
    top = round(h * rng.uniform(0.12, 0.25))
    bottom = round(h * rng.uniform(0.0, 0.2))
    canvas = Image.new("RGB", (w, h + top + bottom), (255, 255, 255))
    canvas.paste(img, (0, top))
    draw = ImageDraw.Draw(canvas)
    font = load_font(rng.choice(EVAL_FONTS), max(10, round(top * 0.45)))
    draw.text((w // 2, top // 2), rng.choice(EVAL_WORDS), font=font, fill=(0, 0, 0), anchor="mm")
    return canvas


def mild(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    steps = []
    if rng.random() < 0.6:
        s = rng.uniform(0.35, 0.8)
        img = rescale(img, s)
        steps.append(f"rescale{s:.2f}")
    choice = rng.randrange(3)
    if choice == 0:
        g = rng.uniform(0.7, 1.4)
        img = Image.eval(img, lambda v: round(255 * (v / 255) ** g))
        steps.append(f"gamma{g:.2f}")
    elif choice == 1:
        img = ImageEnhance.Sharpness(img).enhance(rng.uniform(1.5, 3.0))
        steps.append("sharpen")
    else:
        img = colour(img, rng.uniform(0.85, 1.2), rng.uniform(0.85, 1.2), rng.uniform(0.7, 1.3))
        steps.append("colour")
    return img, "+".join(steps)


def crop(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    area = rng.uniform(0.35, 0.85)
    aspect = rng.choice([1.0, rng.uniform(0.6, 1.6)])
    return crop_area(img, area, aspect, rng.random(), rng.random()), f"crop{area:.2f}@{aspect:.2f}"


def geometric(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    fill = rng.choice([(0, 0, 0), (255, 255, 255), (128, 128, 128)])
    choice = rng.randrange(5)
    if choice == 0:
        deg = rng.choice([-1, 1]) * rng.uniform(8, 25)
        return rotate(img, deg, fill, expand=True), f"rotate{deg:.0f}"
    if choice == 1:
        amount = rng.uniform(0.04, 0.12)
        return perspective(img, [rng.uniform(0, amount) for _ in range(8)], fill), f"perspective{amount:.2f}"
    if choice == 2:
        deg = rng.uniform(-12, 12)
        return rotate(mirror(img), deg, fill, expand=False), f"mirror+rotate{deg:.0f}"
    if choice == 3:
        amount = rng.choice([-1, 1]) * rng.uniform(0.15, 0.35)
        return _shear(img, amount, fill), f"shear{amount:.2f}"
    sx, sy = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
    w, h = img.size
    return img.resize((max(16, round(w * sx)), max(16, round(h * sy)))), f"stretch{sx:.2f}x{sy:.2f}"


def overlay(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    choice = rng.randrange(4)
    if choice == 0:
        return _caption_bars(img, rng), "caption_bars"
    if choice == 1:
        return _watermark(img, rng.choice(EVAL_WORDS), rng), "watermark"
    if choice == 2:
        glyphs = [
            (rng.choice(EVAL_EMOJI), rng.uniform(0.12, 0.25), rng.random(), rng.random(), random_colour(rng))
            for _ in range(rng.randint(2, 5))
        ]
        out = overlay_glyphs(img, glyphs)
        out = overlay_text(
            out, rng.choice(EVAL_WORDS), rng.choice(EVAL_FONTS), 0.1, (0.5, rng.choice([0.05, 0.95])), (255, 255, 0)
        )
        return out, "stickers+text"
    landscape = screenshot(
        img,
        canvas_w=rng.randint(800, 1100),
        aspect=rng.uniform(0.62, 0.8),  # a tablet or desktop window, where training only draws phones
        scale=rng.uniform(0.45, 0.65),
        background=rng.choice([(250, 250, 250), (33, 37, 41)]),
        header=rng.choice(EVAL_WORDS),
        font_name=rng.choice(EVAL_FONTS),
        offset=rng.random(),
    )
    return landscape, "desktop_screenshot"


def combined(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    steps = []
    img, s = crop(img, rng)
    steps.append(s)
    if rng.random() < 0.7:
        img, s = geometric(img, rng)
        steps.append(s)
    img = colour(img, rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3), rng.uniform(0.5, 1.5))
    if rng.random() < 0.25:
        img = grayscale(img)
        steps.append("grayscale")
    if rng.random() < 0.3:
        img = blur(img, rng.uniform(0.8, 2.0))
        steps.append("blur")
    img, s = overlay(img, rng)
    steps.append(s)
    if rng.random() < 0.3:
        img = add_border(img, [rng.uniform(0.02, 0.12)] * 4, random_colour(rng))
        steps.append("border")
    return img.filter(ImageFilter.SMOOTH) if rng.random() < 0.2 else img, "+".join(steps)


FAMILY_EDITS: dict[str, FamilyEdit] = {
    "mild": mild,
    "crop": crop,
    "geometric": geometric,
    "overlay": overlay,
    "combined": combined,
}
# Final re-encode per family: mild copies are good JPEGs, combined ones are the worst.
FAMILY_JPEG: dict[str, tuple[int, int]] = {
    "mild": (70, 92),
    "crop": (60, 90),
    "geometric": (60, 90),
    "overlay": (50, 85),
    "combined": (20, 50),
}


@dataclass
class Benchmark:
    """References and queries as wire pixels (uint8 256x256x3), with the ground truth per query."""

    name: str
    reference_ids: list[str]
    reference_pixels: NDArray[np.uint8]
    query_ids: list[str]
    query_families: list[str]
    query_truth: list[str]  # reference id, or "" for a distractor query
    query_edits: list[str]
    query_pixels: NDArray[np.uint8]
    meta: dict[str, Any] = field(default_factory=dict)

    def truth_index(self) -> NDArray[np.int64]:
        """Index into the references per query, -1 where the query has no original in the database."""
        position = {rid: i for i, rid in enumerate(self.reference_ids)}
        return np.asarray([position.get(t, -1) if t else -1 for t in self.query_truth], dtype=np.int64)


def _stable_fraction(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def wire_pixels(data: bytes) -> NDArray[np.uint8]:
    """The serving decoder (EXIF, draft mode, bilinear resize to 256): queries see exactly production's input."""
    pixels: NDArray[np.uint8] = decode_image(data, DecodeSettings(), 256).pixels
    return pixels


def build_benchmark(
    manifest: Manifest,
    records: Sequence[PhotoRecord],
    name: str,
    seed: int = 2024,
    copies_per_family: int = 2,
    reference_fraction: float = 0.6,
    max_side: int = 768,
) -> Benchmark:
    """Deterministic in (records, seed): the same queries on every machine."""
    ref_ids: list[str] = []
    ref_pixels: list[NDArray[np.uint8]] = []
    q_ids: list[str] = []
    q_fam: list[str] = []
    q_truth: list[str] = []
    q_edit: list[str] = []
    q_pixels: list[NDArray[np.uint8]] = []
    n_distractor = 0
    for record in sorted(records, key=lambda r: r.id):
        path: Path = manifest.path_of(record)
        data = path.read_bytes()
        is_reference = _stable_fraction(f"{name}:{seed}:{record.group}") < reference_fraction
        if is_reference:
            ref_ids.append(record.id)
            ref_pixels.append(wire_pixels(data))
        else:
            n_distractor += 1
        with Image.open(io.BytesIO(data)) as opened:
            original = limit_side(opened, max_side)
        for family in FAMILIES:
            for copy in range(copies_per_family):
                qid = f"{record.id}__{family}{copy}"
                rng = random.Random(f"{name}:{seed}:{qid}")
                edited, description = FAMILY_EDITS[family](original.copy(), rng)
                quality = rng.randint(*FAMILY_JPEG[family])
                q_ids.append(qid)
                q_fam.append(family)
                q_truth.append(record.id if is_reference else "")
                q_edit.append(f"{description}+jpeg{quality}")
                q_pixels.append(wire_pixels(jpeg_bytes(edited, quality)))
    return Benchmark(
        name=name,
        reference_ids=ref_ids,
        reference_pixels=np.stack(ref_pixels),
        query_ids=q_ids,
        query_families=q_fam,
        query_truth=q_truth,
        query_edits=q_edit,
        query_pixels=np.stack(q_pixels),
        meta={
            "seed": seed,
            "originals": len(records),
            "references": len(ref_ids),
            "distractor_originals": n_distractor,
            "queries": len(q_ids),
            "positive_queries": sum(1 for t in q_truth if t),
            "negative_queries": sum(1 for t in q_truth if not t),
            "copies_per_family": copies_per_family,
            "families": list(FAMILIES),
        },
    )


def load_folder_benchmark(queries: Path, references: Path, ground_truth: Path) -> Benchmark:
    """A user's own benchmark: two folders and a CSV of query_id,reference_id (empty = no duplicate).

    Ids may be given as file names or as file names without their extension.
    """
    import csv

    def index(folder: Path) -> tuple[list[Path], dict[str, Path]]:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        lookup = {p.stem: p for p in files}
        lookup.update({p.name: p for p in files})
        return files, lookup

    _, query_lookup = index(queries)
    reference_files, reference_lookup = index(references)
    truth: dict[str, str] = {}
    with ground_truth.open(newline="") as handle:
        for row in csv.DictReader(handle):
            truth[row["query_id"].strip()] = (row.get("reference_id") or "").strip()
    q_ids = sorted(truth)
    missing = [q for q in q_ids if q not in query_lookup]
    unknown = sorted({t for t in truth.values() if t and t not in reference_lookup})
    if missing or unknown:
        raise FileNotFoundError(f"no file for queries {missing[:3]} / references {unknown[:3]} named in the CSV")
    return Benchmark(
        name=f"folder:{queries.name}",
        reference_ids=[p.name for p in reference_files],
        reference_pixels=np.stack([wire_pixels(p.read_bytes()) for p in reference_files]),
        query_ids=q_ids,
        query_families=["all"] * len(q_ids),
        query_truth=[reference_lookup[truth[q]].name if truth[q] else "" for q in q_ids],
        query_edits=[""] * len(q_ids),
        query_pixels=np.stack([wire_pixels(query_lookup[q].read_bytes()) for q in q_ids]),
        meta={"queries": len(q_ids), "references": len(reference_files)},
    )
