"""Runs one packed forward pass of a transformers causal LM over a paged KV pool.

All scheduled tokens of all requests are packed into one row (``[1, num_tokens]``) with
their own positions, so prefill chunks and decode tokens share every matmul. Attention is
swapped for ours through transformers' ``AttentionInterface``: it writes each layer's new
keys and values into the pool slots of their blocks, then attends every request's queries
to that request's blocks only.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tandem.engine.hf.scheduler import ScheduledSeq
from tandem.kv.block_copy import gather_blocks, scatter_blocks

ATTENTION_NAME = "tandem_paged"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class PrefillSlice:
    """A request computing several tokens this step: queries [start, start+length) of the pack."""

    start: int
    length: int
    context_slots: torch.Tensor  # pool slots of every token it attends to, in order
    mask: torch.Tensor | None  # [length, context] causal mask; None when the context is all new


@dataclass(slots=True)
class StepMetadata:
    slot_mapping: torch.Tensor  # [num_tokens]: where each new token's K/V goes
    prefills: list[PrefillSlice]
    decode_positions: torch.Tensor | None  # [num_decodes]: pack index of each single-token query
    decode_slots: torch.Tensor | None  # [num_decodes, max_context]
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_context], True where attended


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None,
                    dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention hook: query [1, H, T, D], key/value [1, KVH, T, D] for the new tokens."""
    runner: ModelRunner = kwargs["tandem_runner"]
    meta: StepMetadata = kwargs["tandem_step"]
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    k_pool, v_pool = runner.k_cache[layer], runner.v_cache[layer]  # [slots, KVH, D]
    k_pool.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1))
    v_pool.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1))

    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [T, H, D]
    for part in meta.prefills:
        q = query[:, :, part.start : part.start + part.length]
        k = k_pool[part.context_slots].transpose(0, 1).unsqueeze(0)
        v = v_pool[part.context_slots].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=part.mask, is_causal=part.mask is None,
                                           scale=scaling, enable_gqa=True)
        out[part.start : part.start + part.length] = o[0].transpose(0, 1)
    if meta.decode_positions is not None:
        assert meta.decode_slots is not None
        q = query[0][:, meta.decode_positions].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
        k = k_pool[meta.decode_slots].permute(0, 2, 1, 3)  # [B, KVH, ctx, D]
        v = v_pool[meta.decode_slots].permute(0, 2, 1, 3)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.decode_mask, scale=scaling,
                                           enable_gqa=True)
        out[meta.decode_positions] = o[:, :, 0]
    return out.unsqueeze(0), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)


def _huge_page_bytes(num_bytes: int) -> torch.Tensor:
    """A zeroed uint8 CPU tensor in its own private anonymous mapping, advised for transparent huge pages."""
    mapping = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP disabled or unsupported: ordinary pages, same tensor
            pass
    # The tensor holds a reference to the mapping, which lives as long as the tensor does.
    return torch.frombuffer(mapping, dtype=torch.uint8)


