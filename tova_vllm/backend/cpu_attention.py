"""Prompt attention on the CPU through vLLM's own CPU attention kernel
(``_C.cpu_attention_with_kv_cache``, what stock vLLM runs): about 2x faster
than PyTorch's CPU flash attention on this project's prompt shapes (8,000
tokens, 2,048-token chunks: 86 ms vs 172 ms per layer call, measured with
SmolLM2-135M's heads).

The kernel cannot read the TOVA page in place: it takes block and KV-head
strides only, and expects each (block, head) to hold its tokens contiguously
in the ISA's own packing (written by ``_C.cpu_attn_reshape_and_cache``),
where the TOVA page is slot-major with a side channel (`slots`). So a
segment's keys and values (its held slots, then its own tokens) are packed
into a paged copy of ``n = ctx + c`` tokens (``2 * n * Hkv * D`` elements of
the model dtype, `workspace.prompt_bytes`; kept across calls,
`workspace.kept_buffer`), attended causally (bottom-right: the
segment's queries are the last ``c`` of the ``n``).

`isa` decides once per (dtype, head size) whether the kernel is there and
agrees with PyTorch's SDPA on a small case; if not (another vLLM build, an
unsupported head size), the prompt path keeps PyTorch's flash attention and
says so once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vllm.logger import init_logger

from tova_vllm.backend import workspace

logger = init_logger(f"vllm.{__name__}")

# Tokens per block of the transient copy: the CPU kernels' vector ISAs take
# multiples of 32 (and AMX needs 32).
BLOCK_SIZE = 32


@functools.cache
def isa(dtype: torch.dtype, head_size: int) -> str | None:
    """vLLM's CPU attention ISA for these shapes, or None when the prompt
    path must use PyTorch's flash attention instead."""
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        name = _get_attn_isa(dtype, BLOCK_SIZE, head_size, "auto")
        _check(name, dtype, head_size)
    except Exception as e:  # noqa: BLE001 -- any failure means: not usable here
        logger.info("tova-vllm: vLLM's CPU attention is not usable for %s, head size %d (%s); "
                    "prompts use PyTorch's flash attention", dtype, head_size, e)  # fmt: skip
        return None
    return name


