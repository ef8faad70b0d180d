"""The KV settings: where they come from and how they are validated.

Every way in (``LLM(kv_policy=...)``, ``vllm serve --kv-policy``,
``--additional-config``) ends up as keys of vLLM's ``additional_config`` dict,
which travels inside ``VllmConfig`` to the engine core and every worker; a
request may override them in ``SamplingParams.extra_args`` (``vllm_xargs`` in
the OpenAI API). This module turns either into a validated `KVSettings` (or
None: stock vLLM). The keys, their help texts and their checks all derive
from the policy registry (`tova_vllm.policies`): a registered policy's options
are settings like the built-in ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tova_vllm.policies import (
    EvictionPolicy,
    Option,
    PolicyOptionError,
    option_keys,
    policy_class,
    policy_classes,
    policy_names,
)
from tova_vllm.policies.registry import GENERAL_KEYS, KEY_BUDGET, KEY_POLICY, KEY_PROMPT_CHUNK, KEY_PROMPT_MODE

# How a prompt is processed. "bulk": full causal attention over the prompt,
# then the policy keeps `budget` of it (the paper's; fast prefill). "chunked":
# the prompt in chunks of kv_prompt_chunk tokens, the cache reduced to the
# budget after each (bounded memory for long prompts). "stream": every prompt
# token attends only to the cache kept so far, evicting as a decode step does
# (the paper's perplexity setup; prompt_logprobs are then predictions from the
# compressed cache).
PROMPT_MODES: tuple[str, ...] = ("bulk", "chunked", "stream")


class PolicyConfigError(PolicyOptionError):
    """Invalid KV settings; the message names the setting and the allowed values."""


@dataclass(frozen=True)
class KVSettings:
    """What the engine, or one request, runs with."""

    policy: EvictionPolicy
    budget: int
    prompt_mode: str = "bulk"
    # chunked prompts: tokens per chunk (None: the budget).
    prompt_chunk: int | None = None

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def chunk(self) -> int:
        """Prompt tokens between two reductions in ``chunked`` mode."""
        return self.prompt_chunk or self.budget

    def to_dict(self) -> dict[str, Any]:
        d = {KEY_POLICY: self.name, KEY_BUDGET: self.budget, KEY_PROMPT_MODE: self.prompt_mode}
        if self.prompt_chunk is not None:
            d[KEY_PROMPT_CHUNK] = self.prompt_chunk
        d.update(self.policy.settings())
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KVSettings:
        settings = engine_settings(json.loads(text))
        assert settings is not None
        return settings

    def describe(self) -> str:
        """E.g. "'sink' (kv_num_sinks=4) with a budget of 64 tokens per layer per
        sequence, bulk prompts"."""
        opts = ", ".join(f"{k}={v}" for k, v in self.policy.settings().items())
        mode = self.prompt_mode + (f" ({self.chunk}-token chunks)" if self.prompt_mode == "chunked" else "")
        return f"{self.name!r}{f' ({opts})' if opts else ''} with a budget of {self.budget} tokens per layer per sequence, {mode} prompts"


# ------------------------------------------------------------ the settings


def settings_keys() -> tuple[str, ...]:
    """Every ``kv_*`` setting: the general ones, then each policy's options."""
    return (*GENERAL_KEYS, *option_keys())


def _names() -> str:
    return ", ".join(policy_names())


def _help_general() -> dict[str, str]:
    return {
        KEY_POLICY: (
            "KV-cache eviction policy that caps every sequence's KV cache at "
            f"--kv-budget tokens per layer. One of: {_names()}. "
            + " ".join(f"'{c.name}': {c.describe()[0].lower() + c.describe()[1:]}" for c in policy_classes())
            + " Requests may pick another policy and a smaller budget (vllm_xargs). "
            "Unset: stock vLLM, nothing evicted."
        ),
        KEY_BUDGET: (
            "Tokens kept per layer per sequence when --kv-policy is set "
            "(a positive integer). Also the largest budget a request may ask for."
        ),
        KEY_PROMPT_MODE: (
            f"How prompts are processed, one of: {', '.join(PROMPT_MODES)}. 'bulk' (default): "
            "full attention over the prompt, then the policy keeps kv-budget tokens. "
            "'chunked': the prompt in chunks of --kv-prompt-chunk tokens, the cache reduced "
            "to the budget after each, so a request never holds more than budget + one chunk. "
            "'stream': every prompt token attends only to the kept cache, as in decoding."
        ),
        KEY_PROMPT_CHUNK: (
            "For --kv-prompt-mode chunked: prompt tokens between two reductions "
            "(a positive integer; default: the budget)."
        ),
    }


def setting_help(key: str) -> str:
    """The help text of a setting (the CLI flag's help)."""
    general = _help_general()
    if key in general:
        return general[key]
    name = option_keys()[key]
    opt = _option(key)
    return f"For --kv-policy {name}: {opt.help} (default {opt.default}, {opt.allowed()})."


