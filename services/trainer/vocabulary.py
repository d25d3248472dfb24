"""Builds the keypoint index's coarse vocabulary: binary k-means centroids of ORB descriptors of training photos.

    python -m services.trainer.vocabulary     # writes services/common/verification/orb_vocabulary.npy

The keypoint index (services/common/verification/keypoint_index.py) files every descriptor under its nearest
centroid and searches only the lists nearest each query descriptor: an exact scan of every reference's
descriptors cost 130 ms a query at ~1,200 references. A fixed vocabulary makes every replica's index the same
and needs no training at run time. Built from the background half of the train-split photos only: no
validation original, no held-out photo, no excluded package.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import faiss
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from services.common.calibration import BACKGROUND_HALF, background_half
from services.common.config import VerificationSettings
from services.common.imaging import detail_view
from services.common.photos.build import load_photo_set
from services.common.verification.features import FeatureExtractor
from services.common.verification.keypoint_index import VOCABULARY_PATH


def descriptors_of_background_photos(limit: int | None = None) -> NDArray[np.uint8]:
    cfg = VerificationSettings()
    extractor = FeatureExtractor("orb", cfg.max_features, cfg.min_side)
    manifest = load_photo_set()
    records = [r for r in manifest.split("train") if background_half(r.group) == BACKGROUND_HALF][:limit]
    rows = []
    for n, record in enumerate(records, 1):
        with Image.open(manifest.path_of(record)) as img:
            feats = extractor.extract(detail_view(img.convert("RGB"), cfg.detail_side))
        rows.append(feats.descriptors[: cfg.keypoint_per_image])
        if n % 50 == 0:
            print(f"[vocabulary] {n}/{len(records)} photos", file=sys.stderr, flush=True)
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.uint8)


def train(descriptors: NDArray[np.uint8], lists: int, seed: int = 0) -> NDArray[np.uint8]:
    """Binary centroids (lists, 32) by FAISS's binary IVF training (k-means on bits, then re-binarised)."""
    quantizer = faiss.IndexBinaryFlat(descriptors.shape[1] * 8)
    ivf = faiss.IndexBinaryIVF(quantizer, descriptors.shape[1] * 8, lists)
    ivf.cp.seed = seed
    ivf.train(descriptors)
    codes = faiss.vector_to_array(quantizer.xb)  # type: ignore[attr-defined]
    return np.ascontiguousarray(codes.reshape(lists, -1), dtype=np.uint8)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--lists", type=int, default=1024)
    parser.add_argument("--limit", type=int, default=None, help="photos to use (default: all background photos)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    descriptors = descriptors_of_background_photos(args.limit)
    print(f"[vocabulary] training {args.lists} lists on {len(descriptors)} descriptors", file=sys.stderr, flush=True)
    centroids = train(descriptors, args.lists)
    np.save(VOCABULARY_PATH, centroids)
    print(f"[vocabulary] wrote {VOCABULARY_PATH} ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
