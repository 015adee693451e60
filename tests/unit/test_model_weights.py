"""The CPU weights' move into transparent huge pages: same model, tied weights still tied."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from torch import nn

from tandem.engine.hf.model_runner import _WEIGHT_ALIGN, _weights_to_huge_pages


class TiedModel(nn.Module):
    """An embedding shared with the output head (as SmolLM2's), a layer between, a small norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 48)
        self.hidden = nn.Linear(48, 48)
        self.norm = nn.LayerNorm(48)  # 192-byte weights: below a page, left where they are
        self.head = nn.Linear(48, 300, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 48 * 40).view(40, 48))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(torch.relu(self.hidden(self.embed(ids)))) * self.scale[0]
        return self.head(x)


def mapping_of(address: int) -> tuple[str, list[str]]:
    """The file (or "" for anonymous memory) and VmFlags of this process's mapping that holds ``address``."""
    inside, path = False, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            start, end = (int(part, 16) for part in fields[0].split("-"))
            inside, path = start <= address < end, fields[5] if len(fields) > 5 else ""
        elif inside and line.startswith("VmFlags:"):
            return path, fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


HAS_THP = Path("/sys/kernel/mm/transparent_hugepage").exists() and hasattr(mmap, "MADV_HUGEPAGE")


def test_outputs_are_unchanged_and_tied_weights_stay_one_tensor() -> None:
    torch.manual_seed(0)
    model = TiedModel().eval()
    ids = torch.tensor([[1, 7, 42, 299]])
    with torch.no_grad():
        before = model(ids)

    moved = _weights_to_huge_pages(model)

    with torch.no_grad():
        after = model(ids)
    assert torch.equal(before, after)
    assert model.head.weight is model.embed.weight
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    # Every weight moves, the small norm's too (what stays would keep the old storage alive).
    unique = [model.embed.weight, model.hidden.weight, model.hidden.bias, model.norm.weight, model.norm.bias,
              model.scale]
    assert moved == sum(-(-t.nbytes // _WEIGHT_ALIGN) * _WEIGHT_ALIGN for t in unique)
    starts = sorted(t.data_ptr() for t in unique)
    assert starts[-1] - starts[0] < moved  # one arena, each weight cache-line aligned
    assert all(start % _WEIGHT_ALIGN == 0 for start in starts)
    # Training would still see the moved tensors as the model's parameters.
    assert {id(p) for p in model.parameters()} >= {id(model.embed.weight), id(model.hidden.weight)}


@pytest.mark.skipif(not HAS_THP, reason="no transparent huge pages on this kernel")
def test_the_arena_is_advised_for_huge_pages() -> None:
    model = TiedModel()
    assert "hg" not in mapping_of(model.embed.weight.data_ptr())[1]
    _weights_to_huge_pages(model)
    for tensor in (model.embed.weight, model.scale, model.norm.bias):
        assert "hg" in mapping_of(tensor.data_ptr())[1]


def test_two_views_of_one_storage_keep_their_own_shapes() -> None:
    model = nn.Module()
    base = torch.arange(2048, dtype=torch.float32)
    model.register_buffer("whole", base)
    model.register_buffer("head", base[:1024])  # same start, another shape
    _weights_to_huge_pages(model)
    assert model.whole.shape == (2048,) and model.head.shape == (1024,)
    assert torch.equal(model.whole, torch.arange(2048, dtype=torch.float32))
    assert torch.equal(model.head, torch.arange(1024, dtype=torch.float32))


def test_a_model_without_cpu_weights_is_left_alone() -> None:
    model = nn.Module()
    model.register_buffer("empty", torch.empty(0))
    assert _weights_to_huge_pages(model) == 0