def _option(key: str) -> Option:
    cls = policy_class(option_keys()[key])
    return next(o for o in cls.options() if o.key == key)


def cli_settings() -> list[tuple[str, str, type, str]]:
    """``(flag, dest, type, help)`` of every setting, for argparse."""
    out = []
    for key in settings_keys():
        typ: type = str
        if key in (KEY_BUDGET, KEY_PROMPT_CHUNK):
            typ = int
        elif key in option_keys():
            typ = _option(key).type
        out.append(("--" + key.replace("_", "-"), key, typ, setting_help(key)))
    return out


def settings_table() -> str:
    """The README's settings table (a test checks the README holds it)."""
    rows = [
        "| `LLM(...)` keyword / `additional_config` / `vllm_xargs` key | CLI flag | meaning |",
        "|---|---|---|",
        f"| `{KEY_POLICY}` | `--kv-policy` | one of {', '.join(f'`{n}`' for n in policy_names())}; unset = stock vLLM |",
        f"| `{KEY_BUDGET}` | `--kv-budget` | tokens kept per layer per sequence (positive integer); "
        "a request may ask for any budget up to the engine's |",
        f"| `{KEY_PROMPT_MODE}` | `--kv-prompt-mode` | {', '.join(f'`{m}`' for m in PROMPT_MODES)} "
        "(default `bulk`): how prompts are processed |",
        f"| `{KEY_PROMPT_CHUNK}` | `--kv-prompt-chunk` | `chunked` prompts: tokens between two reductions "
        "(default: the budget) |",
    ]
    for cls in policy_classes():
        for opt in cls.options():
            rows.append(
                f"| `{opt.key}` | `{opt.flag}` | `{cls.name}` only: {opt.help} (default {opt.default}, "
                f"{opt.allowed()}) |"
            )
    return "\n".join(rows)


def policies_table() -> str:
    """The README's table of policies and their capabilities."""
    rows = [
        "| policy | what it keeps | token set | reads | prefix cache |",
        "|---|---|---|---|---|",
    ]
    for cls in policy_classes():
        reads = [
            what
            for flag, what in (
                (cls.reads_attention, "newest query's attention"),
                (cls.accumulates, "attention of every query"),
                (cls.reads_positions, "positions"),
                (cls.reads_keys, "keys"),
            )
            if flag
        ]
        rows.append(
            f"| `{cls.name}` | {cls.describe()} | {'per KV head' if cls.per_kv_head else 'per layer'} | "
            f"{', '.join(reads) or '-'} | {'exact' if cls.prefix_cacheable else 'not read'} |"
        )
    return "\n".join(rows)


# ------------------------------------------------------------- validation


def _int_setting(key: str, value: Any, lo: int, hi: int | None, *, where: str, strict: bool) -> int:
    allowed = f"an integer in [{lo}, {hi}]" if hi is not None else "a positive integer"
    bad = PolicyConfigError(f"{where}{key} must be {allowed}; got {value!r}")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str) and not strict and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise bad
    return value


def _unknown_keys(settings: dict[str, Any], *, where: str) -> None:
    known = set(settings_keys())
    unknown = sorted(k for k in settings if isinstance(k, str) and k.startswith("kv_") and k not in known)
    if unknown:
        raise PolicyConfigError(
            f"{where}{unknown[0]} is not a KV setting; allowed keys: {', '.join(settings_keys())}"
        )


def _build(
    name: Any,
    budget: int,
    given: dict[str, Any],
    inherit: EvictionPolicy | None,
    *,
    where: str,
    strict: bool,
) -> EvictionPolicy:
    """The policy ``name`` with the options in ``given`` (others inherited
    from ``inherit`` when it is the same policy, else defaults), all fitted
    to ``budget``."""
    if not isinstance(name, str) or name.lower() not in policy_names():
        raise PolicyConfigError(f"{where}{KEY_POLICY} must be one of {_names()}; got {name!r}")
    cls = policy_class(name.lower())
    own = {o.key for o in cls.options()}
    for key in given:
        if key in option_keys() and key not in own:
            raise PolicyConfigError(
                f"{where}{key} applies to {KEY_POLICY}={option_keys()[key]!r} only; "
                f"{'the request runs ' if where else 'got ' + KEY_POLICY + '='}{cls.name!r}"
            )
    kwargs = {}
    try:
        for opt in cls.options():
            if opt.key in given:
                value = given[opt.key]
                if strict and isinstance(value, str):
                    raise PolicyOptionError(f"{where}{opt.key} must be {opt.allowed(budget)}; got {value!r}")
                kwargs[opt.field] = opt.parse(value, budget, where=where)
            else:
                base = getattr(inherit, opt.field) if isinstance(inherit, cls) else opt.default
                kwargs[opt.field] = opt.fit(base, budget)
        policy = cls(**kwargs)
        policy.check(budget)
    except PolicyConfigError:
        raise
    except PolicyOptionError as e:
        raise PolicyConfigError(f"{where}{e}" if where and not str(e).startswith(where) else str(e)) from None
    return policy


