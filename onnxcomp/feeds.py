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
        specs[value.name] = (dtype, [] if value.shape is None else [_dim(d) for d in value.shape])
    return specs


def _dim(d) -> int | str | None:
    """A fixed size, a symbolic name, or None. Exporters write a free dimension as -1 or 0
    as well as by name: only a positive size is fixed."""
    if isinstance(d, int):
        return d if d > 0 else None
    return getattr(d, "value", None)


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


# Sizes synthetic inputs give free dimensions. Decoders tie their inputs' dimensions
# together (attention_mask's total length is the past's plus the new tokens'), so named
# dimensions are sized by what their names say.
SYNTHETIC_SEQUENCE = 16
SYNTHETIC_PAST = 8


def synthetic_dim_size(dim: int | str | None, index: int, batch: int) -> int:
    """A free dimension's size: the batch for a first axis or a name with "batch"; the past
    length for "past…"; past plus new for "total…"/"present…"; a sum for "a + b" (as
    optimum writes attention_mask's); the sequence length otherwise."""
    if isinstance(dim, int):
        return dim
    if isinstance(dim, str) and "+" in dim:
        return sum(synthetic_dim_size(term.strip(), 1, batch) for term in dim.split("+"))
    name = (dim or "").lower()
    if name.isdigit():
        return int(name)
    if "past" in name:
        return SYNTHETIC_PAST
    if "total" in name or "present" in name:
        return SYNTHETIC_PAST + SYNTHETIC_SEQUENCE
    if "batch" in name or index == 0:
        return batch
    return SYNTHETIC_SEQUENCE


def synthetic_feeds(specs: Specs, int_bounds: dict[str, int], seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Feeds from types and shapes alone: normal noise for floats; for integers, ids below the
    row count of the table they index (`int_bounds`), else ones (masks, positions). Free
    dimensions are sized by `synthetic_dim_size`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dtype, shape) in specs.items():
        dims = [synthetic_dim_size(d, i, batch) for i, d in enumerate(shape)]
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
