"""A corpus of hostile and awkward inputs, built from a real photo: what attackers and broken clients send."""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Case:
    key: str
    value: bytes  # the raw Kafka message value
    expect: str  # "verdict", or the DLQ error kind


def _event(upload_id: str, uri: str, **extra: object) -> bytes:
    body: dict[str, object] = {
        "event_id": uuid.uuid4().hex,
        "upload_id": upload_id,
        "user_id": "attacker",
        "image_uri": uri,
        "created_at": datetime.now(UTC).isoformat(),
    }
    body.update(extra)
    return json.dumps(body).encode()


def _save(img: Image.Image, path: Path, fmt: str, **kw: object) -> Path:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    path.write_bytes(buf.getvalue())
    return path


def build_corpus(photo: Image.Image, folder: Path, http_base: str) -> list[Case]:
    """Image files under ``folder``; ``http_base`` is a loopback server the test runs (refused unless allowed)."""
    photo = photo.convert("RGB")
    files: dict[str, tuple[Path, str]] = {}
    jpeg = _save(photo, folder / "photo.jpg", "JPEG", quality=90)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 3])
    files["truncated"] = (truncated, "corrupt_image")
    (folder / "zero.jpg").write_bytes(b"")
    files["zero-bytes"] = (folder / "zero.jpg", "corrupt_image")
    files["bomb"] = (_save(Image.new("1", (30000, 30000)), folder / "bomb.png", "PNG"), "decompression_bomb")
    huge = folder / "huge.jpg"
    with huge.open("wb") as fh:
        fh.write(jpeg.read_bytes())
        fh.seek(100 * 1024 * 1024)
        fh.write(b"\0")
    files["100mb"] = (huge, "too_large")
    files["png-named-jpg"] = (_save(photo, folder / "really_a_png.jpg", "PNG"), "verdict")
    text = folder / "text.jpg"
    text.write_bytes(b"GIF89a? no: a text file pretending to be an image\n" * 20)
    files["text-named-jpg"] = (text, "unsupported_format")
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    files["animated-gif"] = (
        _save(frames[0], folder / "anim.gif", "GIF", save_all=True, append_images=frames[1:], duration=80),
        "verdict",
    )
    files["animated-webp"] = (
        _save(frames[0], folder / "anim.webp", "WEBP", save_all=True, append_images=frames[1:], duration=80),
        "verdict",
    )
    files["cmyk"] = (_save(photo.convert("CMYK"), folder / "cmyk.jpg", "JPEG"), "verdict")
    gray16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    files["16-bit"] = (_save(Image.fromarray(gray16), folder / "gray16.png", "PNG"), "verdict")
    exif = Image.Exif()
    exif[0x0112] = 6
    files["exif-rotated"] = (_save(photo, folder / "rotated.jpg", "JPEG", exif=exif.tobytes()), "verdict")
    svg = folder / "vector.svg"
    svg.write_bytes(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><circle r="4"/></svg>')
    files["svg"] = (svg, "unsupported_format")

    cases = [Case(key, _event(f"h-{key}", path.as_uri()), expect) for key, (path, expect) in files.items()]
    cases += [
        Case("malformed-json", b'{"event_id": "e", "upload_id": "h-malformed", ', "malformed_event"),
        Case("not-json", b"\x89PNG\r\n\x1a\n binary garbage", "malformed_event"),
        Case("schema-violation", json.dumps({"event_id": "e", "upload_id": 5}).encode(), "schema_violation"),
        Case(
            "huge-metadata", _event("h-huge-metadata", jpeg.as_uri(), metadata={"x": "y" * 100_000}), "schema_violation"
        ),
        Case("etc-passwd", _event("h-etc-passwd", "file:///etc/passwd"), "fetch_refused"),
        Case("loopback", _event("h-loopback", f"{http_base}/photo.jpg"), "fetch_refused"),
        Case("metadata-service", _event("h-metadata", "http://169.254.169.254/latest/meta-data/"), "fetch_refused"),
        Case("private-10", _event("h-private-10", "http://10.0.0.1/a.jpg"), "fetch_refused"),
        Case("private-192", _event("h-private-192", "http://192.168.1.1/a.jpg"), "fetch_refused"),
        Case("gopher", _event("h-gopher", "gopher://example.com/a.jpg"), "fetch_refused"),
    ]
    return cases
