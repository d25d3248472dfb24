import io
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from services.common.config import DecodeSettings
from services.common.errors import BadInput
from services.common.imaging import decode_image
from services.common.schemas import ErrorKind

DATA = Path(skimage.__file__).parent / "data"
CFG = DecodeSettings()


def _photo() -> Image.Image:
    return Image.open(DATA / "chelsea.png").convert("RGB")  # a real photo of a cat, 451x300


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_jpeg_decodes_to_fixed_rgb_tensor() -> None:
    out = decode_image(_encode(_photo(), "JPEG"), CFG, 256)
    assert out.pixels.shape == (256, 256, 3) and out.pixels.dtype == np.uint8
    assert (out.width, out.height) == (451, 300)
    assert out.pixels.std() > 10


def test_exif_orientation_is_applied() -> None:
    photo = _photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    rotated_bytes = _encode(photo, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(rotated_bytes, CFG, 256)
    assert (out.width, out.height) == (300, 451)
    upright = decode_image(_encode(photo.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95), CFG, 256)
    diff = np.abs(out.pixels.astype(int) - upright.pixels.astype(int)).mean()
    assert diff < 6


def test_truncated_jpeg_is_corrupt() -> None:
    data = _encode(_photo(), "JPEG")
    with pytest.raises(BadInput) as err:
        decode_image(data[: len(data) // 3], CFG)
    assert err.value.kind is ErrorKind.CORRUPT_IMAGE


def test_zero_bytes() -> None:
    with pytest.raises(BadInput) as err:
        decode_image(b"", CFG)
    assert err.value.kind is ErrorKind.CORRUPT_IMAGE


def test_non_image_is_unsupported() -> None:
    with pytest.raises(BadInput) as err:
        decode_image(b"%PDF-1.4 this is a document, not an image" * 10, CFG)
    assert err.value.kind is ErrorKind.UNSUPPORTED_FORMAT


def test_svg_is_not_allowed() -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    with pytest.raises(BadInput) as err:
        decode_image(svg, CFG)
    assert err.value.kind is ErrorKind.UNSUPPORTED_FORMAT


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = _encode(Image.new("1", (20000, 20000)), "PNG")  # tiny file, 400 megapixel canvas
    assert len(bomb) < 200_000
    with pytest.raises(BadInput) as err:
        decode_image(bomb, CFG)
    assert err.value.kind is ErrorKind.DECOMPRESSION_BOMB


def test_cmyk_and_16_bit_are_converted() -> None:
    cmyk = decode_image(_encode(_photo().convert("CMYK"), "JPEG"), CFG, 64)
    assert cmyk.pixels.shape == (64, 64, 3)
    gray16 = np.asarray(_photo().convert("L"), dtype=np.uint16) * 256
    png16 = _encode(Image.fromarray(gray16), "PNG")
    out = decode_image(png16, CFG, 64)
    assert out.pixels.shape == (64, 64, 3) and out.pixels.std() > 10


def test_animated_gif_uses_first_frame() -> None:
    frames = [_photo(), _photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = decode_image(gif.getvalue(), CFG, 64)
    first = decode_image(_encode(frames[0].convert("P").convert("RGB"), "PNG"), CFG, 64)
    assert np.abs(out.pixels.astype(int) - first.pixels.astype(int)).mean() < 8


def test_disallowed_format_by_configuration() -> None:
    with pytest.raises(BadInput) as err:
        decode_image(_encode(_photo(), "BMP"), DecodeSettings(allowed_formats=["JPEG"]))
    assert err.value.kind is ErrorKind.UNSUPPORTED_FORMAT
