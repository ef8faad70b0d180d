"""The decode path (portable PyTorch): one wave, one token of each of its rows.

Per row the new token attends over its held slots plus itself; the token's
own K/V come from the step (no scratch slot in the cache). Then every row
"evicts" one column of ``held + 1`` (its slots and the new token): a row that
is not full yet evicts its free slot (`selection.EMPTY`), so the new token is
written there; a full row evicts the column its policy ranks lowest, and the
new token is written over it -- or, if the new token itself ranks lowest, to
the sink slot (`slots.SINK_SLOT`), i.e. nowhere. No host sync, no branch on
the data.

Device operations per layer call for a wave of TOVA rows (counted with the
torch profiler in tests/test_decode_ops.py): concatenate K|V|side of the
new tokens, gather the rows' blocks (whole pages), lay out K|V heads first with
the new tokens appended (one concatenation), batched ``q.K`` with
the masks added, softmax, batched ``p.V``, the output write, the head mean,
the selection masks added, argmin, the destination slot, one slot write (plus
the query and output reshapes). A wave where no row is full yet (and no policy
accumulates) skips the selection: four operations fewer.
"""

from __future__ import annotations

import torch

from tova_vllm.backend.metadata import DecodeWave
from tova_vllm.backend.slots import SlotView, encode_side
from tova_vllm.policies import Candidates, selection


def forward_wave(layer, w: DecodeWave, query, key, value, view: SlotView, output) -> None:
    rows, hkv, group, dim = w.size, layer.num_kv_heads, layer.num_queries_per_kv, layer.head_size
    n1, cd = w.num_cols, view.cache.dtype
    q = query[w.tokens]  # [R, Hq, D]
    new = torch.cat((key[w.tokens].to(cd), value[w.tokens].to(cd), w.new_side.expand(-1, hkv, -1)), dim=-1)
    # The rows' blocks, whole pages (one contiguous copy each: gathering KV
    # heads first from the slot-major page is a strided copy, 4-8x slower at
    # budget 512): [R, n, Hkv, C]. Then K|V, KV heads first, with the new
    # tokens as the last column: one contiguous [Hkv, R, n + 1, 2D] the
    # matmuls read.
    gathered = view.pages.index_select(0, w.blocks.flatten()).view(rows, n1 - 1, hkv, -1)
    kv = torch.cat(
        (gathered[..., : 2 * dim].permute(2, 0, 1, 3), new[..., : 2 * dim].transpose(0, 1).unsqueeze(2)), dim=2
    )
    if kv.dtype != q.dtype:
        kv = kv.to(q.dtype)
    keys = kv[..., :dim].reshape(hkv * rows, n1, dim)
    values = kv[..., dim:].reshape(hkv * rows, n1, dim)
    q3 = q.view(rows, hkv, group, dim).transpose(0, 1).reshape(hkv * rows, group, dim)
    # Masked columns get -inf: their probability is exactly 0, and their values
    # (finite: vLLM zeroes the pool and every write is a model's K/V) add nothing.
    scores = torch.baddbmm(w.attn_bias, q3, keys.transpose(1, 2), alpha=layer.scale)  # [Hkv*R, G, n+1]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    attn = torch.bmm(probs if q.dtype == torch.float32 else probs.to(q.dtype), values)
    attn = attn.view(hkv, rows, group, dim).transpose(0, 1)
    if isinstance(w.tokens, slice):
        output[w.tokens].view(rows, hkv, group, dim).copy_(attn)
    else:
        output.index_copy_(0, w.tokens, attn.reshape(rows, hkv * group, dim).to(output.dtype))
    if w.fill_ids is not None:  # nothing evicts: each new token to its row's free slot
        view.slots.index_copy_(0, w.fill_ids, new)
        return
    probs = probs.view(hkv, rows, group, n1)
    victim = _select(layer, w, probs, kv, gathered, new, view)
    dst = w.col_ids.gather(1, victim)  # [R, 1] or [R, Hkv] flat slots
    if w.per_layer:
        view.slots.index_copy_(0, dst[:, 0], new)
    else:
        view.slots[dst, torch.arange(hkv, device=dst.device)] = new


def _select(layer, w: DecodeWave, probs, kv, gathered, new, view: SlotView) -> torch.Tensor:
    """Per row, the column to evict: ``[R, 1]`` (one token set per layer) or
    ``[R, Hkv]``."""
    hkv, dim = layer.num_kv_heads, layer.head_size
    victim = None
    for g in w.groups:
        rs, policy = g.rows, g.policy
        state = _accumulate(layer, w, g, probs, gathered, new, view) if policy.accumulates else None
        cand = Candidates(
            newest=w.positions[rs],
            budget=w.budgets[rs],
            valid=w.valid[rs],
            num_kv_heads=hkv,
            attention=lambda rs=rs: layer.head_mean(probs[:, rs], dims=(0, 2)).unsqueeze(1),
            attention_per_kv_head=lambda rs=rs: probs[:, rs].mean(dim=2).transpose(0, 1),
            positions=lambda rs=rs: _positions(w, rs, gathered, dim),
            keys=lambda rs=rs: kv[:, rs, :, :dim].transpose(0, 1),
            state=state,
        )
        pri = selection.as_priority(policy.priority(cand))
        if pri.dim() == 2:
            pri = pri.unsqueeze(1)
        v = torch.argmin(pri + w.select_bias[rs], dim=-1)  # [Rg, 1 or Hkv]
        if g.whole:
            return v
        if victim is None:
            victim = torch.empty(w.size, 1 if w.per_layer else hkv, dtype=torch.long, device=v.device)
        victim[rs] = v
    return victim


def _positions(w: DecodeWave, rs, gathered, dim) -> torch.Tensor:
    """``[Rg, Hkv, n + 1]`` int64 true positions of the candidate columns."""
    cached = gathered[rs, :, :, 2 * dim :].view(torch.int32)[..., 0].transpose(1, 2).long()
    newest = w.positions[rs].view(-1, 1, 1).expand(-1, cached.shape[1], 1)
    return torch.cat((cached, newest), dim=-1)


def _accumulate(layer, w: DecodeWave, g, probs, gathered, new, view: SlotView) -> torch.Tensor:
    """The group's state after this step ``[Rg, Hkv, n + 1]``, written back
    to its cached slots and to the new tokens' side channel."""
    rs, dim, hkv = g.rows, layer.head_size, layer.num_kv_heads
    before = gathered[rs, :, :, 2 * dim :].view(torch.int32)[..., 1:2].view(torch.float32)[..., 0]
    before = torch.nn.functional.pad(before.transpose(1, 2), (0, 1))  # the new token starts at 0
    state = g.policy.accumulate(before, probs[:, rs].mean(dim=2).transpose(0, 1))
    cached = w.col_ids[rs, :-1]
    heads = torch.arange(hkv, device=cached.device)
    view.scores[cached.unsqueeze(-1), heads] = state[..., :-1].transpose(1, 2)
    new[rs, :, 2 * dim :] = encode_side(w.positions[rs].unsqueeze(1).expand(-1, hkv), new.dtype, state[..., -1])
    return state
