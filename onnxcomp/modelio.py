"""Loading and saving models safely: validated on the way in, written atomically on the way out."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxcomp.errors import ConfigError, InvalidModelError

# Protobuf cannot serialize a message over 2 GiB; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load and check an ONNX model; external data stays memory-mapped, not read."""
    path = Path(path)
    if not path.is_file():
        raise InvalidModelError(f"{path}: no such file; pass the path of an .onnx model")
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidModelError(
            f"{path}: not a valid ONNX model ({first_line}); re-export it or check that the file is complete"
        ) from None
    except Exception as err:  # protobuf decode errors have no common base class
        raise InvalidModelError(
            f"{path}: cannot be parsed as ONNX ({type(err).__name__}); the file is truncated or not an ONNX model"
        ) from None
    try:
        return ir.load(str(path))
    except Exception as err:
        raise InvalidModelError(f"{path}: cannot be loaded ({err}); re-export the model") from None


def initializer_bytes(model: ir.Model) -> int:
    """Bytes held by the main graph's initializers, as stored."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def external_files(model: ir.Model) -> set[Path]:
    """The resolved paths of the files the model's external tensors are read from."""
    return {
        Path(value.const_value.path).resolve()
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }


def check_output_path(path: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Refuse an output that would overwrite the input or land in a missing folder."""
    path = Path(path).resolve()
    if source is not None and Path(source).resolve() == path:
        raise ConfigError(f"output {path} is the input file; choose another path with -o")
    if not path.parent.is_dir():
        raise ConfigError(f"output folder {path.parent} does not exist; create it or choose another -o")
    return path


def save_model(model: ir.Model, path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> None:
    """Write the model to a temporary file beside `path`, then rename it into place.

    Models whose weights would not fit in one protobuf are saved with external data
    (`<name>.data` beside the model). `source`, when given, must not be overwritten.
    """
    path = check_output_path(path, source)
    data_name = path.name + ".data"
    read = external_files(model)
    # Weights that came as external data leave as external data, into the output's own file.
    external = bool(read) or initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external and (path.parent / data_name).resolve() in read:
        raise ConfigError(
            f"the output's data file {path.parent / data_name} is a data file of the input, which writing would "
            "destroy; choose another output name with -o"
        )
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnxcomp-") as tmp:
        tmp_model = Path(tmp) / path.name
        ir.save(model, tmp_model, external_data=data_name if external else None)
        if external:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
