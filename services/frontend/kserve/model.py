"""The served model as Triton describes it: input and output tensors (the vLLM backend's names
plus the TensorRT-LLM ensemble's separate sampling inputs), metadata and a decoupled model config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tandem

MODEL_VERSION = "1"  # Tandem serves one version; Triton clients expect a version string
SERVER_NAME = "tandem"
# The Triton extensions this server speaks (reported by ServerMetadata and GET /v2).
EXTENSIONS = ("model_configuration", "binary_tensor_data", "parameters", "generate")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output. ``dims`` has -1 for a variable-size dimension."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = True

    @property
    def config_datatype(self) -> str:
        """The model configuration's spelling: BYTES is TYPE_STRING there."""
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"


INPUTS: tuple[TensorSpec, ...] = (
    # Triton's vLLM backend.
    TensorSpec("text_input", "BYTES", (1,), optional=False),
    TensorSpec("stream", "BOOL", (1,)),
    TensorSpec("sampling_parameters", "BYTES", (1,)),
    TensorSpec("exclude_input_in_output", "BOOL", (1,)),
    TensorSpec("return_finish_reason", "BOOL", (1,)),
    TensorSpec("return_num_input_tokens", "BOOL", (1,)),
    TensorSpec("return_num_output_tokens", "BOOL", (1,)),
    # The TensorRT-LLM backend's ensemble: sampling settings as separate tensors.
    TensorSpec("max_tokens", "INT32", (1,)),
    TensorSpec("temperature", "FP32", (1,)),
    TensorSpec("top_p", "FP32", (1,)),
    TensorSpec("top_k", "INT32", (1,)),
    TensorSpec("random_seed", "UINT64", (1,)),
    TensorSpec("stop_words", "BYTES", (-1,)),
    TensorSpec("bad_words", "BYTES", (-1,)),
    TensorSpec("end_id", "INT32", (1,)),
    TensorSpec("pad_id", "INT32", (1,)),
    TensorSpec("beam_width", "INT32", (1,)),
    TensorSpec("repetition_penalty", "FP32", (1,)),
    TensorSpec("presence_penalty", "FP32", (1,)),
    TensorSpec("frequency_penalty", "FP32", (1,)),
    TensorSpec("length_penalty", "FP32", (1,)),
    TensorSpec("return_log_probs", "BOOL", (1,)),
    TensorSpec("return_context_logits", "BOOL", (1,)),
    TensorSpec("return_generation_logits", "BOOL", (1,)),
)
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "BYTES", (-1,)),
    TensorSpec("finish_reason", "BYTES", (-1,)),
    TensorSpec("num_input_tokens", "UINT32", (1,)),
    TensorSpec("num_output_tokens", "UINT32", (-1,)),
)
INPUTS_BY_NAME = {spec.name: spec for spec in INPUTS}
OUTPUTS_BY_NAME = {spec.name: spec for spec in OUTPUTS}


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": tandem.__version__, "extensions": list(EXTENSIONS)}


def model_metadata(model_name: str) -> dict[str, Any]:
    """The v2 model metadata; field names match ModelMetadataResponse and the HTTP JSON alike."""
    def tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.dims)} for s in specs]

    return {"name": model_name, "versions": [MODEL_VERSION], "platform": "tandem",
            "inputs": tensors(INPUTS), "outputs": tensors(OUTPUTS)}


def model_config(model_name: str, max_model_len: int) -> dict[str, Any]:
    """Triton's model configuration as JSON (GET .../config), also parsed into the ModelConfig proto.

    Decoupled: a request may get many responses (one per token delta on ModelStreamInfer).
    max_batch_size 0: tensors carry no batch dimension; batching happens inside the engines.
    """
    return {
        "name": model_name,
        "platform": "",
        "backend": "tandem",
        "max_batch_size": 0,
        "input": [{"name": s.name, "data_type": s.config_datatype, "format": "FORMAT_NONE",
                   "dims": list(s.dims), "optional": s.optional} for s in INPUTS],
        "output": [{"name": s.name, "data_type": s.config_datatype, "dims": list(s.dims)} for s in OUTPUTS],
        "instance_group": [{"name": model_name, "kind": "KIND_MODEL", "count": 1}],
        "parameters": {"max_model_len": {"string_value": str(max_model_len)}},
        "model_transaction_policy": {"decoupled": True},
    }


def check_version(model_name: str, version: str) -> str | None:
    """None when ``version`` selects the served version, else why not (for a NOT_FOUND error)."""
    if version in ("", MODEL_VERSION):
        return None
    return f"Request for unknown model: '{model_name}' version {version} is not found; " \
           f"the served version is {MODEL_VERSION}"
