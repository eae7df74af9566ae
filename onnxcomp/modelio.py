"""Loading and saving models safely: validated on the way in, written atomically on the way out."""

from __future__ import annotations

import os
import shutil
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
        model = ir.load(str(path))
    except Exception as err:
        raise InvalidModelError(f"{path}: cannot be loaded ({err}); re-export the model") from None
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    if opset > onnx.defs.onnx_opset_version():
        raise InvalidModelError(
            f"{path}: declares opset {opset}, newer than any this onnx knows ({onnx.defs.onnx_opset_version()}); "
            "re-export it at a released opset"
        )
    return model


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
    """Refuse an output that would overwrite the input or land in a missing or read-only folder."""
    path = Path(path).resolve()
    if source is not None and Path(source).resolve() == path:
        raise ConfigError(f"output {path} is the input file; choose another path with -o")
    if not path.parent.is_dir():
        raise ConfigError(f"output folder {path.parent} does not exist; create it or choose another -o")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {path.parent} is not writable; choose another -o")
    return path


def input_files(source: str | os.PathLike) -> set[Path]:
    """The resolved paths a model is read from: the file and the external data files it names."""
    source = Path(source)
    files = {source.resolve()}
    try:
        import onnx

        proto = onnx.load(str(source), load_external_data=False)
    except Exception:
        return files  # not a model: the loader says so in its own words
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                files.add((source.parent / location).resolve())
    return files


def check_outputs(source: str | os.PathLike, *outputs: str | os.PathLike | None) -> None:
    """No output (model, its data file, report) is a file the input is read from, or another
    output: writing it would destroy what is read or written."""
    read = input_files(source)
    seen: set[Path] = set()
    for output in filter(None, outputs):
        path = check_output_path(output)
        for written in (path, path.with_name(path.name + ".data")):
            if written == Path(source).resolve():
                raise ConfigError(f"output {written} is the input file; choose another path with -o")
            if written in read:
                raise ConfigError(f"output {written} is a data file the input {source} is read from; choose another path")
        if path in seen:
            raise ConfigError(f"{path} is named for two outputs; give each its own path")
        seen.add(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write beside the target, then rename: a reader sees the old file or the whole new one."""
    path = check_output_path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".onnxcomp-", delete=False, encoding="utf-8") as handle:
        handle.write(text)
    try:
        os.chmod(handle.name, 0o666 & ~current_umask())
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse before writing when the folder's disk cannot hold what will be written."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ConfigError(f"{what} needs about {needed:,} bytes but {folder} has {free:,} free; free some space or "
                          "write elsewhere with -o")


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
