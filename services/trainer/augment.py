"""Strong augmentations that mimic how re-uploads are edited, plus the primitives the benchmark reuses.

Training pairs an original with copies pushed through a random chain of these edits, so the embedder learns
to ignore them. The primitives take explicit parameters; the random policy (``StrongAugment``) lives here and
the benchmark draws its own, different parameters, so evaluation does not simply replay training.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from services.common.models.stn import DEFAULT_CATEGORIES

WIRE_SIZE = 256
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
TRAIN_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed-Bold.ttf")
# Symbols DejaVu Sans draws; monochrome glyphs painted in bright colours stand in for emoji stickers.
TRAIN_EMOJI = "☺☻♥♦♣♠★☀☁☂☃☕☠☢☮☯✈✉✌✓✔✗✘❄❤"
TRAIN_WORDS = (
    "LOL", "OMG", "WOW", "when you", "me irl", "nope", "FAIL", "so true", "mood", "like and share",
    "BREAKING", "this is fine", "Monday", "sale 50%", "look at this", "#blessed", "new post", "why",
)  # fmt: skip

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=64)
def load_font(name: str, size: int) -> Font:
    """A TrueType font from Debian's fonts-dejavu-core (or liberation) if present, else PIL's built-in font."""
    for folder in FONT_DIRS:
        path = folder / name
        if path.exists():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def to_wire(img: Image.Image, size: int = WIRE_SIZE) -> NDArray[np.uint8]:
    """Exactly the resize ``services.common.imaging.decode_image`` applies, so training sees serving's pixels."""
    resized = to_rgb(img).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(resized, dtype=np.uint8)


def limit_side(img: Image.Image, max_side: int) -> Image.Image:
    """Big photos are shrunk once up front: edits at 512 px look the same after the 256 px wire resize."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img.convert("RGB")  # always a loaded copy, usable after the file is closed
    scale = max_side / max(w, h)
    return to_rgb(img).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)


# ---------------------------------------------------------------------------------------------- primitives


def crop_area(img: Image.Image, area: float, aspect: float, cx: float, cy: float) -> Image.Image:
    """Keep ``area`` of the pixels with the given aspect change; (cx, cy) in [0, 1] places the window."""
    w, h = img.size
    cw = min(w, max(8, round(w * (area * aspect) ** 0.5)))
    ch = min(h, max(8, round(h * (area / aspect) ** 0.5)))
    left = round((w - cw) * cx)
    top = round((h - ch) * cy)
    return img.crop((left, top, left + cw, top + ch))


def rescale(img: Image.Image, scale: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(16, round(w * scale)), max(16, round(h * scale))), Image.Resampling.BICUBIC)


def mirror(img: Image.Image) -> Image.Image:
    return ImageOps.mirror(img)


def rotate(img: Image.Image, degrees: float, fill: tuple[int, int, int], expand: bool = True) -> Image.Image:
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR, expand=expand, fillcolor=fill)


def _perspective_coeffs(src: Sequence[tuple[float, float]], dst: Sequence[tuple[float, float]]) -> list[float]:
    """PIL maps output (x, y) to input: solve the 8 homography terms from four point pairs."""
    rows: list[list[float]] = []
    rhs: list[float] = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    solution = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    return [float(c) for c in solution]


def perspective(img: Image.Image, offsets: Sequence[float], fill: tuple[int, int, int]) -> Image.Image:
    """Move the four corners inwards by ``offsets`` (8 fractions of the size): a photo of a tilted screen."""
    w, h = img.size
    corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
    signs = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    dst = [
        (x + sx * offsets[2 * i] * w, y + sy * offsets[2 * i + 1] * h)
        for i, ((x, y), (sx, sy)) in enumerate(zip(corners, signs, strict=True))
    ]
    coeffs = _perspective_coeffs(corners, dst)
    return img.transform((w, h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR, fillcolor=fill)


def colour(img: Image.Image, brightness: float, contrast: float, saturation: float) -> Image.Image:
    out = ImageEnhance.Brightness(img).enhance(brightness)
    out = ImageEnhance.Contrast(out).enhance(contrast)
    return ImageEnhance.Color(out).enhance(saturation)


def grayscale(img: Image.Image) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


def blur(img: Image.Image, radius: float) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius))


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as decoded:
        out: Image.Image = decoded.convert("RGB")
    return out


def overlay_text(
    img: Image.Image,
    text: str,
    font_name: str,
    size_frac: float,
    pos: tuple[float, float],
    fill: tuple[int, int, int],
    stroke: bool = True,
) -> Image.Image:
    """Caption text at a relative position; a dark or light outline like meme generators draw."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    font = load_font(font_name, max(8, round(min(out.size) * size_frac)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = round((out.width - (right - left)) * pos[0])
    y = round((out.height - (bottom - top)) * pos[1])
    outline = (0, 0, 0) if sum(fill) > 380 else (255, 255, 255)
    width = max(1, round(font.size / 12)) if stroke and isinstance(font, ImageFont.FreeTypeFont) else 0
    draw.text((x, y), text, font=font, fill=fill, stroke_width=width, stroke_fill=outline)
    return out


