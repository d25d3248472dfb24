"""Decode untrusted image bytes into the fixed-size RGB tensor the models take, cheaply and safely."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.config import DecodeSettings
from services.common.errors import BadInput
from services.common.schemas import ErrorKind

# Pillow's own bomb guard is set per call below; disable the global one so our limit is the single source.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodedImage:
    pixels: NDArray[Any]  # uint8, (size, size, 3), RGB, EXIF-oriented
    format: str
    width: int  # original, after orientation
    height: int
    detail: NDArray[Any] | None = None  # uint8 grayscale, aspect kept, for local-feature verification
    pdq_view: NDArray[Any] | None = None  # uint8 grayscale, aspect kept, longest side PDQ_SIDE: PDQ is hashed on it


PDQ_SIDE = 512  # what the reference PDQ tools hash (they downsample larger images to 512 first)


def decode_image(
    data: bytes, settings: DecodeSettings, size: int = 256, detail_side: int = 0, pdq: bool = False
) -> DecodedImage:
    """``detail_side`` > 0 also keeps a grayscale view with that longest side (or less), from the same decode;
    ``pdq`` keeps one at PDQ_SIDE (the same array when detail_side is PDQ_SIDE). PDQ of the 256-pixel square
    would sit 18 bits (median) away from what other tools compute for the same photo; at 512, a few bits."""
    if not data:
        raise BadInput(ErrorKind.CORRUPT_IMAGE, "empty body (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            fmt = image.format or "UNKNOWN"
            if fmt not in settings.allowed_formats:
                raise BadInput(ErrorKind.UNSUPPORTED_FORMAT, f"format {fmt} is not allowed")
            width, height = image.size
            if width * height > settings.max_pixels:
                raise BadInput(
                    ErrorKind.DECOMPRESSION_BOMB,
                    f"declared canvas {width}x{height} exceeds {settings.max_pixels} pixels",
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated GIF/WebP: moderate the first frame
            # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale: most of the cost of big photos disappears.
            draft = max(size, detail_side, PDQ_SIDE if pdq else 0)
            image.draft("RGB", (draft, draft))
            image.load()
            image = ImageOps.exif_transpose(image) or image
            oriented_w, oriented_h = image.size
            if image.mode not in ("RGB",):
                image = _to_rgb(image)
            detail = detail_view(image, detail_side) if detail_side > 0 else None
            pdq_view = None
            if pdq:
                pdq_view = detail if detail is not None and detail_side == PDQ_SIDE else detail_view(image, PDQ_SIDE)
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            pixels = np.asarray(image, dtype=np.uint8)
    except BadInput:
        raise
    except (UnidentifiedImageError, SyntaxError) as exc:
        raise BadInput(ErrorKind.UNSUPPORTED_FORMAT, f"not a recognised image: {exc}") from exc
    except Image.DecompressionBombError as exc:
        raise BadInput(ErrorKind.DECOMPRESSION_BOMB, str(exc)) from exc
    except (OSError, ValueError, EOFError) as exc:
        raise BadInput(ErrorKind.CORRUPT_IMAGE, f"cannot decode image: {exc}") from exc
    if pixels.shape != (size, size, 3):
        raise BadInput(ErrorKind.CORRUPT_IMAGE, f"unexpected decoded shape {pixels.shape}")
    return DecodedImage(
        pixels=pixels, format=fmt, width=oriented_w, height=oriented_h, detail=detail, pdq_view=pdq_view
    )


def detail_view(image: Image.Image, side: int) -> NDArray[np.uint8]:
    """Grayscale, aspect kept, longest side at most ``side``: verification needs the geometry that the wire
    square distorts, and more pixels than it holds."""
    gray = image.convert("L")
    scale = side / max(gray.size)
    if scale < 1.0:
        size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        gray = gray.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(gray, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flattens alpha onto white, and maps CMYK, 16-bit and palette images to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = arr.max() or 1.0
        image = Image.fromarray((arr / peak * 255.0).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
