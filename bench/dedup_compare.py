"""Batch dedup on one folder: Sieve's ``sieve dedup`` vs imagededup's hashes and PDQ, plus a scale run.

Part 1, compare (``var/bench/dedup-compare``): held-out real photos are the originals; each gets 15 planted
copies (the moderator's NEAR_DUPLICATES plus stronger edits: flip, rotation, heavy crop, caption, border,
greyscale, screenshot framing, thumbnail-and-recompress, contrast, and a byte-identical copy), and every other
photo of the set is a distractor. Every method clusters the whole folder; a predicted pair is two images in
one cluster, a true pair two images of one planted family. Reported per method: pairwise precision, recall
and F1, recall per edit (copy in its original's cluster), wall time and peak RSS. Each method runs in its own
child process, so its peak RSS is its own (the figure includes the interpreter and the libraries it imports,
which is what a user pays; ``baseline_rss_mb`` shows that floor).

Methods: Sieve at the moderator's duplicate threshold ("near") and at the lower "similar" threshold (one run
yields both), imagededup 0.3.3.post2 PHash/DHash/WHash/AHash with its default ``max_distance_threshold=10``
(64-bit hashes; only its hashing path is imported, see ``_imagededup``), and PDQ (pdqhash, 256 bits, Hamming
<= 31, hashes of the full-resolution decoded image, no quality filter). Pairs are clustered the same way
for all methods (connected components), so the comparison is of the signals, not of the grouping.

Part 2, scale (``var/bench/dedup-scale``): N small JPEGs (default 10,000) made from the whole photo set with
random edits, then the real CLI (``python -m services.cli dedup``) in a child process: interrupted with
SIGINT after ``--interrupt-after`` seconds and resumed with ``--resume``, to measure both. Reported:
embedding images/s, neighbour-graph time, peak RSS, and a clearly labelled extrapolation to 100k images.

Part 3, graph at 100k: the neighbour-graph step alone (``build_graph`` + ``make_clusters``, the real code) on
100k synthetic embeddings (groups of 10 near copies) written as real shards: measured time and peak RSS of the
part whose cost grows quadratically, without the hours that embedding 100k real images takes on 2 cores.

``--sieve-repo DIR`` evaluates another embedder repository in part 1, in-process, at the threshold ``sieve dedup``
would pick for it (the moderator's per-version threshold, else its model card): for example a candidate
version staged in a copy of ``model_repo/sieve_embedder``; stored as ``compare_other_version``.

    .venv/bin/python -m bench.dedup_compare                      # all parts -> bench/results/dedup_compare.json
    .venv/bin/python -m bench.dedup_compare --skip-scale --skip-graph   # part 1 only (~5 min on 2 busy cores)
    .venv/bin/python -m bench.dedup_compare --skip-compare --skip-graph --scale-images 20000
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import types
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.common.transforms import NEAR_DUPLICATES, Transform, chain, crop, jpeg, resize  # noqa: E402

WORK = ROOT / "var" / "bench"
RESULT = ROOT / "bench" / "results" / "dedup_compare.json"
HASH_METHODS = ("PHash", "DHash", "WHash", "AHash")
IMAGEDEDUP_THRESHOLD = 10  # imagededup's default max_distance_threshold for its 64-bit hashes
PDQ_MAX_DISTANCE = 31
EPOCH = 1_700_000_000  # fixed mtimes: originals first, copies later, so "earliest mtime" means the original


# ---------------------------------------------------------------------------------------------------- edits


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
    return ImageFont.truetype(str(path), size) if path.exists() else ImageFont.load_default(size=size)


def hflip(img: Image.Image) -> Image.Image:
    return ImageOps.mirror(img)


def rotate(degrees: float) -> Transform:
    def apply(img: Image.Image) -> Image.Image:
        return img.convert("RGB").rotate(degrees, Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0))

    return apply


def caption(img: Image.Image) -> Image.Image:
    """Meme-style: white bars with bold text above and below the picture."""
    img = img.convert("RGB")
    w, h = img.size
    bar = max(18, h // 6)
    out = Image.new("RGB", (w, h + 2 * bar), (255, 255, 255))
    out.paste(img, (0, bar))
    draw = ImageDraw.Draw(out)
    font = _font(max(10, bar * 2 // 3))
    draw.text((6, bar // 8), "WHEN THE MODEL", fill=(0, 0, 0), font=font)
    draw.text((6, h + bar + bar // 8), "FINDS THE COPY", fill=(0, 0, 0), font=font)
    return out


def border(img: Image.Image) -> Image.Image:
    w, h = img.size
    return ImageOps.expand(img.convert("RGB"), border=max(8, int(0.12 * max(w, h))), fill=(230, 40, 90))


def grayscale(img: Image.Image) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


def screenshot(img: Image.Image) -> Image.Image:
    """The photo shown at 70% inside a phone-like frame with status and navigation bars."""
    img = img.convert("RGB")
    w, h = img.size
    inner = img.resize((max(16, int(w * 0.7)), max(16, int(h * 0.7))), Image.Resampling.BILINEAR)
    out = Image.new("RGB", (w, int(h * 1.2)), (245, 245, 245))
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, 0, w, int(h * 0.08)), fill=(30, 30, 30))
    draw.rectangle((0, int(h * 1.12), w, int(h * 1.2)), fill=(30, 30, 30))
    out.paste(inner, ((w - inner.width) // 2, int(h * 0.15)))
    draw.text((8, int(h * 0.09) + inner.height + int(h * 0.08)), "12 likes", fill=(60, 60, 60), font=_font(12))
    return out


def contrast(img: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(ImageEnhance.Contrast(img.convert("RGB")).enhance(1.8)).enhance(0.8)


STRONG_EDITS: dict[str, Transform] = {
    "hflip": hflip,
    "rotate10": rotate(10),
    "crop60": crop(0.6),
    "caption": caption,
    "border": border,
    "grayscale": grayscale,
    "screenshot": screenshot,
    "thumb_jpeg35": chain(resize(0.25), jpeg(35)),
    "contrast": contrast,
}
EDITS: dict[str, Transform] = {**NEAR_DUPLICATES, **STRONG_EDITS}


def _jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _set_mtime(path: Path, seconds: int) -> None:
    os.utime(path, (seconds, seconds))


# ------------------------------------------------------------------------------------------- compare folder


def build_compare_set(folder: Path, originals: int, max_distractors: int | None = None) -> dict[str, Any]:
    """Originals from the held-out split (never trained on), 16 per family; all other photos are distractors."""
    from services.common.photos.build import load_photo_set

    manifest = load_photo_set()
    held = sorted(manifest.split("heldout"), key=lambda r: r.sha256)
    chosen = held[:originals]
    chosen_ids = {r.id for r in chosen}
    if folder.exists():
        shutil.rmtree(folder)
    families: dict[str, dict[str, str]] = {}
    for n, record in enumerate(chosen):
        fam = f"f{n:03d}"
        src = manifest.path_of(record)
        orig_rel = f"originals/{fam}_{record.id}.jpg"
        (folder / "originals").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / orig_rel)
        _set_mtime(folder / orig_rel, EPOCH)
        members = {orig_rel: "original"}
        img = Image.open(src).convert("RGB")
        exact_rel = f"uploads/exact/{fam}.jpg"
        (folder / "uploads" / "exact").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / exact_rel)
        _set_mtime(folder / exact_rel, EPOCH + 100)
        members[exact_rel] = "exact"
        for k, (name, edit) in enumerate(EDITS.items()):
            rel = f"uploads/{name}/{fam}.jpg"
            (folder / "uploads" / name).mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(_jpeg_bytes(edit(img)))
            _set_mtime(folder / rel, EPOCH + 200 + k)
            members[rel] = name
        families[fam] = members
    distractors: list[str] = []
    by_rel: dict[str, str] = {}
    for record in manifest.images:
        if record.id in chosen_ids or (max_distractors is not None and len(distractors) >= max_distractors):
            continue
        rel = f"distractors/{record.source}/{record.id}.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(manifest.path_of(record), folder / rel)
        _set_mtime(folder / rel, EPOCH)
        distractors.append(rel)
        by_rel[rel] = record.group
    truth = {
        "families": families,
        "distractors": distractors,
        "groups": {rel: by_rel[rel] for rel in distractors},
    }
    (folder.parent / f"{folder.name}.truth.json").write_text(json.dumps(truth, indent=1))
    return truth


# --------------------------------------------------------------------------------------------------- methods


def _components(nodes: list[str], pairs: list[tuple[str, str]]) -> list[list[str]]:
    """Connected components of the match graph, the same grouping for every method (size >= 2 only).

    Written here rather than imported from services.tools.dedup, so that a hash method's child process does
    not import torch and its peak RSS is its own.
    """
    parent = {n: n for n in nodes}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for n in nodes:
        groups.setdefault(find(n), []).append(n)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _walk(folder: Path) -> list[str]:
    suffixes = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix.lower() in suffixes)


def _imagededup() -> types.ModuleType:
    """imagededup's hashing module without its package __init__s, which import torchvision and matplotlib.

    Only ``methods/hashing.py`` and what it imports are loaded (numpy, scipy, PyWavelets, scikit-learn, tqdm and
    imagededup's compiled brute-force search), so the CNN side's dependencies need not be installed.
    """
    spec = importlib.util.find_spec("imagededup")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps imagededup==0.3.3.post2 tqdm==4.70.1 (see docs/explain-and-dedup.md)")
    base = Path(spec.origin).parent
    for sub in ("methods", "utils"):
        name = f"imagededup.{sub}"
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [str(base / sub)]
            sys.modules[name] = stub
    return importlib.import_module("imagededup.methods.hashing")


def run_method(method: str, folder: Path, work: Path, repo: Path | None = None) -> dict[str, Any]:
    """One method on the whole folder: its clusters (lists of relative paths) and what it took."""
    began = time.perf_counter()
    info: dict[str, Any] = {}
    if method == "sieve":
        from services.evaluation.embed import ServedEmbedder
        from services.tools.dedup import DedupOptions, default_near, run_dedup

        embedder = ServedEmbedder.in_process(repo) if repo is not None else ServedEmbedder.connect()
        near, near_source = default_near(embedder.model_version, repo)
        out = work / "sieve-out"
        if out.exists():
            shutil.rmtree(out)
        options = DedupOptions(near=near, similar=round(near - 0.1, 4), progress=False)
        summary = run_dedup(folder, out, options, embedder)
        body = json.loads((out / "clusters.json").read_text())
        clusters = {
            level: [[m["path"] for m in c["members"]] for c in body["clusters"] if c["level"] == level]
            for level in ("near", "similar")
        }
        # "similar" lists only what it adds to "near"; the full partition at the lower threshold is their merge.
        nodes = sorted({p for cs in clusters.values() for c in cs for p in c})
        pairs = [(c[0], p) for cs in clusters.values() for c in cs for p in c[1:]]
        info = {
            "model_version": summary["model_version"],
            "backend": summary["backend"],
            "thresholds": summary["thresholds"],
            "near_source": near_source,
            "timings": summary["timings"],
            "embed_images_per_s": summary["embed_images_per_s"],
            "failed": len(summary["failed"]),
        }
        seconds = time.perf_counter() - began
        edges = _sieve_edges(out, [summary["thresholds"]["near"], summary["thresholds"]["similar"]])
        return {
            "seconds": seconds,
            "variants": {
                "near": {"clusters": clusters["near"], "pairs": edges[0]},
                "similar": {"clusters": _components(nodes, pairs), "pairs": edges[1]},
            },
            "info": info,
        }
    if method in HASH_METHODS:
        import logging

        logging.disable(logging.INFO)  # imagededup logs every step at INFO even with verbose=False
        hashing = _imagededup()
        hasher = getattr(hashing, method)(verbose=False)
        t0 = time.perf_counter()
        encodings = hasher.encode_images(image_dir=str(folder), recursive=True, num_enc_workers=2)
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "num_enc_workers has no effect" with encodings given
            dupes = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=IMAGEDEDUP_THRESHOLD)
        t2 = time.perf_counter()
        nodes = sorted(encodings)
        pairs = sorted({(min(a, b), max(a, b)) for a, found in dupes.items() for b in found})
        info = {"encode_s": round(t1 - t0, 2), "search_s": round(t2 - t1, 2), "max_distance": IMAGEDEDUP_THRESHOLD}
        seconds = time.perf_counter() - began
        return {
            "seconds": seconds,
            "variants": {"": {"clusters": _components(nodes, pairs), "pairs": pairs}},
            "info": info,
        }
    if method == "PDQ":
        import faiss
        import pdqhash

        rels = _walk(folder)
        codes = np.zeros((len(rels), 32), np.uint8)
        quality: list[int] = []
        t0 = time.perf_counter()
        for i, rel in enumerate(rels):
            with Image.open(folder / rel) as img:
                rgb = np.asarray(img.convert("RGB"))
            bits, q = pdqhash.compute(rgb)
            codes[i] = np.packbits(np.asarray(bits, dtype=np.uint8))
            quality.append(int(q))
        t1 = time.perf_counter()
        index = faiss.IndexBinaryFlat(256)
        index.add(codes)
        lims, _, ids = index.range_search(codes, PDQ_MAX_DISTANCE + 1)  # binary radius is exclusive
        pairs = [(rels[q], rels[int(j)]) for q in range(len(rels)) for j in ids[lims[q] : lims[q + 1]] if j > q]
        info = {
            "hash_s": round(t1 - t0, 2),
            "search_s": round(time.perf_counter() - t1, 2),
            "max_distance": PDQ_MAX_DISTANCE,
            "low_quality_hashes": sum(1 for q in quality if q < 50),
        }
        seconds = time.perf_counter() - began
        return {
            "seconds": seconds,
            "variants": {"": {"clusters": _components(rels, pairs), "pairs": pairs}},
            "info": info,
        }
    raise SystemExit(f"unknown method {method}")


def _sieve_edges(out: Path, thresholds: list[float]) -> list[list[tuple[str, str]]]:
    """Sieve's direct matches (cosine >= each threshold) from its checkpoints: the pairs before union-find."""
    import faiss

    rels: list[str] = []
    blocks = []
    for shard in sorted((out / "embeddings").glob("shard-*.npz")):
        with np.load(shard) as data:
            rels.extend(str(k).split("\t")[0] for k in data["keys"])
            blocks.append(np.asarray(data["embeddings"], dtype=np.float32))
    vectors = np.ascontiguousarray(np.concatenate(blocks))
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    lowest = min(thresholds)
    lims, scores, ids = index.range_search(vectors, float(np.nextafter(np.float32(lowest), -np.inf)))
    found: list[list[tuple[str, str]]] = [[] for _ in thresholds]
    for q in range(len(rels)):
        for j, s in zip(ids[lims[q] : lims[q + 1]], scores[lims[q] : lims[q + 1]], strict=True):
            if j > q:
                for k, t in enumerate(thresholds):
                    if s >= t:
                        found[k].append((rels[q], rels[int(j)]))
    return found


def _child(method: str, folder: Path, work: Path, out: Path, repo: Path | None = None) -> int:
    """Entry point of one method's child process: run, then report its own peak RSS too."""
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = run_method(method, folder, work, repo)
    result["baseline_rss_mb"] = round(baseline_rss, 1)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # imagededup's worker pool
    if method in HASH_METHODS:
        result["worker_peak_rss_mb"] = round(children, 1)
    out.write_text(json.dumps(result))
    return 0


def run_child(args: list[str]) -> tuple[int, float, float]:
    """Run this file in a child process; returns (exit code, wall seconds, the child's own peak RSS in MiB)."""
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.dedup_compare", *args], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - began, usage.ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------- scoring


def score_pairs(pairs: list[list[str]], truth: dict[str, Any]) -> dict[str, Any]:
    """Direct matches only (no transitive closure): how good the signal is before any grouping."""
    family_of = {rel: fam for fam, members in truth["families"].items() for rel in members}
    positives = sum(math.comb(len(m), 2) for m in truth["families"].values())
    tp = sum(1 for a, b in pairs if a in family_of and family_of.get(b) == family_of[a])
    fp = len(pairs) - tp
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / positives if positives else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "tp": tp, "fp": fp}