def overlay_glyphs(
    img: Image.Image,
    glyphs: Sequence[tuple[str, float, float, float, tuple[int, int, int]]],
    font_name: str = "DejaVuSans.ttf",
) -> Image.Image:
    """Emoji-like stickers: (glyph, size fraction, x, y, colour) each."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    for glyph, size_frac, gx, gy, fill in glyphs:
        font = load_font(font_name, max(10, round(min(out.size) * size_frac)))
        x, y = round(out.width * gx), round(out.height * gy)
        draw.text((x, y), glyph, font=font, fill=fill, anchor="mm")
    return out


def add_border(img: Image.Image, fracs: Sequence[float], fill: tuple[int, int, int]) -> Image.Image:
    """Padding (left, top, right, bottom as fractions of the size), as reposting tools add."""
    w, h = img.size
    border = (round(w * fracs[0]), round(h * fracs[1]), round(w * fracs[2]), round(h * fracs[3]))
    return ImageOps.expand(img, border=border, fill=fill)


def screenshot(
    img: Image.Image,
    canvas_w: int,
    aspect: float,
    scale: float,
    background: tuple[int, int, int],
    header: str,
    font_name: str,
    offset: float = 0.5,
) -> Image.Image:
    """Paste the photo into a phone-like screen with a status bar, a header line and text lines below it."""
    canvas_h = round(canvas_w * aspect)
    canvas = Image.new("RGB", (canvas_w, canvas_h), background)
    draw = ImageDraw.Draw(canvas)
    ink = (20, 20, 20) if sum(background) > 380 else (235, 235, 235)
    bar = max(10, canvas_h // 28)
    draw.rectangle((0, 0, canvas_w, bar), fill=tuple(max(0, c - 40) for c in background))
    font = load_font(font_name, max(9, canvas_w // 22))
    draw.text((canvas_w // 20, bar + canvas_h // 60), header, font=font, fill=ink)
    pw = round(canvas_w * scale)
    ph = max(8, round(pw * img.height / img.width))
    ph = min(ph, round(canvas_h * 0.7))
    photo = img.resize((pw, ph), Image.Resampling.BILINEAR)
    top = bar + canvas_h // 12 + round((canvas_h * 0.7 - ph) * 0.3 * offset)
    left = (canvas_w - pw) // 2
    canvas.paste(photo, (left, top))
    line_y = top + ph + canvas_h // 30
    while line_y < canvas_h - canvas_h // 20:
        draw.rectangle((canvas_w // 20, line_y, canvas_w - canvas_w // 6, line_y + canvas_h // 90 + 1), fill=ink)
        line_y += canvas_h // 25
    return canvas


# ----------------------------------------------------------------------------------------- random policy


def random_colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the training policy (the benchmark uses its own, see evaluation)."""

    p_crop: float = 0.6
    crop_area: tuple[float, float] = (0.3, 0.9)
    p_scale: float = 0.3
    scale: tuple[float, float] = (0.3, 1.0)
    p_flip: float = 0.3
    p_rotate: float = 0.35
    rotate_deg: float = 30.0
    p_perspective: float = 0.25
    perspective: float = 0.15
    p_colour: float = 0.7
    p_grayscale: float = 0.12
    p_blur: float = 0.2
    p_text: float = 0.3
    p_emoji: float = 0.2
    p_border: float = 0.2
    p_screenshot: float = 0.15
    p_jpeg: float = 0.6
    jpeg_quality: tuple[int, int] = (15, 60)


