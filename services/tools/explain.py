"""``sieve explain A B``: why two images match, drawn as one PNG (or a small self-contained HTML page).

A score alone does not let a reviewer overrule the model. The picture shows what the served network did with
each image (the spatial transformer's warp, when the served version has one), which regions drive the match
(Grad-CAM on the cosine similarity, not on a class logit), where the score sits against the moderator's
thresholds, and what the content classifier says about each image.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from services.common.config import REPO_ROOT, DecisionSettings, DecodeSettings, Settings
from services.common.imaging import DecodedImage, decode_image
from services.common.models.open_nsfw import caffe_input, network_path, nsfw_probability
from services.common.verification import FeatureExtractor, GeometricMatch, Verifier, match_geometry
from services.evaluation.embed import EMBEDDER_REPO, latest_version, load_serving, triton_reachable
from services.tools.pair_evidence import PairEvidence, pose_of

WIRE_SIZE = 256  # what the moderator sends to Triton: uint8 NHWC 256x256
CLASSIFIER_CONFIG = REPO_ROOT / "model_repo" / "sieve_classifier" / "config.pbtxt"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")

# ------------------------------------------------------------------------------------------------ classifier


def classifier_categories(config: Path = CLASSIFIER_CONFIG) -> list[str]:
    """Category names as the classifier's config.pbtxt declares them (what TritonModels reads over gRPC)."""
    match = re.search(r'key:\s*"categories"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', config.read_text())
    names = [n.strip() for n in match.group(1).split(",")] if match else []
    return [n for n in names if n] or ["category_0"]


def open_nsfw_scores(pixels: NDArray[np.uint8], precision: str = "int8") -> NDArray[np.float32]:
    """The served classifier (version 1, the served precision) run in-process, for when Triton is not reachable."""
    from services.common.models.ort_runtime import ort_session

    session = ort_session(network_path(CLASSIFIER_CONFIG.parent / "1", precision), 2)
    batch = np.stack([caffe_input(p) for p in pixels])
    return nsfw_probability(session.run(None, {session.get_inputs()[0].name: batch})[0])


@dataclass
class Served:
    """What the serving path says: the embedding version that answered and the classifier scores."""

    model_version: str
    backend: str
    similarity: float | None  # None: in-process, so the local similarity *is* the served one
    scores: list[dict[str, float]]
    classifier_source: str


def served_view(pixels: NDArray[np.uint8], settings: Settings, prefer_triton: bool, local_name: str) -> Served:
    """Triton when reachable (embeddings and scores in one call), else the same artifacts in-process."""
    if prefer_triton and triton_reachable(settings.triton.url, settings.triton.embedder_model):
        from services.common.errors import TransientError
        from services.common.inference import TritonModels

        models = TritonModels(settings.triton)
        try:
            result = models.infer(pixels)
            emb = result.embeddings.astype(np.float64)
            scores = [
                {c: round(float(s), 4) for c, s in zip(result.categories, row, strict=True)} for row in result.scores
            ]
            return Served(result.model_version, "triton", float(emb[0] @ emb[1]), scores, "triton")
        except TransientError:
            pass  # fall through to in-process: an explanation is still useful while Triton restarts
        finally:
            models.close()
    try:
        names = classifier_categories()
        raw = open_nsfw_scores(pixels)
        scores = [{c: round(float(s), 4) for c, s in zip(names, row, strict=True)} for row in raw]
        source = "onnxruntime in-process (same ONNX file and preprocessing as model_repo/sieve_classifier/1)"
    except (ImportError, OSError, FileNotFoundError) as exc:
        scores, source = [{}, {}], f"skipped: classifier unavailable in-process ({exc})"
    return Served(local_name, "in-process", None, scores, source)


# ----------------------------------------------------------------------------------------------- the verdict


def band_of(similarity: float, cfg: DecisionSettings) -> str:
    """The moderator's reading of a neighbour at this score (services/moderator/decide.py)."""
    duplicate = similarity >= cfg.duplicate_threshold
    near = abs(similarity - cfg.duplicate_threshold) < cfg.review_margin
    if duplicate and near:
        return "duplicate, near the threshold: review"
    if duplicate:
        return "duplicate"
    if near:
        return "not a duplicate, near the threshold: review"
    return "no match"


