"""Frontend metrics bookkeeping and the proto translation of sampling parameters."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from services.frontend.metrics import FrontendMetrics
from services.frontend.wire import (
    finish_reason_from_proto,
    finish_reason_to_proto,
    sampling_from_proto,
    sampling_to_proto,
)
from tandem.engine.types import FinishReason, SamplingParams
from tandem.errors import InvalidRequest
from tandem.proto.common.v1 import common_pb2

pytestmark = pytest.mark.unit

LABELS = {"model": "m"}


def _value(registry: CollectorRegistry, name: str, labels: dict[str, str] = LABELS) -> float | None:
    return registry.get_sample_value(name, labels)


def test_tracker_records_one_request() -> None:
    registry = CollectorRegistry()
    metrics = FrontendMetrics(registry)
    tracker = metrics.track("m", "chat_completions", "stream", num_prompt_tokens=12)
    assert _value(registry, "tandem_frontend_inflight_requests") == 1
    tracker.on_tokens(1)
    tracker.on_tokens(0)  # a delta without tokens is no gap
    tracker.on_tokens(3)
    tracker.finish("success")
    tracker.finish("success")  # idempotent
    assert _value(registry, "tandem_frontend_inflight_requests") == 0
    assert _value(registry, "tandem_frontend_requests_total", {
        "model": "m", "endpoint": "chat_completions", "request_type": "stream", "status": "success"}) == 1
    assert _value(registry, "tandem_frontend_time_to_first_token_seconds_count") == 1
    assert _value(registry, "tandem_frontend_inter_token_latency_seconds_count") == 3
    assert _value(registry, "tandem_frontend_output_tokens_total") == 4
    assert _value(registry, "tandem_frontend_output_sequence_tokens_sum") == 4
    assert _value(registry, "tandem_frontend_input_sequence_tokens_sum") == 12
    assert _value(registry, "tandem_frontend_request_duration_seconds_count") == 1


def test_buckets_span_milliseconds_to_a_minute_and_32k_tokens() -> None:
    registry = CollectorRegistry()
    tracker = FrontendMetrics(registry).track("m", "e", "unary", 1)
    tracker.on_tokens(2)
    tracker.finish("success")
    for name in ("tandem_frontend_time_to_first_token_seconds", "tandem_frontend_inter_token_latency_seconds"):
        assert _value(registry, f"{name}_bucket", {"model": "m", "le": "0.001"}) is not None
        assert _value(registry, f"{name}_bucket", {"model": "m", "le": "60.0"}) is not None
    assert _value(registry, "tandem_frontend_output_sequence_tokens_bucket", {"model": "m", "le": "32768.0"}) == 1
    assert _value(registry, "tandem_frontend_output_sequence_tokens_bucket", {"model": "m", "le": "1.0"}) == 0


def test_two_registries_do_not_share_state() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    FrontendMetrics(first).count_request("m", "completions", "unary", "invalid_argument")
    FrontendMetrics(second)
    labels = {"model": "m", "endpoint": "completions", "request_type": "unary", "status": "invalid_argument"}
    assert _value(first, "tandem_frontend_requests_total", labels) == 1
    assert _value(second, "tandem_frontend_requests_total", labels) is None


def test_sampling_round_trip_keeps_unset_fields_unset() -> None:
    sampling = SamplingParams(max_tokens=None, temperature=0.0, top_p=0.9, top_k=5, seed=None,
                              stop=["x"], stop_token_ids=[7], ignore_eos=True)
    message = sampling_to_proto(sampling)
    assert not message.HasField("max_tokens") and not message.HasField("seed")
    assert message.HasField("temperature") and message.temperature == 0.0
    back = sampling_from_proto(message)
    assert back.max_tokens is None and back.seed is None and back.top_k == 5 and back.stop == ["x"]
    assert back.temperature == 0.0 and back.ignore_eos and back.stop_token_ids == [7]
    assert sampling_from_proto(sampling_to_proto(SamplingParams(max_tokens=3, seed=9))).seed == 9


def test_unset_proto_sampling_takes_openai_defaults() -> None:
    sampling = sampling_from_proto(common_pb2.SamplingParams())
    assert sampling.max_tokens is None and sampling.temperature == 1.0 and sampling.top_p == 1.0


def test_invalid_proto_sampling_names_the_field() -> None:
    with pytest.raises(InvalidRequest) as info:
        sampling_from_proto(common_pb2.SamplingParams(max_tokens=0))
    assert info.value.field == "max_tokens"


def test_finish_reason_round_trip() -> None:
    for reason in FinishReason:
        assert finish_reason_from_proto(finish_reason_to_proto(reason)) is reason
    assert finish_reason_from_proto(common_pb2.FINISH_REASON_UNSPECIFIED) is None
    assert finish_reason_to_proto(None) == common_pb2.FINISH_REASON_UNSPECIFIED
