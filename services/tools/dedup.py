"""``sieve dedup DIR``: find exact, near and "similar" duplicates in a folder tree with the served embedder.

Built for dataset cleaning at 100k images on a small machine:

- streaming: files are read, hashed and decoded one batch at a time (the next batch decodes in a background
  thread while the model runs), and only embeddings are kept;
- resumable: embeddings are checkpointed shard by shard (``embeddings/shard-*.npz`` keyed by path, size and
  mtime), so an interrupted run picks up where it stopped and a changed file is embedded again;
- bounded: the neighbour graph is a FAISS range search over an exact inner-product index, queried one shard at
  a time, and clusters are the connected components (union-find) of edges above each threshold. Memory is the
  index (images x dim x 4 bytes) plus one shard; nothing is quadratic except the search time.

Levels: ``exact`` (same sha256), ``near`` (cosine >= the moderator's duplicate threshold, exact included) and
``similar`` (a lower threshold; listed only where it adds to ``near``). The keeper of a cluster is the largest
image (pixels), then the earliest mtime, then the path, so the choice is deterministic.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from services.common.config import DecisionSettings, DecodeSettings
from services.common.errors import BadInput
from services.common.hashing import sha256_hex
from services.common.imaging import decode_image
from services.evaluation.embed import IMAGE_SUFFIXES

WIRE_SIZE = 256
SHARD_PREFIX = "shard-"
LinkMode = Literal["hard", "sym"]
Level = Literal["exact", "near", "similar"]


class Embedder(Protocol):
    """What dedup needs from ``services.evaluation.embed.ServedEmbedder`` (tests pass counting wrappers)."""

    model_version: str

    def embed(self, pixels: NDArray[np.uint8], batch: int = 32) -> NDArray[np.float32]: ...


# ------------------------------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class FileEntry:
    rel: str  # POSIX path relative to the scanned root
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        """Checkpoint key: a file that changes size or mtime is embedded again on resume."""
        return f"{self.rel}\t{self.size}\t{self.mtime_ns}"


def scan(root: Path, exclude: Sequence[Path] = ()) -> list[FileEntry]:
    """Every image file under ``root`` (suffix match, symlinks not followed), in a stable order."""
    skip = {p.resolve() for p in exclude}
    found: list[FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() not in skip)
        for name in sorted(filenames):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = here / name
            try:
                st = path.stat()
            except OSError:
                continue  # vanished or unreadable between listing and stat
            if path.is_symlink():
                continue
            found.append(FileEntry(path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return found


# ---------------------------------------------------------------------------------------------- checkpoints


@dataclass
class ShardRows:
    """One shard being filled: embedded rows, and files that could not be decoded (so resume skips them too)."""

    keys: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    width: list[int] = field(default_factory=list)
    height: list[int] = field(default_factory=list)
    embeddings: list[NDArray[np.float32]] = field(default_factory=list)
    failed_keys: list[str] = field(default_factory=list)
    failed_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys) + len(self.failed_keys)


class ShardCache:
    """A folder of ``shard-NNNNNN.npz`` files, each written atomically (temp file, then rename)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob(f"{SHARD_PREFIX}*.npz")) if self.folder.exists() else []

    def clear(self) -> int:
        shards = self.shards()
        for path in shards:
            path.unlink()
        return len(shards)

    @staticmethod
    def read(path: Path) -> dict[str, NDArray[Any]]:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}

    def known_keys(self, model_version: str) -> set[str]:
        """Keys already done for this version; shards of another version are dropped (other embedding space)."""
        keys: set[str] = set()
        for path in self.shards():
            data = self.read(path)
            if str(data["model_version"]) != model_version:
                path.unlink()
                continue
            keys.update(str(k) for k in data["keys"])
            keys.update(str(k) for k in data["failed_keys"])
        return keys

    def write(self, rows: ShardRows, model_version: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = self.shards()
        number = int(existing[-1].stem.removeprefix(SHARD_PREFIX)) + 1 if existing else 0
        path = self.folder / f"{SHARD_PREFIX}{number:06d}.npz"
        tmp = path.with_suffix(".tmp")
        dim = rows.embeddings[0].shape[0] if rows.embeddings else 0
        with tmp.open("wb") as fh:
            np.savez(
                fh,
                model_version=np.asarray(model_version),
                keys=np.asarray(rows.keys, dtype=str),
                sha256=np.asarray(rows.sha256, dtype=str),
                width=np.asarray(rows.width, dtype=np.int64),
                height=np.asarray(rows.height, dtype=np.int64),
                embeddings=np.stack(rows.embeddings).astype(np.float32) if rows.embeddings else np.zeros((0, dim)),
                failed_keys=np.asarray(rows.failed_keys, dtype=str),
                failed_reasons=np.asarray(rows.failed_reasons, dtype=str),
            )
        os.replace(tmp, path)
        return path


# ------------------------------------------------------------------------------------------------ embedding


@dataclass
class Loaded:
    entry: FileEntry
    sha256: str = ""
    width: int = 0
    height: int = 0
    pixels: NDArray[np.uint8] | None = None
    error: str = ""


def true_size(data: bytes) -> tuple[int, int]:
    """Width and height as stored, after EXIF rotation, from the header alone.

    ``decode_image`` reports the size after JPEG draft mode (a 4000 px photo decodes at 1/8 scale), which would
    make a large original and its half-size copy look alike to the keeper rule; this reads the real size.
    """
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        try:
            orientation = int(img.getexif().get(0x0112, 1))
        except (OSError, ValueError, TypeError):
            orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_batch(root: Path, entries: Sequence[FileEntry]) -> list[Loaded]:
    """Read, hash and decode one batch exactly as the moderator does; the bytes are dropped right away."""
    out: list[Loaded] = []
    settings = DecodeSettings()
    for entry in entries:
        item = Loaded(entry)
        try:
            data = (root / entry.rel).read_bytes()
            item.sha256 = sha256_hex(data)
            decoded = decode_image(data, settings, WIRE_SIZE)
            item.pixels = decoded.pixels
            item.width, item.height = true_size(data)
        except BadInput as exc:
            item.error = str(exc)
        except OSError as exc:
            item.error = f"unreadable: {exc}"
        out.append(item)
    return out


ProgressFn = Callable[[int], None]


def embed_missing(
    root: Path,
    todo: Sequence[FileEntry],
    cache: ShardCache,
    embedder: Embedder,
    batch: int,
    shard_size: int,
    advance: ProgressFn,
) -> dict[str, int]:
    """Embed ``todo`` in batches, checkpointing a shard every ``shard_size`` files and on any interruption."""
    rows = ShardRows()
    counts = {"embedded": 0, "failed": 0, "shards": 0}
    batches = [todo[i : i + batch] for i in range(0, len(todo), batch)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending: Future[list[Loaded]] | None = pool.submit(load_batch, root, batches[0]) if batches else None
        try:
            for i in range(len(batches)):
                assert pending is not None
                loaded = pending.result()
                pending = pool.submit(load_batch, root, batches[i + 1]) if i + 1 < len(batches) else None
                good = [item for item in loaded if item.pixels is not None]
                if good:
                    pixels = np.stack([item.pixels for item in good if item.pixels is not None])
                    emb = embedder.embed(pixels, batch=batch)
                    for item, vector in zip(good, emb, strict=True):
                        rows.keys.append(item.entry.key)
                        rows.sha256.append(item.sha256)
                        rows.width.append(item.width)
                        rows.height.append(item.height)
                        rows.embeddings.append(np.asarray(vector, dtype=np.float32))
                    counts["embedded"] += len(good)
                for item in loaded:
                    if item.pixels is None:
                        rows.failed_keys.append(item.entry.key)
                        rows.failed_reasons.append(item.error)
                        counts["failed"] += 1
                    item.pixels = None
                if len(rows) >= shard_size:
                    cache.write(rows, embedder.model_version)
                    counts["shards"] += 1
                    rows = ShardRows()
                advance(len(loaded))
        finally:
            # Checkpoint whatever is done, also on Ctrl-C or an embedder failure: resume starts from here.
            if len(rows):
                cache.write(rows, embedder.model_version)
                counts["shards"] += 1
            if pending is not None:
                pending.cancel()
    return counts


# ------------------------------------------------------------------------------------------------ clustering


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size: near-linear for millions of edges."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True

    def groups(self, min_size: int = 2) -> list[list[int]]:
        """Components with at least ``min_size`` members, each sorted, largest first (ties by first member)."""
        by_root: dict[int, list[int]] = {}
        for x in range(len(self.parent)):
            by_root.setdefault(self.find(x), []).append(x)
        found = [sorted(g) for g in by_root.values() if len(g) >= min_size]
        return sorted(found, key=lambda g: (-len(g), g[0]))


@dataclass
class Catalogue:
    """What is known about each embedded image, by dense id (the FAISS row)."""

    rels: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    width: list[int] = field(default_factory=list)
    height: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rels)


def choose_keeper(ids: Iterable[int], cat: Catalogue) -> int:
    """Largest resolution first, then the earliest mtime (the likely original), then the path for determinism."""
    return min(ids, key=lambda i: (-cat.width[i] * cat.height[i], cat.mtime_ns[i], cat.rels[i]))


@dataclass
class Graph:
    catalogue: Catalogue
    near: UnionFind
    similar: UnionFind
    exact: list[list[int]]
    edges: dict[str, int]
    index: Any  # faiss.IndexFlatIP holding every embedding, for keeper similarities


def build_graph(
    entries: Sequence[FileEntry],
    cache: ShardCache,
    model_version: str,
    near: float,
    similar: float,
    block: int = 1024,
    progress_for: Callable[[int], ProgressFn] | None = None,
) -> tuple[Graph, dict[str, str]]:
    """Exact groups by sha256, then near/similar edges by FAISS range search, merged with union-find."""
    import faiss

    wanted = {e.key: e for e in entries}
    cat = Catalogue()
    failed: dict[str, str] = {}
    index: Any = None
    plan: list[tuple[Path, NDArray[np.int64], int]] = []  # shard, its rows that are current, first dense id
    seen: set[str] = set()
    for path in cache.shards():
        data = cache.read(path)
        if str(data["model_version"]) != model_version:
            continue
        for key, reason in zip(data["failed_keys"], data["failed_reasons"], strict=True):
            entry = wanted.get(str(key))
            if entry is not None and str(key) not in seen:
                seen.add(str(key))
                failed[entry.rel] = str(reason)
        rows = [i for i, k in enumerate(data["keys"]) if str(k) in wanted and str(k) not in seen]
        if not rows:
            continue
        take = np.asarray(rows, dtype=np.int64)
        vectors = np.ascontiguousarray(data["embeddings"][take], dtype=np.float32)
        if index is None:
            index = faiss.IndexFlatIP(vectors.shape[1])
        plan.append((path, take, len(cat)))
        index.add(vectors)
        for i in rows:
            key = str(data["keys"][i])
            seen.add(key)
            entry = wanted[key]
            cat.rels.append(entry.rel)
            cat.sha256.append(str(data["sha256"][i]))
            cat.width.append(int(data["width"][i]))
            cat.height.append(int(data["height"][i]))
            cat.size.append(entry.size)
            cat.mtime_ns.append(entry.mtime_ns)
    n = len(cat)
    uf_near, uf_similar = UnionFind(n), UnionFind(n)
    by_sha: dict[str, list[int]] = {}
    for i, sha in enumerate(cat.sha256):
        by_sha.setdefault(sha, []).append(i)
    exact = sorted((g for g in by_sha.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
    for group in exact:
        for other in group[1:]:
            uf_near.union(group[0], other)
            uf_similar.union(group[0], other)
    edges = {"near": 0, "similar": 0}
    advance = progress_for(n) if progress_for is not None else None
    for path, take, first in plan:
        vectors = np.ascontiguousarray(cache.read(path)["embeddings"][take], dtype=np.float32)
        for start in range(0, len(vectors), block):
            queries = vectors[start : start + block]
            # Inner-product range search returns scores strictly above the radius: nudge it to mean ">=".
            lims, scores, ids = index.range_search(queries, float(np.nextafter(np.float32(similar), -np.inf)))
            counts = np.diff(lims).astype(np.int64)
            src = np.repeat(np.arange(first + start, first + start + len(queries), dtype=np.int64), counts)
            keep = (ids > src) & (scores >= similar)
            src, dst, sim = src[keep], ids[keep], scores[keep]
            for a, b, s in zip(src.tolist(), dst.tolist(), sim.tolist(), strict=True):
                uf_similar.union(a, b)
                edges["similar"] += 1
                if s >= near:
                    uf_near.union(a, b)
                    edges["near"] += 1
            if advance is not None:
                advance(len(queries))
    return Graph(cat, uf_near, uf_similar, exact, edges, index), failed


@dataclass
class Member:
    path: str
    keeper: bool
    similarity_to_keeper: float
    width: int
    height: int
    bytes: int
    mtime: str
    sha256: str


@dataclass
class Cluster:
    id: str
    level: Level
    keeper: str
    size: int
    min_similarity: float
    members: list[Member]


def _member(cat: Catalogue, i: int, keeper: int, sim: float) -> Member:
    mtime = datetime.fromtimestamp(cat.mtime_ns[i] / 1e9, tz=UTC).isoformat(timespec="seconds")
    return Member(
        cat.rels[i], i == keeper, round(sim, 4), cat.width[i], cat.height[i], cat.size[i], mtime, cat.sha256[i]
    )


def make_clusters(graph: Graph) -> list[Cluster]:
    """The three levels as lists of clusters; ``similar`` only where it joins what ``near`` keeps apart."""
    cat = graph.catalogue
    near_root = [graph.near.find(i) for i in range(len(cat))]
    levels: list[tuple[Level, list[list[int]]]] = [
        ("exact", graph.exact),
        ("near", graph.near.groups()),
        ("similar", [g for g in graph.similar.groups() if len({near_root[i] for i in g}) > 1]),
    ]
    out: list[Cluster] = []
    for level, groups in levels:
        for number, ids in enumerate(groups, start=1):
            keeper = choose_keeper(ids, cat)
            anchor = graph.index.reconstruct(keeper)
            sims = {i: float(graph.index.reconstruct(i) @ anchor) for i in ids}
            members = [_member(cat, i, keeper, sims[i]) for i in sorted(ids, key=lambda i: (i != keeper, -sims[i]))]
            out.append(
                Cluster(
                    f"{level}-{number:05d}", level, cat.rels[keeper], len(ids), round(min(sims.values()), 4), members
                )
            )
    return out


# ------------------------------------------------------------------------------------------------ link view


def build_link_view(
    root: Path, view: Path, keeper_of: dict[str, str], sha_of: dict[str, str], mode: LinkMode
) -> dict[str, Any]:
    """Store each kept image once (``store/``), point every original path at it (``tree/``), count references.

    ``keeper_of`` maps every image's path to its keeper's path (itself for a singleton). Hard links share the
    keeper's inode (same filesystem only); symlinks point at the keeper's absolute path. A previous view is
    rebuilt only when it carries our ``refcounts.json``, so an unrelated folder is never emptied.
    """
    marker = view / "refcounts.json"
    if view.exists() and any(view.iterdir()):
        if not marker.exists():
            raise ValueError(f"{view} is not empty and is not a sieve link view (no refcounts.json); pick another")
        for sub in ("store", "tree"):
            if (view / sub).exists():
                shutil.rmtree(view / sub)
    store, tree = view / "store", view / "tree"
    objects: dict[str, dict[str, Any]] = {}
    for rel in sorted(keeper_of):
        keeper = keeper_of[rel]
        sha = sha_of[keeper]
        obj = store / sha[:2] / f"{sha}{Path(keeper).suffix.lower()}"
        if sha not in objects:
            obj.parent.mkdir(parents=True, exist_ok=True)
            _link(root / keeper, obj, mode, absolute=True)
            objects[sha] = {"keeper": keeper, "object": obj.relative_to(view).as_posix(), "refcount": 0, "paths": []}
        target = tree / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _link(obj, target, mode, absolute=False)
        objects[sha]["refcount"] += 1
        objects[sha]["paths"].append(rel)
    stored = sum((root / o["keeper"]).stat().st_size for o in objects.values())
    total = sum((root / rel).stat().st_size for rel in keeper_of)
    body = {
        "mode": mode,
        "root": str(root.resolve()),
        "images": len(keeper_of),
        "objects": len(objects),
        "bytes_referenced": total,
        "bytes_stored": stored,
        "refcounts": dict(sorted(objects.items(), key=lambda kv: (-kv[1]["refcount"], kv[1]["keeper"]))),
    }
    marker.write_text(json.dumps(body, indent=1) + "\n")
    return {k: v for k, v in body.items() if k != "refcounts"}


def _link(source: Path, target: Path, mode: LinkMode, absolute: bool) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
    if mode == "hard":
        try:
            os.link(source, target)
        except OSError as exc:
            raise OSError(
                f"cannot hard-link {source} -> {target} ({exc}); use --link-mode sym across filesystems"
            ) from exc
    else:
        dest = source.resolve() if absolute else Path(os.path.relpath(source, target.parent))
        target.symlink_to(dest)


# --------------------------------------------------------------------------------------------------- report


def thumbnail(source: Path, dest: Path, px: int) -> bool:
    """A small JPEG per clustered image, so the report loads fast and stays a few KB per image."""
    if dest.exists():
        return True
    try:
        with Image.open(source) as img:
            img.draft("RGB", (px, px))
            pic = ImageOps.exif_transpose(img) or img
            pic = pic.convert("RGB")
            pic.thumbnail((px, px), Image.Resampling.BILINEAR)
            dest.parent.mkdir(parents=True, exist_ok=True)
            pic.save(dest, format="JPEG", quality=70)
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _thumb_name(rel: str) -> str:
    return hashlib.sha1(rel.encode(), usedforsecurity=False).hexdigest()[:20] + ".jpg"


def write_report(
    root: Path, out: Path, clusters: Sequence[Cluster], summary: dict[str, Any], max_per_level: int, thumb_px: int
) -> Path:
    """report.html: one block per cluster with thumbnails (files under thumbs/), the keeper outlined in green."""
    thumbs = out / "thumbs"
    parts: list[str] = []
    titles = {
        "exact": "Exact duplicates (same sha256)",
        "near": f"Near duplicates (cosine ≥ {summary['thresholds']['near']:.2f}, exact included)",
        "similar": f"Similar (cosine ≥ {summary['thresholds']['similar']:.2f}; only groups that join near clusters)",
    }
    for level in ("exact", "near", "similar"):
        chosen = [c for c in clusters if c.level == level]
        parts.append(f"<h2>{html.escape(titles[level])}: {len(chosen)} clusters</h2>")
        if len(chosen) > max_per_level:
            parts.append(f"<p class=note>showing the {max_per_level} largest; all are in clusters.json</p>")
        for cluster in chosen[:max_per_level]:
            figures = []
            for m in cluster.members:
                name = _thumb_name(m.path)
                ok = thumbnail(root / m.path, thumbs / name, thumb_px)
                img = f"<img loading=lazy src='thumbs/{name}' alt=''>" if ok else "<div class=missing>no preview</div>"
                figures.append(
                    f"<figure class='{'keep' if m.keeper else ''}'>{img}<figcaption>"
                    f"{'<b>keep</b> ' if m.keeper else ''}{html.escape(m.path)}<br>{m.width}x{m.height} · "
                    f"{m.bytes // 1024} KB · cos {m.similarity_to_keeper:.3f}</figcaption></figure>"
                )
            parts.append(
                f"<section><h3>{cluster.id} · {cluster.size} images · min cos to keeper {cluster.min_similarity:.3f}"
                f"</h3><div class=row>{''.join(figures)}</div></section>"
            )
    failed: dict[str, str] = summary["failed"]
    if failed:
        items = "".join(
            f"<li><code>{html.escape(rel)}</code>: {html.escape(why)}</li>" for rel, why in list(failed.items())[:500]
        )
        parts.append(f"<h2>Could not decode: {len(failed)} files</h2><ul>{items}</ul>")
    counts = summary["counts"]
    head = (
        f"<p>{summary['images']} images under <code>{html.escape(str(root))}</code> · model "
        f"<code>{html.escape(summary['model_version'])}</code> ({html.escape(summary['backend'])}) · "
        f"{counts['exact']} exact, {counts['near']} near, {counts['similar']} similar clusters · "
        f"{summary['removable']} images ({summary['bytes_removable'] // 1024} KB) removable by keeping one per near "
        f"cluster · {len(summary['failed'])} files could not be decoded</p>"
    )
    style = (
        "body{font:13px sans-serif;margin:16px}section{border-top:1px solid #ddd;padding:6px 0}"
        "h3{font-size:13px;margin:4px 0}.row{display:flex;flex-wrap:wrap;gap:8px}"
        f"figure{{margin:0;width:{thumb_px + 16}px;padding:3px;border:3px solid transparent}}"
        "figure.keep{border-color:#2a9d4b}figcaption{font-size:11px;word-break:break-all;color:#444}"
        ".note{color:#777}.missing{height:80px;background:#eee}"
    )
    page = (
        f"<!doctype html><meta charset='utf-8'><title>sieve dedup report</title><style>{style}</style>"
        f"<h1>sieve dedup</h1>{head}{''.join(parts)}"
    )
    path = out / "report.html"
    path.write_text(page)
    return path


def write_tables(out: Path, clusters: Sequence[Cluster], summary: dict[str, Any]) -> tuple[Path, Path]:
    """clusters.json (summary + nested clusters) and clusters.csv (one row per member, keeper flagged)."""
    json_path = out / "clusters.json"
    json_path.write_text(json.dumps({**summary, "clusters": [asdict(c) for c in clusters]}, indent=1) + "\n")
    csv_path = out / "clusters.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "level",
                "cluster",
                "path",
                "keeper",
                "similarity_to_keeper",
                "width",
                "height",
                "bytes",
                "mtime",
                "sha256",
            ]
        )
        for c in clusters:
            for m in c.members:
                writer.writerow(
                    [
                        c.level,
                        c.id,
                        m.path,
                        int(m.keeper),
                        m.similarity_to_keeper,
                        m.width,
                        m.height,
                        m.bytes,
                        m.mtime,
                        m.sha256,
                    ]
                )
    return json_path, csv_path


# ---------------------------------------------------------------------------------------------------- driver


def model_card_threshold(model_version: str, repo: Path | None = None) -> float | None:
    """The threshold calibrated when the version shipped (``model_card.json``), if the version has a card."""
    from services.common.config import REPO_ROOT
    from services.common.thresholds import card_threshold

    return card_threshold(repo or REPO_ROOT / "model_repo" / "sieve_embedder", model_version)


def moderator_threshold(model_version: str, cfg: DecisionSettings | None = None) -> tuple[float, str]:
    """The duplicate threshold the moderator applies to this version, minus what only Redis holds (admin
    overrides and thresholds recorded at promotions, which these offline tools do not see)."""
    from services.common.config import BankSettings
    from services.common.thresholds import ThresholdResolver

    resolved = ThresholdResolver(cfg or DecisionSettings(), BankSettings()).duplicate(model_version)
    return resolved.value, resolved.source


def default_near(model_version: str, repo: Path | None = None) -> tuple[float, str]:
    """The near threshold when ``--near`` is not given, and where it came from: the moderator's for this version
    when the configuration lists it, else the version's model card (thresholds do not carry over between
    embedding spaces), else the global duplicate threshold (services.common.thresholds resolves it)."""
    from services.common.config import REPO_ROOT, BankSettings
    from services.common.thresholds import ThresholdResolver

    cards = repo or REPO_ROOT / "model_repo" / "sieve_embedder"
    resolved = ThresholdResolver(DecisionSettings(), BankSettings(), cards=cards).duplicate(model_version)
    return resolved.value, resolved.source


@dataclass
class DedupOptions:
    near: float
    similar: float
    batch: int = 32
    shard_size: int = 1024
    resume: bool = False
    link_view: Path | None = None
    link_mode: LinkMode = "hard"
    progress: bool = True
    html_clusters: int = 300
    thumb_px: int = 128


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


class _Bar:
    """A rich progress bar on stderr, or nothing (tests, --quiet)."""

    def __init__(self, enabled: bool) -> None:
        self.progress: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def task(self, description: str, total: int) -> ProgressFn:
        if self.progress is None:
            return lambda _n: None
        progress = self.progress
        task_id = progress.add_task(description, total=total, rate="")
        began = time.perf_counter()
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            rate = done[0] / max(time.perf_counter() - began, 1e-9)
            progress.update(task_id, advance=n, rate=f"{rate:7.1f}/s")

        return advance


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_dedup(root: Path, out: Path, options: DedupOptions, embedder: Embedder | None = None) -> dict[str, Any]:
    """Scan, embed what is missing, cluster, and write clusters.json/.csv, report.html and the link view."""
    if not 0.0 < options.similar <= options.near <= 1.0:
        raise ValueError(f"need 0 < similar ({options.similar}) <= near ({options.near}) <= 1")
    root = root.resolve()
    out = out.resolve()
    timings: dict[str, float] = {}
    began = time.perf_counter()
    entries = scan(root, exclude=[out, *([options.link_view] if options.link_view else [])])
    timings["scan_s"] = time.perf_counter() - began
    if embedder is None:
        from services.evaluation.embed import ServedEmbedder

        embedder = ServedEmbedder.connect()
    backend = str(getattr(embedder, "backend", "custom"))
    cache = ShardCache(out / "embeddings")
    if not options.resume:
        dropped = cache.clear()
        if dropped:
            _say(f"[dedup] removed {dropped} checkpoint shards of an earlier run (pass --resume to reuse them)")
    done = cache.known_keys(embedder.model_version)
    todo = [e for e in entries if e.key not in done]
    if options.resume:
        _say(f"[dedup] resume: {len(entries) - len(todo)} of {len(entries)} files already checkpointed")
    t0 = time.perf_counter()
    with _Bar(options.progress) as bar:
        try:
            counts = embed_missing(
                root, todo, cache, embedder, options.batch, options.shard_size, bar.task("embed", len(todo))
            )
        except KeyboardInterrupt:
            _say(f"[dedup] interrupted: progress is checkpointed in {cache.folder}; rerun with --resume")
            raise
        timings["embed_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        graph, failed = build_graph(
            entries,
            cache,
            embedder.model_version,
            options.near,
            options.similar,
            progress_for=lambda n: bar.task("neighbours", n),
        )
        timings["graph_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    clusters = make_clusters(graph)
    cat = graph.catalogue
    near_clusters = [c for c in clusters if c.level == "near"]
    removable = sum(c.size - 1 for c in near_clusters)
    bytes_removable = sum(m.bytes for c in near_clusters for m in c.members if not m.keeper)
    summary: dict[str, Any] = {
        "root": str(root),
        "model_version": embedder.model_version,
        "backend": backend,
        "thresholds": {"near": options.near, "similar": options.similar},
        "images": len(entries),
        "embedded": len(cat),
        "embedded_this_run": counts["embedded"],
        "from_checkpoint": len(entries) - len(todo),
        "failed": failed,
        "counts": {level: sum(1 for c in clusters if c.level == level) for level in ("exact", "near", "similar")},
        "edges": graph.edges,
        "removable": removable,
        "bytes_removable": bytes_removable,
    }
    write_tables(out, clusters, summary)
    write_report(root, out, clusters, summary, options.html_clusters, options.thumb_px)
    if options.link_view is not None:
        keeper_of = {rel: rel for rel in cat.rels}
        for c in near_clusters:
            for m in c.members:
                keeper_of[m.path] = c.keeper
        sha_of = dict(zip(cat.rels, cat.sha256, strict=True))
        summary["link_view"] = build_link_view(root, options.link_view, keeper_of, sha_of, options.link_mode)
    timings["report_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - began
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
    summary["embed_images_per_s"] = round(counts["embedded"] / timings["embed_s"], 2) if counts["embedded"] else None
    summary["peak_rss_mb"] = peak_rss_mb()
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