def engine_settings(settings: dict[str, Any] | None) -> KVSettings | None:
    """Validated engine settings from ``additional_config``-style settings,
    or None (no policy: stock vLLM).

    Raises `PolicyConfigError` naming the setting and its allowed values.
    """
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    _unknown_keys(settings, where="")
    name = settings.get(KEY_POLICY)
    if name is None or name == "none":
        extras = [k for k in settings_keys() if k in settings and k != KEY_POLICY]
        if extras:
            raise PolicyConfigError(
                f"{extras[0]}={settings[extras[0]]!r} was given without {KEY_POLICY}; set "
                f"{KEY_POLICY} to one of {_names()} (or drop {extras[0]})"
            )
        return None
    if KEY_BUDGET not in settings:
        raise PolicyConfigError(
            f"{KEY_POLICY}={name!r} needs {KEY_BUDGET}, a positive integer (tokens kept per "
            "layer per sequence)"
        )
    budget = _int_setting(KEY_BUDGET, settings[KEY_BUDGET], 1, None, where="", strict=False)
    policy = _build(name, budget, settings, None, where="", strict=False)
    mode = settings.get(KEY_PROMPT_MODE, "bulk")
    if mode not in PROMPT_MODES:
        raise PolicyConfigError(f"{KEY_PROMPT_MODE} must be one of {', '.join(PROMPT_MODES)}; got {mode!r}")
    chunk = settings.get(KEY_PROMPT_CHUNK)
    if chunk is not None:
        chunk = _int_setting(KEY_PROMPT_CHUNK, chunk, 1, None, where="", strict=False)
        _chunk_needs_chunked(mode, where="")
    return KVSettings(policy, budget, mode, chunk)


def _chunk_needs_chunked(mode: str, *, where: str) -> None:
    if mode != "chunked":
        raise PolicyConfigError(
            f"{where}{KEY_PROMPT_CHUNK} applies to {KEY_PROMPT_MODE}='chunked' only; got {KEY_PROMPT_MODE}={mode!r}"
        )


def engine_settings_of(vllm_config: Any) -> KVSettings | None:
    """The settings of a ``VllmConfig`` (None when no policy is set)."""
    additional = getattr(vllm_config, "additional_config", None)
    return engine_settings(additional if isinstance(additional, dict) else None)


def merge_settings(additional_config: dict[str, Any] | None, **settings: Any) -> dict[str, Any]:
    """``additional_config`` with the given settings (those not None) folded
    in; a setting given both ways must agree."""
    merged = dict(additional_config or {})
    for key, value in settings.items():
        if value is None:
            continue
        if key in merged and merged[key] != value:
            raise PolicyConfigError(
                f"{key} is given twice with different values: {value!r} and "
                f"additional_config[{key!r}]={merged[key]!r}"
            )
        merged[key] = value
    return merged


# --------------------------------------------------------------- per request

REQUEST_PREFIX = "vllm_xargs."


def request_settings(engine: KVSettings | None, extra_args: dict[str, Any] | None) -> KVSettings | None:
    """The settings one request runs with, or None (stock engine).

    A request may choose any registered policy, a budget in ``[1, engine
    budget]`` (the engine's blocks per request are sized for its budget), the
    policy's options (unspecified ones are the engine's when it names the
    engine's policy, else the defaults), the prompt mode and chunk. Unknown
    ``kv_*`` keys and booleans for numbers are refused. Raises
    `PolicyConfigError` naming the field and its allowed values.
    """
    where = REQUEST_PREFIX
    given = {k: v for k, v in (extra_args or {}).items() if isinstance(k, str) and k.startswith("kv_")}
    if engine is None:
        if given:
            key = next(iter(given))
            raise PolicyConfigError(
                f"{where}{key} needs a server started with a KV eviction policy (--kv-policy / "
                "kv_policy=...); this engine runs without one"
            )
        return None
    if not given:
        return engine
    _unknown_keys(given, where=where)
    name = given.get(KEY_POLICY, engine.name)
    budget = engine.budget
    if KEY_BUDGET in given:
        budget = _int_setting(KEY_BUDGET, given[KEY_BUDGET], 1, engine.budget, where=where, strict=True)
    policy = _build(name, budget, given, engine.policy, where=where, strict=True)
    mode = given.get(KEY_PROMPT_MODE, engine.prompt_mode)
    if mode not in PROMPT_MODES:
        raise PolicyConfigError(f"{where}{KEY_PROMPT_MODE} must be one of {', '.join(PROMPT_MODES)}; got {mode!r}")
    # The engine's chunk applies when the request runs chunked prompts too.
    chunk = engine.prompt_chunk if mode == "chunked" else None
    if KEY_PROMPT_CHUNK in given:
        chunk = _int_setting(KEY_PROMPT_CHUNK, given[KEY_PROMPT_CHUNK], 1, None, where=where, strict=True)
        _chunk_needs_chunked(mode, where=where)
    settings = KVSettings(policy, budget, mode, chunk)
    return engine if settings == engine else settings
