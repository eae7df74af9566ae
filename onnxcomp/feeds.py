"""Model inputs for running a model: read from a user's .npz, checked, or made up from types."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcomp.errors import InputMismatchError

# onnxruntime's type strings → numpy dtypes.
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def input_specs(session: ort.InferenceSession) -> dict[str, tuple[np.dtype, list]]:
    """Name → (dtype, shape with None or a dim name for free dimensions)."""
    specs = {}
    for arg in session.get_inputs():
        if arg.type not in _ORT_DTYPES:
            raise InputMismatchError(f"input {arg.name!r} has type {arg.type}, which onnxcomp cannot feed yet")
        specs[arg.name] = (np.dtype(_ORT_DTYPES[arg.type]), list(arg.shape))
    return specs


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise InputMismatchError(f"{path}: no such file; pass an .npz whose keys are the model's input names")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as err:
        raise InputMismatchError(f"{path}: not a readable .npz ({type(err).__name__}); save it with numpy.savez") from None


def check_feeds(feeds: dict[str, np.ndarray], specs: dict[str, tuple[np.dtype, list]], source: str) -> dict[str, np.ndarray]:
    """Every input present, nothing extra, dtypes and fixed dimensions matching."""
    missing = sorted(set(specs) - set(feeds))
    extra = sorted(set(feeds) - set(specs))
    if missing or extra:
        raise InputMismatchError(
            f"{source}: inputs do not match the model: missing {missing or 'none'}, unexpected {extra or 'none'}; "
            f"the model's inputs are {sorted(specs)}"
        )
    checked = {}
    for name, (dtype, shape) in specs.items():
        array = feeds[name]
        if array.dtype != dtype:
            raise InputMismatchError(f"{source}: input {name!r} is {array.dtype}, the model expects {dtype}")
        if array.ndim != len(shape) or any(isinstance(d, int) and d != a for d, a in zip(shape, array.shape)):
            raise InputMismatchError(
                f"{source}: input {name!r} has shape {list(array.shape)}, the model expects {shape}"
            )
        checked[name] = array
    return checked


def synthetic_feeds(specs: dict[str, tuple[np.dtype, list]], int_bounds: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds from types and shapes alone: normal noise for floats; for integers, ids below the
    row count of the table they index (`int_bounds`), else ones (masks). Free dimensions: the
    first gets 2 (batch), the others 16."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dtype, shape) in specs.items():
        dims = [d if isinstance(d, int) and d > 0 else (2 if i == 0 else 16) for i, d in enumerate(shape)]
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = np.ones(dims, dtype=dtype)
        elif name in int_bounds:
            feeds[name] = rng.integers(0, int_bounds[name], size=dims).astype(dtype)
        else:
            feeds[name] = np.ones(dims, dtype=dtype)
    return feeds


def index_bounds(model) -> dict[str, int]:
    """Integer graph inputs used (directly or through a Cast) as Gather indices into a table:
    name → the table's row count, the largest id the model accepts plus one."""
    bounds: dict[str, int] = {}
    for graph_input in model.graph.inputs:
        frontier = [graph_input]
        while frontier:
            value = frontier.pop()
            for user, index in value.uses():
                if user.op_type == "Cast":
                    frontier.extend(user.outputs)
                elif user.op_type == "Gather" and index == 1:
                    table = user.inputs[0].shape
                    if table is not None and len(table) >= 1 and isinstance(table[0], int):
                        bounds[graph_input.name] = min(bounds.get(graph_input.name, table[0]), table[0])
    return bounds
