"""Signal types a bank holds, in the names hash-exchange lists use, and the hashes an upload is matched by.

PDQ is Meta's 256-bit perceptual hash (the one HMA, ThreatExchange and StopNCII exchange); its hex form is the
reference one (16 words, most significant first), so lists from other tools match what Sieve computes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pdqhash
from numpy.typing import NDArray

from services.common.hashing import informative_phash

SignalType = Literal["sha256", "md5", "pdq", "phash"]
_HEX = re.compile(r"^[0-9a-f]+$")


class ImageHashes(Protocol):
    """What a signal kind hashes: one prepared image (``services.common.prepared.PreparedImage``)."""

    @property
    def sha256(self) -> str: ...
    @property
    def md5(self) -> str: ...
    @property
    def phash(self) -> str: ...
    @property
    def pdq(self) -> str: ...


@dataclass(frozen=True)
class SignalKind:
    """One signal type with what it needs, as Hasher-Matcher-Actioner's signal types carry theirs: how it is
    written (hex digits, names other tools use), how an image is hashed for it, and how it is matched (equal
    values through a Redis set per value, or near ones, by Hamming distance, through the in-memory PDQ index)."""

    name: SignalType
    hex_length: int
    aliases: tuple[str, ...]
    hasher: Callable[[ImageHashes], str]  # "" when the image gives no usable hash of this kind
    exact: bool  # matched by equality; False: by distance (``near``)

    def normalise(self, value: str) -> str:
        """Lower-case hex of the right length; raises MalformedSignal otherwise."""
        text = value.strip().lower()
        if len(text) != self.hex_length or not _HEX.match(text):
            raise MalformedSignal(f"{self.name} must be {self.hex_length} hex digits, got {value.strip()[:80]!r}")
        return text

    def hash(self, image: ImageHashes) -> str | None:
        value = self.hasher(image)
        return value or None


def _informative_phash(image: ImageHashes) -> str:
    return image.phash if informative_phash(image.phash) else ""


# The order exact kinds are tried in a match (bytes before pixels), then the near one.
SIGNAL_KINDS: dict[SignalType, SignalKind] = {
    kind.name: kind
    for kind in (
        SignalKind("sha256", 64, ("hash_sha256", "sha-256"), lambda image: image.sha256, exact=True),
        SignalKind("md5", 32, ("hash_md5", "photo_md5"), lambda image: image.md5, exact=True),
        SignalKind("phash", 16, (), _informative_phash, exact=True),
        SignalKind("pdq", 64, ("hash_pdq", "photo_pdq"), lambda image: image.pdq, exact=False),
    )
}
SIGNAL_TYPES: tuple[SignalType, ...] = ("pdq", "md5", "sha256", "phash")  # as `sieve banks export` lists them
EXACT_KINDS: tuple[SignalKind, ...] = tuple(k for k in SIGNAL_KINDS.values() if k.exact)
# Names other tools use for the same signal (ThreatExchange indicator types, HMA signal type names).
ALIASES: dict[str, SignalType] = {
    alias: kind.name for kind in SIGNAL_KINDS.values() for alias in (kind.name, *kind.aliases)
}


class MalformedSignal(ValueError):
    """A row or request naming an unknown signal type or a value that is not that type's hash."""


def signal_type(name: str) -> SignalType:
    found = ALIASES.get(name.strip().lower())
    if found is None:
        raise MalformedSignal(f"unsupported signal type {name.strip()!r} (supported: {', '.join(SIGNAL_TYPES)})")
    return found


def normalise(kind: SignalType, value: str) -> str:
    """Lower-case hex of the right length; raises MalformedSignal otherwise."""
    return SIGNAL_KINDS[kind].normalise(value)


def image_signals_of(image: ImageHashes, item_id: str) -> list[Signal]:
    """Every signal kind's hash of one prepared image, under one banked item id (kinds with no usable hash left
    out: a flat image's PDQ, an uninformative pHash)."""
    out = []
    for kind in SIGNAL_KINDS.values():
        value = kind.hash(image)
        if value is not None:
            out.append(Signal(kind.name, value, item_id))
    return out


def default_item_id(kind: SignalType, value: str) -> str:
    """The id a banked signal gets when its list names none: stable, so re-imports land on the same item."""
    return hashlib.sha1(f"{kind}:{value}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Signal:
    kind: SignalType
    value: str
    item_id: str = ""  # the banked content this signal came from; several signals of one image share it
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.value}"

    def with_id(self) -> Signal:
        if self.item_id:
            return self
        return Signal(self.kind, self.value, default_item_id(self.kind, self.value), self.metadata)


def parse_signal(kind: str, value: str, item_id: str = "", metadata: dict[str, Any] | None = None) -> Signal:
    """Raises MalformedSignal."""
    canonical = signal_type(kind)
    return Signal(canonical, normalise(canonical, value), item_id.strip(), dict(metadata or {})).with_id()


def pdq_hex(pixels: NDArray[Any]) -> tuple[str, int]:
    """PDQ of RGB or grayscale pixels as reference hex, and its quality (0-100; below ~50 mostly noise)."""
    image = np.asarray(pixels, dtype=np.uint8)
    if image.ndim == 2:  # pdqhash takes RGB and weighs it to luminance; equal channels give the gray back
        image = np.repeat(image[:, :, None], 3, axis=2)
    bits, quality = pdqhash.compute(np.ascontiguousarray(image))
    # pdqhash returns the 256 bits most significant first, which is the order of the reference hex.
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex(), int(quality)


def pdq_bytes(values: list[str]) -> NDArray[np.uint8]:
    """Rows of 32 bytes for FAISS binary indexes; Hamming distance is the same in any consistent bit order."""
    if not values:
        return np.zeros((0, 32), dtype=np.uint8)
    return np.frombuffer(bytes.fromhex("".join(values)), dtype=np.uint8).reshape(-1, 32)
