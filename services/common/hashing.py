"""Content hashes for the fast paths: sha256 of the bytes, and a 64-bit DCT perceptual hash of the pixels."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5_hex(data: bytes) -> str:
    """For hash lists that carry MD5 (many industry lists do); never used for anything but matching them."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@lru_cache(maxsize=1)
def _dct_matrix(n: int = 32) -> NDArray[np.float64]:
    k = np.arange(n)
    m: NDArray[np.float64] = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


MIN_AC_ENERGY = 8.0


def phash_hex(pixels: NDArray[Any]) -> str:
    """pHash (low 8x8 DCT coefficients against their median): stable under re-encoding and mild resizing.

    Returns "" for images without structure, which must never match on a perceptual hash.
    """
    gray = Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    d = _dct_matrix()
    coeffs = d @ np.asarray(gray, dtype=np.float64) @ d.T
    low = coeffs[:8, :8].flatten()[1:]  # drop the DC term: brightness is not content
    if float(np.abs(low).max()) < MIN_AC_ENERGY:
        return ""  # a flat image: its bits would be rounding noise, shared by every other flat image
    bits = np.concatenate([[0], (low > np.median(low)).astype(np.uint8)])
    return f"{int(''.join(map(str, bits)), 2):016x}"


def informative_phash(value: str) -> bool:
    """Flat or nearly blank images give degenerate hashes that many unrelated images share: never match on those."""
    ones = int(value, 16).bit_count() if value else 0
    return 16 <= ones <= 48


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()