class StrongAugment:
    """One random chain of edits; returns the edited image and the multi-label flags it earned."""

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.cfg = config or AugmentConfig()
        self.categories = DEFAULT_CATEGORIES

    def __call__(self, img: Image.Image, rng: random.Random) -> tuple[Image.Image, NDArray[np.float32]]:
        cfg = self.cfg
        flags: set[str] = set()
        img = to_rgb(img)
        if rng.random() < cfg.p_crop:
            img = crop_area(img, rng.uniform(*cfg.crop_area), rng.uniform(0.75, 1.33), rng.random(), rng.random())
        if rng.random() < cfg.p_scale:
            img = rescale(img, rng.uniform(*cfg.scale))
        if rng.random() < cfg.p_flip:
            img = mirror(img)
        fill = rng.choice([(0, 0, 0), (255, 255, 255), random_colour(rng)])
        if rng.random() < cfg.p_rotate:
            img = rotate(img, rng.uniform(-cfg.rotate_deg, cfg.rotate_deg), fill, expand=rng.random() < 0.5)
        if rng.random() < cfg.p_perspective:
            img = perspective(img, [rng.uniform(0, cfg.perspective) for _ in range(8)], fill)
        if rng.random() < cfg.p_colour:
            img = colour(img, rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.4, 1.6))
        if rng.random() < cfg.p_grayscale:
            img = grayscale(img)
            flags.add("grayscale")
        if rng.random() < cfg.p_blur:
            img = blur(img, rng.uniform(0.5, 2.5))
        if rng.random() < cfg.p_text:
            for _ in range(rng.randint(1, 3)):
                img = overlay_text(
                    img,
                    rng.choice(TRAIN_WORDS),
                    rng.choice(TRAIN_FONTS),
                    rng.uniform(0.06, 0.18),
                    (rng.random(), rng.random()),
                    rng.choice([(255, 255, 255), (0, 0, 0), random_colour(rng)]),
                )
            flags.add("text_overlay")
        if rng.random() < cfg.p_emoji:
            glyphs = [
                (rng.choice(TRAIN_EMOJI), rng.uniform(0.1, 0.3), rng.random(), rng.random(), random_colour(rng))
                for _ in range(rng.randint(1, 4))
            ]
            img = overlay_glyphs(img, glyphs)
            flags.add("emoji_overlay")
        if rng.random() < cfg.p_border:
            img = add_border(img, [rng.uniform(0.03, 0.2) for _ in range(4)], rng.choice([fill, random_colour(rng)]))
            flags.add("border")
        if rng.random() < cfg.p_screenshot:
            img = screenshot(
                img,
                canvas_w=rng.randint(360, 720),
                aspect=rng.uniform(1.4, 2.1),
                scale=rng.uniform(0.6, 0.95),
                background=rng.choice([(255, 255, 255), (24, 24, 28), (240, 242, 245)]),
                header=rng.choice(TRAIN_WORDS),
                font_name=rng.choice(TRAIN_FONTS),
                offset=rng.random(),
            )
            flags.add("screenshot")
        if rng.random() < cfg.p_jpeg:
            img = jpeg(img, rng.randint(*cfg.jpeg_quality))
        return img, flag_vector(flags, self.categories)


