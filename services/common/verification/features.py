"""Keypoints and binary descriptors of one image, in a compact form that Redis can hold per upload."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

FeatureKind = Literal["orb", "sift"]
_MAGIC = b"SLF1"
_HEADER = struct.Struct("<4s4sHHI")  # magic, kind, width, height, count
_DESCRIPTOR_BYTES: dict[str, int] = {"orb": 32, "sift": 128}

cv2.setNumThreads(1)  # the moderator runs verification on its own worker threads; nested pools only thrash


@dataclass(frozen=True)
class LocalFeatures:
    kind: FeatureKind
    points: NDArray[np.float32]  # (n, 2) x, y in the detail view's pixels
    descriptors: NDArray[np.uint8]  # (n, 32) ORB bits, or (n, 128) SIFT (OpenCV's SIFT values fit in a byte)
    width: int
    height: int

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def to_bytes(self) -> bytes:
        """Points as float16 (sub-pixel is noise at RANSAC's 5 px), descriptors as stored: ~18 KB for 500 ORB."""
        head = _HEADER.pack(_MAGIC, self.kind.encode().ljust(4), self.width, self.height, len(self))
        return head + self.points.astype(np.float16).tobytes() + self.descriptors.astype(np.uint8).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> LocalFeatures:
        magic, raw_kind, width, height, count = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("not a local-features record")
        kind = raw_kind.decode().strip()
        if kind not in ("orb", "sift"):
            raise ValueError(f"unknown feature kind {kind!r}")
        offset = _HEADER.size
        points = np.frombuffer(data, np.float16, count * 2, offset).reshape(count, 2).astype(np.float32)
        offset += count * 4
        size = _DESCRIPTOR_BYTES[kind]
        descriptors = np.frombuffer(data, np.uint8, count * size, offset).reshape(count, size)
        return cls("orb" if kind == "orb" else "sift", points, descriptors, width, height)


class FeatureExtractor:
    """ORB by default (4 ms an image on one core); SIFT costs ~10x more for the same verified quality.

    Images whose longest side is under ``min_side`` are enlarged to it first: ORB ignores a 31-pixel border and
    describes 31-pixel patches, so a 90-pixel thumbnail or a small crop of a small photo yields a handful of
    keypoints or none (on the bank benchmark's hard crops: a median of 60, some 1-20). Points are reported in
    the given image's pixels, so nothing downstream knows."""

    def __init__(self, kind: FeatureKind = "orb", max_features: int = 500, min_side: int = 0) -> None:
        self.kind: FeatureKind = kind
        self.max_features = max_features
        self.min_side = min_side
        self._detector: Any = (
            cv2.ORB_create(nfeatures=max_features, fastThreshold=10)  # type: ignore[attr-defined]
            if kind == "orb"
            else cv2.SIFT_create(nfeatures=max_features)  # type: ignore[attr-defined]
        )

    def extract(self, gray: NDArray[np.uint8]) -> LocalFeatures:
        height, width = gray.shape[:2]
        scale = self.min_side / max(height, width, 1)
        if scale > 1.0:
            enlarged = (round(width * scale), round(height * scale))
            gray = cv2.resize(gray, enlarged, interpolation=cv2.INTER_LINEAR)  # type: ignore[assignment]
        else:
            scale = 1.0
        keypoints, descriptors = self._detector.detectAndCompute(gray, None)
        size = _DESCRIPTOR_BYTES[self.kind]
        if descriptors is None or not keypoints:
            return LocalFeatures(self.kind, np.zeros((0, 2), np.float32), np.zeros((0, size), np.uint8), width, height)
        # Strongest first: the keypoint index keeps only each reference's first ``per_image`` descriptors.
        order = np.argsort([-kp.response for kp in keypoints], kind="stable")
        points = np.asarray([keypoints[i].pt for i in order], dtype=np.float32) / np.float32(scale)
        descriptors = descriptors[order]
        if self.kind == "sift":
            descriptors = np.clip(descriptors, 0, 255)
        return LocalFeatures(self.kind, points, descriptors.astype(np.uint8), width, height)

    def extract_mirrored(self, gray: NDArray[np.uint8]) -> LocalFeatures:
        """Features of the left-right flip: a mirrored copy matches these, not the original's."""
        return self.extract(np.ascontiguousarray(gray[:, ::-1]))
