"""Files in and out of the container: atomic writes, clear errors, the inspect table."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import tempfile
from pathlib import Path

from onnxcomp.container.format import ContainerError, describe, pack_to, read_toc, unpack_to
from onnxcomp.container.toc import safe_name
from onnxcomp.modelio import check_free_space, check_output_path, current_umask, load_model
from onnxcomp.report import format_table


class _AtomicFiles:
    """Temporary files beside their targets, renamed into place together by `commit()` and
    removed otherwise: a reader never sees a half-written or wrongly decoded file."""

    def __init__(self):
        self.pending: list[tuple[object, Path]] = []

    def open(self, path: Path):
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=".onnxcomp-", delete=False)
        self.pending.append((handle, path))
        return handle

    def commit(self) -> None:
        mode = 0o666 & ~current_umask()  # as any other output, not a temporary file's 0600
        for handle, path in self.pending:
            handle.close()
            os.chmod(handle.name, mode)
            os.replace(handle.name, path)
        self.pending = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for handle, _ in self.pending:
            handle.close()
            os.unlink(handle.name)


@contextlib.contextmanager
def _mapped(path: str | os.PathLike, what: str):
    """The file's bytes as a read-only memory map (empty files as b""): read as needed,
    never loaded whole."""
    path = Path(path)
    if not path.is_file():
        raise ContainerError(f"{path}: no such file; pass the path of {what}")
    with path.open("rb") as handle:
        if path.stat().st_size == 0:
            yield b""
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped


def external_locations(model_path: str | os.PathLike) -> list[str]:
    """The external data files the model's initializers name, relative to its folder."""
    import onnx_ir as ir

    model = load_model(model_path)  # also: a clear error for a bad model or a missing data file
    found = {
        value.const_value.location
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    return sorted(safe_name(location, str(model_path)) for location in found)


def pack_file(source: str | os.PathLike, target: str | os.PathLike) -> tuple[int, int]:
    """Check the model, pack it with its external data files (read through memory maps, one
    tensor at a time), write atomically; (bytes before, bytes after)."""
    target = check_output_path(target, source)
    folder = Path(source).parent
    with contextlib.ExitStack() as stack, _AtomicFiles() as files:
        external = {location: stack.enter_context(_mapped(folder / location, "an external data file"))
                    for location in external_locations(source)}
        data = stack.enter_context(_mapped(source, "an .onnx model"))
        out = files.open(target)
        pack_to(out, data, external)
        sizes = len(data) + sum(len(content) for content in external.values()), out.tell()
        files.commit()
    return sizes


def unpack_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Write the model to `target`, and its external data files beside it under the names
    the model gives them; tensor by tensor, all renamed into place only once all decoded.
    Every name is checked (inside the target's folder, none the target or the container
    itself, none twice) and the free space counted before anything is written."""
    target = check_output_path(target, source)
    created: list[Path] = []

    def output_path(name) -> Path:
        if name is None:
            return target
        path = (target.parent / name).resolve()  # names are relative and plain; links are followed here
        if target.parent not in path.parents:
            raise ContainerError(f"{source}: external data {name!r} would be written outside {target.parent}; refused")
        if path in (target, Path(source).resolve()):
            raise ContainerError(f"{source}: an external data file is named like the output model or the container "
                                 f"({path.name!r}); choose another output name with -o")
        return path

    def open_output(name):
        path = output_path(name)
        for folder in reversed(path.parents):
            if folder != target.parent and target.parent in folder.parents and not folder.exists():
                folder.mkdir()
                created.append(folder)
        return files.open(path)

    with _mapped(source, "an .onnxc container") as blob:
        toc, _ = read_toc(blob, str(source))
        paths = [output_path(digest.name) for digest in toc.files]
        for path in paths:
            folders = [f for f in path.parents if target.parent in f.parents]
            if any(f in paths or (f.exists() and not f.is_dir()) for f in folders):
                raise ContainerError(f"{source}: external data {path.relative_to(target.parent)} would need a folder "
                                     "where a file is; refused")
        check_free_space(target.parent, toc.decoded_bytes, f"unpacking {source}")
        try:
            with _AtomicFiles() as files:
                unpack_to(blob, open_output, str(source))
                files.commit()
        finally:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only where it stayed empty


def container_table(path: str | os.PathLike, as_json: bool = False) -> str:
    path = Path(path)
    if not path.is_file():
        raise ContainerError(f"{path}: no such file; pass the path of an .onnxc container")
    with _mapped(path, "an .onnxc container") as blob:
        infos, toc = describe(blob)
        container = len(blob)
    model, external = toc.files[0], toc.files[1:]
    if as_json:
        return json.dumps({"size": model.size, "container": container, "tensors": [vars(i) for i in infos],
                           "external_files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in external]},
                          indent=2)
    rows = [("tensor", "bits", "weights", "models", "coded bits/weight", "entropy bits/weight", "coded / entropy")]
    for i in infos:
        coded = 8 * i.stored_bytes / max(i.elements, 1)
        rows.append((i.name, str(i.bits), f"{i.elements:,}", i.models, f"{coded:.4f}", f"{i.entropy_bits:.4f}",
                     f"{coded / i.entropy_bits:.4f}" if i.entropy_bits else "-"))
    coded_total = sum(i.stored_bytes for i in infos)
    bound = sum(i.entropy_bits * i.elements / 8 for i in infos)
    chunked = [i for i in infos if i.models == "chunk"]
    lines = [format_table(rows), ""]
    if bound:
        lines.append(f"integer payloads: {coded_total:,} bytes coded, per-tensor entropy bound {bound:,.0f} bytes "
                     f"({coded_total / bound:.4f}x)")
    if chunked:
        below = sum(i.entropy_bits * i.elements / 8 - i.stored_bytes for i in chunked)
        lines.append(f"{len(chunked)} tensor(s) coded with one model per chunk: {below:,.0f} bytes below their per-tensor bound")
    files = f" and {len(external)} external data file(s)" if external else ""
    lines.append(f"container {container:,} bytes for a {toc.decoded_bytes:,}-byte model{files} "
                 f"({container / toc.decoded_bytes:.3f})")
    return "\n".join(lines)
