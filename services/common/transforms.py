"""Near-duplicate transformations for demos, tests and benchmarks: the edits re-uploads go through."""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image, ImageEnhance

Transform = Callable[[Image.Image], Image.Image]


def crop(fraction: float) -> Transform:
    def apply(img: Image.Image) -> Image.Image:
        w, h = img.size
        cw, ch = int(w * fraction), int(h * fraction)
        left, top = (w - cw) // 2, (h - ch) // 3
        return img.crop((left, top, left + cw, top + ch))

    return apply


def jpeg(quality: int) -> Transform:
    def apply(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    return apply


def resize(scale: float) -> Transform:
    def apply(img: Image.Image) -> Image.Image:
        w, h = img.size
        return img.resize((max(16, int(w * scale)), max(16, int(h * scale))), Image.Resampling.BICUBIC)

    return apply


def colour(saturation: float, brightness: float) -> Transform:
    def apply(img: Image.Image) -> Image.Image:
        out = ImageEnhance.Color(img.convert("RGB")).enhance(saturation)
        return ImageEnhance.Brightness(out).enhance(brightness)

    return apply


def chain(*steps: Transform) -> Transform:
    def apply(img: Image.Image) -> Image.Image:
        for step in steps:
            img = step(img)
        return img

    return apply


# The near-duplicate families the foundation tests and the demo use.
NEAR_DUPLICATES: dict[str, Transform] = {
    "crop80": crop(0.8),
    "jpeg30": jpeg(30),
    "resize50": resize(0.5),
    "colour": colour(1.4, 1.1),
    "crop90_jpeg50": chain(crop(0.9), jpeg(50)),
}


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
