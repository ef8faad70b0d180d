"""What an eviction policy is: a small frozen dataclass that says how to score.

A policy declares its name, its options (`option`: key, type, default,
allowed range, help text) and its capabilities (class variables, below), and
implements one function, `EvictionPolicy.priority`: a keep priority per
candidate slot (higher = kept longer) over a `Candidates` view. A policy that
keeps a per-slot state across steps (H2O's accumulated attention) also
implements `EvictionPolicy.accumulate`. Everything else -- which slot goes,
ties, masks, the budget, paging, tensor parallelism -- is the engine's
(`tova_vllm.policies.selection`), so the same policy object runs in the vLLM
backend and in the transformers reference.

A new policy is one file::

    @register_policy
    @dataclass(frozen=True)
    class KNorm(EvictionPolicy):
        '''Keeps the keys with the lowest L2 norm (kvpress' KnormPress).'''

        name: ClassVar[str] = "knorm"
        per_kv_head: ClassVar[bool] = True
        reads_keys: ClassVar[bool] = True

        def priority(self, view):
            return -view.keys.float().norm(dim=-1)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


class PolicyOptionError(ValueError):
    """An invalid policy setting; the message names the setting and the
    allowed values."""


# --------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One setting of a policy: its config key (``kv_*``: the ``LLM(...)``
    keyword, the ``additional_config`` / ``vllm_xargs`` key and, with dashes,
    the CLI flag), type, default, allowed range and help text."""

    key: str
    field: str
    type: type
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    below_budget: bool = False  # an integer that must stay < the budget

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def allowed(self, budget: int | None = None) -> str:
        """The allowed values, in words (for errors and help texts)."""
        kind = {int: "an integer", float: "a number"}.get(self.type, self.type.__name__)
        hi: Any = self.max
        hi_open = self.max_open
        if self.below_budget:
            hi, hi_open = ("kv_budget - 1" if budget is None else budget - 1), False
        if self.min is None and hi is None:
            return kind
        lo = "-inf" if self.min is None else _num(self.min)
        hi_text = "inf" if hi is None else (hi if isinstance(hi, str) else _num(hi))
        left = "(" if self.min_open or self.min is None else "["
        right = ")" if hi_open or hi is None else "]"
        return f"{kind} in {left}{lo}, {hi_text}{right}"

    def parse(self, value: Any, budget: int | None = None, *, where: str = "") -> Any:
        """``value`` checked (JSON/CLI strings of numbers accepted; never a
        bool); raises `PolicyOptionError` naming the key and the allowed values."""
        name = f"{where}{self.key}"
        bad = PolicyOptionError(f"{name} must be {self.allowed(budget)}; got {value!r}")
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str) and self.type in (int, float):
            try:
                value = self.type(value.strip())
            except ValueError:
                raise bad from None
        if self.type is int:
            if not isinstance(value, int):
                raise bad
        elif self.type is float:
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad
            value = float(value)
        elif not isinstance(value, self.type):
            raise bad
        if self.min is not None and (value < self.min or (self.min_open and value == self.min)):
            raise bad
        if self.max is not None and (value > self.max or (self.max_open and value == self.max)):
            raise bad
        if self.below_budget and budget is not None and value >= budget:
            raise bad
        return value

    def fit(self, value: Any, budget: int) -> Any:
        """An inherited or default value made to fit a (smaller) budget."""
        if self.below_budget:
            return min(value, budget - 1)
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def option(
    default: Any,
    *,
    help: str,
    key: str | None = None,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    below_budget: bool = False,
) -> Any:
    """A policy option as a dataclass field. ``key`` defaults to
    ``kv_<policy name>_<field name>``."""
    spec = dict(
        key=key, help=help, min=min, max=max, min_open=min_open, max_open=max_open, below_budget=below_budget
    )
    return dataclasses.field(default=default, metadata={"tova_option": spec})


# ------------------------------------------------------------------ the view


