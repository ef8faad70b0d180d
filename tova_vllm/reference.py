"""The transformers reference of the eviction policies: the ground truth the vLLM
path is compared with, token by token.

Two pieces, both plain transformers extension points (read from and tested
against the installed transformers 5.19; the project allows 5.16-5.19):

* `EvictionCache`, a `transformers.Cache` whose layers (`EvictionLayer`) hold,
  per layer, the kept keys/values (after RoPE, at their true positions, never
  re-indexed) in chronological slot order, plus per slot its true position, a
  validity flag (padding is invalid) and, for H2O, the accumulated attention.
* ``attn_implementation="tova_eager"`` (`enable_reference_attention`), an
  attention function registered with `AttentionInterface` that computes
  exactly transformers' `eager_attention_forward` (same ops, same order: with a
  budget >= the length, logits are bitwise those of ``"eager"``) over the kept
  tokens plus the new ones, then hands this step's attention probabilities to
  the cache layer, which evicts.

The attention function does not receive the cache, so `EvictionLayer.update`
leaves a note (thread-local) naming itself and the key tensor it returned; the
attention call that receives that very tensor (identity check) finishes the
step. With any other cache, ``"tova_eager"`` is plain eager attention.

Masks: the cache reports the TRUE number of tokens seen (`get_seq_length`), so
positions are true positions, but asks the mask builder only for the block of
the new tokens (`get_mask_sizes` -> kv_length = new tokens, kv_offset = tokens
seen): that block carries causality and the new tokens' padding (from the 2D
``attention_mask``). The kept old tokens are all earlier than the new ones;
the cache masks the slots that hold no token itself. A new token is padding iff
it cannot attend to itself (the diagonal of that block).

Semantics (budget ``k`` per layer and sequence; see ../shared/design.md):

* A forward of ``q`` new tokens attends (causally) over the kept tokens plus the
  new ones. Afterwards, if the layer holds more than ``k`` slots, it is reduced
  to ``k``: by `selection.evict_one` when one slot is over (a decode step), else
  by one bulk `selection.keep_top` (a prompt, or a prompt chunk). The new token
  itself can go.
* Priorities come from the policy object (`tova_vllm.policies`, the same the
  vLLM backend runs) over a `Candidates` view of the layer's slots; ties evict
  the lowest slot = the oldest token (`tova_vllm.policies.selection`).
* Padding never counts: slots holding no token are `selection.EMPTY` (evicted
  first), so a row keeps min(real tokens, k) real tokens; its other slots stay
  masked.
* Scores are taken from the float32 softmax (before the cast to the model
  dtype), so bf16 models rank by float32 probabilities; a float64 model ranks
  in float64.
* Prompt modes (`KVSettings.prompt_mode`): ``bulk``, one prompt forward;
  ``chunked``, forwards of ``KVSettings.chunk`` tokens (from position 0), each
  reduced to the budget; ``stream``, the first ``min(P, k)`` tokens in one
  forward (nothing can be evicted before), then one token per forward.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from tova_vllm.config import KVSettings
from tova_vllm.policies import Candidates, selection

__all__ = [
    "ATTN_IMPLEMENTATION",
    "EvictionCache",
    "EvictionLayer",
    "enable_reference_attention",
    "generate_greedy",
    "perplexity",
    "reference_attention_forward",
    "score_nll",
]

ATTN_IMPLEMENTATION = "tova_eager"

_pending = threading.local()


# --------------------------------------------------------------------------- cache


class EvictionLayer(CacheLayerMixin):
    """One layer's kept tokens. Tensors (after the first update), ``B`` = batch,
    ``H`` = KV heads, ``n`` = slots (chronological order, shared across rows):

    * ``keys``/``values``: ``[B, H, n, D]``;
    * ``positions``: ``[B, H, n]`` true positions (-1 in slots holding no token);
    * ``valid``: ``[B, H, n]`` whether a slot holds a real token;
    * ``scores``: ``[B, H, n]`` float32 accumulated attention (h2o only).

    Except for h2o, all heads hold the same tokens.
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, settings: KVSettings | None = None, trace: bool = False):
        super().__init__()
        # With trace: the last selection's candidates, (positions [B, H, n],
        # masked priority [B, G, n]), for divergence reports.
        self.trace = trace
        self.last_selection: tuple[torch.Tensor, torch.Tensor] | None = None
        if settings is not None and not isinstance(settings, KVSettings):
            raise TypeError(f"settings must be a KVSettings or None; got {type(settings).__name__}")
        self.settings = settings
        self.policy = None if settings is None else settings.policy
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.seen = 0  # columns (tokens, padding included) seen so far
        self.real_seen: torch.Tensor | None = None  # [B] real tokens seen so far
        self._open_step: tuple[int, int] | None = None  # (slots before, new tokens)

    # -- CacheLayerMixin ------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros((b, h, 0, d))
        self.values = value_states.new_zeros((b, h, 0, value_states.shape[-1]))
        self.positions = torch.zeros((b, h, 0), dtype=torch.long, device=self.device)
        self.valid = torch.zeros((b, h, 0), dtype=torch.bool, device=self.device)
        self.real_seen = torch.zeros((b,), dtype=torch.long, device=self.device)
        if self.policy is not None and self.policy.accumulates:
            self.scores = torch.zeros((b, h, 0), dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._open_step is not None:
            raise RuntimeError(
                "EvictionCache: the previous step of this layer was never finished by the "
                f"reference attention; run the model with attn_implementation={ATTN_IMPLEMENTATION!r} "
                "(tova_vllm.reference.enable_reference_attention(model))"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_old, q = self.keys.shape[-2], key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += q
        self._open_step = (n_old, q)
        _pending.note = (self, self.keys)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only the new tokens' block: causality among them and their padding.
        return query_length, self.seen

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.valid = self.scores = self.real_seen = None
        self.is_initialized = False
        self.seen = 0
        self._open_step = None

    def _select_rows(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in ("keys", "values", "positions", "valid", "scores", "real_seen"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(lambda t: t[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("EvictionCache cannot be cropped (evicted tokens are gone)")

    # -- the eviction step ------------------------------------------------------

    @property
    def budget(self) -> int | None:
        return None if self.settings is None else self.settings.budget

    def finish_step(
        self, probs: torch.Tensor, new_valid: torch.Tensor, new_positions: torch.Tensor
    ) -> None:
        """Close the step opened by `update`: record the new tokens, accumulate
        H2O scores, and evict down to the budget.

        ``probs``: ``[B, Hq, q, n]`` float32 attention probabilities of this step
        (over the old slots then the new tokens); ``new_valid``/``new_positions``:
        ``[B, q]``.
        """
        if self._open_step is None:
            raise RuntimeError("EvictionCache: finish_step without a matching update")
        n_old, q = self._open_step
        self._open_step = None
        b, h, n, _ = self.keys.shape
        assert n == n_old + q and probs.shape[-1] == n and probs.shape[-2] == q
        new_positions = torch.where(new_valid, new_positions, torch.full_like(new_positions, -1))
        self.valid = torch.cat([self.valid, new_valid[:, None, :].expand(b, h, q)], dim=-1)
        self.positions = torch.cat([self.positions, new_positions[:, None, :].expand(b, h, q)], dim=-1)
        self.real_seen = self.real_seen + new_valid.sum(dim=-1)

        if self.scores is not None:  # accumulate over every valid query (h2o)
            per_kv = selection.head_average(probs.transpose(1, 2), num_kv_heads=h)  # [B, q, H, n]
            per_kv = per_kv * new_valid[:, :, None, None].to(per_kv.dtype)
            scores = torch.cat([self.scores, self.scores.new_zeros((b, h, q))], dim=-1)
            self.scores = self.policy.accumulate(scores, per_kv.sum(dim=1))

        k = self.budget
        if k is None or n <= k:
            return
        priority = self.priority(probs)  # [B, G, n], G = 1 or H
        if self.trace:
            self.last_selection = (self.positions.clone(), priority.clone())
        if n - k == 1:
            drop = selection.evict_one(priority)  # [B, G]
            ar = torch.arange(k, device=priority.device)
            kept = ar + (ar >= drop[..., None]).long()  # every slot but `drop`, in order
        else:
            kept = selection.keep_top(priority, k)  # [B, G, k] ascending
        self._gather(kept.expand(b, h, k))

    def priority(self, probs: torch.Tensor) -> torch.Tensor:
        """The policy's masked keep priority of every slot, ``[B, G, n]``
        (``probs``: this step's ``[B, Hq, q, n]``; its last query is the newest)."""
        b, h, n, _ = self.keys.shape
        valid = self.valid
        last = probs[:, :, -1, :]
        newest = self.positions.masked_fill(~valid, -1).amax(dim=(1, 2))  # [B]
        view = Candidates(
            newest=newest,
            budget=torch.full((b,), self.budget, dtype=torch.long, device=valid.device),
            valid=valid if self.policy.per_kv_head else valid[:, :1],
            num_kv_heads=h,
            attention=lambda: selection.head_average(last)[:, None, :],
            attention_per_kv_head=lambda: selection.head_average(last, num_kv_heads=h),
            positions=self.positions,
            keys=self.keys,
            state=self.scores,
        )
        pri = self.policy.priority(view)
        if pri.dim() == 2:
            pri = pri[:, None, :]
        return selection.mask(pri, empty=~(valid if pri.shape[1] == h else valid[:, :1]))

    def _gather(self, kept: torch.Tensor) -> None:
        idx4 = kept[..., None]
        self.keys = self.keys.gather(2, idx4.expand(*kept.shape, self.keys.shape[-1]))
        self.values = self.values.gather(2, idx4.expand(*kept.shape, self.values.shape[-1]))
        self.positions = self.positions.gather(2, kept)
        self.valid = self.valid.gather(2, kept)
        if self.scores is not None:
            self.scores = self.scores.gather(2, kept)


class EvictionCache(Cache):
    """A transformers Cache that keeps at most ``settings.budget`` tokens per
    layer and sequence, evicting by ``settings.policy`` (``None``: keep
    everything).

    Use it with a model whose attention implementation is ``"tova_eager"``
    (`enable_reference_attention`); `generate` and plain forward both work::

        enable_reference_attention(model)
        cache = EvictionCache(KVSettings(TOVA(), budget=64), config=model.config)
        out = model.generate(**enc, past_key_values=cache, max_new_tokens=20, do_sample=False)
    """

    def __init__(
        self,
        settings: KVSettings | None,
        num_layers: int | None = None,
        *,
        config=None,
        trace: bool = False,
    ):
        if settings is not None and not isinstance(settings, KVSettings):
            raise TypeError(f"settings must be a KVSettings or None; got {type(settings).__name__}")
        if num_layers is None and config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        self.settings = settings
        if num_layers is None:
            super().__init__(layer_class_to_replicate=functools.partial(EvictionLayer, settings, trace))
        else:
            super().__init__(layers=[EvictionLayer(settings, trace) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model: nn.Module, settings: KVSettings | None) -> EvictionCache:
        return cls(settings, config=model.config)

    def _layer(self, layer_idx: int) -> EvictionLayer:
        if layer_idx >= len(self.layers) or not self.layers[layer_idx].is_initialized:
            raise IndexError(f"layer {layer_idx} holds nothing yet")
        return self.layers[layer_idx]

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """True positions of the tokens layer ``layer_idx`` keeps, in slot
        (= chronological) order: ``[batch, n]``, or ``[batch, kv_heads, n]`` for
        head-wise policies (h2o). Slots holding no token (padding not yet
        evicted, in rows shorter than the batch) read -1."""
        layer = self._layer(layer_idx)
        pos = layer.positions.masked_fill(~layer.valid, -1)
        return pos.clone() if layer.policy is not None and layer.policy.per_kv_head else pos[:, 0].clone()

    def kept_counts(self, layer_idx: int) -> torch.Tensor:
        """Number of real tokens layer ``layer_idx`` keeps: ``[batch]`` (``[batch,
        kv_heads]`` for head-wise policies)."""
        layer = self._layer(layer_idx)
        counts = layer.valid.sum(dim=-1)
        return counts if layer.policy is not None and layer.policy.per_kv_head else counts[:, 0]


# ----------------------------------------------------------------------- attention


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # Same ops as transformers' repeat_kv (expand + reshape).
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Boolean 'may attend' from an additive float mask or a boolean mask."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def reference_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """transformers' eager attention; with an `EvictionCache` layer's keys it
    attends over the kept tokens + the new ones and then lets the layer evict."""
    note = getattr(_pending, "note", None)
    layer = None
    if note is not None and note[1] is key:
        layer = note[0]
        _pending.note = None

    n_rep = query.shape[1] // key.shape[1]
    key_states = _repeat_kv(key, n_rep)
    value_states = _repeat_kv(value, n_rep)
    b, hq, q, _ = query.shape

    if layer is not None:
        n_old, q_new = layer._open_step
        if q_new != q:
            raise RuntimeError(f"EvictionCache: {q} queries for {q_new} new keys")
        dtype = query.dtype
        if attention_mask is None:  # no padding, plain causal block
            new_block = torch.ones((q, q), dtype=torch.bool, device=query.device).tril()
            new_block = new_block[None, None].expand(b, 1, q, q)
        else:
            if attention_mask.shape[-1] != q:
                raise RuntimeError(
                    "EvictionCache: expected the mask of the new tokens only (kv length "
                    f"{q}), got kv length {attention_mask.shape[-1]}; the attention mask must "
                    f"come from transformers' mask builder for {ATTN_IMPLEMENTATION!r}"
                )
            new_block = _allowed(attention_mask)
            new_block = new_block.expand(b, new_block.shape[1], q, q)
        new_valid = new_block[:, 0].diagonal(dim1=-2, dim2=-1)  # [B, q]: pads can't see themselves
        old_valid = layer.valid[:, :, :n_old]  # [B, H, n_old]
        old_allowed = old_valid.repeat_interleave(n_rep, dim=1)[:, :, None, :].expand(b, hq, q, n_old)
        allowed = torch.cat([old_allowed, new_block.expand(b, hq, q, q)], dim=-1)
        zero = torch.tensor(0.0, dtype=dtype, device=query.device)
        full_mask = torch.where(allowed, zero, torch.finfo(dtype).min)
    else:
        full_mask = attention_mask

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if full_mask is not None:
        attn_weights = attn_weights + full_mask
    probs32 = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32)
    attn_weights = probs32.to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()

    if layer is not None:
        layer.finish_step(probs32, new_valid, _new_positions(kwargs.get("position_ids"), layer, new_valid))
    return attn_output, attn_weights


def _new_positions(position_ids, layer: EvictionLayer, new_valid: torch.Tensor) -> torch.Tensor:
    """True positions of the new tokens: the ``position_ids`` RoPE used (2D, as
    `generate` and `LlamaModel` pass them), else the count of real tokens seen
    before each one."""
    b, q = new_valid.shape
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == q:
        return position_ids.to(new_valid.device).long().expand(b, q)
    return layer.real_seen[:, None] + new_valid.long().cumsum(dim=-1) - 1


def enable_reference_attention(model: nn.Module) -> nn.Module:
    """Register ``"tova_eager"`` (idempotent) and switch ``model`` to it.

    With any cache other than `EvictionCache` it is exactly eager attention."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, reference_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
    assert ATTN_IMPLEMENTATION in ALL_ATTENTION_FUNCTIONS
    assert ATTN_IMPLEMENTATION in ALL_MASK_ATTENTION_FUNCTIONS
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


# ------------------------------------------------------------------------ helpers


def _new_cache(model: nn.Module, settings: KVSettings | None) -> Cache:
    if settings is None:
        return DynamicCache(config=model.config)
    return EvictionCache(settings, config=model.config)


def prompt_pieces(prompt_len: int, settings: KVSettings | None) -> list[tuple[int, int]]:
    """The prompt forwards, ``(start, end)``, of a prompt mode (the engine
    processes prompts with the same boundaries)."""
    if settings is None or settings.prompt_mode == "bulk":
        return [(0, prompt_len)]
    if settings.prompt_mode == "chunked":
        c = settings.chunk
        return [(i, min(i + c, prompt_len)) for i in range(0, prompt_len, c)]
    first = min(prompt_len, settings.budget)  # stream: nothing is evicted before
    return [(0, first)] + [(i, i + 1) for i in range(first, prompt_len)]


def _batch_inputs(inputs, tokenizer, attention_mask, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` from the accepted forms."""
    if isinstance(inputs, str) or (
        isinstance(inputs, Sequence) and len(inputs) > 0 and isinstance(inputs[0], str)
    ):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        inputs = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    if hasattr(inputs, "keys") and "input_ids" in inputs:  # dict / BatchEncoding
        attention_mask = inputs.get("attention_mask", attention_mask)
        inputs = inputs["input_ids"]
    if isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs[None]
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError("only left padding is supported (attention_mask must be 0...0 1...1)")
        return ids.long(), mask.long()
    rows = [list(map(int, r)) for r in inputs]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    inputs,
    settings: KVSettings | None,
    max_new_tokens: int,
    *,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
) -> list[list[int]]:
    """Greedy decoding of ``max_new_tokens`` tokens per prompt (EOS does not
    stop it, like vLLM's ``ignore_eos``) with the reference eviction
    ``settings`` (``None``: the full cache, i.e. plain eager attention). The
    prompt is processed in ``settings.prompt_mode`` (`prompt_pieces`;
    ``chunked`` and ``stream`` take unpadded prompts: one at a time, or of one
    length).

    ``inputs``: a list of token-id lists (ragged: left-padded here), a
    ``[batch, len]`` LongTensor (with ``attention_mask`` for left padding), a
    dict/BatchEncoding with ``input_ids`` (and ``attention_mask``), or text(s)
    with ``tokenizer``. Same steps as `generate` for bulk prompts: one prompt
    forward, then one token per forward, positions ``cumsum(attention_mask) -
    1``. Switches ``model`` to ``"tova_eager"`` (eager-identical for any other
    cache). Pass ``cache`` (an empty `EvictionCache` for ``settings``) to
    inspect it afterwards. Returns the new token ids per prompt.
    """
    enable_reference_attention(model)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    ids, mask = _batch_inputs(inputs, tokenizer, attention_mask, pad)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    if cache is None:
        cache = _new_cache(model, settings)
    elif isinstance(cache, EvictionCache) and cache.settings != settings:
        raise ValueError(f"cache settings {cache.settings} differ from {settings}")
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    pieces = prompt_pieces(ids.shape[1], settings)
    if len(pieces) > 1 and not bool(mask.all()):
        raise ValueError(f"prompt mode {settings.prompt_mode!r} takes unpadded prompts (one at a time)")
    for a, b in pieces:
        out = model(
            input_ids=ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
    new_tokens = []
    for step in range(max_new_tokens):
        tok = out.logits[:, -1].argmax(dim=-1)
        new_tokens.append(tok)
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        pos = pos[:, -1:] + 1
        out = model(
            input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
    if not new_tokens:
        return [[] for _ in range(ids.shape[0])]
    return torch.stack(new_tokens, dim=1).tolist()


@torch.no_grad()
def score_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    settings: KVSettings | None,
    *,
    prompt_len: int = 0,
    cache: Cache | None = None,
) -> torch.Tensor:
    """Per-token negative log-likelihood of ``input_ids`` (``[len]`` or
    ``[batch, len]``, no padding) with eviction active while scoring.

    The first ``prompt_len`` tokens go in as one prompt forward (one bulk
    selection if longer than the budget); every later token is fed alone and
    evicts as a decode step does, so each one is predicted from the compressed
    cache. Tokens are fed in one chunk as long as the layers cannot yet exceed
    the budget (no eviction can happen there, so it is the same computation,
    only faster; with ``settings=None`` the whole text is one forward).

    Returns float32 NLLs of the tokens ``start .. len-1`` with
    ``start = max(prompt_len, 1)`` (``[len - start]`` or ``[batch, len -
    start]``). Switches ``model`` to ``"tova_eager"``.
    """
    enable_reference_attention(model)
    squeeze = input_ids.dim() == 1
    ids = (input_ids[None] if squeeze else input_ids).long().to(next(model.parameters()).device)
    t = ids.shape[1]
    start = max(int(prompt_len), 1)
    if t <= start:
        raise ValueError(f"need more than {start} tokens to score; got {t}")
    if cache is None:
        cache = _new_cache(model, settings)
    if cache.get_seq_length() != 0:
        raise ValueError("score_nll needs an empty cache")
    budget = t if settings is None else settings.budget
    chunk = min(max(int(prompt_len), budget), t)  # the prompt, or all tokens before any eviction
    out = model(input_ids=ids[:, :chunk], past_key_values=cache, use_cache=True)
    logits = [out.logits[:, start - 1 : chunk].float()]
    for i in range(chunk, t - 1):  # token i predicts token i + 1
        out = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[:, -1:].float())
    logits = torch.cat(logits, dim=1)[:, : t - start]  # [B, t - start, V]: predicts tokens start..t-1
    nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, start:].reshape(-1), reduction="none"
    ).view(ids.shape[0], t - start)
    return nll[0] if squeeze else nll


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL)."""
    return math.exp(float(nll.float().mean()))
