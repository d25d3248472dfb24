"""The ONNX export Triton's version-1 model runs on: same embeddings as torch, on real photos, any batch size."""

from __future__ import annotations

import numpy as np
import torch

from services.common.config import DecodeSettings
from services.common.imaging import decode_image
from services.common.models.gem import GeMEmbedder
from services.common.models.mobilenet_v2 import load_imagenet_trunk
from services.common.models.onnx_export import export_embedder
from services.common.models.ort_runtime import ort_session
from services.common.photos.build import load_photo_set


def test_v1_onnx_matches_torch_on_real_photos_at_any_batch_size() -> None:
    manifest = load_photo_set()
    records = sorted(manifest.split("heldout"), key=lambda r: r.id)[:5]
    pixels = np.stack([decode_image(manifest.path_of(r).read_bytes(), DecodeSettings(), 256).pixels for r in records])
    model = GeMEmbedder(load_imagenet_trunk()).eval()
    session = ort_session(export_embedder(model), threads=1)
    with torch.inference_mode():
        expected = model(torch.from_numpy(pixels)).numpy()
    for batch in (pixels[:1], pixels):  # exported with batch 2: the batch axis must stay dynamic
        got = np.asarray(session.run(None, {"IMAGE": batch})[0])
        assert got.shape == (len(batch), 1280)
        assert float(np.min((got * expected[: len(batch)]).sum(axis=1))) > 0.9999
        assert np.abs(got - expected[: len(batch)]).max() < 1e-3
    # Different photos stay different: the antialiased resize and GeM were not exported as constants.
    sims = expected @ expected.T
    assert float(sims[np.triu_indices(len(pixels), 1)].max()) < 0.99
