"""Images for the labelling page, under the moderator's own SSRF policy and only from file:// roots.

The page must show uploads without turning the service into an open proxy: the shared FetcherRegistry is used
with every scheme but ``file`` switched off, so only files below SIEVE_FETCH_FILE_ROOTS are readable, and the
bytes are served only when they decode as an allowed image format (a text file under a root is refused).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
from collections.abc import Callable
from typing import Any

from PIL import Image, UnidentifiedImageError

from services.common.config import DecodeSettings, FetchSettings
from services.common.errors import BadInput
from services.common.fetch import FetcherRegistry
from services.common.schemas import ErrorKind

AlignedView = Callable[[bytes], bytes | None]
"""Image bytes in, PNG bytes of the spatial transformer's aligned (canonical-pose) view out (None: no STN)."""

ExplainView = Callable[[bytes, bytes], bytes]
"""Upload bytes and neighbour bytes in, PNG bytes of "why they match" (warps, Grad-CAM, thresholds) out."""

_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}


class ImageRefused(Exception):
    """The URI may not be served (status 403/404/413/415 with a reason that names no secret)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def load_view_function(spec: str) -> Callable[..., Any] | None:
    """``"package.module:function"`` -> the function, imported on its first call; empty -> None (the page hides
    that view).

    The aligned view draws with torch (the STN's warp), which the serving image leaves out: the reviewer starts
    without it, and a view asked for where a package is missing answers 501 saying what to install. The explain
    view draws without torch, leaving out only Grad-CAM and the warp.
    """
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    if importlib.util.find_spec(module_name) is None:
        raise ModuleNotFoundError(f"{spec}: no module {module_name}")
    loaded: list[Callable[..., Any]] = []

    def view(*args: Any) -> Any:
        try:
            if not loaded:
                fn = getattr(importlib.import_module(module_name), attr)
                if not callable(fn):
                    raise TypeError(f"{spec} is not callable")
                loaded.append(fn)
            return loaded[0](*args)
        except ModuleNotFoundError as exc:  # at import, or inside the view (the aligned view imports torch late)
            raise ImageRefused(501, f"this view needs {exc.name}: pip install 'sieve[train]'") from exc

    return view


def load_aligned_view(spec: str) -> AlignedView | None:
    return load_view_function(spec)


def load_explain_view(spec: str) -> ExplainView | None:
    return load_view_function(spec)


class ImageSource:
    def __init__(
        self,
        fetch: FetchSettings,
        decode: DecodeSettings,
        aligned: AlignedView | None = None,
        explain: ExplainView | None = None,
    ) -> None:
        self.registry = FetcherRegistry(fetch.model_copy(update={"allowed_schemes": ["file"]}))
        self.allowed_formats = {f.upper() for f in decode.allowed_formats} & set(_MIME)
        self.max_pixels = decode.max_pixels
        self.aligned_fn = aligned
        self.explain_fn = explain

    def load(self, uri: str) -> tuple[bytes, str]:
        """The image bytes and their MIME type; raises ImageRefused."""
        try:
            data = self.registry.fetch(uri)
        except BadInput as exc:
            status = {ErrorKind.FETCH_REFUSED: 403, ErrorKind.TOO_LARGE: 413}.get(exc.kind, 404)
            raise ImageRefused(status, exc.detail) from exc
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = (img.format or "").upper()
                if img.width * img.height > self.max_pixels:
                    raise ImageRefused(413, "image exceeds the pixel limit")
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageRefused(415, "not an image") from exc
        if fmt not in self.allowed_formats:
            raise ImageRefused(415, f"image format {fmt or 'unknown'} is not served")
        return data, _MIME[fmt]

    @property
    def has_aligned_view(self) -> bool:
        return self.aligned_fn is not None

    def aligned(self, uri: str) -> bytes | None:
        """PNG of the aligned view, or None when no aligned-view function is configured."""
        if self.aligned_fn is None:
            return None
        data, _ = self.load(uri)
        return self.aligned_fn(data)

    @property
    def has_explain_view(self) -> bool:
        return self.explain_fn is not None

    def explain(self, upload_uri: str, neighbour_uri: str) -> bytes | None:
        """PNG of why the upload matches the neighbour; both images pass the same checks as ``load``."""
        if self.explain_fn is None:
            return None
        upload, _ = self.load(upload_uri)
        neighbour, _ = self.load(neighbour_uri)
        return self.explain_fn(upload, neighbour)