def score(clusters: list[list[str]], truth: dict[str, Any]) -> dict[str, Any]:
    """Pairwise precision/recall over clusters, recall per edit, and how many clusters mix families."""
    family_of: dict[str, str] = {}
    edit_of: dict[str, str] = {}
    original_of: dict[str, str] = {}
    for fam, members in truth["families"].items():
        for rel, edit in members.items():
            family_of[rel] = fam
            edit_of[rel] = edit
            if edit == "original":
                original_of[fam] = rel
    positives = sum(math.comb(len(m), 2) for m in truth["families"].values())
    tp = fp = 0
    mixed = 0
    cluster_of: dict[str, int] = {}
    fp_same_group = 0
    for n, cluster in enumerate(clusters):
        for rel in cluster:
            cluster_of[rel] = n
        labels = Counter(family_of.get(rel, f"d:{rel}") for rel in cluster)
        same = sum(math.comb(c, 2) for c in labels.values())
        tp += same
        fp += math.comb(len(cluster), 2) - same
        mixed += len(labels) > 1
        groups = Counter(truth["groups"].get(rel) for rel in cluster if rel in truth["groups"])
        fp_same_group += sum(math.comb(c, 2) for g, c in groups.items() if g is not None)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / positives if positives else 1.0
    per_edit: dict[str, list[int]] = {}
    for rel, edit in edit_of.items():
        if edit == "original":
            continue
        orig = original_of[family_of[rel]]
        hit = rel in cluster_of and cluster_of.get(orig) == cluster_of[rel]
        per_edit.setdefault(edit, []).append(int(hit))
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0,
        "tp_pairs": tp,
        "fp_pairs": fp,
        "fp_pairs_same_person_or_scene_group": fp_same_group,
        "positive_pairs": positives,
        "clusters": len(clusters),
        "mixed_clusters": mixed,
        "largest_cluster": max((len(c) for c in clusters), default=0),
        "copy_recall_by_edit": {e: round(sum(v) / len(v), 3) for e, v in sorted(per_edit.items())},
    }


