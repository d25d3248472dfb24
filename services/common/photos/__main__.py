"""``python -m services.common.photos [--out DIR]``: build the photo set and print a summary."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from services.common.photos.build import (
    DEFAULT_SOURCES,
    MAX_IMAGES,
    SOURCES,
    Manifest,
    build_photo_set,
    default_photo_dir,
)


def _summary(manifest: Manifest) -> str:
    lines = [f"photo set: {manifest.root}  ({manifest.build_seconds:.1f}s)"]
    lines.append(
        f"{'source':<12}{'package':<22}{'kept':>6}{'train':>7}{'heldout':>8}{'min px':>12}{'max px':>12}{'MB':>8}"
    )
    for source in manifest.counts():
        recs = [r for r in manifest.images if r.source == source]
        splits = Counter(r.split for r in recs)
        small = min(recs, key=lambda r: r.width * r.height)
        big = max(recs, key=lambda r: r.width * r.height)
        mb = sum(r.bytes for r in recs) / 1e6
        lines.append(
            f"{source:<12}{recs[0].package:<22}{len(recs):>6}{splits['train']:>7}{splits['heldout']:>8}"
            f"{f'{small.width}x{small.height}':>12}{f'{big.width}x{big.height}':>12}{mb:>8.1f}"
        )
    total_mb = sum(r.bytes for r in manifest.images) / 1e6
    heldout = len(manifest.split("heldout"))
    lines.append(
        f"{'total':<34}{len(manifest.images):>6}{len(manifest.images) - heldout:>7}{heldout:>8}{'':>24}{total_mb:>8.1f}"
    )
    for source, reasons in manifest.rejected.items():
        if reasons:
            lines.append(f"rejected {source}: " + ", ".join(f"{k}={v}" for k, v in reasons.items()))
    lines.extend(f"warning: {e}" for e in manifest.errors)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build (or rebuild) the set; exit 1 when nothing could be gathered."""
    parser = argparse.ArgumentParser(prog="python -m services.common.photos", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help=f"output (default {default_photo_dir()})")
    parser.add_argument("--min-side", type=int, default=128, help="drop images whose shorter side is smaller")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(DEFAULT_SOURCES))
    parser.add_argument("--max-images", type=int, default=MAX_IMAGES)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        manifest = build_photo_set(
            args.out or default_photo_dir(),
            min_side=args.min_side,
            progress=not args.quiet,
            sources=args.sources,
            max_images=args.max_images,
        )
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