def model_card_threshold(version: str, repo: Path = EMBEDDER_REPO) -> float | None:
    """The served version's calibrated threshold (model_card.json), drawn as a second marker when it differs."""
    from services.tools.dedup import model_card_threshold as card_threshold

    return card_threshold(version, repo)


@dataclass
class Explanation:
    """Every number the picture shows, for the CLI's JSON and for tests."""

    a: str
    b: str
    out: str
    model_version: str
    backend: str
    similarity: float
    local_similarity: float
    verdict: str
    duplicate_threshold: float
    review_margin: float
    card_threshold: float | None
    stn: bool
    stn_note: str
    pose: list[dict[str, float]] | None
    heat_peak: list[float]
    heat_std: list[float]
    scores: list[dict[str, float]]
    classifier_source: str
    flag_threshold: float
    flag_review_low: float
    stn_flags: list[dict[str, float]] | None
    sizes: list[str]
    inliers: int = 0  # keypoint matches on one homography (ORB + RANSAC, as the moderator verifies)
    mirrored: bool = False  # found by matching the mirrored A
    score: float = 0.0  # cosine fused with the inliers: what the moderator compares with the threshold

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _decode(data: bytes, detail_side: int = 0) -> tuple[DecodedImage, tuple[int, int]]:
    from services.tools.dedup import true_size

    return decode_image(data, DecodeSettings(), WIRE_SIZE, detail_side), true_size(data)


def keypoint_match(a: DecodedImage, b: DecodedImage, settings: Settings) -> tuple[GeometricMatch, bool, int, int]:
    """The moderator's verification of this pair: A's features (and its mirror's) against B's; with both
    keypoint counts, which decide whether a miss counts against the pair."""
    cfg = settings.verify
    if a.detail is None or b.detail is None:
        raise ValueError("decode both images with a detail view first")
    extractor = FeatureExtractor(cfg.kind, cfg.max_features, cfg.min_side)
    reference = extractor.extract(b.detail)
    query = extractor.extract(a.detail)
    direct = match_geometry(query, reference, cfg.ratio, cfg.ransac_px)
    flipped = match_geometry(extractor.extract_mirrored(a.detail), reference, cfg.ratio, cfg.ransac_px)
    best, mirrored = (flipped, True) if flipped.inliers > direct.inliers else (direct, False)
    return best, mirrored, len(query), len(reference)


def explain(
    a: Path,
    b: Path,
    out: Path,
    *,
    settings: Settings | None = None,
    prefer_triton: bool = True,
    repo: Path = EMBEDDER_REPO,
) -> Explanation:
    """Write the explanation of why ``a`` and ``b`` match (or not) to ``out`` (.png, or .html with the PNG inline)."""
    result, picture, notes = explain_pair(
        a.read_bytes(), b.read_bytes(), str(a), str(b), settings=settings, prefer_triton=prefer_triton, repo=repo
    )
    result.out = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".html", ".htm"):
        out.write_text(to_html(result, picture, notes))
    else:
        picture.save(out, format="PNG", optimize=True)
    return result


def explanation_png(a: bytes, b: bytes) -> bytes:
    """The reviewer page's "why does it match" view (``SIEVE_REVIEWER_EXPLAIN_VIEW``): upload vs neighbour."""
    _, picture, _ = explain_pair(a, b, "upload", "neighbour")
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def aligned_png(data: bytes) -> bytes | None:
    """The reviewer page's aligned view (``SIEVE_REVIEWER_ALIGNED_VIEW``): the STN's canonical pose of one image.

    None when the newest version has no spatial transformer (the page then hides the figure, rather than
    showing the input again as if it were a warp).
    """
    from services.tools.gradcam import aligned_view, anatomy_of  # torch: the page says what to install without it

    version = latest_version(EMBEDDER_REPO)
    decoded, _ = _decode(data)
    view = aligned_view(anatomy_of(version, EMBEDDER_REPO, f"{EMBEDDER_REPO.name}:{version}"), decoded.pixels)
    if view is None:
        return None
    buf = io.BytesIO()
    Image.fromarray(view).save(buf, format="PNG")
    return buf.getvalue()


