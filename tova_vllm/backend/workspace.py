"""The backend's transient memory, bounded and accounted.

Persistent state (each slot's position and accumulated score) lives in vLLM's
own KV page (`tova_vllm.backend.slots`), so vLLM's block counts include it.
Everything else is transient, per layer call, and bounded by the engine's
limits:

* a decode wave of ``R`` rows over ``n = ceil(budget / bs) * bs`` slots:
  the gathered blocks ``Hkv * R * n * C`` and their copy with the new tokens
  ``Hkv * R * (n + 1) * 2D`` elements of the cache dtype, the scores and the
  probabilities ``2 * Hq * R * (n + 1)`` float32 -- `decode_bytes`;
* a prompt segment of ``c`` tokens after ``ctx`` held slots (``n = ctx +
  c``): the held slots ``ctx * Hkv * C``, the keys for scoring ``n * Hkv *
  D`` (model dtype), on the CPU the packed copy vLLM's CPU attention reads
  ``2 * ceil(n / 32) * 32 * Hkv * D`` (model dtype), the attention outputs
  and their merge ``3 * Hq * c * D`` plus ``2 * Hq * c`` float32, the last query's scores ``2 * Hq * n`` float32,
  and for accumulating policies one query tile, at most `prompt.TILE_BYTES`
  -- `prompt_bytes`.

On the CPU the packed copy (and, where a segment's slots are too scattered
to pack from the page in place, the held slots' gather) and the kept slots'
copy at a prompt's end are kept across calls (`kept_buffer`), sized by the
longest prompt segment seen: at most ``max_model_len * Hkv * (2C + 2D)``
elements.

vLLM sizes its KV pool from a profile run that passes no attention metadata,
where this backend computes nothing. So that the profile still counts the
backend's peak, the first profile run of each layer on CUDA allocates (and
frees) `worst_case_bytes` -- the larger of a full decode batch
(``max_num_seqs`` rows at the engine's budget) and a prompt chunk of
``max_num_batched_tokens`` after ``max_model_len`` held slots -- which
PyTorch's allocator then keeps reserved, and vLLM's measured peak includes.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from tova_vllm.backend.slots import side_elements

F32 = 4


@dataclass(frozen=True)
class Shapes:
    num_heads: int
    num_kv_heads: int
    head_size: int
    cache_dtype: torch.dtype
    model_dtype: torch.dtype

    @property
    def slot_elements(self) -> int:
        return 2 * self.head_size + side_elements(self.cache_dtype)


def decode_bytes(s: Shapes, rows: int, budget: int, block_size: int) -> int:
    n = -(-budget // block_size) * block_size
    cache = s.cache_dtype.itemsize
    gathered = s.num_kv_heads * rows * n * s.slot_elements * cache
    with_new = s.num_kv_heads * rows * (n + 1) * 2 * s.head_size * s.model_dtype.itemsize
    scores = 2 * s.num_heads * rows * (n + 1) * F32
    return gathered + with_new + scores


def prompt_bytes(s: Shapes, ctx: int, chunk: int, accumulates: bool = True) -> int:
    from tova_vllm.backend.prompt import TILE_BYTES

    n = ctx + chunk
    held = ctx * s.num_kv_heads * s.slot_elements * s.cache_dtype.itemsize
    keys = n * s.num_kv_heads * s.head_size * s.model_dtype.itemsize
    packed = 2 * -(-n // 32) * 32 * s.num_kv_heads * s.head_size * s.model_dtype.itemsize  # CPU only
    outputs = 3 * s.num_heads * chunk * s.head_size * F32 + 2 * s.num_heads * chunk * F32
    last = 2 * s.num_heads * n * F32
    return held + keys + packed + outputs + last + (TILE_BYTES if accumulates else 0)


def worst_case_bytes(s: Shapes, *, max_num_seqs: int, budget: int, block_size: int, max_model_len: int,
                     max_num_batched_tokens: int) -> int:  # fmt: skip
    chunk = min(max_num_batched_tokens, max_model_len)
    return max(
        decode_bytes(s, max_num_seqs, budget, block_size),
        prompt_bytes(s, max(max_model_len - chunk, 0), chunk),
    )


# -- kept buffers (CPU) ---------------------------------------------------------

_KEPT: dict[tuple, torch.Tensor] = {}


def kept_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``shape`` view of a buffer kept across layer calls for ``name``,
    grown to the largest asked for (bounded by ``max_model_len``: a bulk
    prompt's chunks grow it a few times, once); on CUDA a fresh tensor
    (PyTorch's caching allocator keeps its memory anyway).

    On the CPU the prompt path's largest transients (the held slots' gather
    and the packed copy for vLLM's CPU attention, tens of MiB per layer call
    at 8k tokens) otherwise go through glibc's allocator on every layer call,
    and the prompt's time then varied with its state: 11.1-12.0 s against
    9.8-10.0 s kept, at 8,000 tokens in the long-prompt benchmark. Kept
    buffers are anonymous mappings (zero-filled when mapped; later they hold
    earlier calls' values, finite too)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    rows, row = shape[0], math.prod(shape[1:])
    key = (name, row, dtype)
    buf = _KEPT.get(key)
    if buf is None or buf.shape[0] < rows:
        _KEPT.pop(key, None)
        region = mmap.mmap(-1, max(1, rows * row * dtype.itemsize))  # zero-filled by the kernel
        buf = torch.frombuffer(region, dtype=dtype, count=rows * row).view(rows, row)
        buf._tova_region = region  # the mapping lives as long as the tensor
        _KEPT[key] = buf
    return buf[:rows].view(shape)
