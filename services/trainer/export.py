"""TorchScript export of the STN embedder: fp16 storage (a few MB in git), fp32 compute everywhere it runs.

The weights are rounded to fp16 *before* export and cast back to fp32 on load, so the model Triton serves,
the one ``sieve embed`` runs in-process and the one ``sieve eval`` measures are bit-for-bit the same network.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from services.common.models.stn import STNEmbedder

META_FILE = "meta.json"


def round_to_half(model: STNEmbedder) -> STNEmbedder:
    """Make every floating tensor exactly fp16-representable (ImageNet mean/std buffers stay exact)."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and name not in ("mean", "std"):
                tensor.copy_(tensor.half().float())
    return model


def export_torchscript(model: STNEmbedder, path: Path, meta: dict[str, Any]) -> Path:
    """Script (not trace) so ``align`` and ``flags`` survive next to ``forward``; store the weights as fp16."""
    model = round_to_half(copy.deepcopy(model).eval())  # scripting shares tensors: keep the caller's fp32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.15 nudges towards torch.export
        scripted = torch.jit.script(model)
    with torch.no_grad():
        for name, tensor in [*scripted.named_parameters(), *scripted.named_buffers()]:
            if tensor.is_floating_point() and name not in ("mean", "std"):
                tensor.data = tensor.data.half()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    body = {**meta, "categories": list(model.categories), "embed_dim": model.embed_dim}
    body.update({"input_size": model.input_size, "use_stn": model.use_stn, "storage": "fp16"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(tmp), _extra_files={META_FILE: json.dumps(body, sort_keys=True)})
    tmp.replace(path)
    return path


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The exported model in fp32 and eval mode, plus its metadata. Triton's model.py does the same."""
    extra = {META_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)  # type: ignore[no-untyped-call]
    module.float().eval()
    meta: dict[str, Any] = json.loads(extra[META_FILE] or "{}")
    return module, meta


def embed_fn(module: torch.nn.Module) -> Callable[[NDArray[np.uint8]], NDArray[np.float32]]:
    """In-process embedding with a candidate, for backfilling its index before Triton has loaded it."""

    def embed(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
        out = []
        with torch.inference_mode():
            for start in range(0, len(pixels), 32):
                out.append(module(torch.from_numpy(np.ascontiguousarray(pixels[start : start + 32]))).float().numpy())
        result: NDArray[np.float32] = np.concatenate(out).astype(np.float32)
        return result

    return embed


def export_onnx(torchscript_path: Path, path: Path) -> Path:
    """ONNX copy of an exported model for onnxruntime, which runs it about twice as fast on CPU.

    The network is rebuilt from the TorchScript weights (already fp16-rounded), exported at opset 20 (the
    first with AffineGrid), and its weights stored as fp16 with Cast nodes in front, so the file stays as
    small as model.pt while onnxruntime folds the casts away when the session loads.
    """
    import onnx
    from onnx import helper, numpy_helper

    from services.common.models.mobilenet_v2 import MobileNetV2Features
    from services.common.models.stn import STNEmbedder

    scripted, meta = load_torchscript(torchscript_path)
    model = STNEmbedder(
        MobileNetV2Features(),
        embed_dim=int(meta["embed_dim"]),
        input_size=int(meta["input_size"]),
        use_stn=bool(meta["use_stn"]),
        categories=tuple(meta["categories"]),
    ).eval()
    model.load_state_dict({k: v.float() for k, v in scripted.state_dict().items()})
    example = torch.zeros(2, 256, 256, 3, dtype=torch.uint8)
    tmp = path.with_suffix(".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is "legacy" in torch 2.15, and works
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["IMAGE"],
            output_names=["EMBEDDING"],
            dynamic_axes={"IMAGE": {0: "batch"}, "EMBEDDING": {0: "batch"}},
            opset_version=20,
            dynamo=False,
            # No folding: folded conv+BN weights are not fp16-exact; onnxruntime fuses them itself at load.
            do_constant_folding=False,
        )
    graph_model = onnx.load(str(tmp))
    graph = graph_model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) == 0 or init.name.endswith(("mean", "std")):
            continue
        array = numpy_helper.to_array(init)
        if array.size < 64:
            continue
        original = init.name
        init.CopyFrom(numpy_helper.from_array(array.astype("float16"), f"{original}__fp16"))
        casts.append(helper.make_node("Cast", [f"{original}__fp16"], [original], to=onnx.TensorProto.FLOAT))
    for node in reversed(casts):
        graph.node.insert(0, node)
    for key, value in meta.items():
        graph_model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=json.dumps(value)))
    onnx.save(graph_model, str(tmp))
    tmp.replace(path)
    return path
