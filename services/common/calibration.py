"""Score normalisation against a background set, so that one threshold holds as the index fills.

A query that looks like many things (a sunset, a face, a screenshot of text) has high cosine to unrelated
images, and the more images the index holds, the more likely one of them crosses a fixed threshold. SSCD's
remedy: subtract the query's similarity to its k-th nearest neighbour in a fixed background set of unrelated
images, so that each query is judged against how similar it is to everything.

The background of a model version is half of the train-split photos (by group); the other half are the
validation originals on which that version's threshold is calibrated, so no query is normalised against its
own original.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from numpy.typing import NDArray

VALIDATION_HALF = 0
BACKGROUND_HALF = 1


def background_half(group: str) -> int:
    """Stable split of train-split photo groups into validation originals (0) and the background set (1)."""
    return int(hashlib.sha256(f"sieve-background:{group}".encode()).hexdigest()[:8], 16) % 2


def background_similarity(queries: NDArray[Any], background: NDArray[Any], k: int) -> NDArray[np.float32]:
    """Each query's cosine to its k-th most similar background image (embeddings L2-normalised)."""
    if len(background) < k:
        raise ValueError(f"a background of {len(background)} images has no {k}-th neighbour")
    sims = np.asarray(queries, dtype=np.float32) @ np.asarray(background, dtype=np.float32).T
    kth: NDArray[np.float32] = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return kth


def normalised(scores: NDArray[Any], query_background: NDArray[Any], beta: float, centre: float) -> NDArray[Any]:
    """``score - beta * (bg_k(q) - centre)``: ``centre`` (the background's typical bg_k) keeps thresholds on the
    cosine scale, so a typical query's scores are unchanged and only unusually generic ones are discounted."""
    out: NDArray[Any] = np.asarray(scores) - beta * (np.asarray(query_background)[:, None] - centre)
    return out
