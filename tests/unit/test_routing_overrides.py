"""The OpenAI body's ``routing`` object (extra_body) becomes the RouteRequest's overrides."""

from __future__ import annotations

from typing import Any

import pytest

from services.frontend.routing import parse_routing_overrides
from tandem.errors import InvalidRequest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, None),
        ({"routing": None}, None),
        ({"routing": {}}, {}),
        ({"routing": {"kv_overlap_weight": 2}}, {"kv_overlap_weight": 2.0}),
        ({"routing": {"kv_temperature": 0.25, "kv_overlap_weight": 0}},
         {"kv_temperature": 0.25, "kv_overlap_weight": 0.0}),
    ],
)
def test_set_keys_become_overrides_and_unset_ones_stay_unset(body: dict[str, Any],
                                                              expected: dict[str, float] | None) -> None:
    overrides = parse_routing_overrides(body)
    if expected is None:
        assert overrides is None
        return
    assert overrides is not None
    for name in ("kv_overlap_weight", "kv_temperature"):
        assert overrides.HasField(name) is (name in expected)
        if name in expected:
            assert getattr(overrides, name) == expected[name]


@pytest.mark.parametrize(
    ("routing", "field"),
    [
        ("fast", "routing"),
        ({"kv_overlap_weight": -1}, "routing.kv_overlap_weight"),
        ({"kv_temperature": "hot"}, "routing.kv_temperature"),
        ({"kv_temperature": True}, "routing.kv_temperature"),
        ({"overlap": 1}, "routing.overlap"),
    ],
)
def test_bad_routing_settings_name_the_field(routing: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_routing_overrides({"routing": routing})
    assert caught.value.field == field
