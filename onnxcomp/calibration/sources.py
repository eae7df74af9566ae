"""Calibration data: an .npz, a folder of arrays or images, any iterable of feeds, or
synthetic inputs; read lazily, checked against the model before anything runs, and cut
into batches of a fixed number of samples."""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxcomp.errors import ConfigError, InputMismatchError
from onnxcomp.feeds import Specs, check_array, check_feeds, check_names, synthetic_feeds

Feeds = dict[str, np.ndarray]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz")


@dataclass(frozen=True)
class CalibOptions:
    """How calibration data is read and batched."""

    samples: int = 128
    batch: int = 16
    image_size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    seed: int = 0
    positions: int = 4096  # a convolution's input rows per sample in its Gram matrix (0: every position)
    tokenizer: str | None = None  # a tokenizer.json for calibration text (one sample per line)
    max_tokens: int = 128  # text samples are cut to this many tokens

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"--calib-samples {self.samples} must be at least 1")
        if self.batch < 1:
            raise ConfigError(f"--calib-batch {self.batch} must be at least 1")
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"--layout {self.layout} is not supported; choose NCHW or NHWC")
        if self.positions < 0:
            raise ConfigError(f"--calib-positions {self.positions} is negative; use 0 (every position) or more")
        if any(s == 0 for s in self.std):
            raise ConfigError("--std has a zero; every channel's standard deviation must be non-zero")


@dataclass
class CalibrationSet:
    """A re-iterable stream of checked feed batches, and where it comes from."""

    label: str
    synthetic: bool
    _batches: Callable[[], Iterator[Feeds]]
    samples: int | None = None  # how many the batches hold in all, where known
    positions: int = 0  # convolution rows per sample in a Gram matrix, drawn at random (0: all)
    seed: int = 0

    def position_rng(self, batch_number: int) -> np.random.Generator:
        """The draw of convolution positions for one batch: the same for every layer and run."""
        return np.random.default_rng([self.seed, batch_number])

    def batches(self) -> Iterator[Feeds]:
        return self._batches()


# --- reading .npy headers without reading the data -------------------------------------


def _read_header(stream) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    if dtype.hasobject:
        raise InputMismatchError("holds Python objects; save plain numeric arrays")
    return tuple(shape), dtype, fortran


def _check_length(source, shape: tuple[int, ...], dtype: np.dtype, header_end: int, size: int) -> None:
    """The data an .npy header declares is all there (a header can claim any shape)."""
    declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if header_end + declared > size:
        raise InputMismatchError(
            f"{source}: its header declares shape {list(shape)} ({declared:,} bytes) but the file holds "
            f"{max(size - header_end, 0):,}; the file is truncated or damaged"
        )


