"""Runs an admin's promotion request through the same promotion as a retrain: backfill, install, load, switch.

An admin promotes a version that is either already installed in the model repository but not loaded (shipped by
``sieve train --ship``) or staged as a candidate under ``<trainer workdir>/candidates/<model>/<version>/`` (a
complete version folder: model.py, and model.pt to re-embed the retention window with). The candidate is copied
next to the model's versions first, so the install is a rename on one filesystem, and it stays where it was.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import redis

from services.common.config import Settings
from services.common.index import recent_index_dim
from services.common.promotions import PromotionRecord, PromotionState
from services.trainer.promotion import (
    EmbedFn,
    ModelRepository,
    PromotionFailed,
    promote,
    triton_serving,
)
from services.trainer.promotion_consumer import Outcome
from services.trainer.promotion_plan import Plan, RepositoryView, plan


def candidates_dir(settings: Settings) -> Path:
    return settings.trainer.workdir / "candidates"


def _numbered(folder: Path) -> tuple[int, ...]:
    if not folder.is_dir():
        return ()
    return tuple(sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()))


class AdminPromotion:
    """The consumer's handler: validates a request against the repository and Triton, then promotes."""

    def __init__(self, settings: Settings, client: redis.Redis, log_path: Path) -> None:
        self.settings = settings
        self.client = client
        self.log_path = log_path

    def view(self, model: str) -> RepositoryView:
        root = self.settings.stack.model_repo
        known = "/" not in model and not model.startswith(".") and (root / model / "config.pbtxt").is_file()
        if not known:
            return RepositoryView(model, False, (), (), None)
        return RepositoryView(
            model,
            True,
            _numbered(root / model),
            _numbered(candidates_dir(self.settings) / model),
            triton_serving(self.settings.triton.url, model),
        )

    def __call__(self, request: PromotionRecord) -> Outcome:
        view = self.view(request.model)
        if request.attempts > 1 and view.serving is not None and str(view.serving) == request.version:
            # An earlier attempt got as far as the switch and died before recording it.
            return Outcome(PromotionState.PROMOTED, f"version {request.version} serves (found after a restart)")
        decided = plan(request.version, view)
        if not isinstance(decided, Plan):
            return Outcome(PromotionState.REFUSED, decided.reason, view.serving)
        try:
            self.run(request, decided)
        except PromotionFailed as exc:
            return Outcome(PromotionState.REFUSED, str(exc), decided.serving)
        return Outcome(
            PromotionState.PROMOTED,
            f"version {decided.version} of {request.model} serves (was {decided.serving})",
            decided.serving,
        )

    def run(self, request: PromotionRecord, decided: Plan) -> None:
        repo = ModelRepository(self.settings.stack.model_repo, request.model)
        source = (
            candidates_dir(self.settings) / request.model / str(decided.version)
            if decided.source == "staged"
            else repo.dir / str(decided.version)
        )
        staged: Path | None = None
        if decided.source == "staged":
            staged = repo.dir / f".incoming-{decided.version}-{int(time.time())}"
            shutil.copytree(source, staged)
        try:
            promote(
                self.settings,
                self.client,
                repo,
                staged,
                _embedder(source),
                recent_index_dim(self.settings, self.client, f"{request.model}:{decided.serving}"),
                self.log_path,
                {"request_id": request.request_id, "requested_by": request.requested_by, "reason": request.reason},
                threshold=_card_threshold(source),
                bank_threshold=_card_threshold(source, "bank_embedding_threshold"),
                version=decided.version,
                serving=decided.serving,
            )
        finally:
            if staged is not None and staged.exists():  # refused before the install: leave no copy behind
                shutil.rmtree(staged, ignore_errors=True)


def _embedder(version_dir: Path) -> EmbedFn | None:
    """The candidate itself, in-process, when it ships a TorchScript model (Triton has not loaded it yet)."""
    artifact = version_dir / "model.pt"
    if not artifact.is_file():
        return None
    from services.trainer.export import embed_fn, load_torchscript

    try:
        module, _ = load_torchscript(artifact)
    except (RuntimeError, ValueError, OSError) as exc:
        raise PromotionFailed(f"cannot load {artifact.name} to backfill the index with: {exc}") from exc
    return embed_fn(module)


def _card_threshold(version_dir: Path, field: str = "duplicate_threshold") -> float | None:
    """A threshold the version was calibrated or fine-tuned at, as its model card records it (the duplicate
    threshold, or ``bank_embedding_threshold`` for banked images)."""
    card = version_dir / "model_card.json"
    if not card.is_file():
        return None
    value: Any = json.loads(card.read_text()).get(field)
    return float(value) if isinstance(value, int | float) else None
