"""Translation between the worker's wire types (protobuf) and the engine's domain types."""

from __future__ import annotations

from tandem.engine.types import EngineRequest, EngineStats, FinishReason, RequestOutput
from tandem.errors import TandemError
from tandem.proto.common.v1 import common_pb2
from tandem.proto.worker.v1 import worker_pb2
from tandem.wire import logprob_to_proto, sampling_from_proto

_FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
_ERROR_CODES = {
    "invalid_argument": common_pb2.ERROR_CODE_INVALID_ARGUMENT,
    "not_found": common_pb2.ERROR_CODE_NOT_FOUND,
    "unavailable": common_pb2.ERROR_CODE_UNAVAILABLE,
    "resource_exhausted": common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED,
}
# Engine error fields -> the GenerateRequest field a client would fix.
_FIELDS = {"prompt": "prompt_token_ids", "request_id": "request_id"}


def wire_field(field: str | None) -> str:
    """The GenerateRequest path of an engine field: "max_tokens" -> "sampling.max_tokens"."""
    if not field:
        return ""
    return _FIELDS.get(field, field if field.startswith("sampling.") else f"sampling.{field}")


def request_from_proto(message: worker_pb2.GenerateRequest, request_id: str) -> EngineRequest:
    return EngineRequest(request_id=request_id, prompt_token_ids=list(message.prompt_token_ids),
                         sampling=sampling_from_proto(message.sampling),
                         num_resumed_output_tokens=message.num_resumed_output_tokens)


def response_from_output(output: RequestOutput) -> worker_pb2.GenerateResponse:
    response = worker_pb2.GenerateResponse(
        delta=common_pb2.TokenDelta(token_ids=output.token_ids, text=output.text,
                                    logprobs=[logprob_to_proto(lp) for lp in output.logprobs or ()]),
    )
    if output.prompt_logprobs:
        response.prompt_logprobs.extend(logprob_to_proto(lp) for lp in output.prompt_logprobs)
    if output.finish_reason is not None:
        response.finish_reason = _FINISH_REASONS[output.finish_reason]
        response.usage.CopyFrom(common_pb2.Usage(
            prompt_tokens=output.num_prompt_tokens, completion_tokens=output.num_output_tokens,
            cached_prompt_tokens=output.num_cached_tokens,
        ))
        if output.finish_reason is FinishReason.ERROR:
            response.error.CopyFrom(common_pb2.ErrorDetail(
                code=common_pb2.ERROR_CODE_INTERNAL, message=output.error or "the engine failed the request",
            ))
    return response


def error_response(error: Exception, output: RequestOutput | None) -> worker_pb2.GenerateResponse:
    """The last response of a stream that failed after it started."""
    detail = common_pb2.ErrorDetail(code=common_pb2.ERROR_CODE_INTERNAL, message=str(error) or type(error).__name__)
    if isinstance(error, TandemError):
        detail = common_pb2.ErrorDetail(code=_ERROR_CODES.get(error.code, common_pb2.ERROR_CODE_INTERNAL),
                                        message=error.message, field=wire_field(error.field))
    response = worker_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_ERROR, error=detail)
    if output is not None:
        response.usage.CopyFrom(common_pb2.Usage(prompt_tokens=output.num_prompt_tokens,
                                                 completion_tokens=output.num_output_tokens,
                                                 cached_prompt_tokens=output.num_cached_tokens))
    return response


def load_from_stats(stats: EngineStats) -> worker_pb2.WorkerLoad:
    return worker_pb2.WorkerLoad(
        num_running=stats.num_running, num_waiting=stats.num_waiting,
        num_kv_blocks_used=stats.num_kv_blocks_used, num_kv_blocks_total=stats.num_kv_blocks_total,
        num_free_queue_slots=stats.num_free_queue_slots,
    )


def stats_response(stats: EngineStats, model: str) -> worker_pb2.GetStatsResponse:
    return worker_pb2.GetStatsResponse(
        load=load_from_stats(stats), model=model, max_model_len=stats.max_model_len, block_size=stats.block_size,
        num_prefix_cache_queries=stats.num_prefix_cache_queries, num_prefix_cache_hits=stats.num_prefix_cache_hits,
    )
