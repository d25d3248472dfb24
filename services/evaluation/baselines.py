"""Every method the benchmark compares, behind one interface: pixels in, query x reference similarity out.

Hashes score as 1 - Hamming distance / bits, so every method is "higher = more similar" and the same
metrics and threshold calibration apply to all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from services.common.config import REPO_ROOT

EmbedFn = Callable[[torch.Tensor], torch.Tensor]
EMBEDDER_REPO = REPO_ROOT / "model_repo" / "sieve_embedder"
ABLATION_PATH = REPO_ROOT / "var" / "trainer" / "no_stn" / "model.pt"


@dataclass
class Timing:
    images: int = 0
    seconds: float = 0.0

    def add(self, images: int, seconds: float) -> None:
        self.images += images
        self.seconds += seconds

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / self.images if self.images else float("nan")


@dataclass
class Method:
    """A named way of comparing images; subclasses fill in ``describe`` and ``similarity``."""

    name: str
    timing: Timing = field(default_factory=Timing)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def similarity(self, queries: NDArray[np.uint8], references: NDArray[np.uint8]) -> NDArray[np.float64]:
        raise NotImplementedError


@dataclass
class EmbeddingMethod(Method):
    fn: EmbedFn | None = None
    dim: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    batch: int = 64
    _cache: dict[tuple[int, tuple[int, ...]], tuple[NDArray[np.uint8], NDArray[np.float32]]] = field(
        default_factory=dict, repr=False
    )

    def embed(self, pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Embeddings of a batch of wire pixels; the same array object is embedded only once per run."""
        key = (id(pixels), pixels.shape)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is pixels:
            return hit[1]
        result = self._embed(pixels)
        self._cache[key] = (pixels, result)
        return result

    def _embed(self, pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
        assert self.fn is not None
        out: list[NDArray[np.float32]] = []
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch):
                chunk = torch.from_numpy(np.ascontiguousarray(pixels[start : start + self.batch]))
                out.append(self.fn(chunk).float().numpy())
        self.timing.add(len(pixels), time.perf_counter() - started)
        result = np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
        self.dim = int(result.shape[1]) if result.size else self.dim
        return result

    def similarity(self, queries: NDArray[np.uint8], references: NDArray[np.uint8]) -> NDArray[np.float64]:
        q, r = self.embed(queries), self.embed(references)
        return (q.astype(np.float64) @ r.astype(np.float64).T).clip(-1.0, 1.0)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "embedding", "dim": self.dim, "bytes_per_vector": 4 * self.dim, **self.info}


def _hamming_similarity(q_bits: NDArray[np.uint8], r_bits: NDArray[np.uint8]) -> NDArray[np.float64]:
    """1 - Hamming/bits for every (query, reference) pair, via two matrix products on 0/1 floats."""
    q = q_bits.astype(np.float32)
    r = r_bits.astype(np.float32)
    distance = q @ (1.0 - r).T + (1.0 - q) @ r.T
    similarity: NDArray[np.float64] = 1.0 - distance.astype(np.float64) / q_bits.shape[1]
    return similarity


@dataclass
class PHashMethod(Method):
    """imagehash's DCT perceptual hash, 64 bits."""

    def bits(self, pixels: NDArray[np.uint8]) -> NDArray[np.uint8]:
        import imagehash

        started = time.perf_counter()
        rows = [imagehash.phash(Image.fromarray(p)).hash.ravel() for p in pixels]
        self.timing.add(len(pixels), time.perf_counter() - started)
        return np.asarray(rows, dtype=np.uint8)

    def similarity(self, queries: NDArray[np.uint8], references: NDArray[np.uint8]) -> NDArray[np.float64]:
        return _hamming_similarity(self.bits(queries), self.bits(references))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "hash", "bits": 64, "library": "imagehash.phash"}


@dataclass
class PDQMethod(Method):
    """Meta's PDQ (256 bits). With ``dihedral`` a query matches if any of its 8 rotations/flips does."""

    dihedral: bool = False

    def _hashes(self, pixels: NDArray[np.uint8], dihedral: bool) -> NDArray[np.uint8]:
        import pdqhash

        started = time.perf_counter()
        if dihedral:
            rows = [np.stack(pdqhash.compute_dihedral(np.ascontiguousarray(p))[0]) for p in pixels]
        else:
            rows = [pdqhash.compute(np.ascontiguousarray(p))[0] for p in pixels]
        self.timing.add(len(pixels), time.perf_counter() - started)
        return np.asarray(rows, dtype=np.uint8)

    def similarity(self, queries: NDArray[np.uint8], references: NDArray[np.uint8]) -> NDArray[np.float64]:
        refs = self._hashes(references, dihedral=False)
        if not self.dihedral:
            return _hamming_similarity(self._hashes(queries, dihedral=False), refs)
        variants = self._hashes(queries, dihedral=True)  # (Q, 8, 256)
        per_variant = [_hamming_similarity(variants[:, v], refs) for v in range(variants.shape[1])]
        best: NDArray[np.float64] = np.max(np.stack(per_variant), axis=0)
        return best

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "hash", "bits": 256, "library": "pdqhash", "dihedral": self.dihedral}


def gem_v1() -> EmbeddingMethod:
    """The version-1 baseline exactly as served: ImageNet MobileNetV2 + GeM at 224 px, 1280-d."""
    from services.common.models.gem import GeMEmbedder
    from services.common.models.mobilenet_v2 import load_imagenet_trunk

    model = GeMEmbedder(load_imagenet_trunk()).eval()
    return EmbeddingMethod("gem_v1", fn=model, dim=1280, info={"model": "sieve_embedder:1 (ImageNet MobileNetV2+GeM)"})


def torchscript_method(name: str, path: Path) -> EmbeddingMethod:
    from services.trainer.export import load_torchscript

    module, meta = load_torchscript(path)
    info = {"path": str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)}
    info.update({k: meta[k] for k in ("use_stn", "input_size", "embed_dim") if k in meta})
    return EmbeddingMethod(name, fn=module, dim=int(meta.get("embed_dim", 0)), info=info)


def default_methods(stn_path: Path | None = None, ablation_path: Path | None = None) -> tuple[list[Method], list[str]]:
    """STN v2 (as shipped), the no-STN ablation, GeM v1, pHash and PDQ ± dihedral; notes for anything missing."""
    methods: list[Method] = []
    notes: list[str] = []
    from services.evaluation.embed import version_dir

    stn = stn_path or version_dir(2) / "model.pt"
    ablation = ablation_path or ABLATION_PATH
    if stn.exists():
        methods.append(torchscript_method("stn_v2", stn))
    else:
        notes.append(f"stn_v2 skipped: {stn} missing (sieve train --ship)")
    if ablation.exists():
        methods.append(torchscript_method("no_stn_ablation", ablation))
    else:
        notes.append(f"no_stn_ablation skipped: {ablation} missing (sieve train --variant no_stn)")
    methods.append(gem_v1())
    methods += [PHashMethod("phash"), PDQMethod("pdq"), PDQMethod("pdq_dihedral", dihedral=True)]
    return methods, notes
