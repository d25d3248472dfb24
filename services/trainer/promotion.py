"""Ships a model version safely: backfill its index, then let Triton load it; roll back with one command.

Order matters. The new version's recent-images index is built first (every image in the retention window is
re-embedded with the candidate and written as that version's snapshot in Redis), banked images are re-embedded
with it too, and only then is the version folder renamed into model_repo/ and loaded by Triton. So the first
verdict from the new version already sees the whole window and every bank, and no index ever holds embeddings of
two versions. A version Triton fails to load is moved back
out of sight and the previous version reloaded, so a bad folder never stays where the next reload would pick it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from services.common.banks import HashBankStore
from services.common.banks.embeddings import EmbeddingBanks
from services.common.config import Settings
from services.common.errors import BadInput, TransientError
from services.common.fetch import FetcherRegistry
from services.common.imaging import decode_image
from services.common.index import IndexEntry, open_recent_index
from services.common.thresholds import forget_threshold, record_threshold
from services.common.upload_keys import upload_uri_key

log = logging.getLogger(__name__)
EmbedFn = Callable[[NDArray[np.uint8]], NDArray[np.float32]]


class PromotionFailed(RuntimeError):
    """The version was refused or did not load; the previous version still serves."""


@dataclass(frozen=True)
class BackfillReport:
    model_version: str
    entries: int
    skipped: int
    seconds: float


class ModelRepository:
    """The numbered version folders Triton serves ("latest 1": the highest number wins)."""

    def __init__(self, root: Path, model: str = "sieve_embedder") -> None:
        self.model = model
        self.dir = root / model

    def versions(self) -> list[int]:
        return sorted(int(p.name) for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit())

    def serving(self) -> int:
        return max(self.versions())

    def install(self, staged: Path, version: int) -> Path:
        """Atomic from Triton's point of view: the folder appears complete, by rename."""
        target = self.dir / str(version)
        if target.exists():
            raise FileExistsError(target)
        staged.rename(target)
        return target

    def retire(self, version: int, tag: str = "retired") -> Path:
        """Moves a version out of Triton's sight (a non-numeric name), keeping it for the record."""
        source = self.dir / str(version)
        target = self.dir / f".{tag}-{version}-{int(time.time())}"
        source.rename(target)
        return target


def window_entries(settings: Settings, client: redis.Redis, from_version: str, dim: int) -> list[IndexEntry]:
    """Every entry of the serving version's shared index within the retention window."""
    return open_recent_index(settings, client, from_version, dim).entries()