def network_evidence(pixels: NDArray[np.uint8], version: int, repo: Path, local_name: str) -> PairEvidence:
    """Grad-CAM and the warp where torch is installed; else the served artifact's cosine alone (ONNX in process),
    and the picture says what is missing."""
    try:
        from services.tools.gradcam import anatomy_of, pair_evidence
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "torch":
            raise
        embeddings = load_serving(version, repo)(pixels).astype(np.float64)
        embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        return PairEvidence.without_network(float(embeddings[0] @ embeddings[1]))
    return pair_evidence(anatomy_of(version, repo, local_name), pixels)


def explain_pair(
    data_a: bytes,
    data_b: bytes,
    name_a: str,
    name_b: str,
    *,
    settings: Settings | None = None,
    prefer_triton: bool = True,
    repo: Path = EMBEDDER_REPO,
) -> tuple[Explanation, Image.Image, list[str]]:
    """The numbers, the picture and its notes for one pair of encoded images; writes nothing."""
    from services.tools.dedup import moderator_threshold

    settings = settings or Settings()
    decoded = [_decode(data_a, settings.verify.detail_side), _decode(data_b, settings.verify.detail_side)]
    pixels = np.stack([d.pixels for d, _ in decoded]).astype(np.uint8)
    version = latest_version(repo)
    local_name = f"{repo.name}:{version}"
    evidence = network_evidence(pixels, version, repo, local_name)
    served = served_view(pixels, settings, prefer_triton, local_name)
    similarity = served.similarity if served.similarity is not None else evidence.similarity
    threshold, source = moderator_threshold(served.model_version, settings.decision)
    cfg = settings.decision.model_copy(update={"duplicate_threshold": threshold})
    notes: list[str] = []
    if evidence.stn_note:
        notes.append(evidence.stn_note)
    if served.model_version != local_name:
        notes.append(
            f"Triton answered with {served.model_version}; the warp and heat maps come from {local_name}, the newest "
            "version in model_repo (Triton has not loaded it yet)."
        )
    card = model_card_threshold(served.model_version, repo)
    if card is not None and abs(card - cfg.duplicate_threshold) > 1e-6:
        notes.append(
            f"{served.model_version}'s model card calibrates its threshold at {card:.3f}; the moderator uses "
            f"{cfg.duplicate_threshold:.3f} for it ({source})."
        )
    notes.append(f"classifier: {served.classifier_source}")
    geometry, mirrored, keypoints_a, keypoints_b = keypoint_match(decoded[0][0], decoded[1][0], settings)
    vcfg = settings.verify
    score = Verifier(vcfg).score(similarity, geometry.inliers, keypoints_a, keypoints_b)
    missed = geometry.inliers <= vcfg.inlier_floor and min(keypoints_a, keypoints_b) >= vcfg.miss_min_keypoints
    notes.append(
        f"verification: {geometry.inliers} {vcfg.kind.upper()} keypoint matches agree on one homography"
        + (" (with A mirrored)" if mirrored else "")
        + f"; inliers above {vcfg.inlier_floor} add up to {vcfg.weight} to the cosine (saturating at "
        f"{vcfg.inlier_cap})"
        + (
            f"; none found between two images with {keypoints_a} and {keypoints_b} keypoints costs {vcfg.miss_penalty}"
            if missed
            else ""
        )
        + f": score {score:.3f}."
    )
    result = Explanation(
        a=name_a,
        b=name_b,
        out="",
        model_version=served.model_version,
        backend=served.backend,
        similarity=round(similarity, 6),
        local_similarity=round(evidence.similarity, 6),
        verdict=band_of(score, cfg),
        duplicate_threshold=cfg.duplicate_threshold,
        review_margin=cfg.review_margin,
        card_threshold=card,
        stn=evidence.stn,
        stn_note=evidence.stn_note,
        pose=None if evidence.theta is None else [pose_of(t) for t in evidence.theta],
        heat_peak=[round(p, 6) for p in evidence.heat_peak or []],
        heat_std=[] if evidence.heat_input is None else [round(float(h.std()), 4) for h in evidence.heat_input],
        scores=served.scores,
        classifier_source=served.classifier_source,
        flag_threshold=cfg.flag_threshold,
        flag_review_low=cfg.flag_review_low,
        stn_flags=evidence.stn_flags,
        sizes=[f"{w}x{h} {d.format}" for d, (w, h) in decoded],
        inliers=geometry.inliers,
        mirrored=mirrored,
        score=round(score, 6),
    )
    picture = render(result, pixels, evidence, notes)
    details = [d.detail for d, _ in decoded]
    if details[0] is not None and details[1] is not None:
        picture = _stacked(picture, keypoint_panel(details[0], details[1], geometry, mirrored, picture.width))
    return result, picture, notes


