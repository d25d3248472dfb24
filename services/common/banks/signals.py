"""Signal types a bank holds, in the names hash-exchange lists use, and the hashes an upload is matched by.

PDQ is Meta's 256-bit perceptual hash (the one HMA, ThreatExchange and StopNCII exchange); its hex form is the
reference one (16 words, most significant first), so lists from other tools match what Sieve computes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pdqhash
from numpy.typing import NDArray

SignalType = Literal["sha256", "md5", "pdq", "phash"]
SIGNAL_TYPES: tuple[SignalType, ...] = ("pdq", "md5", "sha256", "phash")
HEX_LENGTH: dict[SignalType, int] = {"sha256": 64, "md5": 32, "pdq": 64, "phash": 16}

# Names other tools use for the same signal (ThreatExchange indicator types, HMA signal type names).
ALIASES: dict[str, SignalType] = {
    "pdq": "pdq",
    "hash_pdq": "pdq",
    "photo_pdq": "pdq",
    "md5": "md5",
    "hash_md5": "md5",
    "photo_md5": "md5",
    "sha256": "sha256",
    "hash_sha256": "sha256",
    "sha-256": "sha256",
    "phash": "phash",
}
_HEX = re.compile(r"^[0-9a-f]+$")


class MalformedSignal(ValueError):
    """A row or request naming an unknown signal type or a value that is not that type's hash."""


def signal_type(name: str) -> SignalType:
    found = ALIASES.get(name.strip().lower())
    if found is None:
        raise MalformedSignal(f"unsupported signal type {name.strip()!r} (supported: {', '.join(SIGNAL_TYPES)})")
    return found


def normalise(kind: SignalType, value: str) -> str:
    """Lower-case hex of the right length; raises MalformedSignal otherwise."""
    text = value.strip().lower()
    want = HEX_LENGTH[kind]
    if len(text) != want or not _HEX.match(text):
        raise MalformedSignal(f"{kind} must be {want} hex digits, got {value.strip()[:80]!r}")
    return text


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
