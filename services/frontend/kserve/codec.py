"""KServe v2 tensors on the wire: decode request inputs (raw bytes, typed contents, JSON) into
flat Python values, and encode output tensors back. Malformed tensors raise InvalidRequest."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tandem.errors import InvalidRequest

ParameterValue = bool | int | float | str

# Little-endian element layout of every fixed-size datatype; BYTES and BF16 are handled apart.
_NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
DATATYPES = frozenset([*_NUMPY_DTYPES, "BYTES", "BF16"])
INTEGER_DATATYPES = frozenset(["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"])
FLOAT_DATATYPES = frozenset(["FP16", "FP32", "FP64", "BF16"])

# InferTensorContents has one repeated field per family of datatypes; FP16 and BF16 have none
# (the protocol sends them raw only).
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_LENGTH_PREFIX = struct.Struct("<I")


@dataclass(slots=True)
class Tensor:
    """One tensor with its elements flattened in row-major order (bytes for BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    values: list[Any] = field(default_factory=list)


def element_count(name: str, shape: Sequence[int]) -> int:
    if any(dim < 0 for dim in shape):
        raise InvalidRequest(f"input '{name}' has a negative dimension in shape {list(shape)}", name)
    return math.prod(shape)


def _check_datatype(name: str, datatype: str) -> None:
    if datatype not in DATATYPES:
        raise InvalidRequest(f"input '{name}' has unknown datatype '{datatype}'; expected one of "
                             f"{', '.join(sorted(DATATYPES))}", name)


def _check_count(name: str, shape: Sequence[int], num_values: int) -> None:
    expected = element_count(name, shape)
    if num_values != expected:
        raise InvalidRequest(f"input '{name}' has shape {list(shape)} ({expected} elements) but "
                             f"{num_values} elements of data", name)


# -- BYTES elements: each a 4-byte little-endian length, then that many bytes --------------------

def decode_bytes_elements(name: str, raw: bytes) -> list[bytes]:
    elements: list[bytes] = []
    offset, size = 0, len(raw)
    while offset < size:
        if offset + 4 > size:
            raise InvalidRequest(f"input '{name}': BYTES data ends inside a 4-byte length prefix", name)
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise InvalidRequest(f"input '{name}': a BYTES element of {length} bytes runs past the "
                                 f"end of the data", name)
        elements.append(bytes(raw[offset:offset + length]))
        offset += length
    return elements


def encode_bytes_elements(values: Iterable[bytes]) -> bytes:
    return b"".join(_LENGTH_PREFIX.pack(len(value)) + value for value in values)


# -- decoding -------------------------------------------------------------------------------------

def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> Tensor:
    """A tensor sent in raw_input_contents (gRPC) or as binary data (HTTP)."""
    _check_datatype(name, datatype)
    values: list[Any]
    if datatype == "BYTES":
        values = decode_bytes_elements(name, raw)
    else:
        item_size = 2 if datatype == "BF16" else np.dtype(_NUMPY_DTYPES[datatype]).itemsize
        if len(raw) % item_size:
            raise InvalidRequest(f"input '{name}': {len(raw)} bytes of data is not a whole number of "
                                 f"{datatype} elements", name)
        if datatype == "BF16":  # the upper half of an IEEE float32
            halves = np.frombuffer(raw, dtype="<u2").astype("<u4") << 16
            values = halves.view("<f4").tolist()
        else:
            values = np.frombuffer(raw, dtype=_NUMPY_DTYPES[datatype]).tolist()
    _check_count(name, shape, len(values))
    return Tensor(name, datatype, list(shape), values)


def decode_typed(name: str, datatype: str, shape: Sequence[int], contents: Any) -> Tensor:
    """A tensor sent in InferTensorContents (gRPC), the repeated field matching its datatype."""
    _check_datatype(name, datatype)
    field_name = _CONTENTS_FIELD.get(datatype)
    if field_name is None:
        raise InvalidRequest(f"input '{name}': {datatype} data must be sent in raw_input_contents", name)
    for other in set(_CONTENTS_FIELD.values()) - {field_name}:
        if len(getattr(contents, other)):
            raise InvalidRequest(f"input '{name}' is {datatype} but carries data in '{other}'", name)
    values = list(getattr(contents, field_name))
    _check_count(name, shape, len(values))
    return Tensor(name, datatype, list(shape), values)


def decode_grpc_inputs(request: Any) -> dict[str, Tensor]:
    """The inputs of a ModelInferRequest by name, from raw_input_contents or typed contents."""
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise InvalidRequest(f"raw_input_contents has {len(raw_contents)} entries for "
                             f"{len(request.inputs)} inputs; send one per input, in order", "raw_input_contents")
    tensors: dict[str, Tensor] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in tensors:
            raise InvalidRequest(f"input '{name}' appears more than once", name)
        if raw_contents:
            if tensor.HasField("contents"):
                raise InvalidRequest(f"input '{name}' has typed contents although the request uses "
                                     "raw_input_contents", name)
            tensors[name] = decode_raw(name, tensor.datatype, tensor.shape, raw_contents[index])
        else:
            tensors[name] = decode_typed(name, tensor.datatype, tensor.shape, tensor.contents)
    return tensors


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


def decode_json_input(obj: Any, binary: bytes | None = None) -> Tensor:
    """One element of the v2 HTTP "inputs" list; ``binary`` is its slice of the binary extension."""
    if not isinstance(obj, dict):
        raise InvalidRequest("each input must be an object with name, datatype, shape and data", "inputs")
    name = obj.get("name")
    datatype = obj.get("datatype")
    shape = obj.get("shape")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("an input has no 'name'", "inputs")
    if not isinstance(datatype, str):
        raise InvalidRequest(f"input '{name}' has no 'datatype'", name)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidRequest(f"input '{name}' needs a 'shape' list of integers", name)
    if binary is not None:
        return decode_raw(name, datatype, shape, binary)
    _check_datatype(name, datatype)
    if "data" not in obj:
        raise InvalidRequest(f"input '{name}' has neither 'data' nor binary data", name)
    values = [_json_element(name, datatype, value) for value in _flatten(obj["data"])]
    _check_count(name, shape, len(values))
    return Tensor(name, datatype, list(shape), values)


def _json_element(name: str, datatype: str, value: Any) -> Any:
    if datatype == "BYTES":
        if isinstance(value, str):
            return value.encode("utf-8")
    elif datatype == "BOOL":
        if isinstance(value, bool):
            return value
    elif datatype in INTEGER_DATATYPES:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise InvalidRequest(f"input '{name}': {value!r} is not a {datatype} element", name)


def parameters_from_proto(parameters: Mapping[str, Any]) -> dict[str, ParameterValue]:
    """An InferParameter map as plain Python values (unset parameters are left out)."""
    values: dict[str, ParameterValue] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def set_parameter(target: Any, value: ParameterValue) -> None:
    """Fill an InferParameter from a Python value (bool before int: bool is an int)."""
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = value


# -- encoding -------------------------------------------------------------------------------------

def encode_raw(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return encode_bytes_elements(tensor.values)
    return np.asarray(tensor.values, dtype=_NUMPY_DTYPES[tensor.datatype]).tobytes()


def encode_grpc_outputs(tensors: Sequence[Tensor], response: Any) -> None:
    """Append the tensors to a ModelInferResponse, data in raw_output_contents as tritonclient expects."""
    for tensor in tensors:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(encode_raw(tensor))


def encode_json_output(tensor: Tensor, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """A v2 HTTP output object, with its data inline or (binary=True) as a separate chunk."""
    obj: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
    if binary:
        data = encode_raw(tensor)
        obj["parameters"] = {"binary_data_size": len(data)}
        return obj, data
    if tensor.datatype == "BYTES":
        obj["data"] = [value.decode("utf-8", errors="replace") for value in tensor.values]
    else:
        obj["data"] = list(tensor.values)
    return obj, None