def _check(name: str, dtype: torch.dtype, head_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    c, ctx, hq, hkv = 5, 37, 4, 2
    q = torch.randn(c, hq, head_size, generator=gen).to(dtype)
    k = torch.randn(ctx + c, hkv, head_size, generator=gen).to(dtype)
    v = torch.randn(ctx + c, hkv, head_size, generator=gen).to(dtype)
    # Packed as the engine packs from the page: a span whose rows are the
    # held tokens out of order, with rows to skip (-1) holding NaN.
    span_k = torch.full((ctx + 3, hkv, head_size), float("nan"), dtype=dtype)
    span_v = torch.full_like(span_k, float("nan"))
    order = torch.randperm(ctx, generator=gen)  # token i in span row 3 + order[i]
    span_k[3:][order], span_v[3:][order] = k[:ctx], v[:ctx]
    slots = torch.cat((torch.full((3,), -1), torch.argsort(order)))
    parts = [(span_k, span_v, slots), (k[ctx:], v[ctx:], torch.arange(ctx, ctx + c))]
    got = attend_packed(q, pack(parts, ctx + c, dtype, name), head_size**-0.5).float()
    from torch.nn.attention.bias import causal_lower_right

    want = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().repeat_interleave(hq // hkv, 1).transpose(0, 1),
        v.float().repeat_interleave(hq // hkv, 1).transpose(0, 1), attn_mask=causal_lower_right(c, ctx + c),
        scale=head_size**-0.5,
    ).transpose(0, 1)  # fmt: skip
    err = (got - want).abs().max().item()
    if not err < (1e-4 if dtype == torch.float32 else 5e-2):
        raise RuntimeError(f"differs from SDPA by {err:.3g} (ISA {name})")


@functools.lru_cache(maxsize=16)
def _schedule(c: int, n: int, hq: int, hkv: int, dim: int, dtype: torch.dtype, name: str):
    """The kernel's inputs that depend on the shapes only (query start, length,
    its work schedule, the block table of the packed copy): the same for every
    layer of a step, so computed once per segment shape."""
    ops = _ops()
    from vllm import envs

    query_start = torch.tensor([0, c], dtype=torch.int32)
    seq_lens = torch.tensor([n], dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=hq, num_kv_heads=hkv, head_dim=dim, seq_lens=seq_lens, dtype=dtype,
        query_start_loc=query_start, causal=True, sliding_window_size=-1, isa=name,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
    )  # fmt: skip
    nb = -(-n // BLOCK_SIZE)
    return query_start, seq_lens, metadata, torch.arange(nb, dtype=torch.int32).view(1, nb)


@dataclass
class Packed:
    """A segment's keys and values in the kernel's paged packing: ``n``
    tokens in blocks of `BLOCK_SIZE` (kept buffers, valid until the next
    `pack`)."""

    key_cache: torch.Tensor  # [nb, Hkv, BLOCK_SIZE, D] (the ISA's packing)
    value_cache: torch.Tensor
    n: int
    isa: str

    def key_scores(self, q: torch.Tensor) -> torch.Tensor | None:
        """``q [Hkv, G, D] . keys`` as ``[Hkv, G, n]`` (float32; unscaled),
        read from the packed keys while they are in the CPU's caches, where
        this ISA's packing is known (`keys_readable`); else None."""
        if not keys_readable(self.key_cache.dtype, self.key_cache.shape[-1], self.isa):
            return None
        return _packed_key_scores(q, self.key_cache, self.n)


def _packed_key_scores(q: torch.Tensor, key_cache: torch.Tensor, n: int) -> torch.Tensor:
    # The VEC packing: each (block, head) holds its keys transposed, [D, 32]
    # row-major, so a block's scores are one small [G, D] @ [D, 32] product.
    nb, hkv, bs, dim = key_cache.shape
    blocks = torch.matmul(q.unsqueeze(0).float(), key_cache.view(nb, hkv, dim, bs).float())  # [nb, Hkv, G, bs]
    return blocks.permute(1, 2, 0, 3).reshape(hkv, q.shape[1], nb * bs)[..., :n]


@functools.cache
def keys_readable(dtype: torch.dtype, head_size: int, name: str) -> bool:
    """Whether `Packed.key_scores` reads this ISA's key packing right:
    checked once against the keys it packed (only the VEC packing is known)."""
    if name != "vec":
        return False
    gen = torch.Generator().manual_seed(1)
    n, hkv, g = 45, 2, 3
    k = torch.randn(n, hkv, head_size, generator=gen).to(dtype)
    q = torch.randn(hkv, g, head_size, generator=gen).to(dtype)
    packed = pack(in_order((k,), (k,)), n, dtype, name)
    got = _packed_key_scores(q, packed.key_cache, n)
    want = torch.einsum("hgd,nhd->hgn", q.float(), k.float())
    return bool((got - want).abs().max() < (1e-4 if dtype == torch.float32 else 5e-2) * head_size**0.5)


def pack(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n: int, dtype: torch.dtype,
         name: str) -> Packed:  # fmt: skip
    """``n`` tokens packed for the kernel, in kept buffers, from ``parts``
    ``(keys, values, slots)``: ``[t, Hkv, D]`` each (strided views of the
    TOVA page are fine) and, per row, its token's place ``0 .. n - 1`` in the
    segment or -1 for a row to skip (`PromptSegment.page_spans`)."""
    ops = _ops()

    hkv, dim = parts[0][0].shape[1], parts[0][0].shape[2]
    dev = parts[0][0].device
    nb = -(-n // BLOCK_SIZE)
    # Kept across calls (`workspace.kept_buffer`); a block's tail past the
    # segment is masked, but the kernel still multiplies it by zero weights,
    # so it must hold finite values: zeros, or an earlier segment's K/V.
    key_cache = workspace.kept_buffer("packed_keys", (nb, hkv, BLOCK_SIZE, dim), dtype, dev)
    value_cache = workspace.kept_buffer("packed_values", (nb, hkv, BLOCK_SIZE, dim), dtype, dev)
    for k, v, slots in parts:
        if k.shape[0]:
            ops.cpu_attn_reshape_and_cache(k.to(dtype), v.to(dtype), key_cache, value_cache, slots, name)
    return Packed(key_cache, value_cache, n, name)


def in_order(keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...]) -> list[tuple]:
    """`pack`'s parts for keys/values given in token order as ``[t_i, Hkv, D]``."""
    parts, start = [], 0
    for k, v in zip(keys, values):
        parts.append((k, v, _token_slots(start + k.shape[0])[start:]))
        start += k.shape[0]
    return parts


def _token_slots(n: int) -> torch.Tensor:
    """``0 .. n - 1`` (int64), one kept tensor sliced: the packed slot of
    each token of a segment."""
    global _SLOTS
    if _SLOTS.shape[0] < n:
        _SLOTS = torch.arange(max(n, 2 * _SLOTS.shape[0]))
    return _SLOTS[:n]


_SLOTS = torch.arange(4096)


def attend_packed(q: torch.Tensor, packed: Packed, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[c, Hq, D]``: the ``c`` queries ``q`` over the packed tokens, causal
    with the queries as the last ``c``; written into ``out`` when given
    (contiguous, the queries' dtype)."""
    ops = _ops()

    c, hq, dim = q.shape
    hkv = packed.key_cache.shape[1]
    query_start, seq_lens, metadata, block_table = _schedule(c, packed.n, hq, hkv, dim, q.dtype, packed.isa)
    if out is None:
        out = torch.empty(c, hq, dim, dtype=q.dtype, device=q.device)
    ops.cpu_attention_with_kv_cache(
        query=q if q.stride(-1) == 1 else q.contiguous(), key_cache=packed.key_cache,
        value_cache=packed.value_cache, output=out, query_start_loc=query_start, seq_lens=seq_lens, scale=scale,
        causal=True, alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
        scheduler_metadata=metadata, s_aux=None,
    )  # fmt: skip
    return out


def attend(q: torch.Tensor, keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...], scale: float,
           name: str, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``[c, Hq, D]``: the ``c`` queries ``q`` over the keys/values given in
    token order as parts ``[t_i, Hkv, D]`` (held slots, then the segment's own
    tokens), causal with the queries as the last ``c`` tokens (`pack`, then
    `attend_packed`)."""
    n = sum(k.shape[0] for k in keys)
    return attend_packed(q, pack(in_order(keys, values), n, q.dtype, name), scale, out)


def _ops():
    """vLLM's CPU attention ops: ``vllm._cpu_ops`` from vLLM 0.34,
    ``vllm._custom_ops`` before."""
    try:
        from vllm import _cpu_ops as ops
    except ImportError:
        from vllm import _custom_ops as ops
    return ops
