"""KServe v2 tensor codec, checked against what tritonclient itself puts on (and reads off) the wire."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import _utils as grpc_utils
from tritonclient.grpc import service_pb2 as triton_pb

from services.frontend.kserve import codec
from services.frontend.kserve.codec import Tensor
from tandem.errors import InvalidRequest
from tandem.proto.kserve import grpc_service_pb2 as pb
from tandem.proto.kserve import model_config_pb2

pytestmark = pytest.mark.unit


def _from_tritonclient(*inputs: grpcclient.InferInput, **kwargs: object) -> pb.ModelInferRequest:
    """The ModelInferRequest tritonclient.grpc would send, parsed by our stubs."""
    request = grpc_utils._get_inference_request(
        model_name="m", inputs=list(inputs), model_version="", request_id="r1", outputs=None,
        sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None,
        parameters=kwargs or None,
    )
    return pb.ModelInferRequest.FromString(request.SerializeToString())


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_our_protos_match_tritonclient_field_for_field() -> None:
    """Every message, field number and type we declare is the published protocol's."""
    from tritonclient.grpc import model_config_pb2 as triton_config

    def check(ours: object, theirs: object) -> None:
        for field in ours.fields:  # type: ignore[attr-defined]
            other = theirs.fields_by_name[field.name]  # type: ignore[attr-defined]
            assert (field.number, field.type) == (other.number, other.type), field.full_name
        for nested in ours.nested_types:  # type: ignore[attr-defined]
            check(nested, theirs.nested_types_by_name[nested.name])  # type: ignore[attr-defined]

    for ours_file, theirs_file in ((pb.DESCRIPTOR, triton_pb.DESCRIPTOR),
                                   (model_config_pb2.DESCRIPTOR, triton_config.DESCRIPTOR)):
        assert ours_file.package == theirs_file.package == "inference"
        for name, message in ours_file.message_types_by_name.items():
            check(message, theirs_file.message_types_by_name[name])
    ours_service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs_service = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours_service.methods:
        other = theirs_service.methods_by_name[method.name]
        assert (method.input_type.name, method.output_type.name) == (other.input_type.name,
                                                                      other.output_type.name)


def test_bytes_and_bool_inputs_from_tritonclient_decode() -> None:
    request = _from_tritonclient(
        _input("text_input", np.array([b"Hello", "w\u00f6rld".encode()], dtype=object), "BYTES"),
        _input("stream", np.array([True]), "BOOL"),
        _input("max_tokens", np.array([[7]], dtype=np.int32), "INT32"),
        _input("temperature", np.array([0.5], dtype=np.float32), "FP32"),
        _input("random_seed", np.array([2**40], dtype=np.uint64), "UINT64"),
    )
    tensors = codec.decode_grpc_inputs(request)
    assert tensors["text_input"].values == [b"Hello", "w\u00f6rld".encode()]
    assert tensors["stream"].values == [True]
    assert tensors["max_tokens"] == Tensor("max_tokens", "INT32", [1, 1], [7])
    assert tensors["temperature"].values == [0.5]
    assert tensors["random_seed"].values == [2**40]


def test_typed_contents_decode() -> None:
    request = pb.ModelInferRequest(inputs=[
        pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1],
                                              contents=pb.InferTensorContents(bytes_contents=[b"hi"])),
        pb.ModelInferRequest.InferInputTensor(name="top_k", datatype="INT32", shape=[1],
                                              contents=pb.InferTensorContents(int_contents=[5])),
    ])
    tensors = codec.decode_grpc_inputs(request)
    assert tensors["text_input"].values == [b"hi"]
    assert tensors["top_k"].values == [5]


@pytest.mark.parametrize(("datatype", "contents"), [
    ("INT32", pb.InferTensorContents(bytes_contents=[b"x"])),  # data in the wrong field
    ("FP16", pb.InferTensorContents()),  # FP16 travels raw only
    ("INT32", pb.InferTensorContents(int_contents=[1, 2])),  # two elements for shape [1]
    ("COMPLEX", pb.InferTensorContents()),
])
def test_bad_typed_contents_are_rejected(datatype: str, contents: pb.InferTensorContents) -> None:
    request = pb.ModelInferRequest(inputs=[
        pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=[1], contents=contents)])
    with pytest.raises(InvalidRequest) as info:
        codec.decode_grpc_inputs(request)
    assert info.value.field == "x"


