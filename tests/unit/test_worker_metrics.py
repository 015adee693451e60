"""The decode worker's step metrics: a step after a batch wait shows that wait; one after a step does not."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.decode.metrics import DecodeMetrics
from tandem.engine.types import StepInfo


def test_the_batch_wait_is_observed_only_for_steps_that_followed_one() -> None:
    metrics = DecodeMetrics(CollectorRegistry())
    metrics.observe_step(StepInfo(num_seqs=4, num_tokens=80, num_prefill_tokens=80, duration_s=0.09,
                                  batch_wait_s=0.0042))
    metrics.observe_step(StepInfo(num_seqs=4, num_tokens=4, num_prefill_tokens=0, duration_s=0.06))
    sample = metrics.registry.get_sample_value
    assert sample("tandem_worker_step_duration_seconds_count") == 2
    assert sample("tandem_worker_batch_wait_seconds_count") == 1
    assert sample("tandem_worker_batch_wait_seconds_sum") == 0.0042
    assert sample("tandem_worker_batch_wait_seconds_bucket", {"le": "0.004"}) == 0
    assert sample("tandem_worker_batch_wait_seconds_bucket", {"le": "0.005"}) == 1
