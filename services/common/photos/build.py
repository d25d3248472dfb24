"""Build a reproducible set of real photographs from files that Debian packages (and scikit-image) ship.

Tests and model training need genuine photos, not synthetic noise, but the build machine has no
general internet access. Debian's archive does ship a few hundred real photos (GCompris activity
pictures, dlib's example images, Stellarium's astrophotos), so we pull exactly those packages with
``apt-get download``, keep only images that look like photos, and write them with a manifest whose
train/heldout split is a pure function of content hashes, so every machine gets the same split.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, TextIO

import numpy as np
from PIL import Image

from services.common.photos.debian import DebianFetchError, fetch_package
from services.common.photos.rcc import RccError, RccStats, iter_rcc

Split = Literal["train", "heldout"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
HELDOUT_PERCENT = 20
MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_IMAGES = 3000
JPEG_QUALITY = 90

GCOMPRIS_PACKAGE = "gcompris-qt-data"
GCOMPRIS_RCC_DIR = "usr/share/gcompris-qt/rcc"
# Shape-puzzle boards: paintings with white holes punched in them, opaque so no filter catches them.
GCOMPRIS_SKIP_BUNDLES = frozenset({"babyshapes.rcc"})
DLIB_PACKAGE = "libdlib19.1"
DLIB_EXAMPLES_DIR = f"usr/share/doc/{DLIB_PACKAGE}/examples"
# dlib ships ~150 consecutive frames of one clip; every 10th keeps the scene without 150 near-copies.
DLIB_VIDEO_FRAME_STRIDE = 10
STELLARIUM_PACKAGE = "stellarium-data"
STELLARIUM_NEBULAE_DIR = "usr/share/stellarium/nebulae/default"
# ~550 astrophotos would otherwise outnumber every other kind of scene put together.
STELLARIUM_MAX_IMAGES = 200
SKIMAGE_DIST = "scikit-image"
# Synthetic test patterns and drawings in skimage/data that the generic filters cannot tell apart.
SKIMAGE_NOT_PHOTOS = frozenset(
    {"chessboard_GRAY.png", "chessboard_RGB.png", "color.png", "horse.png", "logo.png", "phantom.png"}
)

SOURCES: tuple[str, ...] = ("gcompris", "dlib", "skimage", "stellarium")
# tuxpaint-stamps-default was evaluated and left out: 160 MB for a single opaque photo (the rest are
# cut-outs with transparent backgrounds or smaller than 128 px).
DEFAULT_SOURCES: tuple[str, ...] = SOURCES

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_ANALYSIS_SIDE = 128
_MAX_TRANSPARENT_FRACTION = 0.02
_MIN_UNIQUE_COLOURS = 32
_MIN_GRAY_STD = 8.0


def default_cache_root() -> Path:
    """``$SIEVE_STACK_CACHE_DIR`` (the stack's shared download cache) or ``~/.cache/sieve``."""
    env = os.environ.get("SIEVE_STACK_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sieve"


def default_photo_dir() -> Path:
    """Where the photo set lives unless a caller says otherwise."""
    return default_cache_root() / "photos"


def default_deb_cache() -> Path:
    """Downloaded ``.deb`` files and their unpacked trees, reused across builds."""
    return default_cache_root() / "debian"


def split_for(key: str) -> Split:
    """Stable train/heldout assignment: the same key lands in the same split on every machine."""
    bucket = int(hashlib.sha256(f"sieve-photos-split:{key}".encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


@dataclass(frozen=True)
class PhotoRecord:
    """One kept photo. ``sha256`` hashes the bytes as shipped; ``file_sha256`` the file we wrote."""

    id: str
    source: str
    package: str
    package_version: str
    original_path: str
    file: str
    width: int
    height: int
    sha256: str
    file_sha256: str
    bytes: int
    split: Split
    group: str


@dataclass
class Manifest:
    """The photo set on disk: records plus what was fetched and what was rejected, and why."""

    root: Path
    images: list[PhotoRecord]
    min_side: int
    packages: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    build_seconds: float = 0.0

    def path_of(self, record: PhotoRecord) -> Path:
        return self.root / record.file

    def split(self, name: Split) -> list[PhotoRecord]:
        return [r for r in self.images if r.split == name]

    def counts(self) -> dict[str, int]:
        """Kept images per source, in the order sources were built."""
        return dict(Counter(r.source for r in self.images))

    def to_json(self) -> dict[str, object]:
        return {
            "format": MANIFEST_FORMAT,
            "min_side": self.min_side,
            "heldout_percent": HELDOUT_PERCENT,
            "packages": self.packages,
            "rejected": self.rejected,
            "errors": self.errors,
            "build_seconds": round(self.build_seconds, 2),
            "images": [asdict(r) for r in self.images],
        }

    def save(self) -> Path:
        path = self.root / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, root: Path) -> Manifest:
        raw = json.loads((root / MANIFEST_NAME).read_text())
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{root / MANIFEST_NAME}: unsupported manifest format {raw.get('format')}")
        return cls(
            root=root,
            images=[PhotoRecord(**r) for r in raw["images"]],
            min_side=int(raw["min_side"]),
            packages=dict(raw.get("packages", {})),
            rejected={k: dict(v) for k, v in raw.get("rejected", {}).items()},
            errors=list(raw.get("errors", [])),
            build_seconds=float(raw.get("build_seconds", 0.0)),
        )


def load_photo_set(out_dir: Path | None = None) -> Manifest:
    """Open an already-built photo set (raises ``FileNotFoundError`` when it was never built)."""
    return Manifest.load(out_dir or default_photo_dir())


# ----------------------------------------------------------------------------------------- filtering


def _transparent_fraction(im: Image.Image) -> float:
    if im.mode not in ("RGBA", "LA", "PA") and "transparency" not in im.info:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-with-transparency conversion warning
        alpha = im.convert("RGBA").resize((_ANALYSIS_SIDE, _ANALYSIS_SIDE), Image.Resampling.NEAREST)
    return float((np.asarray(alpha)[..., 3] < 128).mean())


def reject_reason(im: Image.Image, *, min_side: int) -> str | None:
    """Why ``im`` is not a usable photo, or None. Cheap heuristics, tuned on the packaged images.

    Cut-outs and clip-art carry transparency; test patterns and textures have few colours; blank
    frames have almost no contrast. None of that is what uploads to a moderation service look like.
    """
    if min(im.size) < min_side:
        return "too_small"
    if _transparent_fraction(im) > _MAX_TRANSPARENT_FRACTION:
        return "transparent"
    small = im.convert("RGB").resize((_ANALYSIS_SIDE, _ANALYSIS_SIDE), Image.Resampling.NEAREST)
    px = np.asarray(small).astype(np.int64)
    if len(np.unique((px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2])) < _MIN_UNIQUE_COLOURS:
        return "few_colours"
    gray = im.convert("L").resize((_ANALYSIS_SIDE, _ANALYSIS_SIDE), Image.Resampling.BILINEAR)
    if float(np.asarray(gray, dtype=np.float64).std()) < _MIN_GRAY_STD:
        return "blank"
    return None


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = Image.open(io.BytesIO(data))
        im.load()  # a full decode: truncated or corrupt files must fail here, not in a consumer
    return im


def _encode(data: bytes, fmt: str | None) -> tuple[bytes, str]:
    """JPEG bytes stay byte-identical; PNG/WebP become JPEG so consumers need one codec only."""
    if fmt == "JPEG":
        return data, ".jpg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = Image.open(io.BytesIO(data))
        src.load()
    out = src.convert("L" if src.mode in ("L", "LA", "I", "I;16") else "RGB")
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), ".jpg"


# ------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class _Candidate:
    original_path: str
    name: str
    group: str | None
    load: Callable[[], bytes]


@dataclass
class _SourceRun:
    source: str
    package: str
    version: str
    candidates: Iterator[_Candidate]
    limit: int | None = None
    notes: list[str] = field(default_factory=list)


def _safe_name(parts: Iterable[str]) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(p for p in parts if p)).strip("_") or "image"


def _file_loader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _const_loader(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _gcompris(cache: Path) -> _SourceRun:
    pkg = fetch_package(GCOMPRIS_PACKAGE, cache, members=[f"{GCOMPRIS_RCC_DIR}/*.rcc"])
    run = _SourceRun("gcompris", pkg.name, pkg.version, iter(()))

    def candidates() -> Iterator[_Candidate]:
        for bundle in sorted(pkg.path(GCOMPRIS_RCC_DIR).glob("*.rcc")):
            if bundle.name in GCOMPRIS_SKIP_BUNDLES:
                continue
            stats = RccStats()
            try:
                for inner, data in iter_rcc(bundle, stats):
                    if not inner.lower().endswith(_IMAGE_SUFFIXES):
                        continue
                    skip = {"gcompris", "src", "activities", "resource"}
                    parts = [p for p in inner.split("/")[:-1] if p not in skip] + [inner.rsplit("/", 1)[-1]]
                    yield _Candidate(
                        original_path=f"{GCOMPRIS_RCC_DIR}/{bundle.name}:/{inner}",
                        name=_safe_name(parts),
                        group=None,
                        load=_const_loader(data),
                    )
            except RccError as exc:
                run.notes.append(f"{bundle.name}: {exc}")
            if stats.skipped_zstd:
                run.notes.append(f"{bundle.name}: skipped {stats.skipped_zstd} zstd entries (no decoder)")
            run.notes.extend(f"{bundle.name}: {e}" for e in stats.errors)

    run.candidates = candidates()
    return run


def _dlib(cache: Path) -> _SourceRun:
    pkg = fetch_package(DLIB_PACKAGE, cache, members=[f"{DLIB_EXAMPLES_DIR}/*"])
    root = pkg.path(DLIB_EXAMPLES_DIR)

    def candidates() -> Iterator[_Candidate]:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        frames = [p for p in files if p.parent.name == "video_frames"]
        keep_frames = set(frames[::DLIB_VIDEO_FRAME_STRIDE])
        for path in files:
            if path in frames and path not in keep_frames:
                continue
            rel = path.relative_to(root)
            # Frames of one clip, or several shots of one person, must not straddle train/heldout.
            group = None
            if path.parent.name == "video_frames":
                group = "dlib:video_frames"
            elif rel.parts[0] == "johns":
                group = f"dlib:johns/{rel.parts[1]}"
            yield _Candidate(f"{DLIB_EXAMPLES_DIR}/{rel.as_posix()}", _safe_name(rel.parts), group, _file_loader(path))

    return _SourceRun("dlib", pkg.name, pkg.version, candidates())


def _skimage(_cache: Path) -> _SourceRun:
    spec = importlib.util.find_spec("skimage")  # locate without importing (skimage is heavy)
    if spec is None or not spec.submodule_search_locations:
        raise _SourceUnavailable("scikit-image is not installed")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    try:
        version = importlib.metadata.version(SKIMAGE_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"

    def candidates() -> Iterator[_Candidate]:
        for path in sorted(data_dir.glob("*")):
            if path.suffix.lower() in _IMAGE_SUFFIXES and path.name not in SKIMAGE_NOT_PHOTOS:
                yield _Candidate(f"skimage/data/{path.name}", _safe_name([path.name]), None, _file_loader(path))

    return _SourceRun("skimage", SKIMAGE_DIST, version, candidates())


def _stellarium(cache: Path) -> _SourceRun:
    # Only the nebula photos are unpacked, and the 246 MB .deb is dropped once they are.
    pkg = fetch_package(STELLARIUM_PACKAGE, cache, members=[f"{STELLARIUM_NEBULAE_DIR}/*"], keep_deb=False)
    root = pkg.path(STELLARIUM_NEBULAE_DIR)

    def candidates() -> Iterator[_Candidate]:
        files = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES]
        # A hash order spreads the capped selection over the catalogue instead of taking M1..M99.
        files.sort(key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
        for path in files:
            yield _Candidate(f"{STELLARIUM_NEBULAE_DIR}/{path.name}", _safe_name([path.name]), None, _file_loader(path))

    return _SourceRun("stellarium", pkg.name, pkg.version, candidates(), limit=STELLARIUM_MAX_IMAGES)


class _SourceUnavailable(RuntimeError):
    """A source cannot be used on this machine; the build goes on without it."""


_SOURCE_FACTORIES: dict[str, Callable[[Path], _SourceRun]] = {
    "gcompris": _gcompris,
    "dlib": _dlib,
    "skimage": _skimage,
    "stellarium": _stellarium,
}


# -------------------------------------------------------------------------------------------- build


class _Progress:
    """Plain line-oriented progress on stderr: works in CI logs and under pytest capture."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[photos {time.monotonic() - self.t0:6.1f}s] {msg}", file=self.stream, flush=True)


def _prepare_staging(out_dir: Path) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists():
        raise ValueError(f"{out_dir} is not empty and holds no {MANIFEST_NAME}; refusing to replace it")
    staging = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_photo_set(
    out_dir: Path,
    *,
    min_side: int = 128,
    progress: bool = True,
    sources: Sequence[str] = DEFAULT_SOURCES,
    cache_dir: Path | None = None,
    max_images: int = MAX_IMAGES,
) -> Manifest:
    """Gather, filter, dedupe and write the photo set to ``out_dir``; returns the saved manifest.

    The set is built in a sibling staging folder and swapped in at the end, so readers never see a
    half-built set. ``out_dir`` must be empty, absent, or a previous build (it is replaced).
    A source that cannot be fetched is recorded in ``Manifest.errors`` and skipped; if no source
    yields anything the build fails instead of writing an empty set.
    """
    unknown = [s for s in sources if s not in _SOURCE_FACTORIES]
    if unknown:
        raise ValueError(f"unknown photo sources {unknown}; choose from {list(SOURCES)}")
    out_dir = out_dir.expanduser().resolve()
    cache = (cache_dir or default_deb_cache()).expanduser()
    say = _Progress(progress)
    t0 = time.monotonic()
    staging = _prepare_staging(out_dir)
    manifest = Manifest(root=staging, images=[], min_side=min_side)
    seen: set[str] = set()
    try:
        for source in sources:
            if len(manifest.images) >= max_images:
                say(f"{source}: skipped, image cap {max_images} reached")
                break
            say(f"{source}: fetching")
            try:
                run = _SOURCE_FACTORIES[source](cache)
            except (DebianFetchError, _SourceUnavailable) as exc:
                manifest.errors.append(f"{source}: {exc}")
                say(f"{source}: UNAVAILABLE, skipped ({exc})")
                continue
            manifest.packages[run.package] = run.version
            kept, rejected = _collect(run, staging, min_side, seen, manifest, max_images, say)
            manifest.rejected[source] = dict(sorted(rejected.items()))
            manifest.errors.extend(f"{source}: {n}" for n in run.notes)
            say(f"{source}: kept {kept}, rejected {sum(rejected.values())} {dict(rejected)}")
        if not manifest.images:
            raise RuntimeError(f"no photos gathered from {list(sources)}: {manifest.errors}")
        manifest.build_seconds = time.monotonic() - t0
        manifest.save()
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest.root = out_dir
    say(f"done: {len(manifest.images)} photos in {out_dir} ({manifest.build_seconds:.1f}s)")
    return manifest


def _collect(
    run: _SourceRun,
    staging: Path,
    min_side: int,
    seen: set[str],
    manifest: Manifest,
    max_images: int,
    say: Callable[[str], None],
) -> tuple[int, Counter[str]]:
    rejected: Counter[str] = Counter()
    kept = 0
    used_names: set[str] = set()
    (staging / run.source).mkdir()
    for n, cand in enumerate(run.candidates, 1):
        if n % 200 == 0:
            say(f"{run.source}: scanned {n}, kept {kept}")
        if len(manifest.images) >= max_images or (run.limit is not None and kept >= run.limit):
            rejected["over_cap"] += 1
            continue
        data = cand.load()
        if len(data) > MAX_FILE_BYTES:
            rejected["too_large"] += 1
            continue
        sha = hashlib.sha256(data).hexdigest()
        if sha in seen:
            rejected["duplicate"] += 1
            continue
        try:
            im = _open(data)
            width, height = im.size
            reason = reject_reason(im, min_side=min_side)
            out_bytes, suffix = (b"", "") if reason else _encode(data, im.format)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            reason = "undecodable"
        if reason:
            rejected[reason] += 1
            continue
        file_sha = hashlib.sha256(out_bytes).hexdigest()
        if file_sha in seen:  # same pixels shipped twice in different containers
            rejected["duplicate"] += 1
            continue
        seen.update((sha, file_sha))
        stem = cand.name.rsplit(".", 1)[0]
        name = f"{stem}{suffix}"
        if name in used_names:
            name = f"{stem}-{sha[:8]}{suffix}"
        used_names.add(name)
        (staging / run.source / name).write_bytes(out_bytes)
        group = cand.group or sha
        manifest.images.append(
            PhotoRecord(
                id=f"{run.source}-{sha[:12]}",
                source=run.source,
                package=run.package,
                package_version=run.version,
                original_path=cand.original_path,
                file=f"{run.source}/{name}",
                width=width,
                height=height,
                sha256=sha,
                file_sha256=file_sha,
                bytes=len(out_bytes),
                split=split_for(group),
                group=group,
            )
        )
        kept += 1
    return kept, rejected
