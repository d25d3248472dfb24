"""Embeddings from exactly the model version Triton serves: over gRPC when Triton is up, else the same file.

Triton's version policy is "latest 1": the highest numbered folder under model_repo/sieve_embedder. The
in-process fallback applies the same rule and runs the same artifact (ONNX through onnxruntime where the
version ships one, as its model.py prefers; else its TorchScript; the ImageNet GeM network for version 1),
so ``sieve embed`` output does not depend on where it ran; the integration parity test proves the two paths
agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from services.common.config import REPO_ROOT, DecodeSettings, Settings
from services.common.errors import BadInput
from services.common.imaging import decode_image

if TYPE_CHECKING:
    import torch

EMBEDDER_REPO = REPO_ROOT / "model_repo" / "sieve_embedder"


def version_dir(version: int) -> Path:
    """Where a served version's files live."""
    return EMBEDDER_REPO / str(version)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def latest_version(repo: Path = EMBEDDER_REPO) -> int:
    """What Triton's ``version_policy: { latest: { num_versions: 1 } }`` picks: the largest numeric folder."""
    versions = [int(p.name) for p in repo.iterdir() if p.is_dir() and p.name.isdigit() and (p / "model.py").exists()]
    if not versions:
        raise FileNotFoundError(f"no model versions under {repo}")
    return max(versions)


def load_version(version: int, repo: Path = EMBEDDER_REPO) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network one version folder serves, loaded the way its model.py loads it (torch: the train extra)."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    artifact = repo / str(version) / "model.pt"
    if artifact.exists():
        from services.trainer.export import load_torchscript

        module, _ = load_torchscript(artifact)
        return module
    if version == 1:
        from services.common.models.gem import GeMEmbedder
        from services.common.models.mobilenet_v2 import load_imagenet_trunk

        return GeMEmbedder(load_imagenet_trunk()).eval()
    raise FileNotFoundError(f"{artifact} is missing")


def load_serving(version: int, repo: Path = EMBEDDER_REPO) -> Callable[[NDArray[np.uint8]], NDArray[np.float32]]:
    """The exact artifact Triton runs for a version: model.onnx through onnxruntime when the version ships
    one (as its model.py prefers), else the network ``load_version`` returns."""
    onnx_path = repo / str(version) / "model.onnx"
    if onnx_path.exists():
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is not None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = min(2, os.cpu_count() or 1)
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

            def run_onnx(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
                return np.asarray(session.run(["EMBEDDING"], {"IMAGE": pixels})[0], dtype=np.float32)

            return run_onnx
    network = load_version(version, repo)
    import torch

    def run_torch(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
        with torch.inference_mode():
            return np.asarray(network(torch.from_numpy(pixels)).float().numpy(), dtype=np.float32)

    return run_torch


def triton_reachable(url: str, model: str, timeout_s: float = 2.0) -> bool:
    """Up, with ``model`` ready. Not the server's readiness: Triton reports the whole server not ready while any
    version of any model is in a failed state (a refused promotion's version stays listed with its error), and
    the model asked for may be serving fine."""
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            live = client.is_server_live(client_timeout=timeout_s)
            return bool(live and client.is_model_ready(model, client_timeout=timeout_s))
        finally:
            client.close()
    except Exception:  # any failure to connect means "not reachable": fall back to in-process
        return False


@dataclass
class ServedEmbedder:
    """Embeds wire pixels with the served version; ``backend`` says which path answered."""

    model_version: str
    backend: str
    _fn: Callable[[NDArray[np.uint8]], tuple[NDArray[np.float32], str]]

    def embed(self, pixels: NDArray[np.uint8], batch: int = 32) -> NDArray[np.float32]:
        rows: list[NDArray[np.float32]] = []
        for start in range(0, len(pixels), batch):
            emb, version = self._fn(np.ascontiguousarray(pixels[start : start + batch]))
            if version != self.model_version:
                raise RuntimeError(f"served version changed from {self.model_version} to {version} mid-run")
            rows.append(emb)
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)

    @classmethod
    def connect(cls, settings: Settings | None = None, prefer_triton: bool = True) -> ServedEmbedder:
        settings = settings or Settings()
        if prefer_triton and triton_reachable(settings.triton.url, settings.triton.embedder_model):
            from services.common.inference import TritonModels

            models = TritonModels(settings.triton)

            def via_triton(pixels: NDArray[np.uint8]) -> tuple[NDArray[np.float32], str]:
                result = models.infer(pixels)
                return result.embeddings.astype(np.float32), result.model_version

            _, version = via_triton(np.zeros((1, 256, 256, 3), np.uint8))
            return cls(version, "triton", via_triton)
        return cls.in_process()

    @classmethod
    def in_process(cls, repo: Path = EMBEDDER_REPO) -> ServedEmbedder:
        version = latest_version(repo)
        run = load_serving(version, repo)
        name = f"{repo.name}:{version}"

        def local(pixels: NDArray[np.uint8]) -> tuple[NDArray[np.float32], str]:
            return run(pixels), name

        return cls(name, "in-process", local)


def images_in_folder(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def embed_folder(folder: Path, out: Path, embedder: ServedEmbedder) -> dict[str, Any]:
    """Writes ids (file names), embeddings, the model version and the backend to ``out`` (.npz)."""
    ids: list[str] = []
    pixels: list[NDArray[np.uint8]] = []
    skipped: dict[str, str] = {}
    for path in images_in_folder(folder):
        try:
            pixels.append(decode_image(path.read_bytes(), DecodeSettings(), 256).pixels)
            ids.append(path.name)
        except BadInput as exc:
            skipped[path.name] = str(exc)
    batch = np.stack(pixels) if pixels else np.zeros((0, 256, 256, 3), np.uint8)
    embeddings = embedder.embed(batch) if len(batch) else np.zeros((0, 0), np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        ids=np.asarray(ids),
        embeddings=embeddings,
        model_version=np.asarray(embedder.model_version),
        backend=np.asarray(embedder.backend),
    )
    return {
        "images": len(ids),
        "skipped": skipped,
        "model_version": embedder.model_version,
        "backend": embedder.backend,
    }
