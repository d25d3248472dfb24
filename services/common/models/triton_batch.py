"""Dynamic batching in Triton's Python backend: the requests Triton grouped run as one model call, and each gets
back its own rows. ``pb_utils`` is passed in because it only exists inside Triton's stub."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray


def gather_inputs(pb_utils: Any, requests: list[Any], name: str) -> tuple[NDArray[Any], list[int]]:
    """Every request's ``name`` tensor concatenated into one contiguous batch, and each request's row count."""
    arrays = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
    return np.ascontiguousarray(np.concatenate(arrays)), [a.shape[0] for a in arrays]


def respond_per_request(pb_utils: Any, name: str, out: NDArray[Any], sizes: list[int]) -> list[Any]:
    """One response per request, holding that request's slice of ``out`` as output ``name``."""
    responses = []
    start = 0
    for n in sizes:
        tensor = pb_utils.Tensor(name, out[start : start + n])
        responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        start += n
    return responses