def _huge_page_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in transparent huge pages.

    The KV pool is most of a worker's memory. In huge pages a SIGKILLed worker's address space is
    torn down in milliseconds rather than ~0.1 ms a MB, and the kernel closes its sockets (what
    tells peers on other hosts that it died) only after that. Only the pool and the weights (below):
    torch's own THP_MEM_ALLOC_ENABLE puts every large temporary in huge pages too, and with it the
    decode steps of SmolLM2-135M on a CPU measured 6-10% slower.
    """
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return _huge_page_bytes(num_bytes).view(dtype).view(shape)


_WEIGHT_ALIGN = 64  # bytes: each weight starts on a cache line, as torch's allocator places them


def _weights_to_huge_pages(model: torch.nn.Module) -> int:
    """Move the model's CPU weights into one mapping in transparent huge pages; returns its bytes.

    transformers leaves them in the safetensors file's mapping, in 4 KiB page-cache pages: a decode
    step reads every weight, and with 4 KiB pages that is a TLB miss every 4 KiB (130,000 a step
    for SmolLM2-135M in fp32). Every weight moves, the small ones too, so that nothing keeps the
    file's mapping (and its page-cache pages in this process's memory) alive. Tied weights (an
    embedding shared with the LM head) stay one tensor; other views of shared memory get copies.
    """
    by_storage: dict[tuple[int, torch.dtype, torch.Size], list[torch.Tensor]] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.nbytes:
            by_storage.setdefault((tensor.data_ptr(), tensor.dtype, tensor.shape), []).append(tensor)
    sizes = [-(-group[0].nbytes // _WEIGHT_ALIGN) * _WEIGHT_ALIGN for group in by_storage.values()]
    if not sizes:
        return 0
    arena = _huge_page_bytes(sum(sizes))
    offset = 0
    with torch.no_grad():
        for group, size in zip(by_storage.values(), sizes, strict=True):
            first = group[0]
            home = arena[offset : offset + first.nbytes].view(first.dtype).view(first.shape)
            home.copy_(first)
            for tensor in group:
                tensor.data = home
            offset += size
    return offset


class ModelRunner:
    """Owns the model weights and the KV pool of one engine. Called only from the step thread."""

    def __init__(self, model_path: Path, num_blocks: int, block_size: int, device: str, dtype: str) -> None:
        from transformers import AutoModelForCausalLM

        _register_attention()
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, attn_implementation=ATTENTION_NAME
        ).to(self.device)  # type: ignore[arg-type]
        self.model.eval()
        if self.device.type == "cpu":
            _weights_to_huge_pages(self.model)
        config = self.model.config
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (self.num_layers, num_blocks * block_size, self.num_kv_heads, self.head_dim)
        if self.device.type == "cpu":
            self.k_cache, self.v_cache = _huge_page_tensor(shape, self.dtype), _huge_page_tensor(shape, self.dtype)
        else:
            self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._slot_offsets = torch.arange(block_size, device=self.device)

    @property
    def max_position_embeddings(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        blocks = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return (blocks[:, None] * self.block_size + self._slot_offsets).flatten()[start:end]

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass; returns logits [num_sampling_seqs, vocab] in scheduled order, and those of
        every ``prompt_logprob_positions`` position in scheduled order (None when there are none)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        prefills: list[PrefillSlice] = []
        decode_positions: list[int] = []
        decode_slots: list[torch.Tensor] = []
        logit_rows: list[int] = []
        prompt_rows: list[int] = []
        for item in scheduled:
            seq, n = item.seq, item.num_new_tokens
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            pack_start = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            context = self._slots(seq.block_table, 0, end)
            slot_parts.append(context[start:end])
            if n == 1:
                decode_positions.append(pack_start)
                decode_slots.append(context)
            else:
                mask = None
                if start > 0:  # query i sits at position start+i and sees keys 0..start+i
                    rows = torch.arange(start, end, device=self.device)[:, None]
                    mask = torch.arange(end, device=self.device)[None, :] <= rows
                prefills.append(PrefillSlice(pack_start, n, context, mask))
            if item.samples:
                logit_rows.append(pack_start + n - 1)
            prompt_rows.extend(pack_start + p - start for p in item.prompt_logprob_positions)

        decode_pos_t = decode_slots_t = decode_mask = None
        if decode_positions:
            lengths = torch.tensor([len(s) for s in decode_slots], device=self.device)
            decode_slots_t = torch.nn.utils.rnn.pad_sequence(decode_slots, batch_first=True)
            decode_mask = (torch.arange(decode_slots_t.shape[1], device=self.device)[None, :]
                           < lengths[:, None])[:, None, None, :]
            decode_pos_t = torch.tensor(decode_positions, dtype=torch.long, device=self.device)
        meta = StepMetadata(torch.cat(slot_parts), prefills, decode_pos_t, decode_slots_t, decode_mask)

        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        pos = torch.tensor([positions], dtype=torch.long, device=self.device)
        keep = torch.tensor(logit_rows + prompt_rows, dtype=torch.long, device=self.device)
        output = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep,
                            tandem_runner=self, tandem_step=meta)
        logits = output.logits[0].float()
        if not prompt_rows:
            return logits, None
        return logits[: len(logit_rows)], logits[len(logit_rows) :]

    def read_blocks(self, block_ids: list[int], layer_start: int, layer_count: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """K/V of whole blocks as one contiguous tensor [layers, 2, blocks, block_size, kv_heads, head_dim].

        ``out``, when given, receives the copy (and is returned).
        """
        return gather_blocks(self.k_cache, self.v_cache, self.block_size, block_ids, layer_start, layer_count, out)

    def write_blocks(self, block_ids: list[int], layer_start: int, data: torch.Tensor) -> None:
        """The inverse of ``read_blocks``: ``data`` [layers, 2, blocks, block_size, kv_heads, head_dim]."""
        scatter_blocks(self.k_cache, self.v_cache, self.block_size, block_ids, layer_start, data)