@pytest.mark.parametrize("raw", [
    b"\x05\x00\x00",  # ends inside the length prefix
    b"\x09\x00\x00\x00short",  # element runs past the end
])
def test_malformed_bytes_elements_are_rejected(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="text_input"):
        codec.decode_raw("text_input", "BYTES", [1], raw)


def test_raw_size_and_shape_must_agree() -> None:
    with pytest.raises(InvalidRequest, match="whole number"):
        codec.decode_raw("max_tokens", "INT32", [1], b"\x01\x00\x00")
    with pytest.raises(InvalidRequest, match="2 elements"):
        codec.decode_raw("max_tokens", "INT32", [1], b"\x01\x00\x00\x00\x02\x00\x00\x00")
    with pytest.raises(InvalidRequest, match="negative"):
        codec.decode_raw("max_tokens", "INT32", [-1], b"")


def test_bf16_raw_decodes_to_floats() -> None:
    raw = np.array([1.5, -2.0], dtype=np.float32).view(np.uint32) >> 16
    tensor = codec.decode_raw("temperature", "BF16", [2], raw.astype("<u2").tobytes())
    assert tensor.values == [1.5, -2.0]


def test_one_raw_entry_per_input_and_unique_names() -> None:
    request = _from_tritonclient(_input("text_input", np.array([b"a"], dtype=object), "BYTES"))
    request.raw_input_contents.append(b"")
    with pytest.raises(InvalidRequest, match="raw_input_contents"):
        codec.decode_grpc_inputs(request)
    twice = _from_tritonclient(_input("text_input", np.array([b"a"], dtype=object), "BYTES"),
                               _input("text_input", np.array([b"b"], dtype=object), "BYTES"))
    with pytest.raises(InvalidRequest, match="more than once"):
        codec.decode_grpc_inputs(twice)


def test_parameters_round_trip() -> None:
    request = _from_tritonclient(_input("text_input", np.array([b"a"], dtype=object), "BYTES"),
                                 flag=True, count=3, name="x")
    request.parameters["ratio"].double_param = 0.5
    assert codec.parameters_from_proto(request.parameters) == {"flag": True, "count": 3, "name": "x", "ratio": 0.5}
    target = pb.InferParameter()
    for value in (True, 7, 0.25, "s"):
        codec.set_parameter(target, value)
        assert codec.parameters_from_proto({"k": target}) == {"k": value}


def test_outputs_read_back_by_tritonclient() -> None:
    response = pb.ModelInferResponse(model_name="m", id="r1")
    codec.encode_grpc_outputs([Tensor("text_output", "BYTES", [1], ["caf\u00e9".encode()]),
                               Tensor("num_input_tokens", "UINT32", [1], [12])], response)
    result = grpcclient.InferResult(triton_pb.ModelInferResponse.FromString(response.SerializeToString()))
    assert result.as_numpy("text_output").tolist() == ["caf\u00e9".encode()]
    assert result.as_numpy("num_input_tokens").tolist() == [12]


def test_json_inputs_inline_and_binary() -> None:
    tensor = codec.decode_json_input({"name": "stop_words", "datatype": "BYTES", "shape": [1, 2],
                                      "data": [["a", "b"]]})
    assert tensor.values == [b"a", b"b"]
    binary = codec.encode_bytes_elements([b"hello"])
    tensor = codec.decode_json_input({"name": "text_input", "datatype": "BYTES", "shape": [1],
                                      "parameters": {"binary_data_size": len(binary)}}, binary)
    assert tensor.values == [b"hello"]
    with pytest.raises(InvalidRequest, match="not a BOOL"):
        codec.decode_json_input({"name": "stream", "datatype": "BOOL", "shape": [1], "data": [1]})
    with pytest.raises(InvalidRequest, match="shape"):
        codec.decode_json_input({"name": "stream", "datatype": "BOOL", "shape": "1", "data": [True]})


def test_json_outputs_inline_and_binary() -> None:
    tensor = Tensor("text_output", "BYTES", [1], [b"hi"])
    assert codec.encode_json_output(tensor, binary=False) == (
        {"name": "text_output", "datatype": "BYTES", "shape": [1], "data": ["hi"]}, None)
    obj, data = codec.encode_json_output(tensor, binary=True)
    assert obj["parameters"] == {"binary_data_size": 6} and data == b"\x02\x00\x00\x00hi"
