"""The policy settings: where they come from and how they are validated.

Every way in (``LLM(kv_policy=...)``, ``vllm serve --kv-policy``,
``--additional-config``) ends up as keys of vLLM's ``additional_config`` dict,
which travels inside ``VllmConfig`` to the engine core and every worker. This
module turns that dict into a validated `PolicyConfig` (or None: stock vLLM).
"""

from __future__ import annotations

from typing import Any

from tova_vllm.policies import (
    DEFAULT_H2O_RECENT_RATIO,
    DEFAULT_NUM_SINKS,
    PolicyConfig,
)

# Policies the vLLM engine runs today (the reference, `tova_vllm.reference`,
# also has window, sink and h2o: the paper's baselines).
ENGINE_POLICIES: tuple[str, ...] = ("tova",)

# additional_config keys, which are also the LLM(...) keyword arguments and, with
# dashes, the CLI flags.
KEY_POLICY = "kv_policy"
KEY_BUDGET = "kv_budget"
KEY_NUM_SINKS = "kv_num_sinks"
KEY_H2O_RECENT_RATIO = "kv_h2o_recent_ratio"
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
        "query (TOVA, arXiv 2401.06104). Unset: stock vLLM, nothing evicted."
    ),
    KEY_BUDGET: (
        "Tokens kept per layer per sequence when --kv-policy is set "
        "(a positive integer)."
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
