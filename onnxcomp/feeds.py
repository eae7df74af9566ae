"""Model inputs for running a model: read from a user's .npz, checked, or made up from types."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcomp.errors import InputMismatchError

Specs = dict[str, tuple[np.dtype, list]]


def input_specs(model: ir.Model) -> Specs:
    """Name → (numpy dtype, shape with a str or None for free dimensions), for every graph
    input that is not also an initializer."""
    specs = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        try:
            dtype = np.dtype(value.dtype.numpy())
        except (AttributeError, TypeError):
            raise InputMismatchError(f"input {value.name!r} has type {value.type}, which onnxcomp cannot feed") from None
        shape = [] if value.shape is None else [d if isinstance(d, int) else (d.value if d is not None else None) for d in value.shape]
        specs[value.name] = (dtype, shape)
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


def check_array(source: str, name: str, dtype: np.dtype, shape: tuple[int, ...], specs: Specs) -> None:
    """One input's dtype, rank and fixed dimensions against the model's."""
    want_dtype, want_shape = specs[name]
    if dtype != want_dtype:
        raise InputMismatchError(f"{source}: input {name!r} is {dtype}, the model expects {want_dtype}")
    if len(shape) != len(want_shape) or any(isinstance(d, int) and d != a for d, a in zip(want_shape, shape)):
        raise InputMismatchError(f"{source}: input {name!r} has shape {list(shape)}, the model expects {want_shape}")


def check_names(names, specs: Specs, source: str) -> None:
    missing, extra = sorted(set(specs) - set(names)), sorted(set(names) - set(specs))
    if missing or extra:
        raise InputMismatchError(
            f"{source}: inputs do not match the model: missing {missing or 'none'}, unexpected {extra or 'none'}; "
            f"the model's inputs are {sorted(specs)}"
        )


def check_feeds(feeds: dict[str, np.ndarray], specs: Specs, source: str) -> dict[str, np.ndarray]:
    """Every input present, nothing extra, dtypes and fixed dimensions matching."""
    check_names(feeds, specs, source)
    for name, array in feeds.items():
        check_array(source, name, array.dtype, array.shape, specs)
    return feeds


def synthetic_feeds(specs: Specs, int_bounds: dict[str, int], seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Feeds from types and shapes alone: normal noise for floats; for integers, ids below the
    row count of the table they index (`int_bounds`), else ones (masks). Free dimensions: the
    first gets `batch`, the others 16."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dtype, shape) in specs.items():
        dims = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else 16) for i, d in enumerate(shape)]
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
