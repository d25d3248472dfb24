"""A self-contained HTML report (inline SVG and base64 thumbnails, no plotting dependency).

It shows what the JSON cannot: PR curves per method, how duplicate and non-duplicate similarities overlap
around the chosen threshold, what the spatial transformer actually does to inputs, and how the embedding space
clusters (t-SNE via scikit-learn when installed, else PCA, and the page says which).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from services.evaluation.benchmark import Benchmark
from services.evaluation.metrics import precision_recall, predictions

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
W, H, PAD = 460, 300, 44


def _axes(
    title: str, xlabel: str, ylabel: str, x_range: tuple[float, float], y_range: tuple[float, float]
) -> list[str]:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
        f'<text x="{W / 2}" y="14" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{PAD}" y="{PAD / 2}" width="{W - 1.5 * PAD}" height="{H - 1.5 * PAD}" fill="none" stroke="#999"/>',
        f'<text x="{W / 2}" y="{H - 6}" text-anchor="middle">{html.escape(xlabel)}</text>',
        f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">'
        f"{html.escape(ylabel)}</text>",
    ]
    for i in range(5):
        fx = x_range[0] + (x_range[1] - x_range[0]) * i / 4
        fy = y_range[0] + (y_range[1] - y_range[0]) * i / 4
        px, py = _px(fx, x_range), _py(fy, y_range)
        parts.append(f'<text x="{px:.1f}" y="{H - PAD + 14}" text-anchor="middle">{fx:.2f}</text>')
        parts.append(f'<text x="{PAD - 4}" y="{py + 4:.1f}" text-anchor="end">{fy:.2f}</text>')
    return parts


def _px(x: float, rng: tuple[float, float]) -> float:
    return PAD + (x - rng[0]) / max(rng[1] - rng[0], 1e-12) * (W - 1.5 * PAD)


def _py(y: float, rng: tuple[float, float]) -> float:
    return H - PAD - (y - rng[0]) / max(rng[1] - rng[0], 1e-12) * (H - 1.5 * PAD)


def _legend(names: Sequence[str], x: float = PAD + 8, y: float = PAD / 2 + 12) -> list[str]:
    out = []
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        out.append(f'<rect x="{x}" y="{y + 13 * i - 8}" width="10" height="3" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="{y + 13 * i - 4}">{html.escape(name)}</text>')
    return out


def pr_curves_svg(curves: dict[str, tuple[NDArray[Any], NDArray[Any]]], title: str) -> str:
    parts = _axes(title, "recall", "precision", (0, 1), (0, 1))
    for i, (_name, (precision, recall)) in enumerate(curves.items()):
        pts = " ".join(
            f"{_px(float(r), (0, 1)):.1f},{_py(float(p), (0, 1)):.1f}" for p, r in zip(precision, recall, strict=True)
        )
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="1.6"/>')
    parts += _legend(list(curves), x=W - 170, y=H - PAD - 13 * len(curves))
    return "\n".join([*parts, "</svg>"])


def histogram_svg(dup: NDArray[Any], non_dup: NDArray[Any], threshold: float, title: str) -> str:
    lo = float(min(dup.min(initial=1.0), non_dup.min(initial=1.0)))
    lo = min(lo, threshold) - 0.02
    bins = np.linspace(lo, 1.0, 41)
    h_dup, _ = np.histogram(dup, bins)
    h_non, _ = np.histogram(non_dup, bins)
    d_dup = h_dup / max(h_dup.sum(), 1)
    d_non = h_non / max(h_non.sum(), 1)
    top = float(max(d_dup.max(initial=0), d_non.max(initial=0), 1e-6)) * 1.1
    parts = _axes(title, "similarity", "fraction of pairs", (lo, 1.0), (0, top))
    for i, dens in enumerate((d_dup, d_non)):
        colour = PALETTE[i]
        for b in range(len(dens)):
            x0, x1 = _px(bins[b], (lo, 1.0)), _px(bins[b + 1], (lo, 1.0))
            y = _py(float(dens[b]), (0, top))
            parts.append(
                f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" '
                f'height="{H - PAD - y:.1f}" fill="{colour}" fill-opacity="0.45"/>'
            )
    tx = _px(threshold, (lo, 1.0))
    parts.append(
        f'<line x1="{tx:.1f}" y1="{PAD / 2}" x2="{tx:.1f}" y2="{H - PAD}" stroke="#000" stroke-dasharray="4"/>'
    )
    parts.append(f'<text x="{tx + 3:.1f}" y="{PAD / 2 + 10}">threshold {threshold:.3f}</text>')
    parts += _legend(["duplicate pair", "best non-duplicate match"])
    return "\n".join([*parts, "</svg>"])


def scatter_svg(points: NDArray[Any], labels: Sequence[int], title: str) -> str:
    x_range = (float(points[:, 0].min()), float(points[:, 0].max()))
    y_range = (float(points[:, 1].min()), float(points[:, 1].max()))
    parts = _axes(title, "component 1", "component 2", x_range, y_range)
    for (x, y), label in zip(points, labels, strict=True):
        colour = "#bbbbbb" if label < 0 else PALETTE[label % len(PALETTE)]
        shape = "circle"
        parts.append(f'<{shape} cx="{_px(x, x_range):.1f}" cy="{_py(y, y_range):.1f}" r="3" fill="{colour}"/>')
    return "\n".join([*parts, "</svg>"])


def thumbnail(pixels: NDArray[np.uint8], side: int = 112) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def embed_2d(embeddings: NDArray[Any], seed: int = 0) -> tuple[NDArray[Any], str]:
    try:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(5, len(embeddings) // 4)))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine")
        return np.asarray(tsne.fit_transform(embeddings)), "t-SNE (scikit-learn)"
    except ImportError:
        centred = embeddings - embeddings.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T, "PCA (scikit-learn not installed, so not t-SNE)"


def write_report(
    path: Path,
    results: dict[str, Any],
    similarities: dict[str, NDArray[Any]],
    thresholds: dict[str, float],
    bench: Benchmark,
    aligned: list[tuple[str, NDArray[np.uint8], NDArray[np.uint8], NDArray[Any]]],
    tsne_points: NDArray[Any] | None,
    tsne_labels: Sequence[int],
    tsne_method: str,
    focus: str,
) -> Path:
    truth = bench.truth_index()
    has = truth >= 0
    sections: list[str] = []
    curves = {}
    for name, sim in similarities.items():
        precision, recall, _ = precision_recall(predictions(sim, truth, k=10))
        curves[name] = (np.r_[1.0, precision], np.r_[0.0, recall])
    sections.append("<h2>Precision-recall (all families, top-10 predictions per query)</h2>")
    sections.append(pr_curves_svg(curves, "held-out benchmark"))
    families = np.asarray(bench.query_families)
    fam_curves = {}
    for family in dict.fromkeys(bench.query_families):
        rows = families == family
        sim = similarities[focus][rows]
        precision, recall, _ = precision_recall(predictions(sim, truth[rows], k=10))
        fam_curves[family] = (np.r_[1.0, precision], np.r_[0.0, recall])
    sections.append(pr_curves_svg(fam_curves, f"{focus}: per family"))

    sections.append("<h2>Similarity of duplicate pairs against the best non-duplicate match</h2>")
    for name, sim in similarities.items():
        dup = sim[np.arange(len(truth))[has], truth[has]]
        masked = sim.copy()
        masked[np.arange(len(truth))[has], truth[has]] = -np.inf
        hardest = masked.max(axis=1)
        sections.append(histogram_svg(dup, hardest, thresholds[name], name))

    if aligned:
        sections.append("<h2>Spatial transformer: input → warped (the reviewers' aligned view)</h2><table><tr>")
        for i, (label, before, after, theta) in enumerate(aligned):
            if i and i % 4 == 0:
                sections.append("</tr><tr>")
            theta_txt = html.escape(np.array2string(np.asarray(theta), precision=2, suppress_small=True))
            sections.append(
                f'<td><img src="{thumbnail(before)}"> → <img src="{thumbnail(after)}"><br>'
                f"<small>{html.escape(label)}<br><code>{theta_txt}</code></small></td>"
            )
        sections.append("</tr></table>")

    if tsne_points is not None:
        sections.append(f"<h2>Embedding space of {html.escape(focus)}: {html.escape(tsne_method)}</h2>")
        sections.append("<p>Colours: one reference and its copies; grey: distractor queries.</p>")
        sections.append(scatter_svg(tsne_points, tsne_labels, tsne_method))

    rows = []
    metric_names = ("micro_ap", "recall_at_p90", "top1_accuracy", "precision", "recall", "f1", "roc_auc")
    for name, res in results["methods"].items():
        o = res["overall"]
        cells = "".join(f"<td>{o[m]:.3f}</td>" for m in metric_names)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}<td>{res['threshold']:.3f}</td></tr>")
    head = "".join(f"<th>{m}</th>" for m in metric_names)
    table = f"<table border=1 cellpadding=4><tr><th>method</th>{head}<th>threshold</th></tr>{''.join(rows)}</table>"
    fam_rows = []
    for name, res in results["methods"].items():
        cells = "".join(
            f"<td>{res['per_family'][f]['micro_ap']:.3f} / {res['per_family'][f]['f1']:.3f}</td>"
            for f in res["per_family"]
        )
        fam_rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    first = next(iter(results["methods"].values()))
    fam_head = "".join(f"<th>{html.escape(f)}</th>" for f in first["per_family"])
    fam_table = (
        f"<h3>Per family: µAP / F1</h3><table border=1 cellpadding=4><tr><th>method</th>{fam_head}</tr>"
        f"{''.join(fam_rows)}</table>"
    )
    claims = html.escape(str(results.get("paper_claims", "")))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Sieve copy-detection benchmark</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1100px}} svg{{margin:6px}} td img{{vertical-align:middle}}
table{{border-collapse:collapse}}</style></head><body>
<h1>Sieve copy-detection benchmark</h1>
<p>Held-out benchmark: {html.escape(str(bench.meta))}</p>
{table}{fam_table}<p><small>Paper claims for comparison: {claims}</small></p>
{"".join(sections)}
</body></html>"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