def keypoint_panel(
    a: NDArray[np.uint8], b: NDArray[np.uint8], geometry: GeometricMatch, mirrored: bool, width: int
) -> Image.Image:
    """A beside B at the verification's resolution, a line per inlier: where the copy's pixels came from."""
    height = 300
    views = []
    for gray in (a[:, ::-1] if mirrored else a, b):
        img = Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")
        views.append((img.resize((max(1, round(img.width * height / img.height)), height)), height / img.height))
    title_h = 28
    canvas = Image.new("RGB", (max(width, views[0][0].width + views[1][0].width + 3 * PAD), height + title_h + PAD))
    canvas.paste((255, 255, 255), (0, 0, canvas.width, canvas.height))
    draw = ImageDraw.Draw(canvas)
    title = f"keypoint verification: {geometry.inliers} inliers" + (" (A mirrored)" if mirrored else "")
    draw.text((PAD, 6), title, fill=INK, font=_font(14, bold=True))
    xa, xb, y0 = PAD, 2 * PAD + views[0][0].width, title_h
    canvas.paste(views[0][0], (xa, y0))
    canvas.paste(views[1][0], (xb, y0))
    a_width = a.shape[1]
    for (qx, qy), (rx, ry) in zip(geometry.query_points, geometry.reference_points, strict=True):
        qx = a_width - 1 - qx if mirrored else qx  # mirrored features were found on the flipped A, drawn flipped
        p = (xa + qx * views[0][1], y0 + qy * views[0][1])
        r = (xb + rx * views[1][1], y0 + ry * views[1][1])
        draw.line((p, r), fill=(40, 200, 90), width=1)
        for x, y in (p, r):
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), outline=(255, 214, 0))
    return canvas


def _stacked(top: Image.Image, bottom: Image.Image) -> Image.Image:
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), (255, 255, 255))
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out


# ------------------------------------------------------------------------------------------------- drawing

PAD = 14
PANEL = 256
LABEL_W = 34
INK = (30, 30, 30)
MUTED = (110, 110, 110)
ZONES = {  # colours of the similarity bar's zones, as the moderator reads them
    "no match": (198, 226, 200),
    "review": (252, 220, 150),
    "duplicate + review": (247, 178, 120),
    "duplicate": (232, 120, 110),
}
# Anchors of a perceptually ordered dark-to-bright map (close to matplotlib's "inferno"), so no extra dependency.
_ANCHORS = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


def _lut() -> NDArray[np.uint8]:
    pos = np.linspace(0.0, 1.0, len(_ANCHORS))
    xs = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(xs, pos, _ANCHORS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


LUT = _lut()


def overlay(image: NDArray[np.uint8], heat: NDArray[np.float32]) -> Image.Image:
    """Heat on top of the image; weak heat lets the photo show through so the regions stay recognisable."""
    if heat.shape != image.shape[:2]:
        heat = (
            np.asarray(
                Image.fromarray((heat * 255).astype(np.uint8)).resize(
                    (image.shape[1], image.shape[0]), Image.Resampling.BILINEAR
                ),
                dtype=np.float32,
            )
            / 255.0
        )
    colour = LUT[(np.clip(heat, 0, 1) * 255).astype(np.uint8)].astype(np.float32)
    alpha = (0.25 + 0.6 * np.clip(heat, 0, 1))[..., None]
    grey = image.astype(np.float32).mean(axis=2, keepdims=True) * 0.55  # desaturated base: the colour is the heat
    mixed = grey * (1 - alpha) + colour * alpha
    return Image.fromarray(mixed.clip(0, 255).astype(np.uint8))


def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    if path.exists():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=font) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def _placeholder(text: str) -> Image.Image:
    panel = Image.new("RGB", (PANEL, PANEL), (236, 236, 236))
    draw = ImageDraw.Draw(panel)
    font = _font(13)
    lines = _wrap(draw, text, font, PANEL - 24)
    y = (PANEL - 18 * len(lines)) // 2
    for line in lines:
        draw.text((12, y), line, fill=MUTED, font=font)
        y += 18
    return panel


