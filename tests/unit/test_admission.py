"""The frontend's bounded queue: no sockets, no real waiting."""

from __future__ import annotations

import asyncio

import pytest

from services.frontend.admission import QUEUE_FULL, QUEUE_TIMEOUT, Admission
from tandem.errors import ResourceExhausted

pytestmark = pytest.mark.unit


async def test_requests_beyond_slots_and_queue_are_refused_at_once() -> None:
    rejected: list[str] = []
    admission = Admission(max_inflight=2, max_queued=1, queue_timeout_s=60, on_reject=rejected.append)
    release = asyncio.Event()
    order: list[int] = []

    async def request(i: int) -> None:
        async with admission.slot():
            order.append(i)
            await release.wait()

    running = [asyncio.create_task(request(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert order == [0, 1] and admission.num_queued == 1
    with pytest.raises(ResourceExhausted, match="2 requests running, 1 queued"):
        async with admission.slot():
            pass
    assert rejected == [QUEUE_FULL]
    release.set()
    await asyncio.gather(*running)
    assert order == [0, 1, 2] and admission.num_queued == 0


async def test_a_queued_request_gives_up_after_the_queue_timeout() -> None:
    rejected: list[str] = []
    admission = Admission(max_inflight=1, max_queued=4, queue_timeout_s=0.01, on_reject=rejected.append)
    async with admission.slot():
        with pytest.raises(ResourceExhausted, match="no slot freed"):
            async with admission.slot():
                pass
    assert rejected == [QUEUE_TIMEOUT] and admission.num_queued == 0
    async with admission.slot():  # the slot was given back
        pass


def test_settings_are_validated_by_name() -> None:
    with pytest.raises(ValueError, match="max_inflight_requests"):
        Admission(0, 1, 1.0)
    with pytest.raises(ValueError, match="queue_timeout_s"):
        Admission(1, 1, 0)

