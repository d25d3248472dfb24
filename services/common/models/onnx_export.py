"""Embedders to ONNX for onnxruntime, which runs MobileNetV2 about three times faster than torch on a CPU core.

One exporter for everything that serves or measures an embedder (Triton's version-1 model, bench stage 2): the
TorchScript-based ``torch.onnx.export(dynamo=False)`` (the dynamo exporter needs onnxscript, not installed).
Version 1's antialiased 256->224 resize (``aten::_upsample_bilinear2d_aa``) has no symbolic in that exporter;
it gets one here: ONNX ``Resize`` with ``antialias=1`` (opset 18+), the same filter as torch's.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

OPSET = 20  # the first with AffineGrid (the STN versions); Resize antialias needs 18


def _upsample_bilinear_aa(
    g: Any, input: Any, output_size: Any, align_corners: Any, scales_h: Any = None, scales_w: Any = None
) -> Any:
    shape = g.op("Shape", input)
    nc = g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([0])), g.op("Constant", value_t=torch.tensor([2])))
    sizes = g.op("Concat", nc, g.op("Cast", output_size, to_i=7), axis_i=0)  # 7 = INT64
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op(
        "Resize",
        input,
        empty,
        empty,
        sizes,
        mode_s="linear",
        antialias_i=1,
        coordinate_transformation_mode_s="pytorch_half_pixel",
    )


def exportable(module: nn.Module, meta: dict[str, Any] | None = None) -> nn.Module:
    """An eager copy to export; a TorchScript STN export is rebuilt as its eager twin from ``meta``."""
    if isinstance(module, torch.jit.ScriptModule):
        from services.common.models.mobilenet_v2 import MobileNetV2Features
        from services.common.models.stn import STNEmbedder

        meta = meta or {}
        twin = STNEmbedder(
            MobileNetV2Features(),
            embed_dim=int(meta["embed_dim"]),
            input_size=int(meta["input_size"]),
            use_stn=bool(meta["use_stn"]),
            categories=tuple(meta["categories"]),
        )
        twin.load_state_dict({k: v.float() for k, v in module.state_dict().items()}, strict=True)
        return twin.eval()
    return copy.deepcopy(module).eval()


def export_embedder(module: nn.Module, target: Path | None = None) -> bytes:
    """ONNX of an embedder taking uint8 NHWC 256x256 ``IMAGE`` to ``EMBEDDING``, dynamic batch; also written
    to ``target`` when given."""
    torch.onnx.register_custom_op_symbolic(  # type: ignore[attr-defined]
        "aten::_upsample_bilinear2d_aa", _upsample_bilinear_aa, OPSET
    )
    with tempfile.TemporaryDirectory(prefix="sieve-onnx-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is "legacy" in torch 2.15, and works
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            (torch.zeros((2, 256, 256, 3), dtype=torch.uint8),),
            str(path),
            input_names=["IMAGE"],
            output_names=["EMBEDDING"],
            dynamic_axes={"IMAGE": {0: "batch"}, "EMBEDDING": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
        data = path.read_bytes()
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".tmp")
        partial.write_bytes(data)
        partial.replace(target)
    return data
