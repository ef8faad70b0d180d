"""The policy settings: where they come from and how they are validated.

Every way in (``LLM(kv_policy=...)``, ``vllm serve --kv-policy``,
``--additional-config``) ends up as keys of vLLM's ``additional_config`` dict,
which travels inside ``VllmConfig`` to the engine core and every worker. This
module turns that dict into a validated `PolicyConfig` (or None: stock vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tova_vllm.policies import (
    DEFAULT_H2O_RECENT_RATIO,
    DEFAULT_NUM_SINKS,
    POLICIES,
    PolicyConfig,
)

# Policies the vLLM engine runs: TOVA and the paper's baselines.
ENGINE_POLICIES: tuple[str, ...] = POLICIES

# additional_config keys, which are also the LLM(...) keyword arguments and, with
# dashes, the CLI flags.
KEY_POLICY = "kv_policy"
KEY_BUDGET = "kv_budget"
KEY_NUM_SINKS = "kv_num_sinks"
KEY_H2O_RECENT_RATIO = "kv_h2o_recent_ratio"
# Per request only (SamplingParams.extra_args / vllm_xargs): how the prompt is
# processed. "bulk": full causal attention over the prompt, then the policy
# keeps `budget` of it (fast prefill). "stream": every prompt token attends only
# to the cache kept so far and eviction runs after each one, as if the prompt
# were decoded -- the paper's perplexity setup (prompt_logprobs are then
# predictions from the compressed cache).
KEY_PROMPT_MODE = "kv_prompt_mode"
PROMPT_MODES: tuple[str, ...] = ("bulk", "stream")
POLICY_KEYS: tuple[str, ...] = (
    KEY_POLICY,
    KEY_BUDGET,
    KEY_NUM_SINKS,
    KEY_H2O_RECENT_RATIO,
)

# Help text for the CLI flags (also shown by `vllm serve --help`).
POLICY_ARG_HELP: dict[str, str] = {
    KEY_POLICY: (
        "KV-cache eviction policy that caps every sequence's KV cache at "
        f"--kv-budget tokens per layer. One of: {', '.join(ENGINE_POLICIES)}. "
        "'tova' drops the token with the lowest attention from the newest "
        "query (TOVA, arXiv 2401.06104); 'window' keeps the most recent tokens; "
        "'sink' keeps the first --kv-num-sinks tokens plus the most recent "
        "(StreamingLLM); 'h2o' keeps a recent window plus the heavy hitters by "
        "accumulated attention (H2O). Requests may pick another policy and a "
        "smaller budget (vllm_xargs). Unset: stock vLLM, nothing evicted."
    ),
    KEY_BUDGET: (
        "Tokens kept per layer per sequence when --kv-policy is set "
        "(a positive integer). Also the largest budget a request may ask for."
    ),
    KEY_NUM_SINKS: (
        "For --kv-policy sink: number of first tokens always kept "
        f"(default {DEFAULT_NUM_SINKS}, in [0, kv-budget - 1])."
    ),
    KEY_H2O_RECENT_RATIO: (
        "For --kv-policy h2o: share of the budget kept as a recent window, "
        f"the rest being heavy hitters (default {DEFAULT_H2O_RECENT_RATIO}, in (0, 1))."
    ),
}


class PolicyConfigError(ValueError):
    """Invalid eviction-policy settings; the message names the parameter."""


def _as_int(name: str, value: Any) -> int:
    """Integers, or strings of integers (JSON/CLI); never bools or floats."""
    if isinstance(value, bool):
        raise PolicyConfigError(f"{name} must be a positive integer; got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise PolicyConfigError(f"{name} must be a positive integer; got {value!r}")


def policy_from_settings(settings: dict[str, Any] | None) -> PolicyConfig | None:
    """Validated policy from ``additional_config``-style settings, or None.

    Raises `PolicyConfigError` naming the parameter and its allowed values.
    """
    settings = settings or {}
    name = settings.get(KEY_POLICY)
    budget = settings.get(KEY_BUDGET)
    extras = [k for k in (KEY_NUM_SINKS, KEY_H2O_RECENT_RATIO) if settings.get(k) is not None]
    if name is None or name == "none":
        if budget is not None:
            raise PolicyConfigError(
                f"kv_budget={budget!r} was given without kv_policy; set kv_policy to "
                f"one of {', '.join(ENGINE_POLICIES)} (or drop kv_budget)"
            )
        if extras:
            raise PolicyConfigError(
                f"{extras[0]} was given without kv_policy; set kv_policy to one of "
                f"{', '.join(ENGINE_POLICIES)}"
            )
        return None
    if not isinstance(name, str) or name.lower() not in ENGINE_POLICIES:
        raise PolicyConfigError(
            f"kv_policy must be one of {', '.join(ENGINE_POLICIES)}; got {name!r}"
        )
    name = name.lower()
    if budget is None:
        raise PolicyConfigError(
            f"kv_policy={name!r} needs kv_budget, a positive integer (tokens kept "
            "per layer per sequence)"
        )
    kwargs: dict[str, Any] = {"name": name, "budget": _as_int("kv_budget", budget)}
    if settings.get(KEY_NUM_SINKS) is not None:
        if name != "sink":
            raise PolicyConfigError(f"kv_num_sinks applies to kv_policy='sink' only; got kv_policy={name!r}")
        kwargs["num_sinks"] = _as_int("kv_num_sinks", settings[KEY_NUM_SINKS])
    if settings.get(KEY_H2O_RECENT_RATIO) is not None:
        if name != "h2o":
            raise PolicyConfigError(
                f"kv_h2o_recent_ratio applies to kv_policy='h2o' only; got kv_policy={name!r}"
            )
        ratio = settings[KEY_H2O_RECENT_RATIO]
        if isinstance(ratio, str):
            try:
                ratio = float(ratio)
            except ValueError:
                pass
        kwargs["h2o_recent_ratio"] = ratio
    try:
        return PolicyConfig(**kwargs)
    except ValueError as e:
        raise PolicyConfigError(str(e)) from None


def policy_from_vllm_config(vllm_config: Any) -> PolicyConfig | None:
    """The policy of a ``VllmConfig`` (None when no policy is set)."""
    additional = getattr(vllm_config, "additional_config", None)
    return policy_from_settings(additional if isinstance(additional, dict) else None)


def merge_policy_settings(
    additional_config: dict[str, Any] | None, **settings: Any
) -> dict[str, Any]:
    """``additional_config`` with the given policy settings (those not None)
    folded in; a setting given both ways must agree."""
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

REQUEST_KEYS: tuple[str, ...] = (*POLICY_KEYS, KEY_PROMPT_MODE)


@dataclass(frozen=True)
class RequestPolicy:
    """What one request runs with: the engine's policy unless the request's
    ``extra_args`` (``vllm_xargs`` in the OpenAI API) override it."""

    policy: PolicyConfig
    stream_prompt: bool = False


_default_request_policies: dict[PolicyConfig, RequestPolicy] = {}


def _request_error(key: str, message: str) -> PolicyConfigError:
    return PolicyConfigError(f"vllm_xargs.{key} {message}")


def request_policy(engine: PolicyConfig | None, extra_args: dict[str, Any] | None) -> RequestPolicy | None:
    """The policy one request runs with, or None (stock engine, no policy).

    A request may choose any policy of `ENGINE_POLICIES`, a budget in
    ``[1, engine budget]`` (the engine's blocks per request are sized for its
    budget), the policy options, and ``kv_prompt_mode``. Raises
    `PolicyConfigError` naming the field and its allowed values.
    """
    given = {k: v for k, v in (extra_args or {}).items() if k in REQUEST_KEYS and v is not None}
    if engine is None:
        if given:
            key = next(iter(given))
            raise _request_error(
                key,
                "needs a server started with a KV eviction policy (--kv-policy / "
                "kv_policy=...); this engine runs without one",
            )
        return None
    if not given:
        default = _default_request_policies.get(engine)
        if default is None:
            default = _default_request_policies.setdefault(engine, RequestPolicy(engine))
        return default
    name = given.get(KEY_POLICY, engine.name)
    if not isinstance(name, str) or name.lower() not in ENGINE_POLICIES:
        raise _request_error(KEY_POLICY, f"must be one of {', '.join(ENGINE_POLICIES)}; got {name!r}")
    name = name.lower()
    budget = given.get(KEY_BUDGET, engine.budget)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= engine.budget:
        raise _request_error(
            KEY_BUDGET,
            f"must be an integer in [1, {engine.budget}] (the server's kv_budget); got {budget!r}",
        )
    kwargs: dict[str, Any] = {"name": name, "budget": budget}
    if KEY_NUM_SINKS in given:
        if name != "sink":
            raise _request_error(KEY_NUM_SINKS, f"applies to kv_policy='sink' only; the request runs {name!r}")
        sinks = given[KEY_NUM_SINKS]
        if isinstance(sinks, bool) or not isinstance(sinks, int) or not 0 <= sinks < budget:
            raise _request_error(KEY_NUM_SINKS, f"must be an integer in [0, {budget - 1}]; got {sinks!r}")
        kwargs["num_sinks"] = sinks
    elif name == engine.name:
        kwargs["num_sinks"] = min(engine.num_sinks, budget - 1)
    elif name == "sink":
        kwargs["num_sinks"] = min(DEFAULT_NUM_SINKS, budget - 1)
    if KEY_H2O_RECENT_RATIO in given:
        if name != "h2o":
            raise _request_error(
                KEY_H2O_RECENT_RATIO, f"applies to kv_policy='h2o' only; the request runs {name!r}"
            )
        ratio = given[KEY_H2O_RECENT_RATIO]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise _request_error(KEY_H2O_RECENT_RATIO, f"must be a number in (0, 1); got {ratio!r}")
        kwargs["h2o_recent_ratio"] = float(ratio)
    elif name == engine.name:
        kwargs["h2o_recent_ratio"] = engine.h2o_recent_ratio
    mode = given.get(KEY_PROMPT_MODE, "bulk")
    if mode not in PROMPT_MODES:
        raise _request_error(KEY_PROMPT_MODE, f"must be one of {', '.join(PROMPT_MODES)}; got {mode!r}")
    try:
        policy = PolicyConfig(**kwargs)
    except ValueError as e:  # pragma: no cover (each field is checked above)
        raise PolicyConfigError(f"vllm_xargs: {e}") from None
    return RequestPolicy(policy, stream_prompt=mode == "stream")