def flag_vector(flags: set[str], categories: Sequence[str]) -> NDArray[np.float32]:
    return np.asarray([1.0 if c in flags else 0.0 for c in categories], dtype=np.float32)


def augment_views(
    img: Image.Image, n_views: int, seed: int, augment: StrongAugment | None = None
) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """View 0 is the untouched original at wire size; views 1..n are strong augmentations of it."""
    policy = augment or StrongAugment()
    rng = random.Random(seed)
    pixels = [to_wire(img)]
    flags = [flag_vector(set(), policy.categories)]
    for _ in range(n_views):
        out, f = policy(img, rng)
        pixels.append(to_wire(out))
        flags.append(f)
    return np.stack(pixels), np.stack(flags)


def _augment_job(args: tuple[str, int, int, int]) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    path, n_views, seed, max_side = args
    with Image.open(path) as opened:
        img = limit_side(opened, max_side)
    return augment_views(img, n_views, seed)


def pregenerate(
    paths: Sequence[str], n_views: int, seed: int, workers: int = 2, max_side: int = 512
) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """All views up front, in ``workers`` processes: (N, 1 + n_views, 256, 256, 3) uint8 and flags."""
    jobs = [(p, n_views, seed * 1_000_003 + i, max_side) for i, p in enumerate(paths)]
    results: list[Any]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_augment_job, jobs, chunksize=4)
    else:
        results = [_augment_job(j) for j in jobs]
    return np.stack([r[0] for r in results]), np.stack([r[1] for r in results])


# ------------------------------------------------------------------------------ compositions and hard policy


