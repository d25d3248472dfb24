"""Every change an admin makes to banks, behind both faces: the reviewer's admin API and ``sieve banks``.

Before this module the two faces re-implemented the operations and disagreed (an image added through the API
banked no embedding or keypoints; the CLI re-judged inline, the API through requests; the CLI's audit records
never reached the audit file). Now each operation lives here once: the same effects on the bank's state, one
audit record through the one audit writer, and new signals always request re-judging of recent uploads (the
reviewer's worker steps it; ``sieve banks rejudge`` can step it by hand).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from services.common.audit import AuditLog
from services.common.banks.embeddings import EmbeddingBanks
from services.common.banks.exchange import ImportReport, ListFormat, export_list, import_list
from services.common.banks.images import BankedImage, banked_image
from services.common.banks.rejudge import RejudgeRequests
from services.common.banks.signals import Signal, SignalType
from services.common.banks.store import Bank, BankAction, HashBankStore
from services.common.config import Settings
from services.common.errors import TransientError
from services.common.inference import ImageModels


class BankOperations:
    def __init__(
        self,
        store: HashBankStore,
        audit: AuditLog,
        settings: Settings,
        models: ImageModels | None = None,
        embeddings: EmbeddingBanks | None = None,
    ) -> None:
        self.store = store
        self.audit = audit
        self.settings = settings
        self.models = models  # the served embedder: images are banked with its embedding (None: hashes only)
        self.embeddings = embeddings or EmbeddingBanks(store.client, store.prefix, settings.banks.sync_interval_s)
        self.rejudge = RejudgeRequests(store.client, store.prefix)

    # ------------------------------------------------------------------------------------------ the bank itself

    def create(self, name: str, description: str, action: BankAction, actor: str) -> Bank:
        bank = self.store.create(name, description, action)
        self.audit.record("bank_created", actor, name, {"description": description, "action": action})
        return bank

    def update(self, name: str, enabled: bool, description: str | None, action: BankAction, actor: str) -> Bank:
        """Raises KeyError for an unknown bank."""
        self.store.set_enabled(name, enabled, description)
        bank = self.store.set_action(name, action)
        detail = {"enabled": enabled, "description": description, "action": action}
        self.audit.record("bank_updated", actor, name, detail)
        return bank

    def set_enabled(self, name: str, enabled: bool, actor: str) -> Bank:
        bank = self.store.set_enabled(name, enabled)
        self.audit.record("bank_enabled" if enabled else "bank_disabled", actor, name, {})
        return bank

    def set_action(self, name: str, action: BankAction, actor: str) -> Bank:
        bank = self.store.set_action(name, action)
        self.audit.record("bank_action", actor, name, {"action": action})
        return bank

    def set_threshold(self, name: str, threshold: float | None, actor: str) -> Bank:
        """The bank's own embedding threshold (None: the version's, services.common.thresholds)."""
        bank = self.store.set_embedding_threshold(name, threshold)
        self.audit.record("bank_threshold", actor, name, {"embedding_threshold": threshold})
        return bank

    def delete(self, name: str, actor: str) -> bool:
        try:
            self.store.get(name)
        except KeyError:
            return False
        self.store.remove(name)
        self.audit.record("bank_deleted", actor, name, {})
        return True

    # ------------------------------------------------------------------------------------------------ contents

    def add_images(self, name: str, images: Sequence[bytes], actor: str, embed: bool = True) -> dict[str, Any]:
        """Hashes each image as the moderator hashes uploads and, with the embedder at hand, banks its embedding
        and keypoints so edited copies match too. Raises KeyError for an unknown bank, BadInput for something
        that is not an allowed image (nothing is added then)."""
        self.store.get(name)
        banked = [banked_image(data, self.settings) for data in images]
        result = self.store.add_signals(name, [s for image in banked for s in image.signals])
        embedded = self._embed(name, banked) if banked and embed else ""
        report: dict[str, Any] = {"added": result.added, "duplicate": result.duplicate, "images": len(banked)}
        report["embedded_with"] = embedded
        self.audit.record("bank_images_added", actor, name, report)
        new = result.added + (len(banked) if embedded else 0)  # new embeddings catch edited copies hashes miss
        return {**report, "rejudge_requested": self._request_rejudge(name, new, actor)}

    def _embed(self, name: str, images: list[BankedImage]) -> str:
        """The served version that embedded the images; "" when there is no embedder or it cannot be reached
        (the hashes are banked either way, and ``reembed`` can add the embeddings later)."""
        if self.models is None:
            return ""
        pixels = np.stack([image.pixels for image in images])
        ids = [image.item_id for image in images]
        try:
            return self.embeddings.embed_and_add(name, self.models, ids, pixels, [image.features for image in images])
        except TransientError:
            return ""

    def add_signals(self, name: str, signals: Sequence[Signal], actor: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank."""
        result = self.store.add_signals(name, list(signals))
        detail = {"added": result.added, "duplicate": result.duplicate}
        self.audit.record("bank_signals_added", actor, name, detail)
        return {**detail, "rejudge_requested": self._request_rejudge(name, result.added, actor)}

    def remove_signals(self, name: str, signals: Sequence[Signal], actor: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank."""
        self.store.get(name)
        removed = self.store.remove_signals(name, list(signals))
        self.audit.record("bank_signals_removed", actor, name, {"removed": removed})
        return {"removed": removed}

    def import_list(self, name: str, text: str, fmt: ListFormat, source: str, actor: str) -> ImportReport:
        """Raises KeyError for an unknown bank."""
        self.store.get(name)
        report = import_list(self.store, name, text, fmt, source)
        self.audit.record("bank_imported", actor, name, report.summary())
        self._request_rejudge(name, report.added, actor)
        return report

    def export(self, name: str, fmt: ListFormat, kind: SignalType | None, actor: str) -> str:
        """Raises KeyError for an unknown bank."""
        self.store.get(name)
        text = export_list(self.store, name, fmt, kind)
        self.audit.record("bank_exported", actor, name, {"format": fmt, "rows": text.count("\n")})
        return text

    def banked_image_png(self, name: str, item_id: str) -> bytes | None:
        """What reviewers see of a banked item: the image as it was banked (the model's input), as PNG."""
        pixels = self.embeddings.pixels(name, item_id)
        if pixels is None:
            return None
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG")
        return out.getvalue()

    def reembed(self, names: Sequence[str], actor: str) -> dict[str, Any]:
        """Every banked image of these banks embedded again by the served version (after a model change made
        by hand; promotions do it themselves). Raises TransientError when the embedder cannot be reached."""
        if self.models is None:
            raise TransientError("triton", "no embedder to re-embed banked images with")
        for name in names:
            self.store.get(name)
        version, count = self.embeddings.reembed(self.models, list(names))
        detail = {"model_version": version, "images": count, "banks": list(names)}
        self.audit.record("bank_reembedded", actor, ",".join(names), detail)
        return detail

    # ------------------------------------------------------------------------------------------- re-judging

    def _request_rejudge(self, name: str, added: int, actor: str) -> bool:
        """New signals re-judge recent uploads in the background (``banks.rejudge``); the request returns now."""
        if added:
            self.rejudge.request(name, actor)
        return added > 0

    def request_rejudge(self, name: str, actor: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank."""
        self.store.get(name)
        self.rejudge.request(name, actor)
        self.audit.record("bank_rejudge_requested", actor, name, {})
        return self.rejudge_progress(name)

    def rejudge_progress(self, name: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank."""
        self.store.get(name)
        return {"name": name, "pending": name in self.rejudge.pending(), "progress": self.rejudge.progress(name)}