def compare(
    originals: int, methods: list[str], max_distractors: int | None = None, repo: Path | None = None
) -> dict[str, Any]:
    folder = WORK / "dedup-compare"
    truth = build_compare_set(folder, originals, max_distractors)
    n_images = sum(len(m) for m in truth["families"].values()) + len(truth["distractors"])
    print(
        f"[compare] {n_images} images: {originals} families x 16, {len(truth['distractors'])} distractors", flush=True
    )
    rows: list[dict[str, Any]] = []
    for method in methods:
        out = WORK / f"dedup-compare-{method}.json"
        extra = ["--sieve-repo", str(repo)] if repo is not None else []
        code, wall, rss = run_child(["--child", method, "--folder", str(folder), "--child-out", str(out), *extra])
        if code != 0:
            rows.append({"method": method, "error": f"exit code {code}"})
            continue
        result = json.loads(out.read_text())
        for variant, found in result["variants"].items():
            name = method if not variant else f"sieve-{variant}"
            row: dict[str, Any] = {"method": name, **score(found["clusters"], truth)}
            row["direct_pairs"] = score_pairs(found["pairs"], truth)
            row.update(
                {
                    "seconds": round(result["seconds"], 2),
                    "images_per_s": round(n_images / result["seconds"], 1),
                    "child_wall_s": round(wall, 2),
                    "peak_rss_mb": round(rss, 1),
                    "baseline_rss_mb": result["baseline_rss_mb"],
                    "worker_peak_rss_mb": result.get("worker_peak_rss_mb"),
                    "info": result["info"],
                }
            )
            if variant == "similar":
                row["note"] = "same run as sieve-near (both levels come from one pass); time and memory shared"
            rows.append(row)
            direct = row["direct_pairs"]
            print(
                f"[compare] {name:14s} clusters P={row['precision']:.3f} R={row['recall']:.3f}  "
                f"direct P={direct['precision']:.3f} R={direct['recall']:.3f} "
                f"{row['seconds']:7.1f}s {row['peak_rss_mb']:7.1f} MiB",
                flush=True,
            )
    return {
        "folder": str(folder.relative_to(ROOT)),
        "images": n_images,
        "originals": originals,
        "copies_per_original": 16,
        "edits": ["exact", *EDITS],
        "methods": rows,
    }


