"""Where the integer weights lie inside a serialized ONNX file, found by walking the
protobuf wire format (ModelProto.graph → GraphProto.initializer → TensorProto.raw_data, or
an external data file's span) without re-serializing anything, so the files can be rebuilt
byte for byte."""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

# Element types whose payload is entropy-coded, and their bits per element.
INTEGER_BITS = {
    TensorProto.INT8: 8, TensorProto.UINT8: 8,
    TensorProto.INT4: 4, TensorProto.UINT4: 4,
    TensorProto.INT2: 2, TensorProto.UINT2: 2,
}
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True)
class RawTensor:
    """One initializer's raw_data payload: its byte span in the file and what it holds."""

    name: str
    data_type: int
    elements: int
    start: int
    end: int
    location: str | None = None  # the external data file holding the payload; None: raw_data in the model


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int):
    """(field number, wire type, value or (payload start, payload end), next position)."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, kind = key >> 3, key & 7
        if kind == _VARINT:
            value, pos = _varint(data, pos)
            yield number, kind, value
        elif kind == _LEN:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise WireError("length-delimited field runs past its message")
            yield number, kind, (pos, pos + length)
            pos += length
        elif kind == _I64:
            pos += 8
        elif kind == _I32:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {kind}")
    if pos != end:
        raise WireError("message ends inside a field")


def _entry(data: bytes, start: int, end: int) -> tuple[str, str]:
    """A StringStringEntryProto: (key, value)."""
    text = {number: data[v[0] : v[1]].decode("utf-8", "replace") for number, kind, v in _fields(data, start, end) if kind == _LEN}
    return text.get(1, ""), text.get(2, "")


def _tensor(data: bytes, start: int, end: int) -> RawTensor | None:
    dims, data_type, name, raw, external = [], 0, "", None, {}
    for number, kind, value in _fields(data, start, end):
        if number == 1 and kind == _VARINT:
            dims.append(value)
        elif number == 1 and kind == _LEN:  # packed dims
            pos, stop = value
            while pos < stop:
                dim, pos = _varint(data, pos)
                dims.append(dim)
        elif number == 2 and kind == _VARINT:
            data_type = value
        elif number == 8 and kind == _LEN:
            name = data[value[0] : value[1]].decode("utf-8", "replace")
        elif number == 9 and kind == _LEN:
            raw = value
        elif number == 13 and kind == _LEN:  # external_data
            key, text = _entry(data, *value)
            external[key] = text
    if data_type not in INTEGER_BITS:
        return None
    elements = 1
    for dim in dims:
        elements *= dim
    if raw is not None:
        return RawTensor(name, data_type, elements, raw[0], raw[1])
    if "location" not in external:
        return None
    offset = int(external.get("offset", 0))
    length = int(external.get("length", -(-elements * INTEGER_BITS[data_type] // 8)))
    return RawTensor(name, data_type, elements, offset, offset + length, external["location"])


def integer_initializers(data: bytes) -> list[RawTensor]:
    """Every main-graph initializer with an integer payload (raw_data, or a span of an
    external data file), in the order the model lists them."""
    found = []
    for number, kind, value in _fields(data, 0, len(data)):
        if number == 7 and kind == _LEN:  # ModelProto.graph
            for g_number, g_kind, g_value in _fields(data, *value):
                if g_number == 5 and g_kind == _LEN:  # GraphProto.initializer
                    tensor = _tensor(data, *g_value)
                    if tensor is not None:
                        found.append(tensor)
    return found
