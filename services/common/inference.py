"""Triton gRPC client for the embedder and the classifier; both are called concurrently on one batch."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from services.common.config import TritonSettings
from services.common.errors import TransientError


@dataclass(frozen=True)
class InferenceResult:
    embeddings: NDArray[Any]  # (n, d) float32, L2-normalised
    scores: NDArray[Any]  # (n, k) float32
    categories: list[str]
    model_version: str  # "<embedder>:<version>", the key of the index these embeddings belong to


class ImageModels(Protocol):
    def infer(self, images: NDArray[Any]) -> InferenceResult: ...


class TritonModels:
    """The embedder and classifier served by Triton; the verdict records the version that answered."""

    def __init__(self, settings: TritonSettings, max_batch: int = 64) -> None:
        self.settings = settings
        self.max_batch = max_batch
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="triton")
        self._categories: list[str] | None = None
        self._infer_lock = threading.Lock()
        self._shm: _InputRegion | None = None

    def _client(self) -> grpcclient.InferenceServerClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = grpcclient.InferenceServerClient(self.settings.url)
            self._local.client = client
        return client

    def categories(self) -> list[str]:
        if self._categories is None:
            try:
                config = self._client().get_model_config(self.settings.classifier_model, as_json=True)
            except InferenceServerException as exc:
                raise TransientError("triton", str(exc)) from exc
            cfg = config["config"]
            dims = int(cfg["output"][0]["dims"][0])
            # Category names travel in the model's own config, so a new classifier version can add flags.
            raw = cfg.get("parameters", {}).get("categories", {}).get("string_value", "")
            names = [n.strip() for n in raw.split(",") if n.strip()]
            if len(names) != dims:
                names = [f"category_{i}" for i in range(dims)]
            self._categories = names
        return self._categories

    def _call(self, model: str, version: str, output: str, images: NDArray[Any]) -> tuple[NDArray[Any], str]:
        inp = grpcclient.InferInput("IMAGE", list(images.shape), "UINT8")
        if self._shm is not None:
            inp.set_shared_memory(self._shm.name, images.nbytes)  # both models read the one copy
        else:
            inp.set_data_from_numpy(images)
        try:
            result = self._client().infer(
                model,
                [inp],
                model_version=version,
                outputs=[grpcclient.InferRequestedOutput(output)],
                client_timeout=self.settings.timeout_s,
            )
        except InferenceServerException as exc:
            raise TransientError("triton", f"{model}: {exc}") from exc
        array = result.as_numpy(output)
        if array is None:
            raise TransientError("triton", f"{model} returned no {output}")
        response: Any = result.get_response()
        return np.asarray(array, dtype=np.float32), str(response.model_version)

    def infer(self, images: NDArray[Any]) -> InferenceResult:
        with self._infer_lock:
            try:
                return self._infer(images)
            except TransientError:
                if self._shm is not None:  # a restarted server forgot the region: register it afresh
                    self._shm.close(self._client())
                    self._shm = None
                raise

    def _infer(self, images: NDArray[Any]) -> InferenceResult:
        embeddings: list[NDArray[Any]] = []
        scores: list[NDArray[Any]] = []
        versions: set[str] = set()
        categories = self.categories()
        for start in range(0, len(images), self.max_batch):
            chunk = np.ascontiguousarray(images[start : start + self.max_batch])
            if self.settings.shared_memory:
                self._region().write(chunk)
            emb_future = self._pool.submit(
                self._call, self.settings.embedder_model, self.settings.embedder_version, "EMBEDDING", chunk
            )
            cls_future = self._pool.submit(self._call, self.settings.classifier_model, "", "SCORES", chunk)
            emb, version = emb_future.result()
            cls, _ = cls_future.result()
            embeddings.append(emb)
            scores.append(cls)
            versions.add(version)
        if len(versions) > 1:
            # A model roll happened mid-batch: retry so that one batch never mixes embedding spaces.
            raise TransientError("triton", f"embedder versions changed within a batch: {sorted(versions)}")
        version = versions.pop() if versions else "0"
        return InferenceResult(
            embeddings=np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32),
            scores=np.concatenate(scores) if scores else np.zeros((0, len(categories)), np.float32),
            categories=categories,
            model_version=f"{self.settings.embedder_model}:{version}",
        )

    def _region(self) -> _InputRegion:
        if self._shm is None:
            size = self.max_batch * self.settings.input_size * self.settings.input_size * 3
            self._shm = _InputRegion(self._client(), size)
        return self._shm

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close(self._client())
            self._shm = None
        self._pool.shutdown(wait=False)


class _InputRegion:
    """A POSIX shared-memory region registered with Triton, reused for every batch."""

    def __init__(self, client: grpcclient.InferenceServerClient, size: int) -> None:
        import os
        import uuid

        import tritonclient.utils.shared_memory as shm

        self._shm = shm
        self.name = f"sieve_in_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.key = f"/{self.name}"
        self.handle = shm.create_shared_memory_region(self.name, self.key, size)
        try:
            client.register_system_shared_memory(self.name, self.key, size)
        except InferenceServerException as exc:
            shm.destroy_shared_memory_region(self.handle)
            raise TransientError("triton", f"cannot register shared memory: {exc}") from exc

    def write(self, chunk: NDArray[Any]) -> None:
        self._shm.set_shared_memory_region(self.handle, [chunk])

    def close(self, client: grpcclient.InferenceServerClient) -> None:
        with contextlib.suppress(InferenceServerException):
            client.unregister_system_shared_memory(self.name)
        self._shm.destroy_shared_memory_region(self.handle)