# ----------------------------------------------------------------------------------------------------- scale


def build_scale_set(folder: Path, count: int, seed: int = 7) -> int:
    """``count`` small JPEGs (<= 320 px, q85) from every photo of the set under random edits, 1000 per folder."""
    marker = folder / ".complete.json"
    if marker.exists() and json.loads(marker.read_text()).get("count") == count:
        return count
    from services.common.photos.build import load_photo_set

    if folder.exists():
        shutil.rmtree(folder)
    manifest = load_photo_set()
    rng = random.Random(seed)
    edits: list[Callable[[Image.Image], Image.Image]] = [lambda im: im, *EDITS.values()]
    sources = [manifest.path_of(r) for r in manifest.images]
    cache: dict[Path, Image.Image] = {}
    for i in range(count):
        src = sources[i % len(sources)]
        if src not in cache:
            img = Image.open(src).convert("RGB")
            img.thumbnail((320, 320))
            cache[src] = img
        edited = rng.choice(edits)(cache[src])
        path = folder / f"part{i // 1000:03d}" / f"img{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg_bytes(edited, 85))
    marker.write_text(json.dumps({"count": count, "seed": seed, "sources": len(sources)}))
    return count


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def scale(count: int, interrupt_after: float) -> dict[str, Any]:
    folder = WORK / "dedup-scale"
    out = WORK / "dedup-scale.out"
    t0 = time.perf_counter()
    build_scale_set(folder, count)
    gen_s = time.perf_counter() - t0
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "services.cli", "dedup", str(folder), "--out", str(out), "--quiet"]
    runs: list[dict[str, Any]] = []
    began = time.perf_counter()
    # A background job inherits SIGINT as "ignored", and Python then installs no KeyboardInterrupt handler:
    # restore the default in the child so the SIGINT below behaves like Ctrl-C.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, preexec_fn=_default_sigint)
    interrupted = False
    while proc.poll() is None:
        if interrupt_after > 0 and time.perf_counter() - began > interrupt_after:
            proc.send_signal(signal.SIGINT)
            interrupted = True
            break
        time.sleep(0.5)
    _, status, usage = os.wait4(proc.pid, 0)
    runs.append(
        {
            "run": "first",
            "exit": os.waitstatus_to_exitcode(status),
            "wall_s": round(time.perf_counter() - began, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "interrupted": interrupted,
        }
    )
    checkpointed = sum(
        len(np.load(p)["keys"]) + len(np.load(p)["failed_keys"]) for p in (out / "embeddings").glob("shard-*.npz")
    )
    runs[-1]["checkpointed_images"] = checkpointed
    print(f"[scale] first run: {runs[-1]}", flush=True)
    began = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--resume"], cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    runs.append(
        {
            "run": "resume",
            "exit": os.waitstatus_to_exitcode(status),
            "wall_s": round(time.perf_counter() - began, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        }
    )
    summary = json.loads((out / "summary.json").read_text())
    print(f"[scale] resume: {runs[-1]}", flush=True)
    embed_rate = summary["embed_images_per_s"]
    graph_s = summary["timings"]["graph_s"]
    dim = int(np.load(next((out / "embeddings").glob("shard-*.npz")))["embeddings"].shape[1])
    n100k = 100_000
    extrapolated = {
        "label": "EXTRAPOLATED from the measured run above, not measured",
        "images": n100k,
        "embed_hours": round(n100k / embed_rate / 3600, 2),
        "graph_minutes_quadratic": round(graph_s * (n100k / count) ** 2 / 60, 1),
        "index_mb": round(n100k * dim * 4 / 2**20, 1),
        "checkpoint_disk_mb": round(n100k * (dim * 4 + 200) / 2**20, 1),
    }
    return {
        "folder": str(folder.relative_to(ROOT)),
        "images": count,
        "generate_s": round(gen_s, 1),
        "command": " ".join(["python", "-m", "services.cli", *cmd[3:]]),
        "runs": runs,
        "embedded_by_resume": summary["embedded_this_run"],
        "from_checkpoint": summary["from_checkpoint"],
        "embed_images_per_s": embed_rate,
        "timings": summary["timings"],
        "clusters": summary["counts"],
        "removable": summary["removable"],
        "model_version": summary["model_version"],
        "backend": summary["backend"],
        "embedding_dim": dim,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "extrapolated_100k": extrapolated,
    }


# ----------------------------------------------------------------------------------------------- graph at 100k


def _graph_child(count: int, dim: int, out: Path) -> int:
    """The neighbour-graph step of ``sieve dedup`` alone (build_graph + make_clusters, the real code) at ``count``.

    The embeddings are synthetic but shaped like a deduplication workload: groups of 10 copies (cosine 0.93 to
    0.99 to their group's centre), shard files of 1024 as the real run writes them. Embedding 100k real images on
    these shared cores would take hours; this measures the part whose cost grows quadratically.
    """
    from services.tools.dedup import FileEntry, ShardCache, ShardRows, build_graph, make_clusters

    rng = np.random.default_rng(11)
    folder = WORK / f"dedup-graph-{count}-{dim}"
    if folder.exists():
        shutil.rmtree(folder)
    cache = ShardCache(folder)
    entries: list[FileEntry] = []
    centres = rng.standard_normal((count // 10 + 1, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, count, 1024):
        n = min(1024, count - start)
        ids = np.arange(start, start + n)
        noise = rng.standard_normal((n, dim)).astype(np.float32)
        noise -= (noise * centres[ids // 10]).sum(1, keepdims=True) * centres[ids // 10]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        cos = rng.uniform(0.93, 0.99, (n, 1)).astype(np.float32)
        vectors = cos * centres[ids // 10] + np.sqrt(1 - cos**2) * noise
        rows = ShardRows()
        for k, i in enumerate(ids):
            entry = FileEntry(f"syn/{i:07d}.jpg", 1000, int(i))
            entries.append(entry)
            rows.keys.append(entry.key)
            rows.sha256.append(f"{i:064x}")
            rows.width.append(256)
            rows.height.append(256)
            rows.embeddings.append(vectors[k])
        cache.write(rows, "synthetic")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    graph, _ = build_graph(entries, cache, "synthetic", near=0.90, similar=0.80)
    t1 = time.perf_counter()
    clusters = make_clusters(graph)
    t2 = time.perf_counter()
    result = {
        "images": count,
        "dim": dim,
        "graph_s": round(t1 - t0, 1),
        "clusters_s": round(t2 - t1, 1),
        "edges": graph.edges,
        "near_clusters": sum(1 for c in clusters if c.level == "near"),
        "rss_before_graph_mb": round(before, 1),
    }
    out.write_text(json.dumps(result))
    shutil.rmtree(folder)
    return 0


def graph_at(count: int, dim: int) -> dict[str, Any]:
    from bench.common import machine_info

    out = WORK / "dedup-graph.json"
    code, wall, rss = run_child(["--graph-child", f"{count}:{dim}", "--child-out", str(out)])
    if code != 0:
        return {"error": f"exit code {code}"}
    result: dict[str, Any] = json.loads(out.read_text())
    result.update({"child_wall_s": round(wall, 1), "peak_rss_mb": round(rss, 1), "machine": machine_info()})
    result["index_mb"] = round(count * dim * 4 / 2**20, 1)
    result["note"] = "measured, synthetic embeddings (groups of 10 near copies); the graph step of sieve dedup only"
    print(f"[graph] {result}", flush=True)
    return result


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--originals", type=int, default=40)
    parser.add_argument("--distractors", type=int, default=None, help="cap on distractors (default: all photos)")
    parser.add_argument("--methods", default="sieve,PHash,DHash,WHash,AHash,PDQ")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--scale-images", type=int, default=10_000)
    parser.add_argument("--interrupt-after", type=float, default=600.0, help="SIGINT the first scale run (0: never)")
    parser.add_argument("--skip-graph", action="store_true")
    parser.add_argument("--graph-images", type=int, default=100_000)
    parser.add_argument("--graph-dim", type=int, default=256, help="256: version 2; 1280: version 1")
    parser.add_argument("--graph-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--sieve-repo",
        default=None,
        help="evaluate another embedder repository in-process (e.g. a staged candidate), at the "
        "threshold sieve dedup would pick for its version; stored as compare_other_version",
    )
    args = parser.parse_args(argv)
    if args.child:
        repo = Path(args.sieve_repo) if args.sieve_repo else None
        return _child(args.child, Path(args.folder), WORK, Path(args.child_out), repo)
    if args.graph_child:
        count, dim = (int(x) for x in args.graph_child.split(":"))
        return _graph_child(count, dim, Path(args.child_out))

    from bench.common import machine_info

    WORK.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    result: dict[str, Any] = {"pins": _pins()}
    # Each part keeps the machine state of its own run (load average included): parts can be rerun separately.
    if args.sieve_repo:
        candidate = {"machine": machine_info(), "repo": args.sieve_repo}
        candidate.update(compare(args.originals, ["sieve"], args.distractors, Path(args.sieve_repo)))
        result["compare_other_version"] = candidate
    else:
        result["compare_other_version"] = previous.get("compare_other_version")
    if args.skip_compare or args.sieve_repo:
        result["compare"] = previous.get("compare")
    else:
        result["compare"] = {"machine": machine_info()}
        result["compare"].update(compare(args.originals, args.methods.split(","), args.distractors))
    if args.skip_scale:
        result["scale"] = previous.get("scale")
    else:
        result["scale"] = {"machine": machine_info()}
        result["scale"].update(scale(args.scale_images, args.interrupt_after))
    if result["scale"] is not None and "machine" not in result["scale"] and "machine" in previous:
        result["scale"]["machine"] = previous["machine"]  # results written before machine info moved per part
    result["graph"] = previous.get("graph") if args.skip_graph else graph_at(args.graph_images, args.graph_dim)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULT.relative_to(ROOT)}")
    return 0


def _pins() -> dict[str, str]:
    import importlib.metadata

    names = ("imagededup", "tqdm", "PyWavelets", "scipy", "scikit-learn", "pdqhash", "faiss-cpu", "torch", "pillow")
    pins: dict[str, str] = {}
    for name in names:
        try:
            pins[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pins[name] = "not installed"
    return pins


if __name__ == "__main__":
    raise SystemExit(main())
