"""KServe v2 inputs -> one text-generation request, and outputs back, with the semantics of
Triton's vLLM backend (``sampling_parameters`` JSON, ``exclude_input_in_output``) plus the
TensorRT-LLM ensemble's separate sampling tensors. Bad input raises InvalidRequest."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.frontend.kserve.codec import (
    FLOAT_DATATYPES,
    INTEGER_DATATYPES,
    ParameterValue,
    Tensor,
    element_count,
)
from services.frontend.kserve.model import INPUTS_BY_NAME, OUTPUTS_BY_NAME, TensorSpec
from tandem.engine.types import FinishReason, SamplingParams
from tandem.errors import InvalidRequest

TEXT_INPUT = "text_input"
DEFAULT_OUTPUTS = ("text_output", "finish_reason")
_OPTIONAL_OUTPUT_FLAGS = {"return_num_input_tokens": "num_input_tokens",
                          "return_num_output_tokens": "num_output_tokens"}

_IGNORED = object()  # a neutral value meaning "any value is fine: it changes nothing here"
# vLLM SamplingParams keys Tandem has no use for: accepted only at their neutral value (None:
# only null), so a request never silently samples differently from what it asked for.
_NEUTRAL_SAMPLING_KEYS: dict[str, Any] = {
    "n": 1, "best_of": 1,
    "min_p": 0.0, "logprobs": None, "prompt_logprobs": None, "use_beam_search": False,
    "length_penalty": 1.0, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False, "detokenize": True, "lora_name": None,
}
# TensorRT-LLM inputs, likewise.
_NEUTRAL_TRTLLM_INPUTS: dict[str, Any] = {
    "beam_width": 1,
    "return_log_probs": False, "return_context_logits": False, "return_generation_logits": False,
    "length_penalty": _IGNORED,  # only shapes beam search, and beam_width is 1
    "pad_id": _IGNORED,  # padding is internal to the engine
}


@dataclass(slots=True)
class KServeRequest:
    """What one inference request asks for, independent of gRPC or HTTP."""

    prompt: str
    sampling: SamplingParams
    stream: bool  # one response per token delta, else one response with the whole text
    prepend_input: bool  # text_output starts with the prompt (vLLM: unless excluded; never when streaming)
    output_names: tuple[str, ...]


def parse_request(
    tensors: Mapping[str, Tensor],
    parameters: Mapping[str, ParameterValue],
    requested_outputs: Sequence[str],
    model_name: str,
) -> KServeRequest:
    for tensor in tensors.values():
        spec = INPUTS_BY_NAME.get(tensor.name)
        if spec is None:
            raise InvalidRequest(f"unexpected inference input '{tensor.name}' for model '{model_name}'",
                                 tensor.name)
        _check_tensor(spec, tensor)
    if TEXT_INPUT not in tensors:
        raise InvalidRequest(f"missing required input '{TEXT_INPUT}' for model '{model_name}'", TEXT_INPUT)
    prompt = _utf8(tensors[TEXT_INPUT].values[0], TEXT_INPUT)

    stream = _flag(tensors, parameters, "stream")
    exclude = _optional_flag(tensors, parameters, "exclude_input_in_output")
    # vLLM backend: the prompt is prepended unless excluded, and by default only when not streaming.
    prepend_input = (not exclude) if exclude is not None else not stream
    if prepend_input and stream:
        raise InvalidRequest("exclude_input_in_output=false is not allowed when streaming",
                             "exclude_input_in_output")

    sampling_kwargs: dict[str, Any] = {}
    _apply_vllm_sampling(sampling_kwargs, parameters, strict=False, source="parameters")
    if "sampling_parameters" in tensors:
        raw = tensors["sampling_parameters"].values[0]
        try:
            decoded = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"sampling_parameters is not valid JSON: {exc}", "sampling_parameters") from None
        if not isinstance(decoded, dict):
            raise InvalidRequest("sampling_parameters must be a JSON object", "sampling_parameters")
        _apply_vllm_sampling(sampling_kwargs, decoded, strict=True, source="sampling_parameters")
    _apply_trtllm_inputs(sampling_kwargs, tensors)
    sampling = SamplingParams(**sampling_kwargs)  # validates each value, naming the field

    return KServeRequest(prompt=prompt, sampling=sampling, stream=stream, prepend_input=prepend_input,
                         output_names=_output_names(tensors, parameters, requested_outputs, model_name))


def build_outputs(
    request: KServeRequest,
    text: str,
    finish_reason: FinishReason | None,
    num_input_tokens: int,
    num_output_tokens: int,
) -> list[Tensor]:
    """The output tensors of one response; finish_reason appears only once it is known."""
    tensors: list[Tensor] = []
    for name in request.output_names:
        if name == "text_output":
            tensors.append(Tensor(name, "BYTES", [1], [text.encode("utf-8")]))
        elif name == "finish_reason":
            if finish_reason is not None:
                tensors.append(Tensor(name, "BYTES", [1], [finish_reason.value.encode()]))
        elif name == "num_input_tokens":
            tensors.append(Tensor(name, "UINT32", [1], [num_input_tokens]))
        elif name == "num_output_tokens":
            tensors.append(Tensor(name, "UINT32", [1], [num_output_tokens]))
    return tensors


# -- tensors --------------------------------------------------------------------------------------

def _check_tensor(spec: TensorSpec, tensor: Tensor) -> None:
    allowed = _allowed_datatypes(spec.datatype)
    if tensor.datatype not in allowed:
        raise InvalidRequest(f"input '{spec.name}' has datatype {tensor.datatype}; expected "
                             f"{' or '.join(sorted(allowed))}", spec.name)
    # A leading batch dimension of 1 is tolerated: TensorRT-LLM ensemble clients send [1, 1].
    if not 1 <= len(tensor.shape) <= 2 or (len(tensor.shape) == 2 and tensor.shape[0] != 1):
        raise InvalidRequest(f"input '{spec.name}' has shape {tensor.shape}; expected {list(spec.dims)} "
                             "(optionally with a leading batch dimension of 1)", spec.name)
    if spec.dims == (1,) and element_count(spec.name, tensor.shape) != 1:
        raise InvalidRequest(f"input '{spec.name}' must hold exactly one element (shape [1]); got shape "
                             f"{tensor.shape}", spec.name)


def _allowed_datatypes(declared: str) -> frozenset[str]:
    if declared in INTEGER_DATATYPES:
        return INTEGER_DATATYPES
    if declared in FLOAT_DATATYPES:  # an integer 0 or 1 is a fine temperature
        return FLOAT_DATATYPES | INTEGER_DATATYPES
    return frozenset([declared])


def _utf8(value: bytes, name: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"input '{name}' is not valid UTF-8", name) from None


def _optional_flag(tensors: Mapping[str, Tensor], parameters: Mapping[str, ParameterValue],
                   name: str) -> bool | None:
    """An input tensor, else a request parameter of the same name (the generate extension's habit)."""
    if name in tensors:
        return bool(tensors[name].values[0])
    if name in parameters:
        return _coerce_bool(parameters[name], f"parameters.{name}")
    return None


def _flag(tensors: Mapping[str, Tensor], parameters: Mapping[str, ParameterValue], name: str) -> bool:
    return bool(_optional_flag(tensors, parameters, name))


def _output_names(tensors: Mapping[str, Tensor], parameters: Mapping[str, ParameterValue],
                  requested: Sequence[str], model_name: str) -> tuple[str, ...]:
    for name in requested:
        if name not in OUTPUTS_BY_NAME:
            raise InvalidRequest(f"unexpected inference output '{name}' for model '{model_name}'", name)
    if requested:
        return tuple(dict.fromkeys(requested))
    extra = [output for flag, output in _OPTIONAL_OUTPUT_FLAGS.items() if _flag(tensors, parameters, flag)]
    return (*DEFAULT_OUTPUTS, *extra)


# -- sampling -------------------------------------------------------------------------------------

def _apply_vllm_sampling(kwargs: dict[str, Any], values: Mapping[str, Any], *, strict: bool,
                         source: str) -> None:
    """vLLM's sampling keys; numbers may come as strings, as vLLM's own client sends them.

    ``strict``: unknown keys are errors (sampling_parameters is vLLM's own contract); request
    parameters are a shared bag (tritonclient and Triton put their own keys there), so unknown
    keys in them are ignored.
    """
    for key, value in values.items():
        field = f"{source}.{key}"
        if value is None:
            continue  # vLLM drops nulls and keeps its defaults
        converter = _VLLM_KEYS.get(key)
        if converter is not None:
            kwargs[key] = converter(value, field)  # vLLM and Tandem name these keys alike
        elif key in _NEUTRAL_SAMPLING_KEYS:
            _check_neutral(value, _NEUTRAL_SAMPLING_KEYS[key], field)
        elif strict:
            raise InvalidRequest(f"{source} has unknown key '{key}'; supported: "
                                 f"{', '.join(sorted([*_VLLM_KEYS, *_NEUTRAL_SAMPLING_KEYS]))}", field)


def _apply_trtllm_inputs(kwargs: dict[str, Any], tensors: Mapping[str, Tensor]) -> None:
    def scalar(name: str) -> Any:
        return tensors[name].values[0] if name in tensors else None

    for name, key in (("max_tokens", "max_tokens"), ("top_k", "top_k"), ("random_seed", "seed")):
        if (value := scalar(name)) is not None:
            kwargs[key] = _coerce_int(value, name)
    for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if (value := scalar(name)) is not None:
            kwargs[name] = _coerce_float(value, name)
    if "stop_words" in tensors:
        # TensorRT-LLM clients send "" for "no stop words".
        words = [_utf8(word, "stop_words") for word in tensors["stop_words"].values]
        kwargs["stop"] = [*kwargs.get("stop", []), *(w for w in words if w)]
    if any(tensors["bad_words"].values if "bad_words" in tensors else ()):
        raise InvalidRequest("bad_words is not supported by Tandem; send it empty", "bad_words")
    if (end_id := scalar("end_id")) is not None:
        kwargs["stop_token_ids"] = [*kwargs.get("stop_token_ids", []), _coerce_int(end_id, "end_id")]
    for name, neutral in _NEUTRAL_TRTLLM_INPUTS.items():
        if (value := scalar(name)) is not None:
            _check_neutral(value, neutral, name)
    if "top_k" in kwargs and kwargs["top_k"] == -1:
        kwargs["top_k"] = 0


def _check_neutral(value: Any, neutral: Any, field: str) -> None:
    """``value`` is not None; raise unless it equals ``neutral`` (after vLLM-style coercion)."""
    if neutral is _IGNORED:
        return
    if neutral is None:
        same = False
    elif isinstance(neutral, bool):
        same = _coerce_bool(value, field) == neutral
    elif isinstance(neutral, int):
        same = _coerce_int(value, field) == neutral
    else:
        same = _coerce_float(value, field) == neutral
    if not same:
        raise InvalidRequest(f"{field}={value!r} is not supported by Tandem (only {neutral!r})", field)


def _coerce_int(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise InvalidRequest(f"{field} must be an integer, got {value!r}", field)
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{field} must be an integer, got {value!r}", field) from None
    if not math.isfinite(number) or number != int(number):
        raise InvalidRequest(f"{field} must be an integer, got {value!r}", field)
    return int(number)


def _coerce_float(value: Any, field: str) -> float:
    if isinstance(value, bool):
        raise InvalidRequest(f"{field} must be a number, got {value!r}", field)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{field} must be a number, got {value!r}", field) from None
    if not math.isfinite(number):
        raise InvalidRequest(f"{field} must be a finite number, got {value!r}", field)
    return number


def _coerce_bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidRequest(f"{field} must be true or false, got {value!r}", field)


def _coerce_stop(value: Any, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise InvalidRequest(f"{field} must be a string or a list of strings", field)


def _coerce_token_ids(value: Any, field: str) -> list[int]:
    if not isinstance(value, list):
        raise InvalidRequest(f"{field} must be a list of token ids", field)
    return [_coerce_int(item, field) for item in value]


def _coerce_top_k(value: Any, field: str) -> int:
    top_k = _coerce_int(value, field)
    return 0 if top_k == -1 else top_k  # vLLM's "disabled" is -1, Tandem's is 0


_VLLM_KEYS: dict[str, Callable[[Any, str], Any]] = {
    "max_tokens": _coerce_int, "temperature": _coerce_float, "top_p": _coerce_float,
    "top_k": _coerce_top_k, "seed": _coerce_int, "stop": _coerce_stop,
    "stop_token_ids": _coerce_token_ids, "ignore_eos": _coerce_bool,
    "presence_penalty": _coerce_float, "frequency_penalty": _coerce_float, "repetition_penalty": _coerce_float,
    "min_tokens": _coerce_int,
}
