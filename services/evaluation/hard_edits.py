"""The edits re-uploaders make that a global descriptor misses: what the hard benchmark draws its queries from.

Each family is a function of (image, rng) so that a query is reproducible from its id. Parameters are set to
the hard end of what people do (small crops, rotations to 90°, strong perspective, memes, collages, phone
screenshots, heavy colour changes, chains of 2-4 edits), with fonts, words and glyphs the training policy never
draws.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from services.evaluation.benchmark import EVAL_EMOJI  # the glyphs training never draws
from services.trainer.augment import (
    blur,
    colour,
    crop_area,
    grayscale,
    load_font,
    mirror,
    overlay_glyphs,
    overlay_text,
    perspective,
    random_colour,
    rescale,
    rotate,
    screenshot,
    to_rgb,
)

HARD_FAMILIES: tuple[str, ...] = ("crop", "geometric", "overlay", "photometric", "combined")
HARD_FONTS = ("DejaVuSerif-Bold.ttf", "LiberationSerif-Bold.ttf", "LiberationMono-Regular.ttf", "DejaVuSerif.ttf")
HARD_WORDS = (
    "nobody:", "me when", "wait for it", "this!!", "tag a friend", "so cursed", "found it", "original?",
    "credit to OP", "zoom in", "2019 vs 2026", "legend says",
)  # fmt: skip
FAMILY_QUALITY: dict[str, tuple[int, int]] = {
    "crop": (55, 90),
    "geometric": (55, 90),
    "overlay": (45, 85),
    "photometric": (15, 45),
    "combined": (20, 60),
}

Edit = Callable[[Image.Image, random.Random], tuple[Image.Image, str]]


def _fill(rng: random.Random) -> tuple[int, int, int]:
    return rng.choice([(0, 0, 0), (255, 255, 255), (128, 128, 128), random_colour(rng)])


def small_crop(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    area = rng.uniform(0.20, 0.45)
    aspect = rng.uniform(0.6, 1.6)
    out = crop_area(img, area, aspect, rng.random(), rng.random())
    if rng.random() < 0.5:
        scale = rng.uniform(0.6, 1.0)
        out = rescale(out, scale)
        return out, f"crop{area:.2f}@{aspect:.2f}+rescale{scale:.2f}"
    return out, f"crop{area:.2f}@{aspect:.2f}"


def strong_geometry(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    choice = rng.randrange(4)
    fill = _fill(rng)
    if choice == 0:
        deg = rng.choice([-1, 1]) * rng.uniform(30, 90)
        return rotate(img, deg, fill, expand=True), f"rotate{deg:.0f}"
    if choice == 1:
        amount = rng.uniform(0.15, 0.3)
        return perspective(img, [rng.uniform(0.3, 1.0) * amount for _ in range(8)], fill), f"perspective{amount:.2f}"
    if choice == 2:
        turns = rng.choice([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270])
        out = img.transpose(turns)
        if rng.random() < 0.5:
            return mirror(out), f"{turns.name.lower()}+mirror"
        return out, turns.name.lower()
    deg = rng.choice([-1, 1]) * rng.uniform(20, 45)
    return rotate(mirror(img), deg, fill, expand=True), f"mirror+rotate{deg:.0f}"


def _meme(img: Image.Image, rng: random.Random) -> Image.Image:
    """Caption band above (and sometimes below) the photo, in a font and words training never saw."""
    w, h = img.size
    top = round(h * rng.uniform(0.2, 0.4))
    bottom = round(h * rng.uniform(0.0, 0.25))
    background = rng.choice([(255, 255, 255), (0, 0, 0)])
    ink = (0, 0, 0) if background == (255, 255, 255) else (255, 255, 255)
    canvas = Image.new("RGB", (w, h + top + bottom), background)
    canvas.paste(img, (0, top))
    draw = ImageDraw.Draw(canvas)
    font = load_font(rng.choice(HARD_FONTS), max(10, round(top * 0.35)))
    draw.text((w // 2, top // 2), rng.choice(HARD_WORDS), font=font, fill=ink, anchor="mm")
    if bottom > 10:
        draw.text((w // 2, top + h + bottom // 2), rng.choice(HARD_WORDS), font=font, fill=ink, anchor="mm")
    return canvas


def _collage(img: Image.Image, fillers: Sequence[Image.Image], rng: random.Random) -> Image.Image:
    """The photo as one tile of a 2x1, 1x2 or 2x2 grid of other pictures."""
    cols, rows = rng.choice([(2, 1), (1, 2), (2, 2)])
    tile = rng.randint(220, 340)
    gap = rng.randint(0, 12)
    canvas = Image.new("RGB", (cols * tile + (cols + 1) * gap, rows * tile + (rows + 1) * gap), _fill(rng))
    slot = rng.randrange(cols * rows)
    for k in range(cols * rows):
        source = img if k == slot else to_rgb(fillers[rng.randrange(len(fillers))])
        canvas.paste(
            ImageOps.fit(source, (tile, tile)), (gap + (k % cols) * (tile + gap), gap + (k // cols) * (tile + gap))
        )
    return canvas


def _picture_in_picture(img: Image.Image, fillers: Sequence[Image.Image], rng: random.Random) -> Image.Image:
    """The photo pasted at 35-65% of the width onto another picture, maybe tilted."""
    back = ImageOps.fit(to_rgb(fillers[rng.randrange(len(fillers))]), (rng.randint(480, 720), rng.randint(400, 640)))
    scale = rng.uniform(0.35, 0.65) * back.width / img.width
    inner = rescale(img, scale)
    if rng.random() < 0.5:
        inner = inner.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR, expand=True)
    x = rng.randint(0, max(0, back.width - inner.width))
    y = rng.randint(0, max(0, back.height - inner.height))
    back.paste(inner, (x, y))
    return back


def compositions(fillers: Sequence[Image.Image]) -> Edit:
    """Overlays that put the photo among other content: memes, collages, pictures in pictures, screenshots."""

    def edit(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
        choice = rng.randrange(5)
        if choice == 0:
            return _meme(img, rng), "meme"
        if choice == 1 and fillers:
            return _collage(img, fillers, rng), "collage"
        if choice == 2 and fillers:
            return _picture_in_picture(img, fillers, rng), "picture_in_picture"
        if choice == 3:
            shot = screenshot(
                img,
                canvas_w=rng.randint(360, 540),
                aspect=rng.uniform(1.8, 2.2),
                scale=rng.uniform(0.7, 0.95),
                background=rng.choice([(255, 255, 255), (20, 20, 24)]),
                header=rng.choice(HARD_WORDS),
                font_name=rng.choice(HARD_FONTS),
                offset=rng.random(),
            )
            return shot, "phone_screenshot"
        glyphs = [
            (rng.choice(EVAL_EMOJI), rng.uniform(0.15, 0.3), rng.random(), rng.random(), random_colour(rng))
            for _ in range(rng.randint(3, 6))
        ]
        out = overlay_glyphs(img, glyphs)
        out = overlay_text(out, rng.choice(HARD_WORDS), rng.choice(HARD_FONTS), 0.12, (0.5, 0.88), (255, 255, 255))
        return out, "stickers+text"

    return edit


def heavy_photometric(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    steps = []
    img = colour(img, rng.uniform(0.55, 1.5), rng.uniform(0.5, 1.6), rng.uniform(0.0, 2.0))
    steps.append("colour")
    choice = rng.randrange(5)
    if choice == 0:
        g = rng.choice([rng.uniform(0.4, 0.7), rng.uniform(1.5, 2.3)])
        img = Image.eval(img, lambda v: round(255 * (v / 255) ** g))
        steps.append(f"gamma{g:.2f}")
    elif choice == 1:
        img = grayscale(img)
        steps.append("grayscale")
    elif choice == 2:
        img = blur(img, rng.uniform(1.5, 3.0))
        steps.append("blur")
    elif choice == 3:
        arr = np.asarray(to_rgb(img), dtype=np.float32)
        noise = np.random.default_rng(rng.randrange(2**31)).normal(0, rng.uniform(10, 25), arr.shape)
        img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
        steps.append("noise")
    else:
        img = ImageOps.posterize(to_rgb(img), rng.randint(2, 4))
        steps.append("posterize")
    if rng.random() < 0.4:
        img = ImageEnhance.Sharpness(img).enhance(rng.uniform(2.0, 4.0))
        steps.append("sharpen")
    if rng.random() < 0.3:
        img = ImageOps.invert(to_rgb(img)) if rng.random() < 0.2 else img.filter(ImageFilter.EDGE_ENHANCE)
        steps.append("filter")
    return img, "+".join(steps)


def chain(fillers: Sequence[Image.Image]) -> Edit:
    """Two to four edits in a row, each milder than its family alone (a crop always comes first)."""
    overlays = compositions(fillers)

    def edit(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
        area = rng.uniform(0.35, 0.75)
        img = crop_area(img, area, rng.uniform(0.7, 1.4), rng.random(), rng.random())
        steps = [f"crop{area:.2f}"]
        extra = rng.sample(["rotate", "perspective", "photometric", "overlay"], k=rng.randint(1, 3))
        for step in extra:
            if step == "rotate":
                deg = rng.choice([-1, 1]) * rng.uniform(10, 45)
                img = rotate(img, deg, _fill(rng), expand=True)
                steps.append(f"rotate{deg:.0f}")
            elif step == "perspective":
                amount = rng.uniform(0.06, 0.18)
                img = perspective(img, [rng.uniform(0.3, 1.0) * amount for _ in range(8)], _fill(rng))
                steps.append(f"perspective{amount:.2f}")
            elif step == "photometric":
                img = colour(img, rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3), rng.uniform(0.3, 1.6))
                if rng.random() < 0.3:
                    img = grayscale(img)
                steps.append("colour")
            else:
                img, name = overlays(img, rng)
                steps.append(name)
        return img, "+".join(steps)

    return edit


def hard_family_edits(fillers: Sequence[Image.Image]) -> dict[str, Edit]:
    """``fillers`` are unrelated pictures for collages and backgrounds; none may be in the reference set."""
    return {
        "crop": small_crop,
        "geometric": strong_geometry,
        "overlay": compositions(fillers),
        "photometric": heavy_photometric,
        "combined": chain(fillers),
    }