class Candidates:
    """The slots one selection chooses among, for ``R`` rows at once (rows
    are sequences; in the engine, the requests of one policy in one step).

    Each row has ``n`` candidate columns; the engine and the reference fill
    only what the policy's capabilities ask for and mask the columns that are
    not real slots afterwards (`tova_vllm.policies.selection`). Shapes:

    * ``attention``: ``[R, 1, n]``, the newest query's attention averaged over
      all query heads of the layer (with tensor parallelism: over every rank's
      heads) -- ``reads_attention``;
    * ``attention_per_kv_head``: ``[R, Hkv, n]``, averaged within each KV head's
      query group -- ``reads_attention``;
    * ``positions``: ``[R, Hkv, n]`` int64 true positions -- ``reads_positions``;
    * ``keys``: ``[R, Hkv, n, D]`` keys (after RoPE) -- ``reads_keys``;
    * ``state``: ``[R, Hkv, n]`` float32, the accumulated state, this step's
      attention already added -- ``accumulates``;
    * ``valid``: ``[R, 1, n]`` bool, the columns that are real slots (the
      others hold arbitrary finite values and are masked after `priority`;
      a reduction over columns, such as a mean key, must use this);
    * ``newest``: ``[R]`` the newest token's position; ``budget``: ``[R]`` the
      rows' budgets (int64).
    """

    def __init__(
        self,
        *,
        newest: torch.Tensor,
        budget: torch.Tensor,
        valid: torch.Tensor,
        num_kv_heads: int,
        attention: Callable[[], torch.Tensor] | torch.Tensor | None = None,
        attention_per_kv_head: Callable[[], torch.Tensor] | torch.Tensor | None = None,
        positions: Callable[[], torch.Tensor] | torch.Tensor | None = None,
        keys: Callable[[], torch.Tensor] | torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> None:
        self.newest = newest
        self.budget = budget
        self.valid = valid
        self.num_kv_heads = num_kv_heads
        self._sources = {
            "attention": attention,
            "attention_per_kv_head": attention_per_kv_head,
            "positions": positions,
            "keys": keys,
        }
        self.state = state

    def _get(self, name: str) -> torch.Tensor:
        source = self._sources[name]
        if source is None:
            raise AttributeError(
                f"Candidates.{name} is not available: the policy must declare the capability "
                f"that asks for it (reads_attention / reads_positions / reads_keys)"
            )
        if callable(source):
            source = self._sources[name] = source()
        return source

    attention = property(functools.partial(_get, name="attention"))
    attention_per_kv_head = property(functools.partial(_get, name="attention_per_kv_head"))
    positions = property(functools.partial(_get, name="positions"))
    keys = property(functools.partial(_get, name="keys"))


# ------------------------------------------------------------------- policies


@dataclass(frozen=True)
class EvictionPolicy:
    """Base class of an eviction policy (see the module docstring).

    Subclasses are frozen dataclasses whose fields are their options
    (`option`); instances are hashable and compare by value, so the engine
    groups requests that run the same policy with the same options.
    """

    #: The name users pass as ``kv_policy``.
    name: ClassVar[str]
    #: One line for help texts and the README's table (defaults to the first
    #: line of the class docstring).
    summary: ClassVar[str] = ""

    # Capabilities (what the engine must provide, and what it may assume).
    #: Each KV head keeps its own token set (else one set for the layer).
    per_kv_head: ClassVar[bool] = False
    #: `priority` reads the newest query's attention probabilities.
    reads_attention: ClassVar[bool] = False
    #: `priority` reads the slots' true positions.
    reads_positions: ClassVar[bool] = False
    #: `priority` reads the candidate keys (query-agnostic policies).
    reads_keys: ClassVar[bool] = False
    #: Keeps a per-slot state summed over every query (`accumulate`).
    accumulates: ClassVar[bool] = False
    #: The fused CUDA decode kernels implement this policy.
    cuda_fast_path: ClassVar[bool] = False
    #: The kept set of a prompt depends only on the prompt's keys/values and
    #: its last query, so a prefix-cache hit gives the same result as a cold
    #: prompt (not true when every prompt query counts, as in H2O).
    prefix_cacheable: ClassVar[bool] = True

    def priority(self, view: Candidates) -> torch.Tensor:
        """Keep priority per candidate: ``[R, G, n]`` with ``G = num_kv_heads``
        for `per_kv_head` policies, else 1 (a ``[R, n]`` result is read as G=1).
        Higher = kept longer; `selection.PROTECTED` = never evicted."""
        raise NotImplementedError

    def accumulate(self, state: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """For `accumulates` policies: the state after one step, from the
        state before it (0 for a new token) and ``attention`` ``[..., Hkv, n]``:
        this step's attention probabilities averaged within each KV head's query
        group and summed over the step's queries (float32)."""
        raise NotImplementedError

    def check(self, budget: int) -> None:
        """Raise `PolicyOptionError` when the options do not fit ``budget``
        (range checks of each option are done by the option itself)."""
        for opt in self.options():
            opt.parse(getattr(self, opt.field), budget)

    # -- derived from the declaration ---------------------------------------

    @classmethod
    def options(cls) -> tuple[Option, ...]:
        return _options_of(cls)

    @classmethod
    def describe(cls) -> str:
        if cls.summary:
            return cls.summary
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0].strip() if doc else cls.name

    @classmethod
    def needs_whole_query_groups(cls) -> bool:
        """Scores a KV head by its own query heads: a tensor-parallel rank must
        hold every query head of the KV heads it holds (no KV-head
        replication)."""
        return cls.per_kv_head and (cls.reads_attention or cls.accumulates)

    def settings(self) -> dict[str, Any]:
        """The options as ``{key: value}``."""
        return {opt.key: getattr(self, opt.field) for opt in self.options()}


@functools.cache
def _options_of(cls: type) -> tuple[Option, ...]:
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("tova_option")
        if spec is None:
            raise TypeError(
                f"{cls.__name__}.{f.name}: every field of an eviction policy must be an "
                "option (declare it with tova_vllm.policies.option(...))"
            )
        typ = hints.get(f.name)
        if typ not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: option type must be int, float or str; got {typ!r}")
        key = spec["key"] or f"kv_{cls.name}_{f.name}"
        if not key.startswith("kv_"):
            raise TypeError(f"{cls.__name__}.{f.name}: option keys start with 'kv_'; got {key!r}")
        out.append(Option(key=key, field=f.name, type=typ, default=f.default, **{k: v for k, v in spec.items() if k != "key"}))
    return tuple(out)
