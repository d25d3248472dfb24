from pathlib import Path

import numpy as np
import skimage
from PIL import Image

from services.common.config import DecodeSettings
from services.common.hashing import hamming, informative_phash, phash_hex
from services.common.imaging import decode_image
from services.common.transforms import encode_jpeg, jpeg, resize

DATA = Path(skimage.__file__).parent / "data"


def _hash(img: Image.Image) -> str:
    return phash_hex(decode_image(encode_jpeg(img), DecodeSettings(), 256).pixels)


def test_phash_survives_reencoding_but_separates_photos() -> None:
    cat = Image.open(DATA / "chelsea.png").convert("RGB")
    coffee = Image.open(DATA / "coffee.png").convert("RGB")
    base = _hash(cat)
    assert hamming(base, _hash(jpeg(40)(cat))) <= 6
    assert hamming(base, _hash(resize(0.5)(cat))) <= 6
    assert hamming(base, _hash(coffee)) > 16
    assert informative_phash(base)


def test_flat_images_give_uninformative_hashes() -> None:
    flat = np.full((256, 256, 3), 128, dtype=np.uint8)
    assert not informative_phash(phash_hex(flat))
