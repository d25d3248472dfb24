"""Images for the hard benchmark that no training ever used: distractors, extra originals and collage fillers.

Real photos are scarce in the registries, so the reference database is padded the way DISC21 pads it: with
many unrelated images that a query must not match. Game textures (photographed rock, wood, metal, walls,
signs) are photo-like and plentiful. Test and validation draw from different packages, so no threshold is
tuned on the images it is judged on:

| role | test | validation |
|---|---|---|
| originals (references + unmatched queries) | held-out photos + palapeli / puzzle-jigsaw photos | train-split photos |
| distractors in the database | ufoai-textures | openarena-081-textures |
| collage and background fillers | colobot-common-textures | colobot-common-textures |

None of these packages is in ../shared/training-excluded-sources.txt, and none feeds ``sieve train``.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from services.common.photos.build import default_deb_cache
from services.common.photos.debian import fetch_package

# Normal, gloss, specular and height maps are not pictures of anything.
_NOT_PICTURES = ("_nm.", "_gm.", "_sm.", "_hm.", "_bump", "_norm", "_gloss", "_spec", "_glow", "_mask", "_alpha")
MIN_SIDE = 200


@dataclass(frozen=True)
class SourceImage:
    id: str  # "<package>:<path inside>", stable across machines
    data: bytes  # as shipped (JPEG or PNG)
    group: str = ""  # images of one scene (frames of a clip, shots of one person) share a group


@dataclass(frozen=True)
class TextureSource:
    package: str
    pk3_glob: str  # the game's texture archive, a zip


TEST_DISTRACTORS = TextureSource("ufoai-textures", "usr/share/games/ufoai/base/*textures*.pk3")
VALIDATION_DISTRACTORS = TextureSource("openarena-081-textures", "usr/share/games/openarena/baseoa/*textures*.pk3")
FILLER_PACKAGE = "colobot-common-textures"
EXTRA_PHOTOS: dict[str, tuple[str, ...]] = {
    "palapeli-data": ("usr/share/palapeli/collection/*.jpg",),
    "puzzle-jigsaw": ("usr/share/puzzle-jigsaw/samples/*.jp*g",),
}


def _usable(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if min(img.size) < MIN_SIDE:
                return False
            rgb = img.convert("RGB").resize((32, 32))
    except (OSError, ValueError, SyntaxError):
        return False
    extrema = rgb.getextrema()
    spread: int = max(int(hi) - int(lo) for lo, hi in extrema)
    return spread > 40  # flat fills are not distractors worth counting


def _unique(images: Iterator[SourceImage]) -> list[SourceImage]:
    seen: set[str] = set()
    out = []
    for image in images:
        digest = hashlib.sha256(image.data).hexdigest()
        if digest not in seen and _usable(image.data):
            seen.add(digest)
            out.append(image)
    return out


def texture_images(source: TextureSource, cache: Path | None = None, limit: int | None = None) -> list[SourceImage]:
    """Picture textures of at least 200 px from the game's archive, sorted by path (deterministic)."""
    extracted = fetch_package(source.package, cache or default_deb_cache(), members=[source.pk3_glob])
    archives = sorted(extracted.root.glob(source.pk3_glob))
    if not archives:
        raise FileNotFoundError(f"{source.package} holds no {source.pk3_glob}")

    def entries() -> Iterator[SourceImage]:
        for archive in archives:
            with zipfile.ZipFile(archive) as pk3:
                for name in sorted(pk3.namelist()):
                    low = name.lower()
                    if low.endswith((".jpg", ".jpeg", ".png")) and not any(tag in low for tag in _NOT_PICTURES):
                        yield SourceImage(f"{source.package}:{name}", pk3.read(name))

    found = _unique(entries())
    return found[:limit] if limit else found


def package_images(package: str, patterns: tuple[str, ...], cache: Path | None = None) -> list[SourceImage]:
    extracted = fetch_package(package, cache or default_deb_cache(), members=list(patterns))
    paths = sorted(p for pattern in patterns for p in extracted.root.glob(pattern))
    return _unique(SourceImage(f"{package}:{p.relative_to(extracted.root)}", p.read_bytes()) for p in paths)


def extra_photos(cache: Path | None = None) -> list[SourceImage]:
    return [img for package, patterns in EXTRA_PHOTOS.items() for img in package_images(package, patterns, cache)]


def fillers(cache: Path | None = None, limit: int = 80) -> list[Image.Image]:
    images = package_images(FILLER_PACKAGE, ("usr/share/games/colobot/textures/*.png",), cache)
    out = []
    for image in images[:limit]:
        with Image.open(io.BytesIO(image.data)) as img:
            out.append(img.convert("RGB"))
    return out
