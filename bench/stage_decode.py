"""Stage 1: decode and preprocess to the models' 256x256 RGB input, images per second, one core.

Three ways to get there from the same JPEG bytes (held in memory, so disk I/O is not measured):

- ``plain``: full-resolution decode, EXIF orientation, then one bilinear resize to 256x256;
- ``plain+reduce``: full decode, then Pillow's ``reduce()`` by an integer factor before the resize
  (``reducing_gap=2.0``): shows what the resize alone costs;
- ``draft+reduce``: ``services.common.imaging.decode_image`` as served: JPEG draft mode decodes straight
  at 1/2, 1/4 or 1/8 scale via the DCT, then the reduce and resize.

Images are the real photo set (all of it; several are 2-4 MP) plus a few 6-12 MP JPEGs made here by
upscaling real photos with Lanczos and saving at quality 92 into var/bench/big_jpegs, because the packaged
photo set tops out near 4 MP while phone uploads are 12 MP.
"""

from __future__ import annotations

import io
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from bench.common import WORK_DIR, Progress, StageResult, main_for, percentile, summarize_ms
from services.common.config import DecodeSettings
from services.common.imaging import decode_image
from services.common.photos.build import load_photo_set

SIZE = 256
BIG_DIR = WORK_DIR / "big_jpegs"
BIG_MEGAPIXELS = (6.0, 8.0, 10.0, 12.0)
BIG_QUALITY = 92
BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<0.5MP", 0.0, 0.5e6),
    ("0.5-2MP", 0.5e6, 2.0e6),
    (">=2MP real", 2.0e6, float("inf")),
)
XL_BUCKET = "6-12MP upscaled"


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    width: int
    height: int
    bucket: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def plain(data: bytes) -> NDArray[np.uint8]:
    image: Image.Image = Image.open(io.BytesIO(data))
    image.load()
    image = ImageOps.exif_transpose(image) or image
    return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


def plain_reduce(data: bytes) -> NDArray[np.uint8]:
    image: Image.Image = Image.open(io.BytesIO(data))
    image.load()
    image = ImageOps.exif_transpose(image) or image
    resized = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(resized, dtype=np.uint8)


_SETTINGS = DecodeSettings()


def draft_reduce(data: bytes) -> NDArray[np.uint8]:
    return np.asarray(decode_image(data, _SETTINGS, SIZE).pixels)


METHODS: dict[str, Callable[[bytes], NDArray[np.uint8]]] = {
    "plain": plain,
    "plain+reduce": plain_reduce,
    "draft+reduce (decode_image)": draft_reduce,
}


def bucket_of(pixels: int) -> str:
    for name, lo, hi in BUCKETS:
        if lo <= pixels < hi:
            return name
    return BUCKETS[-1][0]


def make_big_jpegs(sources: list[tuple[str, Path]], megapixels: tuple[float, ...], say: Progress) -> list[Path]:
    """Lanczos-upscale real photos to the given sizes and save them at quality 92 (cached in var/bench)."""
    BIG_DIR.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for (name, src), mp in zip(sources, megapixels, strict=False):
        target = BIG_DIR / f"{Path(name).stem}_{mp:g}mp.jpg"
        if not target.exists():
            with Image.open(src) as im:
                rgb = im.convert("RGB")
            scale = (mp * 1e6 / (rgb.width * rgb.height)) ** 0.5
            size = (round(rgb.width * scale), round(rgb.height * scale))
            tmp = target.with_suffix(".tmp")
            rgb.resize(size, Image.Resampling.LANCZOS).save(tmp, format="JPEG", quality=BIG_QUALITY)
            tmp.replace(target)
            say(f"made {target.name} ({size[0]}x{size[1]}) from {name}")
        out.append(target)
    return out