def backfill(
    settings: Settings,
    client: redis.Redis,
    entries: list[IndexEntry],
    to_version: str,
    embed: EmbedFn,
    batch: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> BackfillReport:
    """Re-embeds the window's images with the candidate and writes its snapshot (never touching other versions)."""
    began = time.monotonic()
    fetcher = FetcherRegistry(settings.fetch)
    prefix = settings.redis.key_prefix
    uris = cast(list[bytes | None], client.mget([upload_uri_key(prefix, e.upload_id) for e in entries]))
    fresh: list[IndexEntry] = []
    skipped = 0
    pending: list[tuple[IndexEntry, NDArray[np.uint8]]] = []

    def flush() -> None:
        if not pending:
            return
        vectors = embed(np.stack([p for _, p in pending]))
        fresh.extend(IndexEntry(e.upload_id, vectors[i], e.added_at) for i, (e, _) in enumerate(pending))
        pending.clear()

    for n, (entry, uri) in enumerate(zip(entries, uris, strict=True)):
        if uri is None:
            skipped += 1
            continue
        try:
            data = fetcher.fetch(uri.decode())
            pixels = decode_image(data, settings.decode, settings.triton.input_size).pixels
        except (BadInput, TransientError) as exc:
            log.warning("backfill: %s skipped: %s", entry.upload_id, exc)
            skipped += 1
            continue
        pending.append((entry, pixels))
        if len(pending) >= batch:
            flush()
        if progress:
            progress(n + 1, len(entries))
    flush()
    dim = int(fresh[0].vector.shape[0]) if fresh else 0
    open_recent_index(settings, client, to_version, dim).replace(fresh)  # complete before the caller switches
    return BackfillReport(to_version, len(fresh), skipped, round(time.monotonic() - began, 2))


def triton_serving(url: str, model: str) -> int | None:
    """The version Triton serves now, which can lag the folders on disk (None: the model is not loaded)."""
    client = grpcclient.InferenceServerClient(url)
    try:
        if not client.is_model_ready(model):
            return None
        versions = client.get_model_metadata(model).versions
        return max(int(v) for v in versions) if versions else None
    except InferenceServerException as exc:
        raise TransientError("triton", f"cannot ask Triton which {model} version serves: {exc}") from exc
    finally:
        client.close()


def triton_load(url: str, model: str, expect_version: int, timeout_s: float = 180.0) -> None:
    """Explicit model control: (re)load the model; Triton then serves the highest version folder."""
    client = grpcclient.InferenceServerClient(url)
    try:
        client.load_model(model)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if client.is_model_ready(model, str(expect_version)):
                return
            time.sleep(0.5)
        raise TransientError("triton", f"{model} version {expect_version} not ready after {timeout_s:.0f}s")
    finally:
        client.close()


def record(log_path: Path, event: dict[str, Any]) -> None:
    """Why each promotion or rollback happened, for operators and the model card."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as fh:
        fh.write(json.dumps({"at": round(time.time(), 3), **event}, sort_keys=True) + "\n")


PROMOTION_LOCK_S = 6 * 3600  # a backfill of a large window takes a while; a crashed holder's lock expires
PROMOTION_WAIT_S = 600


def promote(
    settings: Settings,
    client: redis.Redis,
    repo: ModelRepository,
    staged: Path | None,
    embed: EmbedFn | None,
    dim_serving: int | None,
    log_path: Path,
    reason: dict[str, Any],
    threshold: float | None = None,
    version: int | None = None,
    serving: int | None = None,
    bank_threshold: float | None = None,
) -> int:
    """Backfill, record the thresholds (duplicate and bank), install, load. Returns the new version number.

    The retraining job stages a new folder and lets the number be the next one; an admin request names the
    version, and ``staged`` is None when its folder is already installed but not loaded. The threshold is
    recorded before Triton loads the version, so the first verdict a moderator makes with it already uses it
    (moderators pick recorded thresholds up with the admin overrides). Raises PromotionFailed when the version
    cannot be backfilled or loaded; by then it is out of the repository and the previous version serves.
    """
    # The retraining job and admin requests may run at once: they take turns, and a plan made before the wait is
    # refused if another promotion changed what serves.
    with _promotion_lock(client, settings.redis.key_prefix, repo.model):
        now_serving = repo.serving()
        if serving is not None and serving != now_serving:
            raise PromotionFailed(f"version {now_serving} started serving while this promotion (from {serving}) waited")
        serving = now_serving
        if version is not None and version <= serving:
            raise PromotionFailed(f"version {version} is not newer than the serving version {serving}")
        version = version if version is not None else max(repo.versions()) + 1
        tag = f"{repo.model}:{version}"
        entries = window_entries(settings, client, f"{repo.model}:{serving}", dim_serving) if dim_serving else []
        if entries and embed is None:
            raise PromotionFailed(f"no model.pt to re-embed the {len(entries)} images of the window with")
        report = (
            backfill(settings, client, entries, tag, embed) if embed is not None else BackfillReport(tag, 0, 0, 0.0)
        )
        banked = reembed_banks(settings, client, tag, embed)
        if threshold is not None:
            record_threshold(client, settings.redis.key_prefix, tag, threshold)
        if bank_threshold is not None:
            record_threshold(client, settings.redis.key_prefix, tag, bank_threshold, kind="bank")
        if staged is not None:
            repo.install(staged, version)
        try:
            triton_load(settings.triton.url, repo.model, version)
        except (InferenceServerException, TransientError) as exc:
            undo_install(settings, client, repo, version, serving, log_path, str(exc))
            raise PromotionFailed(f"Triton did not load version {version}: {exc}") from exc
        record(
            log_path,
            {
                "event": "promoted",
                "version": version,
                "from": serving,
                "backfill": report.__dict__,
                "banked_images_reembedded": banked,
                **reason,
            },
        )
        return version


def reembed_banks(settings: Settings, client: redis.Redis, to_version: str, embed: EmbedFn | None) -> int:
    """Banked images embedded by the candidate before it serves: banks keep matching from its first verdict
    (a version's uploads are only ever compared with banked embeddings of that version). Only for a model that
    banks were embedded with (the embedder, not the classifier)."""
    prefix = settings.redis.key_prefix
    embedded = EmbeddingBanks(client, prefix)
    if to_version.rpartition(":")[0] not in embedded.models():
        return 0
    names = [bank.name for bank in HashBankStore.configured(client, prefix, settings.banks).all_banks()]
    count = embedded.banked_images(names)
    if count == 0:
        return 0
    if embed is None:
        raise PromotionFailed(f"no model.pt to re-embed the {count} banked images with")
    return embedded.reembed_as(embed, to_version, names)


@contextlib.contextmanager
def _promotion_lock(client: redis.Redis, prefix: str, model: str) -> Iterator[None]:
    """The retraining job and admin requests (``sieve trainer promotions``) may run at once: they take turns."""
    lock = client.lock(
        f"{prefix}:trainer:promotion-lock:{model}", timeout=PROMOTION_LOCK_S, blocking_timeout=PROMOTION_WAIT_S
    )
    try:
        acquired = lock.acquire()
    except redis.RedisError as exc:
        raise TransientError("redis", f"cannot take the promotion lock: {exc}") from exc
    if not acquired:
        raise PromotionFailed(f"another promotion of {model} has been running for over {PROMOTION_WAIT_S} s")
    try:
        yield
    finally:
        with contextlib.suppress(redis.RedisError):
            lock.release()


def undo_install(
    settings: Settings,
    client: redis.Redis,
    repo: ModelRepository,
    version: int,
    previous: int,
    log_path: Path,
    why: str,
) -> None:
    """Takes a version that failed to load back out (kept aside for a post-mortem) and reloads the previous one."""
    kept = repo.retire(version, tag="failed")
    forget_threshold(client, settings.redis.key_prefix, f"{repo.model}:{version}")
    event: dict[str, Any] = {"event": "load_failed", "version": version, "serving": previous, "kept_at": str(kept)}
    try:
        triton_load(settings.triton.url, repo.model, previous)
    except (InferenceServerException, TransientError) as exc:
        record(log_path, {**event, "why": why, "reload_failed": str(exc)})
        raise PromotionFailed(f"Triton did not load version {version} ({why}) nor reload {previous}: {exc}") from exc
    record(log_path, {**event, "why": why})


def rollback(settings: Settings, repo: ModelRepository, log_path: Path, reason: str = "manual") -> int:
    """Retires the serving version; Triton falls back to the previous one, whose index is still in Redis."""
    serving = repo.serving()
    if len(repo.versions()) < 2:
        raise RuntimeError("nothing to roll back to: only one version is installed")
    retired = repo.retire(serving)
    previous = repo.serving()
    triton_load(settings.triton.url, repo.model, previous)
    record(
        log_path, {"event": "rolled_back", "from": serving, "to": previous, "kept_at": str(retired), "reason": reason}
    )
    return previous


def copy_loader(source_version_dir: Path, staged: Path) -> None:
    """A new version ships with the same Triton loader (model.py) as the version it was trained from."""
    staged.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source_version_dir / "model.py", staged / "model.py")