def _quad(theta: NDArray[np.float32], size: int) -> list[tuple[float, float]]:
    """The input region the STN samples: the output's corners pushed through θ (normalised -> pixels)."""
    corners = np.array([[-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1]], dtype=np.float64)
    pts = corners @ theta.astype(np.float64).T
    return [((x + 1) / 2 * size, (y + 1) / 2 * size) for x, y in pts]


def render(result: Explanation, pixels: NDArray[np.uint8], ev: PairEvidence, notes: list[str]) -> Image.Image:
    """One picture: a row per image (input, warp, heat), then the similarity bar, the scores and the notes."""
    columns: list[str] = ["input as decoded (256x256)"]
    if ev.heat_input is None:
        columns += ["spatial transformer and Grad-CAM"]
    elif result.stn:
        columns += ["STN warped view", "Grad-CAM on the warped view", "Grad-CAM back on the input"]
    else:
        columns += ["spatial transformer", "Grad-CAM of cos(A, B)"]
    width = LABEL_W + len(columns) * (PANEL + PAD) + PAD
    width = max(width, 900)
    bar_h, scores_h = 120, 40 + 30 * max(1, len(result.scores[0]) + len((result.stn_flags or [{}])[0]))
    header_h, col_h, caption_h = 78, 22, 22
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    note_lines = [line for n in notes for line in _wrap(probe, "• " + n, _font(12), width - 2 * PAD)]
    notes_h = 16 * len(note_lines) + PAD
    height = header_h + col_h + 2 * (PANEL + caption_h + PAD) + bar_h + scores_h + notes_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    verdict_colour = ZONES["duplicate"] if result.verdict.startswith("duplicate") else ZONES["no match"]
    if "review" in result.verdict:
        verdict_colour = ZONES["review"]
    draw.rectangle((0, 0, width, header_h - 10), fill=tuple(int(c * 0.35 + 255 * 0.65) for c in verdict_colour))
    headline = f"cosine {result.similarity:.3f} + {result.inliers} inliers = {result.score:.3f}  →  {result.verdict}"
    draw.text((PAD, 8), headline, fill=INK, font=_font(22, bold=True))
    sub = f"{result.model_version} via {result.backend}   ·   A: {Path(result.a).name}   ·   B: {Path(result.b).name}"
    draw.text((PAD, 40), sub, fill=MUTED, font=_font(13))
    card = result.card_threshold
    if card is not None and (result.score >= card) != (result.score >= result.duplicate_threshold):
        side = "above" if result.score >= card else "below"
        remark = f"({side} the version's calibrated {card:.3f})"
        title_w = draw.textlength(headline, font=_font(22, bold=True))
        draw.text((PAD + title_w + 12, 14), remark, fill=(60, 60, 200), font=_font(14, bold=True))

    y = header_h
    for i, title in enumerate(columns):
        draw.text((LABEL_W + PAD + i * (PANEL + PAD), y), title, fill=INK, font=_font(12, bold=True))
    y += col_h
    for row in range(2):
        draw.text((10, y + PANEL // 2 - 12), "AB"[row], fill=INK, font=_font(20, bold=True))
        panels: list[tuple[Image.Image, str]] = []
        inp = Image.fromarray(pixels[row])
        if ev.theta is not None:
            ImageDraw.Draw(inp).polygon(_quad(ev.theta[row], PANEL), outline=(255, 214, 0), width=2)
        panels.append((inp, result.sizes[row] + ("  (yellow: STN window)" if ev.theta is not None else "")))
        if ev.heat_input is None or ev.heat_view is None:
            panels.append((_placeholder(result.stn_note), "not drawn in this install"))
        elif result.stn and ev.warped is not None and result.pose is not None:
            pose = result.pose[row]
            caption = f"rot {pose['rotation_deg']:+.1f}°  scale {pose['scale']:.2f}  " + (
                f"shift {pose['shift_x']:+.2f},{pose['shift_y']:+.2f}"
            )
            panels.append((Image.fromarray(ev.warped[row]), caption))
            view = np.asarray(Image.fromarray(ev.warped[row]).resize((PANEL, PANEL)), dtype=np.uint8)
            panels.append((overlay(view, ev.heat_view[row]), f"peak {result.heat_peak[row]:.3g}"))
            panels.append((overlay(pixels[row], ev.heat_input[row]), "bright = drives the match"))
        else:
            panels.append((_placeholder(result.stn_note or "no spatial transformer"), "no warp in this version"))
            panels.append(
                (
                    overlay(pixels[row], ev.heat_input[row]),
                    f"bright = drives the match (peak {result.heat_peak[row]:.3g})",
                )
            )
        for i, (img, caption) in enumerate(panels):
            x = LABEL_W + PAD + i * (PANEL + PAD)
            canvas.paste(img.resize((PANEL, PANEL)), (x, y))
            draw.text((x, y + PANEL + 4), caption, fill=MUTED, font=_font(11))
        y += PANEL + caption_h + PAD

    _similarity_bar(draw, result, PAD, y, width - 2 * PAD)
    y += bar_h
    y = _score_rows(draw, result, PAD, y, width - 2 * PAD)
    for line in note_lines:
        draw.text((PAD, y), line, fill=MUTED, font=_font(12))
        y += 16
    return canvas


def _similarity_bar(draw: ImageDraw.ImageDraw, r: Explanation, x0: int, y0: int, w: int) -> None:
    """The score on a bar whose zones are the moderator's: no match, review band, duplicate."""
    thr, margin = r.duplicate_threshold, r.review_margin
    lo = min(0.5, math.floor((min(r.score, thr - margin) - 0.05) * 10) / 10)
    lo = max(lo, -1.0)
    draw.text((x0, y0), "similarity against the moderator's thresholds", fill=INK, font=_font(13, bold=True))
    top, bottom = y0 + 26, y0 + 58
    left, right = x0 + 10, x0 + w - 10

    def px(v: float) -> float:
        return left + (min(max(v, lo), 1.0) - lo) / (1.0 - lo) * (right - left)

    spans = [
        (lo, thr - margin, "no match"),
        (thr - margin, thr, "review"),
        (thr, thr + margin, "duplicate + review"),
        (thr + margin, 1.0, "duplicate"),
    ]
    for a, b, name in spans:
        if b > a:
            draw.rectangle((px(a), top, px(b), bottom), fill=ZONES[name])
    draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
    small = _font(11)
    for tick in np.arange(math.ceil(lo * 10) / 10, 1.0001, 0.1):
        draw.line((px(tick), bottom, px(tick), bottom + 4), fill=MUTED)
        draw.text((px(tick) - 10, bottom + 5), f"{tick:.1f}", fill=MUTED, font=small)
    draw.line((px(thr), top - 4, px(thr), bottom + 4), fill=INK, width=2)

    def beside(x: float, label: str) -> float:
        """Left of its marker, or right of it where the left would run off the picture."""
        width = draw.textlength(label, font=small)
        return x - width - 6 if x - width - 6 >= x0 else x + 6

    label = f"duplicate threshold for {r.model_version}: {thr:.3g}  (review band ±{margin:.2f})"
    draw.text((beside(px(thr), label), top - 16), label, fill=INK, font=small)
    if r.card_threshold is not None and abs(r.card_threshold - thr) > 1e-6:
        card_x = px(r.card_threshold)
        draw.line((card_x, top - 4, card_x, bottom + 4), fill=(60, 60, 200), width=2)
        label = f"{r.model_version} model card {r.card_threshold:.3f}"
        draw.text((beside(card_x, label), top - 30), label, fill=(60, 60, 200), font=small)
    s = px(r.score)
    draw.polygon([(s - 8, bottom + 22), (s + 8, bottom + 22), (s, bottom + 4)], fill=INK)
    draw.text((s - 20, bottom + 24), f"{r.score:.3f}", fill=INK, font=_font(13, bold=True))
    legend_x = x0 + 10
    for name, colour in ZONES.items():
        draw.rectangle((legend_x, y0 + 100, legend_x + 12, y0 + 112), fill=colour)
        draw.text((legend_x + 16, y0 + 99), name, fill=MUTED, font=small)
        legend_x += int(draw.textlength(name, font=small)) + 40


def _score_rows(draw: ImageDraw.ImageDraw, r: Explanation, x0: int, y0: int, w: int) -> int:
    """Per category, A and B side by side on 0..1 bars with the review band and the flag threshold marked."""
    small = _font(11)
    draw.text((x0, y0 + 8), "classifier scores", fill=INK, font=_font(13, bold=True))
    band = f"[{r.flag_review_low:.2f}, {r.flag_threshold:.2f})"
    legend = f"amber: review band {band}   red: flagged (≥ {r.flag_threshold:.2f})"
    draw.text((x0 + 160, y0 + 10), legend, fill=MUTED, font=small)
    y = y0 + 32
    rows: list[tuple[str, float | None, float | None, bool]] = []
    for cat in r.scores[0] or {}:
        rows.append((cat, r.scores[0].get(cat), r.scores[1].get(cat), True))
    if not r.scores[0]:
        rows.append(("(classifier skipped)", None, None, True))
    if r.stn_flags:
        for cat in r.stn_flags[0]:
            rows.append((f"{cat} · embedder flag head", r.stn_flags[0][cat], r.stn_flags[1][cat], False))
    name_w, text_w, gap = 230, 60, 24
    bar_w = (w - name_w - 2 * (text_w + gap)) // 2
    for name, sa, sb, served in rows:
        draw.text((x0, y + 1), name, fill=INK if served else MUTED, font=small)
        for k, score in enumerate((sa, sb)):
            left = x0 + name_w + k * (bar_w + text_w + gap)
            draw.rectangle((left, y, left + bar_w, y + 14), fill=(240, 240, 240), outline=(200, 200, 200))
            if served:
                low, high = left + r.flag_review_low * bar_w, left + r.flag_threshold * bar_w
                draw.rectangle((low, y + 1, high, y + 13), fill=ZONES["review"])
                draw.rectangle((high, y + 1, left + bar_w - 1, y + 13), fill=ZONES["duplicate"])
            if score is not None:
                draw.rectangle((left, y + 4, left + max(2.0, score * bar_w), y + 10), fill=INK)
                draw.text((left + bar_w + 6, y + 1), f"{'AB'[k]} {score:.3f}", fill=INK, font=small)
        y += 22
    if r.stn_flags:
        draw.text(
            (x0, y),
            "grey rows: the v2 embedder's own flag head (informational, not used in verdicts)",
            fill=MUTED,
            font=small,
        )
        y += 16
    return y + 8


def to_html(result: Explanation, picture: Image.Image, notes: list[str]) -> str:
    """A single file a reviewer can open or attach: the picture inline (JPEG, so it stays small) and the numbers."""
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode()
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(json.dumps(v))}</code></td></tr>"
        for k, v in result.to_json().items()
    )
    note_items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        "<!doctype html><meta charset='utf-8'><title>sieve explain</title>"
        "<style>body{font:14px sans-serif;margin:20px}td,th{text-align:left;padding:2px 8px;vertical-align:top}"
        "img{max-width:100%}</style>"
        f"<h1>{html.escape(Path(result.a).name)} vs {html.escape(Path(result.b).name)}: "
        f"{result.similarity:.3f}, {html.escape(result.verdict)}</h1>"
        f"<img alt='explanation' src='data:image/jpeg;base64,{data}'><ul>{note_items}</ul><table>{rows}</table>"
    )
