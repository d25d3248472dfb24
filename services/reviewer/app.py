"""The reviewer HTTP API and labelling page (FastAPI).

Only /healthz, /readyz and the static page shell (which holds no data and asks for a token) answer without a
bearer token; every /api route needs one, and /api/admin routes need the admin role. The app talks to the queue,
labeller, admin store and image source through the Protocols below, so unit tests can swap in fakes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from services.common.banks import MalformedSignal
from services.common.banks.exchange import ListFormat
from services.common.banks.rejudge import RejudgeWorker
from services.common.banks.rejudging import Rejudger, kafka_publisher
from services.common.banks.signals import SignalType
from services.common.config import Settings
from services.common.errors import BadInput, TransientError
from services.common.redis_client import connect
from services.common.schemas import FeedbackLabel, ReviewRequest
from services.reviewer.admin import (
    BANK_NAME_PATTERN,
    BankHashes,
    BankImport,
    BankSignals,
    BankSpec,
    BankThreshold,
    PromotionRequest,
    ThresholdOverrides,
)
from services.reviewer.auth import Admin, Reviewer, TokenAuthenticator
from services.reviewer.images import ImageRefused
from services.reviewer.labels import InvalidLabel, LabelBody, LabelOutcome, NotClaimed, label_kind
from services.reviewer.queue import Claim, QueueItem, QueueStats
from services.reviewer.settings import ReviewerSettings

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
UploadId = Annotated[str, PathParam(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@/-]+$")]
MATCH_IMAGE_MAX_BYTES = 20 * 1024 * 1024
BankName = Annotated[str, PathParam(pattern=BANK_NAME_PATTERN)]
PromotionId = Annotated[str, PathParam(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$")]  # a stream entry id

# The page is served from this origin only: no inline script, images only from here or blob: URLs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class QueueAPI(Protocol):
    def claim(self, reviewer_id: str, scan: int = ...) -> Claim | None: ...
    def release(self, upload_id: str, reviewer_id: str) -> bool: ...
    def item(self, upload_id: str) -> QueueItem | None: ...
    def upload_uris(self, upload_ids: Sequence[str]) -> dict[str, str]: ...
    def stats(self) -> QueueStats: ...
    def ping(self) -> bool: ...


class LabelAPI(Protocol):
    def label(self, reviewer_id: str, request: ReviewRequest, body: LabelBody) -> LabelOutcome: ...


class AdminAPI(Protocol):
    def thresholds(self) -> dict[str, Any]: ...
    def set_thresholds(self, overrides: ThresholdOverrides, actor: str) -> dict[str, Any]: ...
    def banks(self) -> dict[str, dict[str, Any]]: ...
    def bank(self, name: str) -> dict[str, Any] | None: ...
    def put_bank(self, name: str, spec: BankSpec, actor: str) -> bool: ...
    def add_bank_hashes(self, name: str, body: BankHashes, actor: str) -> int: ...
    def add_bank_images(self, name: str, images: list[bytes], actor: str) -> dict[str, Any]: ...
    def banked_image(self, bank: str, item_id: str) -> bytes | None: ...
    def has_banked_image(self, bank: str, item_id: str) -> bool: ...
    def set_bank_threshold(self, name: str, threshold: float | None, actor: str) -> dict[str, Any]: ...
    def reembed_banks(self, names: list[str], actor: str) -> dict[str, Any]: ...
    def add_bank_signals(self, name: str, body: BankSignals, actor: str) -> dict[str, Any]: ...
    def remove_bank_signals(self, name: str, body: BankSignals, actor: str) -> dict[str, Any]: ...
    def import_bank(self, name: str, body: BankImport, actor: str) -> dict[str, Any]: ...
    def export_bank(self, name: str, fmt: ListFormat, kind: SignalType | None, actor: str) -> str: ...
    def delete_bank(self, name: str, actor: str) -> bool: ...
    def request_rejudge(self, name: str, actor: str) -> dict[str, Any]: ...
    def rejudge_progress(self, name: str) -> dict[str, Any]: ...
    def lookup_signal(self, signal_type: str, value: str) -> list[dict[str, Any]]: ...
    def lookup_image(self, data: bytes) -> dict[str, Any]: ...
    def request_promotion(self, request: PromotionRequest, actor: str) -> str: ...
    def promotions(self, count: int) -> list[dict[str, Any]]: ...
    def promotion(self, request_id: str) -> dict[str, Any] | None: ...
    def audit_log(self, count: int) -> list[dict[str, Any]]: ...


class ImageAPI(Protocol):
    @property
    def has_aligned_view(self) -> bool: ...
    @property
    def has_explain_view(self) -> bool: ...
    def load(self, uri: str) -> tuple[bytes, str]: ...
    def aligned(self, uri: str) -> bytes | None: ...
    def explain(self, upload_uri: str, neighbour_uri: str) -> bytes | None: ...


class Background(Protocol):
    def start(self) -> None: ...
    def stop(self, timeout_s: float = ...) -> None: ...
    def alive(self) -> bool: ...


@dataclass
class ReviewerServices:
    queue: QueueAPI
    labeller: LabelAPI
    admin: AdminAPI
    images: ImageAPI
    ingestor: Background | None = None
    rejudger: Background | None = None  # works re-judging requested through the admin API (banks.rejudge)
    on_label: Callable[[FeedbackLabel, str], None] | None = None
    on_claim: Callable[[], None] | None = None


def _item_view(item: QueueItem, neighbour_uris: dict[str, str], services: ReviewerServices) -> dict[str, Any]:
    """Everything the page shows for one item; image URLs point at the authenticated image route."""
    r = item.request

    def image_url(uri: str | None) -> str | None:
        return f"/api/image?uri={quote(uri, safe='')}" if uri else None

    def explain_url(neighbour: str) -> str | None:
        if not services.images.has_explain_view or neighbour not in neighbour_uris:
            return None
        return f"/api/items/{quote(r.upload_id, safe='')}/explain?neighbour={quote(neighbour, safe='')}"

    def banked_url(bank: str, item_id: str) -> str:
        return f"/api/banks/{quote(bank, safe='')}/items/{quote(item_id, safe='')}/image"

    verified = {e.upload_id: e for e in r.evidence}
    remaining = None
    if item.claim_expires_at_ms is not None:
        remaining = max(0.0, round(item.claim_expires_at_ms / 1000.0 - time.time(), 1))
    return {
        "upload_id": r.upload_id,
        "image_uri": r.image_uri,
        "image_url": image_url(r.image_uri),
        "aligned_url": f"/api/items/{quote(r.upload_id, safe='')}/aligned"
        if services.images.has_aligned_view
        else None,
        "reason": r.reason.value,
        "priority": r.priority,
        "model_version": r.model_version,
        "scores": dict(sorted(r.scores.items(), key=lambda kv: -kv[1])),
        "neighbours": [
            {
                "upload_id": n.upload_id,
                "score": n.score,
                "image_url": image_url(neighbour_uris.get(n.upload_id)),
                "explain_url": explain_url(n.upload_id),
                "inliers": verified[n.upload_id].inliers if n.upload_id in verified else None,
                "cosine": verified[n.upload_id].cosine if n.upload_id in verified else None,
            }
            for n in sorted(r.neighbours, key=lambda n: -n.score)
        ],
        "banks": [
            {
                "bank": m.bank,
                "action": m.action,
                "signal_type": m.signal_type,
                "distance": m.distance,
                "score": m.score,
                "inliers": m.inliers,
                "item_id": m.item_id,
                # Images banked as images keep their pixels; a list of hashes has nothing to show.
                "image_url": banked_url(m.bank, m.item_id)
                if services.admin.has_banked_image(m.bank, m.item_id)
                else None,
            }
            for m in r.bank_matches
        ],
        "state": item.state,
        "claimed_by": item.claimed_by,
        "claim_expires_in_s": remaining,
        "labelled_by": item.labelled_by,
    }


@contextmanager
def _signal_errors() -> Iterator[None]:
    """A bank's signals are added and removed with the same answers: 404 for a missing bank, 422 for a bad row."""
    try:
        yield
    except KeyError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bank") from exc
    except MalformedSignal as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc


def create_app(rsettings: ReviewerSettings, services: ReviewerServices) -> FastAPI:
    authenticator = TokenAuthenticator(rsettings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        background = [b for b in (services.ingestor, services.rejudger) if b is not None]
        for task in background:
            task.start()
        try:
            yield
        finally:
            for task in background:
                task.stop()

    app = FastAPI(title="Sieve reviewer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.authenticator = authenticator

    @app.middleware("http")
    async def security_headers(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if str(request.url.path).startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"live": True}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks = {
            "redis": services.queue.ping(),
            "ingesting": services.ingestor.alive() if services.ingestor is not None else True,
            "tokens": len(authenticator) > 0,
        }
        return JSONResponse(checks, status_code=200 if all(checks.values()) else 503)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def _view(item: QueueItem) -> dict[str, Any]:
        uris = services.queue.upload_uris([n.upload_id for n in item.request.neighbours])
        return _item_view(item, uris, services)

    @app.get("/api/me")
    def me(principal: Reviewer) -> dict[str, Any]:
        return {
            "reviewer_id": principal.reviewer_id,
            "role": principal.role.value,
            "categories": rsettings.categories,
            "claim_ttl_s": rsettings.claim_ttl_s,
        }

    @app.post("/api/claim")
    def claim(principal: Reviewer) -> dict[str, Any]:
        """The caller's live claim, or the next item; ``{"item": null}`` when the queue is empty."""
        got = services.queue.claim(principal.reviewer_id)
        if got is None:
            return {"item": None}
        if got.new and services.on_claim is not None:
            services.on_claim()
        item = QueueItem(got.request, "claimed", principal.reviewer_id, got.expires_at_ms, [])
        return {"item": _view(item)}

    @app.get("/api/items/{upload_id}")
    def get_item(upload_id: UploadId, _principal: Reviewer) -> dict[str, Any]:
        item = services.queue.item(upload_id)
        if item is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such review item")
        return _view(item)

    @app.post("/api/items/{upload_id}/release")
    def release(upload_id: UploadId, principal: Reviewer) -> dict[str, bool]:
        if not services.queue.release(upload_id, principal.reviewer_id):
            raise HTTPException(status.HTTP_409_CONFLICT, "you hold no claim on this item")
        return {"released": True}

    @app.post("/api/items/{upload_id}/label")
    def label(upload_id: UploadId, body: LabelBody, principal: Reviewer, response: Response) -> dict[str, Any]:
        item = services.queue.item(upload_id)
        if item is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such review item")
        try:
            outcome = services.labeller.label(principal.reviewer_id, item.request, body)
        except InvalidLabel as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
        except NotClaimed as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, "claim this item first (or your claim expired)") from exc
        except TransientError as exc:
            log.warning("label for %s not published: %s", upload_id, exc)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "feedback topic unavailable; retry") from exc
        if not outcome.repeated and services.on_label is not None:
            services.on_label(outcome.label, principal.role.value)
        response.status_code = status.HTTP_200_OK if outcome.repeated else status.HTTP_201_CREATED
        return {
            "label": outcome.label.model_dump(mode="json"),
            "kind": label_kind(outcome.label),
            "repeated": outcome.repeated,
        }

    @app.get("/api/queue/stats")
    def stats(_principal: Reviewer) -> dict[str, int]:
        s = services.queue.stats()
        return {"pending": s.pending, "claimed": s.claimed, "labelled": s.labelled}

    @app.get("/api/image")
    def image(_principal: Reviewer, uri: Annotated[str, Query(min_length=1, max_length=4096)]) -> Response:
        try:
            data, mime = services.images.load(uri)
        except ImageRefused as exc:
            raise HTTPException(exc.status, exc.detail) from exc
        return Response(data, media_type=mime, headers={"Cache-Control": "private, max-age=300"})

    @app.get("/api/banks/{bank}/items/{item_id}/image")
    def banked_image(bank: BankName, item_id: UploadId, _principal: Reviewer) -> Response:
        """The banked image an item matched, as it was banked, for the reviewer to compare."""
        png = services.admin.banked_image(bank, item_id)
        if png is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "banked as hashes only: no image")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/api/items/{upload_id}/aligned")
    def aligned(upload_id: UploadId, _principal: Reviewer) -> Response:
        item = services.queue.item(upload_id)
        if item is None or not services.images.has_aligned_view:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no aligned view")
        try:
            png = services.images.aligned(item.request.image_uri)
        except ImageRefused as exc:
            raise HTTPException(exc.status, exc.detail) from exc
        if png is None:  # the serving version has no spatial transformer: nothing to show, and not an error
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/api/items/{upload_id}/explain")
    def explain(
        upload_id: UploadId, _principal: Reviewer, neighbour: Annotated[str, Query(min_length=1, max_length=256)]
    ) -> Response:
        """Why the upload matches one of its neighbours: only neighbours the moderator listed can be asked for."""
        item = services.queue.item(upload_id)
        if item is None or not services.images.has_explain_view:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no explanation")
        if neighbour not in {n.upload_id for n in item.request.neighbours}:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "not a neighbour of this item")
        neighbour_uri = services.queue.upload_uris([neighbour]).get(neighbour)
        if neighbour_uri is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "the neighbour's image is no longer known")
        try:
            png = services.images.explain(item.request.image_uri, neighbour_uri)
        except ImageRefused as exc:
            raise HTTPException(exc.status, exc.detail) from exc
        if png is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no explanation")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    # ---- admin ----

    @app.get("/api/admin/thresholds")
    def get_thresholds(_admin: Admin) -> dict[str, Any]:
        return services.admin.thresholds()

    @app.put("/api/admin/thresholds")
    def put_thresholds(body: ThresholdOverrides, admin: Admin) -> dict[str, Any]:
        try:
            return services.admin.set_thresholds(body, admin.reviewer_id)
        except (ValueError, ValidationError) as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc

    @app.get("/api/admin/banks")
    def list_banks(_admin: Admin) -> dict[str, Any]:
        return {"banks": services.admin.banks()}

    @app.get("/api/admin/banks/{name}")
    def get_bank(name: BankName, _admin: Admin) -> dict[str, Any]:
        found = services.admin.bank(name)
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bank")
        return {"name": name, **found}

    @app.put("/api/admin/banks/{name}")
    def put_bank(name: BankName, body: BankSpec, admin: Admin, response: Response) -> dict[str, Any]:
        created = services.admin.put_bank(name, body, admin.reviewer_id)
        response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return {"name": name, "created": created, **body.model_dump()}

    @app.post("/api/admin/banks/{name}/hashes")
    def add_bank_hashes(name: BankName, body: BankHashes, admin: Admin) -> dict[str, Any]:
        """Hash kinds only; the same operation as POST .../signals (kept for existing clients)."""
        with _signal_errors():
            return {"name": name, "added": services.admin.add_bank_hashes(name, body, admin.reviewer_id)}

    @app.post("/api/admin/banks/{name}/images")
    async def add_bank_images(name: BankName, request: Request, admin: Admin) -> dict[str, Any]:
        """Banks the image in the body (any allowed format) as ``sieve banks add`` does: its hashes, and with the
        embedder at hand its embedding and keypoints, so edited copies match too; re-judging is requested."""
        data = await request.body()
        if len(data) > MATCH_IMAGE_MAX_BYTES:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "image too large")
        try:
            added = await run_in_threadpool(services.admin.add_bank_images, name, [data], admin.reviewer_id)
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bank") from exc
        except BadInput as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
        return {"name": name, **added}

    @app.put("/api/admin/banks/{name}/threshold")
    def set_bank_threshold(name: BankName, body: BankThreshold, admin: Admin) -> dict[str, Any]:
        """The bank's own embedding threshold; null goes back to the model version's."""
        try:
            return {
                "name": name,
                **services.admin.set_bank_threshold(name, body.embedding_threshold, admin.reviewer_id),
            }
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bank") from exc

    @app.post("/api/admin/banks/{name}/reembed")
    def reembed_bank(name: BankName, admin: Admin) -> dict[str, Any]:
        """Every banked image of the bank embedded again by the served version (``all``: every bank)."""
        try:
            return services.admin.reembed_banks([] if name == "all" else [name], admin.reviewer_id)
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bank") from exc
        except TransientError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc

    @app.post("/api/admin/banks/{name}/signals")
    def add_bank_signals(name: BankName, body: BankSignals, admin: Admin) -> dict[str, Any]:
        """Adds HMA-style signals (type, value, optional content id and metadata); idempotent."""
        with _signal_errors():
            return {"name": name, **services.admin.add_bank_signals(name, body, admin.reviewer_id)}

    @app.post("/api/admin/banks/{name}/signals/remove")
    def remove_bank_signals(name: BankName, body: BankSignals, admin: Admin) -> dict[str, Any]:
        with _signal_errors():
            return {"name": name, **services.admin.remove_bank_signals(name, body, admin.reviewer_id)}

    @app.post("/api/admin/banks/{name}/import")
    def import_bank(name: BankName, body: BankImport, admin: Admin) -> dict[str, Any]:
        """Imports a ThreatExchange (te) or HMA CSV list; the report lists every malformed row."""
        try:
            return services.admin.import_bank(name, body, admin.reviewer_id)
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bank") from exc
        except BadInput as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"cannot fetch the list: {exc}") from exc
        except (TransientError, UnicodeDecodeError) as exc:
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"cannot fetch the list: {exc}") from exc

    @app.post("/api/admin/banks/{name}/rejudge", status_code=status.HTTP_202_ACCEPTED)
    def request_rejudge(name: BankName, admin: Admin) -> dict[str, Any]:
        """Re-judges recent uploads against the bank in the background; progress at GET on the same path."""
        try:
            return services.admin.request_rejudge(name, admin.reviewer_id)
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bank") from exc

    @app.get("/api/admin/banks/{name}/rejudge")
    def rejudge_progress(name: BankName, _admin: Admin) -> dict[str, Any]:
        try:
            return services.admin.rejudge_progress(name)
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bank") from exc

    @app.get("/api/admin/banks/{name}/export")
    def export_bank(
        name: BankName,
        admin: Admin,
        format: Annotated[ListFormat, Query()] = "te",
        signal_type: Annotated[SignalType | None, Query()] = None,
    ) -> Response:
        try:
            text = services.admin.export_bank(name, format, signal_type, admin.reviewer_id)
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bank") from exc
        media = "text/csv" if format == "csv" else "text/plain"
        return Response(text, media_type=f"{media}; charset=utf-8")

    @app.delete("/api/admin/banks/{name}", status_code=status.HTTP_204_NO_CONTENT)
    def delete_bank(name: BankName, admin: Admin) -> Response:
        if not services.admin.delete_bank(name, admin.reviewer_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such bank")
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @app.post("/api/admin/promote", status_code=status.HTTP_202_ACCEPTED)
    def promote(body: PromotionRequest, admin: Admin) -> dict[str, Any]:
        request_id = services.admin.request_promotion(body, admin.reviewer_id)
        return {
            "status": "recorded",
            "request_id": request_id,
            "state": f"/api/admin/promotions/{request_id}",
            "note": "recorded for the trainer, which validates it, backfills the index, installs, loads and "
            "switches the model; this service does not promote by itself",
        }

    @app.get("/api/admin/promotions")
    def promotions(_admin: Admin, count: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
        return {"requests": services.admin.promotions(count)}

    @app.get("/api/admin/promotions/{request_id}")
    def promotion(request_id: PromotionId, _admin: Admin) -> dict[str, Any]:
        found = services.admin.promotion(request_id)
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such promotion request")
        return found

    # ---- match API (HMA's lookup, for other services; admin tokens) ----

    @app.get("/api/match/lookup", tags=["match"])
    def match_lookup(
        _admin: Admin,
        signal_type: Annotated[str, Query(max_length=40, description="pdq, md5, sha256 or phash")],
        signal: Annotated[str, Query(max_length=200, description="the hash, hex")],
    ) -> dict[str, Any]:
        """Banks holding this signal, or for PDQ one within SIEVE_BANKS_PDQ_THRESHOLD bits, closest first."""
        try:
            return {"matches": services.admin.lookup_signal(signal_type, signal)}
        except MalformedSignal as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc

    @app.post("/api/match/image", tags=["match"])
    async def match_image(request: Request, _admin: Admin) -> dict[str, Any]:
        """The image in the body (any allowed format), hashed as the moderator hashes uploads, then looked up."""
        data = await request.body()
        if len(data) > MATCH_IMAGE_MAX_BYTES:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "image too large")
        try:
            return await run_in_threadpool(services.admin.lookup_image, data)
        except BadInput as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc

    @app.get("/api/match/openapi.json", tags=["match"])
    def match_openapi(_admin: Admin) -> dict[str, Any]:
        """The OpenAPI description of the match API (the page's own routes are not published)."""
        spec = get_openapi(title="Sieve match API", version="1", routes=app.routes)
        spec["paths"] = {p: v for p, v in spec["paths"].items() if p.startswith("/api/match/")}
        return spec

    @app.get("/api/admin/audit")
    def audit(_admin: Admin, count: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        return {"entries": services.admin.audit_log(count)}

    return app


def build_services(settings: Settings, rsettings: ReviewerSettings) -> ReviewerServices:
    """The real thing: Redis queue and admin store, Kafka consumer and producer, file-root image source."""

    from services.common.audit import AuditLog
    from services.common.inference import TritonModels
    from services.reviewer.admin import AdminStore
    from services.reviewer.images import ImageSource, load_aligned_view, load_explain_view
    from services.reviewer.labels import FeedbackPublisher, Labeller
    from services.reviewer.metrics import ReviewerMetrics
    from services.reviewer.queue import ReviewIngestor, ReviewQueue

    client = connect(settings.redis)
    prefix = settings.redis.key_prefix
    queue = ReviewQueue(
        client,
        prefix,
        rsettings.claim_ttl_s,
        dedup_ttl_s=rsettings.dedup_ttl_s,
        skip_ttl_s=rsettings.skip_ttl_s,
        uri_ttl_s=settings.index.retention_s,
    )
    audit = AuditLog(client, prefix, rsettings.audit_file or settings.audit.file)
    publisher = FeedbackPublisher(settings.kafka, rsettings.publish_timeout_s)
    labeller = Labeller(client, prefix, publisher, audit, rsettings.categories, rsettings.dedup_ttl_s)

    def depth() -> tuple[int, int]:
        s = queue.stats()
        return s.pending, s.claimed

    metrics = ReviewerMetrics(depth)
    ingestor = ReviewIngestor(
        settings.kafka, queue, rsettings.consumer_group, on_ingested=lambda n: metrics.ingested.add(n)
    )
    return ReviewerServices(
        queue=queue,
        labeller=labeller,
        admin=AdminStore(
            client,
            prefix,
            settings.decision,
            audit,
            settings.banks,
            settings.fetch,
            settings,
            TritonModels(settings.triton),
        ),
        images=ImageSource(
            settings.fetch,
            settings.decode,
            load_aligned_view(rsettings.aligned_view),
            load_explain_view(rsettings.explain_view),
        ),
        ingestor=ingestor,
        rejudger=RejudgeWorker(Rejudger(client, settings, kafka_publisher(settings)), rsettings.rejudge_max_signals),
        on_label=lambda label, role: metrics.labels.add(1, {"kind": label_kind(label), "role": role}),
        on_claim=lambda: metrics.claims.add(1),
    )


def app_from_env() -> FastAPI:
    """Uvicorn factory (``uvicorn --factory services.reviewer.app:app_from_env``)."""
    from services.common.kafka_io import ensure_topics
    from services.common.telemetry import setup_telemetry

    settings = Settings()
    rsettings = ReviewerSettings()
    setup_telemetry(settings.telemetry, "sieve-reviewer")
    ensure_topics(settings.kafka)
    return create_app(rsettings, build_services(settings, rsettings))