def load_samples(quick: bool, say: Progress) -> tuple[list[Sample], dict[str, Any]]:
    manifest = load_photo_set()
    records = sorted(manifest.images, key=lambda r: r.id)
    by_size = sorted(records, key=lambda r: r.width * r.height, reverse=True)
    if quick:
        rng = random.Random(6)
        big = [r for r in by_size if r.width * r.height >= 2e6][:6]
        rest = [r for r in records if r not in big]
        chosen = big + rng.sample(rest, min(30, len(rest)))
        megapixels: tuple[float, ...] = (6.0, 12.0)
    else:
        chosen = records
        megapixels = BIG_MEGAPIXELS
    samples = [
        Sample(r.file, manifest.path_of(r).read_bytes(), r.width, r.height, bucket_of(r.width * r.height))
        for r in chosen
    ]
    # Upscale from the largest distinct real photos (different scenes), one per target size.
    seeds = [(r.file, manifest.path_of(r)) for r in by_size[: len(megapixels)]]
    for path in make_big_jpegs(seeds, megapixels, say):
        with Image.open(path) as im:
            w, h = im.size
        samples.append(Sample(f"var/bench/big_jpegs/{path.name}", path.read_bytes(), w, h, XL_BUCKET))
    info = {
        "photo_set": str(manifest.root),
        "real_photos": len(chosen),
        "upscaled_photos": len(megapixels),
        "upscaled_dir": "var/bench/big_jpegs",
        "upscaled_megapixels": list(megapixels),
        "upscaled_how": f"Lanczos upscale of the largest real photos, saved as JPEG quality {BIG_QUALITY}",
        "formats": sorted({Image.open(io.BytesIO(s.data)).format or "?" for s in samples}),
        "megapixels_max": round(max(s.pixels for s in samples) / 1e6, 2),
        "bytes_total_mb": round(sum(len(s.data) for s in samples) / 1e6, 1),
    }
    return samples, info


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: per-image cost of each method on the real photos, and with the upscaled ones."""
    rows = {r["case"]: r for r in out["rows"]}
    summary: dict[str, Any] = {}
    for key, group in (("", "all real photos (mixed)"), ("_incl_upscaled", "all incl. upscaled")):
        serving = rows.get(f"{group} / draft+reduce (decode_image)")
        base = rows.get(f"{group} / plain")
        if serving and base:
            summary[f"draft_reduce_ms_per_image{key}"] = serving["ms_per_image"]
            summary[f"draft_reduce_cpu_ms_per_image{key}"] = serving["cpu_ms_per_image"]
            summary[f"draft_reduce_images_per_s{key}"] = serving["images_per_s"]
            summary[f"plain_ms_per_image{key}"] = base["ms_per_image"]
            summary[f"speedup_vs_plain{key}"] = serving["speedup_vs_plain"]
    return summary


def run(quick: bool = False) -> dict[str, Any]:
    say = Progress("decode")
    result = StageResult("decode", "Stage 1: decode + preprocess to 256x256 RGB (one core)", quick).begin()
    samples, info = load_samples(quick, say)
    repeats = 1 if quick else 3
    result.params = {**info, "repeats": repeats, "target_size": SIZE, "methods": list(METHODS)}
    say(f"{len(samples)} images, {repeats} repeat(s) x {len(METHODS)} methods")

    # times[method][i] = per-repeat seconds for sample i; methods are interleaved per image so load drift
    # on the shared machine hits all of them alike, and the image order is shuffled per repeat.
    times: dict[str, list[list[float]]] = {m: [[] for _ in samples] for m in METHODS}
    cpu: dict[str, list[list[float]]] = {m: [[] for _ in samples] for m in METHODS}
    names = list(METHODS)
    for rep in range(repeats):
        order = list(range(len(samples)))
        random.Random(rep).shuffle(order)
        t_rep = time.monotonic()
        for n, i in enumerate(order):
            data = samples[i].data
            for k in range(len(names)):
                m = names[(n + k) % len(names)]
                c0 = time.thread_time()
                t0 = time.perf_counter()
                METHODS[m](data)
                times[m][i].append(time.perf_counter() - t0)
                cpu[m][i].append(time.thread_time() - c0)
        say(f"repeat {rep + 1}/{repeats} done in {time.monotonic() - t_rep:.1f}s")

    per_image = {m: [statistics.median(ts) for ts in times[m]] for m in METHODS}
    per_image_cpu = {m: [statistics.median(ts) for ts in cpu[m]] for m in METHODS}
    groups: list[tuple[str, list[int]]] = [
        *((b, [i for i, s in enumerate(samples) if s.bucket == b]) for b, _, _ in BUCKETS),
        (XL_BUCKET, [i for i, s in enumerate(samples) if s.bucket == XL_BUCKET]),
        ("all real photos (mixed)", [i for i, s in enumerate(samples) if s.bucket != XL_BUCKET]),
        ("all incl. upscaled", list(range(len(samples)))),
    ]
    for group, idx in groups:
        if not idx:
            continue
        mp = [samples[i].pixels / 1e6 for i in idx]
        base = sum(per_image["plain"][i] for i in idx)
        base_cpu = sum(per_image_cpu["plain"][i] for i in idx)
        for m in METHODS:
            secs = [per_image[m][i] for i in idx]
            total = sum(secs)
            cpu_total = sum(per_image_cpu[m][i] for i in idx)
            result.add_row(
                f"{group} / {m}",
                group=group,
                method=m,
                images=len(idx),
                megapixels_median=round(percentile(mp, 50), 2),
                megapixels_max=round(max(mp), 2),
                images_per_s=round(len(idx) / total, 1),
                ms_per_image=round(1000 * total / len(idx), 3),
                speedup_vs_plain=round(base / total, 2),
                cpu_ms_per_image=round(1000 * cpu_total / len(idx), 3),
                images_per_cpu_s=round(len(idx) / cpu_total, 1),
                cpu_speedup_vs_plain=round(base_cpu / cpu_total, 2),
                **{k: v for k, v in summarize_ms(secs).items() if k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")},
            )

    # The cheap path must still give the model the same picture: mean absolute pixel difference vs plain.
    diffs = []
    for s in samples:
        a = plain(s.data).astype(np.int16)
        b = draft_reduce(s.data).astype(np.int16)
        diffs.append(float(np.abs(a - b).mean()))
    result.params["pixel_mean_abs_diff_draft_vs_plain"] = {
        "mean": round(statistics.fmean(diffs), 3),
        "p95": round(percentile(diffs, 95), 3),
        "max": round(max(diffs), 3),
        "scale": "0-255 per channel",
    }
    result.notes += [
        "Bytes are in memory; each image is timed once per method per repeat and the median per image is kept; "
        "images/s = images / sum of those medians, on one thread (decode runs in the fetch workers' threads). "
        "cpu_ms_per_image is the thread's CPU time: on this shared, oversubscribed machine it is the steadier "
        "figure, wall time includes waiting for a core.",
        "The 6-12 MP inputs are upscaled real photos (Lanczos, JPEG q92) made for this benchmark in "
        "var/bench/big_jpegs, not camera originals: the packaged photo set's largest photo is about 4 MP.",
        "Draft mode only applies to JPEG; every photo in the set is a JPEG, so the speedup is an upper bound for a "
        "stream that also carries PNG/WebP.",
    ]
    out = result.finish().to_dict()
    out["summary"] = summarize(out)
    say("done")
    return out


if __name__ == "__main__":
    raise SystemExit(main_for("decode", run))
