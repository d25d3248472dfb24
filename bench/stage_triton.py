"""Stage 3: the served models through Triton over gRPC, with and without system shared memory.

Client-side batches of 1, 8, 32 and 64, and two concurrent clients so Triton's dynamic batcher can merge requests.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.common.config import REPO_ROOT, DecodeSettings, TritonSettings
from services.common.imaging import decode_image
from services.common.inference import TritonModels
from services.common.photos.build import load_photo_set
from services.common.stack import LocalStack


def sample_batch(n: int) -> NDArray[np.uint8]:
    """Real photos, decoded exactly as the moderator decodes them."""
    manifest = load_photo_set()
    records = sorted(manifest.images, key=lambda r: r.id)[:n]
    return np.stack([decode_image(manifest.path_of(r).read_bytes(), DecodeSettings(), 256).pixels for r in records])


def _scrape(metrics_url: str) -> dict[str, float]:
    """Triton's own counters: where the time goes (queue vs compute) per model."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(
            (
                "nv_inference_queue_duration_us",
                "nv_inference_compute_infer_duration_us",
                "nv_inference_request_success",
                "nv_inference_exec_count",
                "nv_inference_compute_input_duration_us",
                "nv_inference_compute_output_duration_us",
            )
        ):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def measure(
    settings: TritonSettings, images: NDArray[np.uint8], batch: int, seconds: float, concurrency: int = 1
) -> dict[str, Any]:
    clients = [TritonModels(settings) for _ in range(concurrency)]
    chunks = [images[i % len(images) : i % len(images) + batch] for i in range(0, 10_000, batch)]
    chunks = [c for c in chunks if len(c) == batch]
    for c in clients:
        c.infer(chunks[0])  # warm-up (and shared-memory registration)
    latencies: list[float] = []
    done = 0

    def worker(client: TritonModels) -> tuple[int, list[float]]:
        n, lat = 0, []
        end = time.monotonic() + seconds
        k = 0
        while time.monotonic() < end:
            t0 = time.perf_counter()
            client.infer(chunks[k % len(chunks)])
            lat.append((time.perf_counter() - t0) * 1000)
            n += batch
            k += 1
        return n, lat

    began = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for n, lat in pool.map(worker, clients):
            done += n
            latencies += lat
    elapsed = time.monotonic() - began
    for c in clients:
        c.close()
    arr = np.asarray(latencies)
    return {
        "batch": batch,
        "concurrency": concurrency,
        "shared_memory": settings.shared_memory,
        "images_per_s": round(done / elapsed, 2),
        "batch_latency_ms": {f"p{q}": round(float(np.percentile(arr, q)), 1) for q in (50, 95, 99)},
    }


def run(quick: bool = False, stack: LocalStack | None = None) -> dict[str, Any]:
    own = stack is None
    stack = stack or LocalStack()
    endpoints = stack.endpoints() if not own else stack.start()
    images = sample_batch(64)
    seconds = 3.0 if quick else 12.0
    results = []
    try:
        base = TritonSettings(url=endpoints.triton_grpc)
        before = _scrape(endpoints.triton_metrics)
        for shm in (False, True):
            for batch in (8,) if quick else (1, 8, 32, 64):
                settings = base.model_copy(update={"shared_memory": shm})
                results.append(measure(settings, images, batch, seconds))
                print(f"[triton] {results[-1]}", flush=True)
            settings = base.model_copy(update={"shared_memory": shm})
            results.append(measure(settings, images, 16, seconds, concurrency=2))
            print(f"[triton] {results[-1]}", flush=True)
        after = _scrape(endpoints.triton_metrics)
    finally:
        if own:
            stack.stop()
    counters = {k: round(after.get(k, 0) - before.get(k, 0), 1) for k in after}
    return {
        "stage": "triton_grpc",
        "results": results,
        "triton_counters_delta": counters,
        "best_images_per_s": max(r["images_per_s"] for r in results),
    }


if __name__ == "__main__":
    out = REPO_ROOT / "bench" / "results" / "stage_triton.json"
    out.write_text(json.dumps(run(), indent=1))
    print(f"wrote {out}")