def caption_bands(
    img: Image.Image, top: float, bottom: float, words: Sequence[str], font_name: str, background: tuple[int, int, int]
) -> Image.Image:
    """A meme: bands of ``top`` and ``bottom`` (fractions of the height) above and below the photo, captioned."""
    w, h = img.size
    top_px, bottom_px = round(h * top), round(h * bottom)
    canvas = Image.new("RGB", (w, h + top_px + bottom_px), background)
    canvas.paste(to_rgb(img), (0, top_px))
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0) if sum(background) > 380 else (255, 255, 255)
    for band, centre in ((top_px, top_px // 2), (bottom_px, top_px + h + bottom_px // 2)):
        if band > 12 and words:
            font = load_font(font_name, max(10, round(band * 0.4)))
            draw.text((w // 2, centre), words[0 if centre < h else -1], font=font, fill=ink, anchor="mm")
    return canvas


def tile_grid(
    img: Image.Image,
    others: Sequence[Image.Image],
    cols: int,
    rows: int,
    tile: int,
    gap: int,
    slot: int,
    fill: tuple[int, int, int],
) -> Image.Image:
    """A collage: the photo in grid cell ``slot``, the other cells filled from ``others`` (cycled)."""
    canvas = Image.new("RGB", (cols * tile + (cols + 1) * gap, rows * tile + (rows + 1) * gap), fill)
    fillers = list(others) or [img]
    for k in range(cols * rows):
        source = img if k == slot else fillers[k % len(fillers)]
        cell = ImageOps.fit(to_rgb(source), (tile, tile))
        canvas.paste(cell, (gap + (k % cols) * (tile + gap), gap + (k // cols) * (tile + gap)))
    return canvas


def paste_into(
    img: Image.Image, background: Image.Image, width_frac: float, degrees: float, pos: tuple[float, float]
) -> Image.Image:
    """Picture in picture: the photo at ``width_frac`` of the background's width, turned by ``degrees``."""
    back = to_rgb(background).copy()
    inner = rescale(to_rgb(img), width_frac * back.width / img.width)
    if degrees:
        inner = inner.rotate(degrees, resample=Image.Resampling.BILINEAR, expand=True)
    x = round(max(0, back.width - inner.width) * pos[0])
    y = round(max(0, back.height - inner.height) * pos[1])
    back.paste(inner, (x, y))
    return back


def quarter_turn(img: Image.Image, turns: int) -> Image.Image:
    transposes = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
    return img if turns % 4 == 0 else img.transpose(transposes[turns % 4 - 1])


def gamma(img: Image.Image, g: float) -> Image.Image:
    table = [round(255 * (v / 255) ** g) for v in range(256)] * 3
    return to_rgb(img).point(table)


def add_noise(img: Image.Image, sigma: float, seed: int) -> Image.Image:
    arr = np.asarray(to_rgb(img), dtype=np.float32)
    noisy = arr + np.random.default_rng(seed).normal(0.0, sigma, arr.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def pixelate(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    small = img.resize((max(4, round(w * factor)), max(4, round(h * factor))), Image.Resampling.BILINEAR)
    return small.resize((w, h), Image.Resampling.NEAREST)


def hue_shift(img: Image.Image, shift: int) -> Image.Image:
    h, s, v = to_rgb(img).convert("HSV").split()
    return Image.merge("HSV", (h.point(lambda x: (x + shift) % 256), s, v)).convert("RGB")


class HardAugment:
    """SSCD-strength chains for the hard fine-tune: 2-5 edits drawn from every family re-uploaders use.

    Unlike ``StrongAugment`` (one pass over fixed probabilities), each view draws a chain: a crop first most of
    the time, then geometric, photometric and composition edits in random order, so chains of edits (the
    weakest family) are the common case rather than the rare one. Fonts, words and glyphs are the training
    ones; the benchmark draws its own. ``others`` are other training photos for collages and backgrounds.
    """

    categories = DEFAULT_CATEGORIES

    def __init__(self, others: Sequence[Image.Image] = ()) -> None:
        self.others = list(others)

    def __call__(self, img: Image.Image, rng: random.Random) -> tuple[Image.Image, NDArray[np.float32]]:
        flags: set[str] = set()
        img = to_rgb(img)
        if rng.random() < 0.75:
            img = crop_area(img, rng.uniform(0.18, 0.9), rng.uniform(0.6, 1.6), rng.random(), rng.random())
        kinds = ["geometry", "photometric", "composition", "overlay", "quality"]
        steps = rng.sample(kinds, k=rng.choice([1, 2, 2, 3, 3, 4]))
        for step in steps:
            img = getattr(self, f"_{step}")(img, rng, flags)
        if rng.random() < 0.7:
            img = jpeg(img, rng.randint(12, 85))
        return img, flag_vector(flags, self.categories)

    def _fill(self, rng: random.Random) -> tuple[int, int, int]:
        return rng.choice([(0, 0, 0), (255, 255, 255), (128, 128, 128), random_colour(rng)])

    def _geometry(self, img: Image.Image, rng: random.Random, flags: set[str]) -> Image.Image:
        choice = rng.randrange(5)
        if choice == 0:
            img = quarter_turn(img, rng.randint(1, 3))
        elif choice == 1:
            img = rotate(img, rng.uniform(-90, 90), self._fill(rng), expand=rng.random() < 0.7)
        elif choice == 2:
            img = perspective(img, [rng.uniform(0, 0.3) for _ in range(8)], self._fill(rng))
        elif choice == 3:
            img = rescale(img, rng.uniform(0.25, 1.0))
        else:
            img = mirror(img)
        if rng.random() < 0.3:
            img = mirror(img)
        return img

    def _photometric(self, img: Image.Image, rng: random.Random, flags: set[str]) -> Image.Image:
        img = colour(img, rng.uniform(0.5, 1.6), rng.uniform(0.4, 1.7), rng.uniform(0.0, 2.0))
        choice = rng.randrange(7)
        if choice == 0:
            img = gamma(img, rng.choice([rng.uniform(0.35, 0.75), rng.uniform(1.4, 2.5)]))
        elif choice == 1:
            img = grayscale(img)
            flags.add("grayscale")
        elif choice == 2:
            img = blur(img, rng.uniform(1.0, 4.0))
        elif choice == 3:
            img = add_noise(img, rng.uniform(6, 30), rng.randrange(2**31))
        elif choice == 4:
            img = ImageOps.posterize(to_rgb(img), rng.randint(2, 5))
        elif choice == 5:
            img = hue_shift(img, rng.randint(20, 235))
        else:
            img = pixelate(img, rng.uniform(0.1, 0.4))
        if rng.random() < 0.2:
            img = ImageEnhance.Sharpness(img).enhance(rng.uniform(2.0, 5.0))
        if rng.random() < 0.08:
            img = ImageOps.invert(to_rgb(img))
        return img

    def _composition(self, img: Image.Image, rng: random.Random, flags: set[str]) -> Image.Image:
        choice = rng.randrange(4)
        if choice == 0:
            words = [rng.choice(TRAIN_WORDS), rng.choice(TRAIN_WORDS)]
            background = rng.choice([(255, 255, 255), (0, 0, 0), random_colour(rng)])
            top, bottom = rng.uniform(0.1, 0.45), rng.choice([0.0, rng.uniform(0.05, 0.3)])
            flags.add("text_overlay")
            return caption_bands(img, top, bottom, words, rng.choice(TRAIN_FONTS), background)
        if choice == 1 and self.others:
            cols, rows = rng.choice([(2, 1), (1, 2), (2, 2), (3, 1), (1, 3)])
            others = rng.sample(self.others, k=min(len(self.others), cols * rows))
            tile, gap = rng.randint(160, 320), rng.randint(0, 16)
            return tile_grid(img, others, cols, rows, tile, gap, rng.randrange(cols * rows), self._fill(rng))
        if choice == 2 and self.others:
            back = ImageOps.fit(to_rgb(rng.choice(self.others)), (rng.randint(400, 720), rng.randint(360, 720)))
            return paste_into(img, back, rng.uniform(0.35, 0.85), rng.uniform(-20, 20), (rng.random(), rng.random()))
        if choice == 3:
            flags.add("screenshot")
            return screenshot(
                img,
                canvas_w=rng.randint(320, 720),
                aspect=rng.uniform(1.3, 2.2),
                scale=rng.uniform(0.5, 0.95),
                background=rng.choice([(255, 255, 255), (24, 24, 28), (240, 242, 245), random_colour(rng)]),
                header=rng.choice(TRAIN_WORDS),
                font_name=rng.choice(TRAIN_FONTS),
                offset=rng.random(),
            )
        flags.add("border")
        return add_border(img, [rng.uniform(0.03, 0.3) for _ in range(4)], self._fill(rng))

    def _overlay(self, img: Image.Image, rng: random.Random, flags: set[str]) -> Image.Image:
        if rng.random() < 0.6:
            glyphs = [
                (rng.choice(TRAIN_EMOJI), rng.uniform(0.1, 0.35), rng.random(), rng.random(), random_colour(rng))
                for _ in range(rng.randint(1, 7))
            ]
            img = overlay_glyphs(img, glyphs)
            flags.add("emoji_overlay")
        if rng.random() < 0.6:
            for _ in range(rng.randint(1, 3)):
                img = overlay_text(
                    img,
                    rng.choice(TRAIN_WORDS),
                    rng.choice(TRAIN_FONTS),
                    rng.uniform(0.06, 0.2),
                    (rng.random(), rng.random()),
                    rng.choice([(255, 255, 255), (0, 0, 0), random_colour(rng)]),
                )
            flags.add("text_overlay")
        return img

    def _quality(self, img: Image.Image, rng: random.Random, flags: set[str]) -> Image.Image:
        img = rescale(img, rng.uniform(0.2, 0.6))
        return jpeg(img, rng.randint(8, 40))