def _npz_members(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Key → (shape, dtype) of every array in an .npz, from the headers alone."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {}
            for entry in archive.namelist():
                if entry.endswith(".npy"):
                    with archive.open(entry) as stream:
                        shape, dtype, _ = _read_header(stream)
                        _check_length(f"{path} ({entry})", shape, dtype, stream.tell(), archive.getinfo(entry).file_size)
                    members[entry[: -len(".npy")]] = (shape, dtype)
            return members
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise InputMismatchError(f"{path}: not a readable .npz ({err}); save it with numpy.savez") from None


def _check_members(members: dict, specs: Specs, source: str) -> int:
    """Check names, dtypes and per-sample shapes; return the number of samples."""
    check_names(members, specs, source)
    counts = set()
    for name, (shape, dtype) in members.items():
        if not shape:
            raise InputMismatchError(f"{source}: input {name!r} is a scalar; the first axis must count samples")
        check_array(source, name, dtype, (None, *shape[1:]), _free_batch(specs))
        counts.add(shape[0])
    if len(counts) > 1:
        raise InputMismatchError(f"{source}: inputs have different sample counts {sorted(counts)}; they must match")
    return counts.pop()


def _free_batch(specs: Specs) -> Specs:
    """Specs with the first axis left free: a file's sample count need not equal the model's batch."""
    return {name: (dtype, [None, *shape[1:]]) for name, (dtype, shape) in specs.items()}


def _npz_chunks(path: Path, step: int) -> Iterator[Feeds]:
    """Stream an .npz `step` samples at a time, each array read row block by row block; a
    member that fails its CRC or ends early is a one-line error."""
    try:
        yield from _npz_chunk_reader(path, step)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise InputMismatchError(f"{path}: cannot be read ({err}); the file is damaged, save it again") from None


def _npz_chunk_reader(path: Path, step: int) -> Iterator[Feeds]:
    with zipfile.ZipFile(path) as archive:
        streams, layout = {}, {}
        try:
            for entry in archive.namelist():
                if not entry.endswith(".npy"):
                    continue
                stream = archive.open(entry)
                shape, dtype, fortran = _read_header(stream)
                name = entry[: -len(".npy")]
                if fortran:  # column-major data cannot be read by rows: load it whole
                    stream.close()
                    with np.load(path, allow_pickle=False) as data:
                        layout[name] = (data[name], None, None)
                else:
                    streams[name] = stream
                    layout[name] = (None, shape, dtype)
            total = min((a.shape[0] if a is not None else s[0]) for a, s, _ in layout.values())
            for start in range(0, total, step):
                count = min(step, total - start)
                chunk = {}
                for name, (whole, shape, dtype) in layout.items():
                    if whole is not None:
                        chunk[name] = whole[start : start + count]
                    else:
                        size = count * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                        chunk[name] = np.frombuffer(streams[name].read(size), dtype=dtype).reshape(count, *shape[1:])
                yield chunk
        finally:
            for stream in streams.values():
                stream.close()


# --- sources ------------------------------------------------------------------------------


def _rebatch(chunks: Iterator[Feeds], batch: int, samples: int) -> Iterator[Feeds]:
    """Regroup chunks of samples into batches of `batch` samples (fewer at the end, or where
    shapes change between chunks), stopping after `samples` samples in all."""
    pending: list[Feeds] = []
    pending_count = used = 0

    def flush() -> Feeds:
        merged = {name: np.concatenate([c[name] for c in pending]) if len(pending) > 1 else pending[0][name] for name in pending[0]}
        pending.clear()
        return merged

    for chunk in chunks:
        while chunk and used < samples:
            count = next(iter(chunk.values())).shape[0]
            if pending and any(pending[0][k].shape[1:] != v.shape[1:] for k, v in chunk.items()):
                yield flush()
                pending_count = 0
            take = min(count, batch - pending_count, samples - used)
            pending.append({k: v[:take] for k, v in chunk.items()})
            pending_count, used = pending_count + take, used + take
            chunk = {k: v[take:] for k, v in chunk.items()} if take < count else None
            if pending_count == batch:
                yield flush()
                pending_count = 0
        if used >= samples:
            break
    if pending:
        yield flush()


def _npz_source(path: Path, specs: Specs, options: CalibOptions) -> CalibrationSet:
    total = _check_members(_npz_members(path), specs, str(path))
    used = min(total, options.samples)

    def batches() -> Iterator[Feeds]:
        return _rebatch(_npz_chunks(path, options.batch), options.batch, options.samples)

    return CalibrationSet(f"{path} ({used} of {total} samples)", False, batches, used)


def _array_folder_source(folder: Path, files: list[Path], specs: Specs, options: CalibOptions) -> CalibrationSet:
    """Each .npz holds samples keyed by input name; each .npy, for a one-input model, holds
    samples of that input (or a single sample without the sample axis)."""
    total = 0
    plans = []  # (path, add a sample axis)
    for path in files:
        if path.suffix == ".npz":
            total += _check_members(_npz_members(path), specs, str(path))
            plans.append((path, False))
            continue
        if len(specs) != 1:
            raise InputMismatchError(
                f"{path}: a .npy file feeds one input, but the model has inputs {sorted(specs)}; use .npz files keyed by input name"
            )
        (name, (_, shape)), = specs.items()
        with open(path, "rb") as stream:
            try:
                file_shape, dtype, _ = _read_header(stream)
            except ValueError as err:
                raise InputMismatchError(f"{path}: not a readable .npy ({err})") from None
            _check_length(path, file_shape, dtype, stream.tell(), path.stat().st_size)
        single = len(file_shape) == len(shape) - 1
        members = {name: ((1, *file_shape) if single else file_shape, dtype)}
        total += _check_members(members, specs, str(path))
        plans.append((path, single))

    def chunks() -> Iterator[Feeds]:
        for path, single in plans:
            if path.suffix == ".npz":
                yield from _npz_chunks(path, options.batch)
            else:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                yield {next(iter(specs)): np.asarray(array)[None] if single else array}

    used = min(total, options.samples)
    return CalibrationSet(f"{folder}/ ({len(files)} files, {used} of {total} samples)", False,
                          lambda: _rebatch(chunks(), options.batch, options.samples), used)


def _image_geometry(specs: Specs, options: CalibOptions) -> tuple[str, np.dtype, int, tuple[int, int]]:
    if len(specs) != 1:
        raise InputMismatchError(f"a folder of images feeds one image input, but the model has inputs {sorted(specs)}")
    (name, (dtype, shape)), = specs.items()
    if len(shape) != 4 or not np.issubdtype(dtype, np.floating):
        raise InputMismatchError(f"input {name!r} is {dtype} {shape}; a folder of images needs a 4-D float input")
    channel_dim = shape[1] if options.layout == "NCHW" else shape[3]
    spatial = shape[2:] if options.layout == "NCHW" else shape[1:3]
    channels = channel_dim if isinstance(channel_dim, int) else 3
    if channels not in (1, 3):
        raise InputMismatchError(
            f"input {name!r} has {channels} channels with --layout {options.layout}; images give 1 or 3 (check --layout)"
        )
    if options.image_size is not None:
        size = options.image_size
    elif all(isinstance(d, int) for d in spatial):
        size = (spatial[0], spatial[1])
    else:
        raise InputMismatchError(f"input {name!r} has free spatial size {spatial}; pass --image-size H W")
    for option, values in (("--mean", options.mean), ("--std", options.std)):
        if len(values) not in (1, channels):
            raise ConfigError(f"{option} has {len(values)} values; give 1 or {channels} (one per channel)")
    return name, dtype, channels, size


def _image_folder_source(folder: Path, files: list[Path], specs: Specs, options: CalibOptions) -> CalibrationSet:
    """Images decoded with Pillow, resized, scaled to [0, 1], then (x − mean) / std per channel."""
    name, dtype, channels, (height, width) = _image_geometry(specs, options)
    check_array(str(folder), name, dtype, _image_shape(options.layout, channels, height, width), _free_batch(specs))
    mean = np.asarray(options.mean, dtype=np.float32)
    std = np.asarray(options.std, dtype=np.float32)

    def load(path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                pixels = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
        except (UnidentifiedImageError, OSError) as err:
            raise InputMismatchError(f"{path}: not a readable image ({err})") from None
        x = np.asarray(pixels, dtype=np.float32).reshape(height, width, channels) / 255.0
        x = (x - mean) / std
        return (x.transpose(2, 0, 1) if options.layout == "NCHW" else x).astype(dtype)[None]

    def chunks() -> Iterator[Feeds]:
        for path in files:
            yield {name: load(path)}

    used = min(len(files), options.samples)
    return CalibrationSet(f"{folder}/ ({used} of {len(files)} images, {height}x{width}, {options.layout})", False,
                          lambda: _rebatch(chunks(), options.batch, options.samples), used)


def _image_shape(layout: str, channels: int, height: int, width: int) -> tuple:
    return (None, channels, height, width) if layout == "NCHW" else (None, height, width, channels)


def _folder_source(folder: Path, specs: Specs, options: CalibOptions) -> CalibrationSet:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if arrays:
        return _array_folder_source(folder, arrays, specs, options)
    if images:
        return _image_folder_source(folder, images, specs, options)
    raise InputMismatchError(f"{folder}: holds no .npy, .npz or image files; put calibration inputs there")


def _iterable_source(feeds: Iterable[Feeds], specs: Specs, options: CalibOptions) -> CalibrationSet:
    """Any iterable of feed dicts, each a batch; a one-shot iterator is kept (up to the sample
    cap) so that it can be read more than once."""
    if iter(feeds) is feeds:
        kept, count = [], 0
        for batch in feeds:
            kept.append(batch)
            count += len(next(iter(batch.values())))
            if count >= options.samples:
                break
        feeds = kept

    def batches() -> Iterator[Feeds]:
        for batch in _rebatch(iter(feeds), options.batch, options.samples):
            yield check_feeds(batch, specs, "calibration feeds")

    return CalibrationSet("feeds given in Python", False, batches)


def _synthetic_source(specs: Specs, int_bounds: dict[str, int], options: CalibOptions) -> CalibrationSet:
    def batches() -> Iterator[Feeds]:
        for index, start in enumerate(range(0, options.samples, options.batch)):
            count = min(options.batch, options.samples - start)
            yield synthetic_feeds(specs, int_bounds, seed=options.seed + index, batch=count)

    return CalibrationSet(f"synthetic ({options.samples} samples from the input types)", True, batches, options.samples)


def open_calibration(
    data: str | os.PathLike | Iterable[Feeds] | None,
    specs: Specs,
    int_bounds: dict[str, int],
    options: CalibOptions = CalibOptions(),
) -> CalibrationSet:
    """The calibration set for `data`: a path (.npz file or folder), feeds, or None for synthetic.
    Names, dtypes and shapes of files are checked here, before any model runs. A model whose
    inputs all fix the batch size gets batches of exactly that size."""
    fixed = {shape[0] for _, shape in specs.values() if shape and isinstance(shape[0], int)}
    if len(fixed) == 1 and len(specs) == sum(1 for _, s in specs.values() if s and isinstance(s[0], int)):
        options = dataclasses.replace(options, batch=fixed.pop())
    return dataclasses.replace(_source(data, specs, int_bounds, options), positions=options.positions, seed=options.seed)


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _text_source(path: Path, specs: Specs, options: CalibOptions) -> CalibrationSet:
    """One sample per non-empty line of a text file, tokenized with `options.tokenizer` (a
    tokenizer.json, read by the `tokenizers` package), cut to `max_tokens`, padded per batch."""
    if options.tokenizer is None:
        raise ConfigError(f"--calib {path}: calibration text needs the model's tokenizer: pass --tokenizer tokenizer.json")
    others = sorted(set(specs) - set(TEXT_INPUTS))
    if "input_ids" not in specs or others:
        raise InputMismatchError(
            f"--calib {path}: text feeds {', '.join(TEXT_INPUTS)}, but the model also takes {others or 'no input_ids'}; "
            "save its inputs in an .npz instead"
        )
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(options.tokenizer))
        tokenizer.no_padding()  # padded per batch below, to the batch's longest line
        tokenizer.enable_truncation(options.max_tokens)
    except ImportError:
        raise ConfigError("--tokenizer needs the tokenizers package: pip install tokenizers") from None
    except Exception as err:
        raise ConfigError(f"--tokenizer {options.tokenizer}: not a readable tokenizer.json ({err})") from None
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][: options.samples]
    if not lines:
        raise InputMismatchError(f"--calib {path}: holds no text; give it one sample per line")
    encoded = [e.ids for e in tokenizer.encode_batch(lines)]

    def batches() -> Iterator[Feeds]:
        for start in range(0, len(encoded), options.batch):
            rows = encoded[start : start + options.batch]
            width = max(len(r) for r in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, : len(row)], mask[i, : len(row)] = row, 1
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
                     "position_ids": np.broadcast_to(np.arange(width), ids.shape).copy()}
            yield {name: feeds[name].astype(specs[name][0]) for name in specs}

    return CalibrationSet(f"{path} ({len(lines)} lines, tokenized by {Path(options.tokenizer).name})", False, batches,
                          len(lines))


def _source(data, specs: Specs, int_bounds: dict[str, int], options: CalibOptions) -> CalibrationSet:
    if data is None:
        return _synthetic_source(specs, int_bounds, options)
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_file() and path.suffix == ".txt":
            return _text_source(path, specs, options)
        if path.is_dir():
            return _folder_source(path, specs, options)
        if path.is_file() and path.suffix == ".npz":
            return _npz_source(path, specs, options)
        if not path.exists():
            raise InputMismatchError(f"--calib {path}: no such file or folder")
        raise InputMismatchError(f"--calib {path}: not an .npz file or a folder of .npy/.npz files or images")
    return _iterable_source(data, specs, options)
