"""Run configurations: every option of `onnxcomp compress` in a TOML file, under the flags'
own names (`block-size = 32`), read with --config and written with --dump-config, so a
run can be repeated exactly."""

from __future__ import annotations

import math
from pathlib import Path

from onnxcomp.errors import ConfigError

# Parameters that say where and how to write, not how to compress.
NOT_RECORDED = ("model", "config", "dump_config")


def read(path: str | Path, known: set[str]) -> dict:
    """The file's options as click parameter names, each one checked to be an option."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot be read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path}: not valid TOML ({err})") from None
    options = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}; the names are those of the flags")
    return options


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump(params: dict) -> str:
    """TOML of every recorded parameter that has a value (None means "not given")."""
    lines = ["# onnxcomp compress --config this-file"]
    for name, value in sorted(params.items()):
        if name in NOT_RECORDED or value is None:
            continue
        lines.append(f"{name.replace('_', '-')} = {_value(value)}")
    return "\n".join(lines) + "\n"
